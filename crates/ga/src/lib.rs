//! qvirt-ga: a qemu-ga 7.2 compatible guest agent (same wire bytes, same
//! CLI, same state files). Blocking like qemu-ga, its protocol loop on the
//! main thread alone: one client at a time, requests answered in order.
//! The only other threads are guest-exec's pipe readers and input writers
//! (one per captured stream, one per `input-data`).
//!
//! Entry point: [`run`] with the argv after the program name; `main.rs`
//! only maps its result to an exit status.
//!
//! - [`cli`]: options and the `[general]` key file, `-D`.
//! - [`channel`]: unix-listen, vsock-listen, virtio-serial, isa-serial.
//! - [`server`]: the read → parse → dispatch → write loop.
//! - [`signals`]: SIGTERM/SIGINT via a self-pipe.
//! - [`daemon`]: `-d` (fork, session, stdio) and the locked pidfile.
//! - [`agent`]: the command table, blocking/frozen rules, dispatch.
//! - [`args`] (+ [`ghash`]): QAPI-style argument checking.
//! - [`commands`]: the commands; [`state`]: the state directory.
//! - [`sys`]: the raw system calls, behind safe wrappers (the only
//!   `unsafe` code).
//!
//! The wire protocol itself (JSON dialect, writer, envelope) is
//! `qvirt-qga`.

pub mod agent;
pub mod args;
pub mod b64;
pub mod channel;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod ghash;
pub mod log;
pub mod server;
pub mod signals;
pub mod state;
pub mod sys;

use std::ffi::OsString;
use std::path::Path;

use agent::{Agent, AgentOptions, COMMANDS};
use channel::{ChannelError, Device, Method};
use cli::{Action, Config};

/// Version line printed by `-V`: qemu-ga's text and version, then ours.
pub fn version_line() -> String {
    format!(
        "QEMU Guest Agent {} (qvirt-ga {})",
        commands::basic::QGA_VERSION,
        env!("CARGO_PKG_VERSION")
    )
}

