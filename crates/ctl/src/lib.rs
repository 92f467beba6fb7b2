//! qvirtctl: virsh for qvirt. It owns the command line (virsh's command
//! names and flags wherever virsh has them) and how results are printed;
//! every operation is a gRPC call to the gateway, never to a backend.
//!
//! Modules, one per command group: [`domain`] (list, dominfo, define,
//! lifecycle), [`events`] (event, qemu-monitor-event), [`qemu`] (raw QMP
//! and agent commands), [`guest`] (guestinfo, fsfreeze, guest-exec,
//! files), [`admin`] (guestvcpus, passwords, SSH keys), [`misc`]
//! (health, version, hooks, completion). Around them:
//! [`conn`] (the gateway connection and token), [`output`] (tables, JSON,
//! the spinner), [`error`] (the one-line error report), and [`docs`] (the
//! virsh → qvirtctl table in docs/LIBVIRT.md).
//!
//! Entry point: [`run`] with a parsed [`Cli`].

pub mod admin;
pub mod conn;
pub mod docs;
pub mod domain;
pub mod error;
pub mod events;
pub mod guest;
pub mod misc;
pub mod output;
pub mod qemu;

use clap::{Parser, Subcommand};

pub use error::CtlError;

/// The gateway `make run` starts, and where qvirtctl looks by default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:50051";

const LONG_ABOUT: &str = "\
qvirtctl manages qvirt domains (QEMU guests) through the qvirt gateway, with
virsh's command names and flags: `qvirtctl list --all`, `qvirtctl start demo`,
`qvirtctl qemu-monitor-command demo '{\"execute\": \"query-status\"}'`.

Connecting: --connect URL (or QVIRT_URL) names the gateway, http://HOST:PORT
or unix:PATH for its read-write or read-only unix socket (default
http://127.0.0.1:50051, the gateway `make run` starts). Over TCP every call
needs a bearer token: --token-file FILE (or QVIRT_TOKEN_FILE) reads it from a
file, or QVIRT_TOKEN holds it. On a unix socket the socket decides the role.

Output: virsh-like text by default; --json prints every result as JSON
(protobuf's JSON mapping with the proto field names, as in a YAML domain
file; events one object per line). Errors are one line on stderr,
`error: WHAT (CODE, REASON)`, with exit status 1 (2 for a usage error).";

const EXAMPLES: &str = "\
Examples:
  export QVIRT_TOKEN_FILE=.run/token-rw
  qvirtctl list --all
  qvirtctl define guest.yaml && qvirtctl start guest
  qvirtctl dominfo guest
  qvirtctl event --loop --timestamp
  qvirtctl qemu-monitor-event --domain guest --event '^(STOP|RESUME)$' --regex --loop
  qvirtctl qemu-monitor-command guest --pretty '{\"execute\": \"query-status\"}'
  qvirtctl guest-exec guest -- uname -a
  qvirtctl completion bash > /etc/bash_completion.d/qvirtctl";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "qvirtctl",
    version,
    about = "virsh for qvirt: manage QEMU domains through the qvirt gateway",
    long_about = LONG_ABOUT,
    after_long_help = EXAMPLES,
    propagate_version = true
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: conn::Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The qvirtctl commands. Names and flags are virsh's where virsh has the
/// command; docs/LIBVIRT.md has the table (checked by a test).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List domains (running and paused ones by default).
    List(domain::ListArgs),
    /// Show a domain's definition and state.
    Dominfo(domain::DomArg),
    /// Show a domain's state.
    Domstate(domain::DomstateArgs),
    /// Define (or update) a domain from a YAML file.
    #[command(long_about = domain::DEFINE_HELP)]
    Define(domain::DefineArgs),
    /// Remove a shut-off domain's definition.
    Undefine(domain::DomArg),
    /// Start a shut-off domain.
    Start(domain::StartArgs),
    /// Ask a domain's guest to shut down.
    Shutdown(domain::ShutdownArgs),
    /// Ask a domain's guest to reboot.
    Reboot(domain::RebootArgs),
    /// Stop a domain's QEMU at once.
    Destroy(domain::DestroyArgs),
    /// Pause a domain's vCPUs.
    Suspend(domain::DomArg),
    /// Resume a paused domain's vCPUs.
    Resume(domain::DomArg),
    /// Hard-reset a domain (no guest cooperation).
    Reset(domain::DomArg),
    /// Save a running domain's memory to the supervisor's image and shut
    /// it off (virsh's `managedsave`).
    Save(domain::DomArg),
    /// Start a saved domain from its image (`--paused` keeps it paused).
    Restore(domain::StartArgs),
    /// Wait for lifecycle events and print them.
    Event(events::EventArgs),
    /// Wait for raw QMP events and print them.
    QemuMonitorEvent(events::MonitorEventArgs),
    /// Send a QMP command to a domain's monitor.
    #[command(long_about = qemu::MONITOR_COMMAND_HELP)]
    QemuMonitorCommand(qemu::MonitorCommandArgs),
    /// Send a raw command to a domain's guest agent.
    #[command(long_about = qemu::AGENT_COMMAND_HELP)]
    QemuAgentCommand(qemu::AgentCommandArgs),
    /// Show what the guest agent reports about the guest.
    Guestinfo(guest::GuestinfoArgs),
    /// Show the guest's CPUs, or bring some online or offline.
    Guestvcpus(admin::GuestvcpusArgs),
    /// Set a guest user's password through the agent.
    SetUserPassword(admin::PasswordArgs),
    /// Show a guest user's SSH authorized keys.
    GetUserSshkeys(admin::GetKeysArgs),
    /// Add, replace or remove a guest user's SSH authorized keys.
    SetUserSshkeys(admin::SetKeysArgs),
    /// Freeze the guest's filesystems.
    Domfsfreeze(guest::FsfreezeArgs),
    /// Thaw the guest's filesystems.
    Domfsthaw(guest::DomArgTimeout),
    /// Run a program in the guest and wait for it.
    #[command(long_about = guest::EXEC_HELP)]
    GuestExec(guest::ExecArgs),
    /// Read a file from the guest.
    GuestFileRead(guest::FileReadArgs),
    /// Write a file in the guest.
    GuestFileWrite(guest::FileWriteArgs),
    /// Hook scripts (as the gateway exposes them).
    Hooks {
        /// What to do with hooks.
        #[command(subcommand)]
        command: misc::HooksCommand,
    },
    /// Check that the gateway (or one of its services) is serving.
    Health(misc::HealthArgs),
    /// Show qvirtctl's version and API.
    Version,
    /// Print a shell completion script.
    Completion(misc::CompletionArgs),
}

/// Runs one command; the exit status qvirtctl should end with (0, or a
/// guest program's for guest-exec).
pub async fn run(cli: Cli) -> Result<u8, CtlError> {
    let g = &cli.global;
    match cli.command {
        Command::Version => misc::version(g),
        Command::Completion(args) => misc::completion(args),
        command => {
            let gw = conn::Gateway::connect(g).await?;
            dispatch(&gw, g, command).await
        }
    }
}

async fn dispatch(gw: &conn::Gateway, g: &conn::Global, command: Command) -> Result<u8, CtlError> {
    use Command as C;
    match command {
        C::List(a) => domain::list(gw, g, a).await,
        C::Dominfo(a) => domain::dominfo(gw, g, a).await,
        C::Domstate(a) => domain::domstate(gw, g, a).await,
        C::Define(a) => domain::define(gw, g, a).await,
        C::Undefine(a) => domain::undefine(gw, g, a).await,
        C::Start(a) => domain::start(gw, g, a).await,
        C::Shutdown(a) => domain::shutdown(gw, g, a).await,
        C::Reboot(a) => domain::reboot(gw, g, a).await,
        C::Destroy(a) => domain::destroy(gw, g, a).await,
        C::Suspend(a) => domain::suspend(gw, g, a).await,
        C::Resume(a) => domain::resume(gw, g, a).await,
        C::Reset(a) => domain::reset(gw, g, a).await,
        C::Save(a) => domain::save(gw, g, a).await,
        C::Restore(a) => domain::restore(gw, g, a).await,
        C::Event(a) => events::event(gw, g, a).await,
        C::QemuMonitorEvent(a) => events::monitor_event(gw, g, a).await,
        C::QemuMonitorCommand(a) => qemu::monitor_command(gw, g, a).await,
        C::QemuAgentCommand(a) => qemu::agent_command(gw, g, a).await,
        C::Guestinfo(a) => guest::guestinfo(gw, g, a).await,
        C::Guestvcpus(a) => admin::guestvcpus(gw, g, a).await,
        C::SetUserPassword(a) => admin::set_password(gw, g, a).await,
        C::GetUserSshkeys(a) => admin::get_keys(gw, g, a).await,
        C::SetUserSshkeys(a) => admin::set_keys(gw, g, a).await,
        C::Domfsfreeze(a) => guest::fsfreeze(gw, g, a).await,
        C::Domfsthaw(a) => guest::fsthaw(gw, g, a).await,
        C::GuestExec(a) => guest::exec(gw, g, a).await,
        C::GuestFileRead(a) => guest::file_read(gw, g, a).await,
        C::GuestFileWrite(a) => guest::file_write(gw, g, a).await,
        C::Hooks { command } => misc::hooks(gw, g, command).await,
        C::Health(a) => misc::health(gw, g, a).await,
        C::Version | C::Completion(_) => Ok(0),
    }
}