/// Fatal errors (exit status 1, as qemu-ga).
#[derive(Debug, thiserror::Error)]
pub enum GaError {
    /// Bad command line or config.
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    /// The channel could not be opened.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The state directory is unusable.
    #[error("failed to load persistent state")]
    State(#[source] std::io::Error),
    /// The signal handlers or their self-pipe could not be set up.
    #[error("failed to install signal handlers")]
    Signals(#[source] std::io::Error),
    /// Daemonizing failed.
    #[error("failed to daemonize")]
    Daemonize(#[source] std::io::Error),
    /// The pidfile could not be written or locked (another agent holds
    /// it); already logged in qemu-ga's words.
    #[error("pidfile")]
    Pidfile(#[source] std::io::Error),
    /// The main loop failed.
    #[error("channel failure")]
    Io(#[source] std::io::Error),
}

impl GaError {
    /// Whether the error was already written to the agent's log (every
    /// error after the log is set up); `main` prints the others.
    pub fn logged(&self) -> bool {
        !matches!(self, GaError::Cli(_))
    }
}

/// The error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

/// Prints to stdout, ignoring a closed pipe (`qvirt-ga -b help | head`).
fn print_out(text: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text);
    let _ = out.flush();
}

/// Runs the agent as the command line says (`args` as the OS gave them:
/// they need not be UTF-8).
pub fn run(args: &[OsString]) -> Result<(), GaError> {
    let config = match cli::parse(args, std::env::var_os("QGA_CONF"))? {
        Action::Version => {
            print_out(format!("{}\n", version_line()).as_bytes());
            return Ok(());
        }
        Action::Help => {
            print_out(cli::HELP.as_bytes());
            return Ok(());
        }
        Action::ListRpcs => {
            let names: String = COMMANDS.iter().map(|c| format!("{}\n", c.name)).collect();
            print_out(names.as_bytes());
            return Ok(());
        }
        Action::Dump(c) => {
            print_out(&c.dump());
            return Ok(());
        }
        Action::Run(c) => c,
    };
    serve(config)
}

/// `-b`/`-a` names as strings (bytes that are not UTF-8 replaced).
fn lossy_list(names: &[OsString]) -> Vec<String> {
    names
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

fn serve(config: Config) -> Result<(), GaError> {
    // Errors go to stderr until the log file is open, then there.
    log::init(None, config.verbose);
    let result = serve_logged(config);
    if let Err(err) = &result {
        match err {
            GaError::Channel(ChannelError::Open { path, source }) => {
                log::critical(&format!(
                    "error opening channel '{}': {}",
                    path.display(),
                    commands::strerror(source)
                ));
                log::critical("failed to create guest agent channel");
                log::critical("failed to initialize guest agent channel");
            }
            GaError::Channel(ChannelError::Bind { path, source }) => {
                log::critical(&format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    commands::strerror(source)
                ));
                log::critical("failed to create guest agent channel");
                log::critical("failed to initialize guest agent channel");
            }
            GaError::Channel(e @ ChannelError::BadMethod(_)) => {
                log::critical(&e.to_string());
                log::critical("failed to initialize guest agent channel");
            }
            GaError::Pidfile(_) => {}
            other => log::critical(&error_chain(other)),
        }
    }
    result
}

fn serve_logged(config: Config) -> Result<(), GaError> {
    // As qemu-ga: the path is checked first, the method when opening.
    let path = config.channel_path().ok_or(ChannelError::NoPath)?;
    let statedir = config.statedir.clone();
    // Started frozen (the marker of an agent that left while frozen): the
    // log file and the pidfile wait for the thaw, as in qemu-ga, since
    // creating a file on a frozen filesystem blocks.
    let marker = statedir.join("qga.state.isfrozen");
    let frozen = marker.exists();
    if frozen {
        log::warning_to_stderr(&format!(
            "previous instance appears to have exited with frozen filesystems. deferring logging/pidfile creation and disabling non-fsfreeze-safe commands until guest-fsfreeze-thaw is issued, or filesystems are manually unfrozen and the file {} is removed",
            marker.display()
        ));
    }
    let options = AgentOptions {
        statedir,
        // A name that is not UTF-8 matches no command either way.
        blocked: lossy_list(&config.block_rpcs),
        fsfreeze_hook: config.fsfreeze_hook.clone(),
        allowed: lossy_list(&config.allow_rpcs),
        deferred_logfile: config.logfile.clone().filter(|_| frozen),
        deferred_pidfile: (frozen && config.daemonize).then(|| config.pidfile.clone()),
    };
    signals::install().map_err(GaError::Signals)?;
    // As qemu-ga: daemonize (and lock the pidfile) before the channel opens.
    if config.daemonize {
        daemon::daemonize((!frozen).then_some(config.pidfile.as_path()))?;
    }
    // Then the log file is opened (created), before the channel.
    if let Some(l) = config.logfile.as_ref().filter(|_| !frozen) {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l)
        {
            Ok(file) => log::init(Some(file), config.verbose),
            Err(e) => {
                // qemu-ga gives up here, and exits 0 (checked).
                log::critical(&format!(
                    "unable to open specified log file: {}",
                    commands::strerror(&e)
                ));
                log::critical("error initializing guest agent");
                return Ok(());
            }
        }
    }
    let Some(method) = config.method() else {
        return Err(ChannelError::BadMethod(config.method.to_string_lossy().into_owned()).into());
    };
    enum Chan {
        Listener(channel::Listener),
        Device(Device),
    }
    let chan = match method {
        Method::UnixListen => Chan::Listener(channel::bind_unix(&path)?),
        Method::VirtioSerial => Chan::Device(Device::open(&path, false)?),
        Method::IsaSerial => Chan::Device(Device::open(&path, true)?),
        Method::VsockListen => Chan::Listener(channel::bind_vsock(&path.to_string_lossy())?),
    };
    let agent = Agent::new(options).map_err(GaError::State)?;
    let mut server = server::Server::new(agent);
    let result = match chan {
        Chan::Listener(l) => server.serve_listener(&l).map_err(GaError::Io),
        Chan::Device(mut d) => loop {
            match server.serve_conn(&mut d) {
                Ok(true) => continue,
                Ok(false) => break Ok(()),
                // qemu-ga stops its main loop on a channel error and exits
                // 0 after its cleanup (checked: a pty hung up under a
                // pending write).
                Err(e) if !config.retry_path => {
                    log::warning(&format!("channel failure: {}", commands::strerror(&e)));
                    break Ok(());
                }
                // -r: wait 5 s and reopen, until it works (or a stop).
                Err(_) => match reopen(&path, method == Method::IsaSerial) {
                    Some(dev) => d = dev,
                    None => break Ok(()),
                },
            }
        },
    };
    // Leaving while frozen (signals are ignored then, so only on a channel
    // failure): thaw, as qemu-ga's cleanup does.
    if server.agent.frozen {
        commands::fsfreeze::thaw_all();
        let _ = server.agent.unset_frozen();
    }
    result
}

/// Reopens a device every 5 s until it opens (`None` if a stop signal
/// arrives first), as qemu-ga's `-r`.
fn reopen(path: &Path, serial: bool) -> Option<Device> {
    loop {
        match signals::poll_fd(-1, 0, 5000) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return None,
            _ => {}
        }
        if let Ok(dev) = Device::open(path, serial) {
            return Some(dev);
        }
    }
}
