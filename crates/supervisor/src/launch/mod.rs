//! Starting QEMU with a monitor socket the supervisor opened itself, and
//! finding it again after a supervisor restart.
//!
//! [`launch`]: create the per-domain run dir (0700), bind and listen on
//! `RUN_DIR/monitor.sock`, spawn QEMU in its own process group with the
//! listening fd inherited (with the caller's fds, and no other: the child
//! marks every other fd above 2 close-on-exec, then drops to QEMU's user
//! with setgroups/setgid/setuid; see `sys.rs`) and named on its command line
//! ([`monitor_args`]: `-chardev socket,id=mon,fd=N,server=on,wait=off -mon
//! chardev=mon,mode=control -S`), stdout and stderr appended to the log file.
//! The parent closes its copy of the listener right after the spawn (else a
//! QEMU that dies at startup leaves our read blocked forever), connects
//! exactly once (the kernel queues the connection in the listen backlog until
//! QEMU accepts it: no retry, no sleep), and reads the greeting with a
//! timeout while watching the child's exit. Any failure there means QEMU
//! failed: the error carries its exit status and the tail of its log.
//!
//! A [`QemuProcess`] notices its QEMU's exit at once ([`ExitWatch`], fed by
//! the task that reaps the child; the QMP client also sees EOF) and stops it
//! with [`QemuProcess::kill`] (SIGTERM, SIGKILL after a grace period, to the
//! process group). Dropping a half-done [`launch`] kills the child.
//!
//! After a supervisor restart: [`ProcessIdentity::verify`] tells whether a
//! recorded pid is still the same QEMU, [`connect_existing`] opens a new
//! QMP session on its monitor socket (also used to re-attach when a session
//! is lost while QEMU runs), and [`terminate_adopted`] stops such a QEMU
//! (not our child: its exit is seen by polling its identity,
//! [`wait_gone`], never inferred from its monitor). Measured on QEMU 7.2
//! (see the tests):
//! QEMU serves one monitor client at a time and keeps listening, so a new
//! connection gets its greeting as soon as the previous one is closed; a
//! client that connects while another is attached waits in the backlog (no
//! greeting, no error) and is served when the first one goes away.
//!
//! Not here: building the QEMU command line from a domain definition, log
//! rotation, domain state.

mod identity;
mod log;
pub mod remote;
pub(crate) mod sys;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::qmp::{EventReceiver, Greeting, QmpClient, QmpConnection, QmpError};

pub use identity::{IdentityError, ProcessIdentity};
pub use log::LOG_TAIL_BYTES;
pub use sys::{
    Credentials, effective_gid, effective_uid, lookup_group, lookup_user, open_beneath, open_tap,
    signal_process, signal_process_group,
};

/// File name of the monitor socket inside the run dir.
pub const MONITOR_SOCKET_NAME: &str = "monitor.sock";

/// Default bound on spawn → greeting → `qmp_capabilities` (about 26 ms on
/// TCG on a 2-core machine; the margin is for loaded CI machines).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for QEMU's exit status once its monitor closed during
/// startup, before killing it.
pub const STARTUP_EXIT_WAIT: Duration = Duration::from_secs(5);

/// How long to wait for a process group to die after SIGKILL.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// How often [`wait_gone`] checks a process that is not our child.
pub const IDENTITY_POLL: Duration = Duration::from_millis(50);

/// The arguments that attach QMP to the inherited listening socket `fd`
/// and keep the guest paused (`-S`) until the caller sends `cont`.
pub fn monitor_args(fd: i32) -> [OsString; 5] {
    [
        "-chardev".into(),
        format!("socket,id=mon,fd={fd},server=on,wait=off").into(),
        "-mon".into(),
        "chardev=mon,mode=control".into(),
        "-S".into(),
    ]
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The QEMU binary, e.g. `qemu-system-x86_64` (looked up on PATH when
    /// it has no slash).
    pub binary: PathBuf,
    /// QEMU's arguments, without the monitor ones ([`monitor_args`] are
    /// appended).
    pub args: Vec<OsString>,
    /// The domain's run dir, created mode 0700; the monitor socket goes
    /// there.
    pub run_dir: PathBuf,
    /// The log file QEMU's stdout and stderr are appended to.
    pub log_path: PathBuf,
    /// Bound on the monitor handshake.
    pub handshake_timeout: Duration,
    /// Who QEMU runs as; `None`: the supervisor's own user.
    pub credentials: Option<Credentials>,
    /// Start QEMU through the launcher listening on this socket (see
    /// [`remote`]) instead of as a child; `None`: spawn it directly.
    pub launcher: Option<PathBuf>,
}

/// Errors of the launcher, named after the failed step.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Creating the run dir failed.
    #[error("creating run dir {path}")]
    CreateRunDir {
        /// The dir.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Opening the log file failed.
    #[error("opening QEMU log {path}")]
    OpenLog {
        /// The log file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Binding the monitor socket failed.
    #[error("binding monitor socket {path}")]
    BindMonitor {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The QEMU process could not be started at all.
    #[error("spawning {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QEMU exited before its monitor answered.
    #[error("QEMU exited during startup ({status}): {log_tail}")]
    Exited {
        /// QEMU's exit status.
        status: ExitStatus,
        /// The end of its stdout/stderr (e.g.
        /// `qemu-system-x86_64: -bogus-option: invalid option`).
        log_tail: String,
    },
    /// QEMU kept running but its monitor did not complete the handshake;
    /// it was killed.
    #[error(
        "QEMU monitor handshake failed; QEMU killed ({}): {log_tail}",
        describe_status(status.as_ref())
    )]
    Handshake {
        /// The exit status after the kill, when it was seen.
        status: Option<ExitStatus>,
        /// The end of its stdout/stderr.
        log_tail: String,
        /// What went wrong on the monitor.
        #[source]
        source: QmpError,
    },
    /// The blocking task that prepares the run dir, socket and log died.
    #[error("preparing the QEMU launch: {0}")]
    PrepareTask(String),
    /// The process did not exit after SIGKILL within [`KILL_WAIT`].
    #[error("QEMU pid {pid} still running {after:?} after SIGKILL")]
    KillTimeout {
        /// The pid.
        pid: u32,
        /// How long we waited.
        after: Duration,
    },
    /// Sending a signal failed.
    #[error("signalling QEMU process group {pid}")]
    Signal {
        /// The pid (= process group id).
        pid: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The pid no longer runs the recorded QEMU; it was not signalled.
    #[error("refusing to signal a process that is not the recorded QEMU")]
    Identity {
        /// How it differs.
        #[source]
        source: IdentityError,
    },
    /// The launcher did not start QEMU.
    #[error("starting QEMU through the launcher")]
    Launcher(#[source] remote::RemoteError),
    /// The task watching the child ended without an exit status.
    #[error("lost track of QEMU pid {pid}'s exit")]
    ExitLost {
        /// The pid.
        pid: u32,
    },
}

fn describe_status(status: Option<&ExitStatus>) -> String {
    status.map_or_else(|| "exit not seen".to_owned(), ToString::to_string)
}

/// Tells when a spawned QEMU exits. Clone it freely.
#[derive(Debug, Clone)]
pub struct ExitWatch {
    rx: watch::Receiver<Option<ExitStatus>>,
}

impl ExitWatch {
    /// Start a task that reaps `child` and publishes its exit status.
    fn spawn(mut child: tokio::process::Child, pid: u32) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => {
                    if std::os::unix::process::ExitStatusExt::signal(&status).is_some() {
                        // e.g. SIGSYS: the seccomp sandbox killed it.
                        info!(pid, %status, "QEMU killed by a signal");
                    } else {
                        debug!(pid, %status, "QEMU exited");
                    }
                    tx.send_replace(Some(status));
                }
                Err(error) => warn!(pid, %error, "waiting for QEMU failed"),
            }
        });
        ExitWatch { rx }
    }

    /// The exit status, if the process has exited.
    pub fn status(&self) -> Option<ExitStatus> {
        *self.rx.borrow()
    }

    /// Wait for the exit. `None` when the watching task ended without a
    /// status (its runtime shut down, or `wait` failed).
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(status) => *status,
            Err(_) => None,
        }
    }
}

/// A running QEMU started by [`launch`].
#[derive(Debug)]
pub struct QemuProcess {
    pid: u32,
    identity: ProcessIdentity,
    monitor_path: PathBuf,
    greeting: Greeting,
    qmp: Arc<QmpClient>,
    events: Option<EventReceiver>,
    exit: ExitWatch,
    spawn_to_greeting: Duration,
}

impl QemuProcess {
    /// QEMU's pid, also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Start time and command line, to record for [`ProcessIdentity::verify`].
    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// The monitor socket (for [`connect_existing`] after a restart).
    pub fn monitor_path(&self) -> &Path {
        &self.monitor_path
    }

    /// QEMU's QMP greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The QMP client.
    pub fn qmp(&self) -> &Arc<QmpClient> {
        &self.qmp
    }

    /// The event receiver; `None` once taken.
    pub fn take_events(&mut self) -> Option<EventReceiver> {
        self.events.take()
    }

    /// A watch on the child's exit.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    /// Time from the spawn to the greeting line.
    pub fn spawn_to_greeting(&self) -> Duration {
        self.spawn_to_greeting
    }

    /// Stop QEMU: SIGTERM to its process group, SIGKILL after `grace`, and
    /// wait for the exit (at most [`KILL_WAIT`] after SIGKILL). Returns the
    /// exit status; an already exited QEMU is not signalled again (its pid
    /// may have been reused).
    pub async fn kill(&self, grace: Duration) -> Result<ExitStatus, LaunchError> {
        kill_child(self.pid, &mut self.exit.clone(), grace).await
    }
}

async fn kill_child(
    pid: u32,
    exit: &mut ExitWatch,
    grace: Duration,
) -> Result<ExitStatus, LaunchError> {
    if let Some(status) = exit.status() {
        return Ok(status);
    }
    for (signal, wait) in [(libc::SIGTERM, grace), (libc::SIGKILL, KILL_WAIT)] {
        match signal_process_group(pid, signal) {
            // ESRCH: the group is gone; the exit watch reports the status.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
            Err(source) => return Err(LaunchError::Signal { pid, source }),
            Ok(()) => debug!(pid, signal, "signalled QEMU process group"),
        }
        match tokio::time::timeout(wait, exit.wait()).await {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => return Err(LaunchError::ExitLost { pid }),
            Err(_) if signal == libc::SIGTERM => {
                info!(pid, ?grace, "QEMU ignored SIGTERM; sending SIGKILL");
            }
            Err(_) => {}
        }
    }
    Err(LaunchError::KillTimeout {
        pid,
        after: KILL_WAIT,
    })
}

/// Create `dir` (and parents) with mode 0700, and force 0700 on `dir`
/// itself if it already existed. Blocking.
fn create_run_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Bind and listen on `path` (removing a stale socket file left by a QEMU
/// that exited), for QEMU to inherit (the monitor, the agent channel).
/// The fd is moved above 2 if needed, so that the child's stdio setup
/// cannot replace it. Blocking.
pub fn bind_listener(path: &Path) -> io::Result<OwnedFd> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let fd = OwnedFd::from(UnixListener::bind(path)?);
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // try_clone uses F_DUPFD_CLOEXEC with a minimum of 3.
    fd.try_clone()
}

/// What the spawn needs, prepared off the async threads in one go.
struct Prepared {
    monitor_path: PathBuf,
    listener: OwnedFd,
    args: Vec<OsString>,
    log: log::OpenedLog,
}

/// Run dir, monitor listener, full argv, opened log. Blocking (a few
/// quick file-system calls, made in one `spawn_blocking` rather than one
/// async hop each: the start path is latency-sensitive).
fn prepare(config: &LaunchConfig) -> Result<Prepared, LaunchError> {
    create_run_dir(&config.run_dir).map_err(|source| LaunchError::CreateRunDir {
        path: config.run_dir.clone(),
        source,
    })?;
    let monitor_path = config.run_dir.join(MONITOR_SOCKET_NAME);
    let listener = bind_listener(&monitor_path).map_err(|source| LaunchError::BindMonitor {
        path: monitor_path.clone(),
        source,
    })?;
    let mut args = config.args.clone();
    args.extend(monitor_args(listener.as_raw_fd()));
    let log = log::open(&config.log_path, &header(config, &args)).map_err(|source| {
        LaunchError::OpenLog {
            path: config.log_path.clone(),
            source,
        }
    })?;
    Ok(Prepared {
        monitor_path,
        listener,
        args,
        log,
    })
}

fn header(config: &LaunchConfig, args: &[OsString]) -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut line = format!(
        "qvirt: {}.{:03}: starting {}",
        since_epoch.as_secs(),
        since_epoch.subsec_millis(),
        config.binary.display()
    );
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line.push('\n');
    line
}

/// Start QEMU as described in the module docs and return it running,
/// paused (`-S`), with a negotiated QMP session. QEMU inherits its stdio,
/// the monitor listener and `inherit` (fds the caller named in
/// `config.args`, e.g. the agent listener), nothing else; the parent's
/// copies are closed after the spawn.
pub async fn launch(
    config: &LaunchConfig,
    inherit: Vec<OwnedFd>,
) -> Result<QemuProcess, LaunchError> {
    let prepare_config = config.clone();
    let Prepared {
        monitor_path,
        listener,
        args,
        log,
    } = tokio::task::spawn_blocking(move || prepare(&prepare_config))
        .await
        .map_err(|error| LaunchError::PrepareTask(error.to_string()))??;
    let open_log_error = |source| LaunchError::OpenLog {
        path: config.log_path.clone(),
        source,
    };
    let stderr = log.file.try_clone().map_err(open_log_error)?;

    let spawned_at = Instant::now();
    let spawn_error = |source| LaunchError::Spawn {
        binary: config.binary.clone(),
        source,
    };
    let (pid, mut exit) = match &config.launcher {
        None => {
            let mut command = tokio::process::Command::new(&config.binary);
            command
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.file))
                .stderr(Stdio::from(stderr))
                .process_group(0);
            let mut keep: Vec<i32> = inherit.iter().map(AsRawFd::as_raw_fd).collect();
            keep.push(listener.as_raw_fd());
            sys::prepare_child(command.as_std_mut(), keep, config.credentials.clone());
            let child = command.spawn().map_err(spawn_error)?;
            // Ours must go now: with it open, a QEMU that dies at startup would
            // leave the connection below waiting forever instead of reset.
            drop(listener);
            drop(inherit);
            let pid = child
                .id()
                .ok_or_else(|| spawn_error(io::Error::other("spawned QEMU has no pid")))?;
            (pid, ExitWatch::spawn(child, pid))
        }
        Some(socket) => {
            let mut fds = inherit;
            fds.push(listener);
            // The descriptors are sent and closed before this returns, as
            // above.
            let spawned = remote::spawn(
                socket,
                &config.binary,
                &args,
                (OwnedFd::from(log.file), OwnedFd::from(stderr)),
                fds,
                config.credentials.clone(),
                config.handshake_timeout,
            )
            .await
            .map_err(LaunchError::Launcher)?;
            (spawned.pid, spawned.exit)
        }
    };
    let mut cancel_guard = KillIfCancelled {
        pid,
        exit: exit.clone(),
        armed: true,
    };
    debug!(pid, "QEMU spawned");

    let handshake = async {
        let stream =
            UnixStream::connect(&monitor_path)
                .await
                .map_err(|source| QmpError::Connect {
                    path: monitor_path.clone(),
                    source,
                })?;
        QmpClient::handshake(stream, config.handshake_timeout).await
    };
    let watch_exit = async { exit.clone().wait().await };
    let outcome = tokio::select! {
        result = handshake => result.map_err(Some),
        _ = watch_exit => Err(None),
    };
    let conn = match outcome {
        Ok(conn) => conn,
        Err(qmp_error) => {
            return Err(startup_failure(pid, &mut exit, qmp_error, config, log.start).await);
        }
    };
    let QmpConnection {
        client,
        greeting,
        events,
        greeted_at,
    } = conn;
    let spawn_to_greeting = greeted_at.saturating_duration_since(spawned_at);
    let identity = match ProcessIdentity::read(pid).await {
        Ok(identity) => identity,
        Err(error) => {
            warn!(pid, %error, "QEMU vanished right after its handshake");
            return Err(startup_failure(
                pid,
                &mut exit,
                Some(QmpError::MonitorClosed),
                config,
                log.start,
            )
            .await);
        }
    };
    info!(pid, ?spawn_to_greeting, "QEMU started");
    cancel_guard.armed = false;
    Ok(QemuProcess {
        pid,
        identity,
        monitor_path,
        greeting,
        qmp: Arc::new(client),
        events: Some(events),
        exit,
        spawn_to_greeting,
    })
}

/// Kills a QEMU whose [`launch`] future was dropped half-way, so that a
/// cancelled start leaves no untracked process behind.
struct KillIfCancelled {
    pid: u32,
    exit: ExitWatch,
    armed: bool,
}

impl Drop for KillIfCancelled {
    fn drop(&mut self) {
        // Once reaped, the pid may be reused: only signal a live child.
        if self.armed && self.exit.status().is_none() {
            warn!(pid = self.pid, "QEMU start cancelled; killing it");
            if let Err(error) = signal_process_group(self.pid, libc::SIGKILL) {
                debug!(pid = self.pid, %error, "killing a cancelled QEMU start failed");
            }
        }
    }
}

/// The end of QEMU's log at `path` (its last lines, at most
/// [`log::LOG_TAIL_BYTES`]), for an error about a QEMU that already runs.
pub async fn log_tail(path: &Path) -> String {
    match log::tail(path, 0).await {
        Ok(tail) => tail,
        Err(error) => format!("(log unreadable: {error})"),
    }
}

/// Build the startup error: wait a little for QEMU's own exit, kill it if
/// it is still running, and quote its log.
async fn startup_failure(
    pid: u32,
    exit: &mut ExitWatch,
    qmp_error: Option<QmpError>,
    config: &LaunchConfig,
    log_start: u64,
) -> LaunchError {
    // A monitor that closed means QEMU is exiting: give it time to report
    // its status. A monitor that stayed silent means a QEMU stuck alive.
    let wait = match &qmp_error {
        Some(QmpError::GreetingTimeout { .. } | QmpError::CapabilitiesTimeout { .. }) => {
            Duration::ZERO
        }
        _ => STARTUP_EXIT_WAIT,
    };
    let exited = tokio::time::timeout(wait, exit.wait()).await.ok().flatten();
    let killed = match exited {
        Some(_) => None,
        None => Some(kill_child(pid, exit, Duration::ZERO).await),
    };
    let log_tail = match log::tail(&config.log_path, log_start).await {
        Ok(tail) => tail,
        Err(error) => format!("(log unreadable: {error})"),
    };
    match (exited, killed, qmp_error) {
        (Some(status), _, _) => LaunchError::Exited { status, log_tail },
        (None, killed, source) => {
            let status = killed.and_then(Result::ok);
            LaunchError::Handshake {
                status,
                log_tail,
                source: source.unwrap_or(QmpError::MonitorClosed),
            }
        }
    }
}

/// Stop a QEMU this supervisor did not spawn (adopted after a restart, so
/// it cannot be waited for): check it is still the recorded process, SIGTERM
/// its process group, SIGKILL after `grace`. Its exit is seen by polling its
/// identity ([`wait_gone`]), so this works with its monitor lost too. A pid
/// that no longer runs the recorded QEMU is never signalled.
pub async fn terminate_adopted(
    identity: &ProcessIdentity,
    grace: Duration,
) -> Result<(), LaunchError> {
    let pid = identity.pid;
    for (signal, wait) in [(libc::SIGTERM, grace), (libc::SIGKILL, KILL_WAIT)] {
        match identity.verify().await {
            Ok(()) => {}
            Err(IdentityError::NotRunning { .. }) => return Ok(()),
            Err(source) => return Err(LaunchError::Identity { source }),
        }
        match signal_process_group(pid, signal) {
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
            Err(source) => return Err(LaunchError::Signal { pid, source }),
            Ok(()) => debug!(pid, signal, "signalled adopted QEMU process group"),
        }
        if tokio::time::timeout(wait, wait_gone(identity))
            .await
            .is_ok()
        {
            return Ok(());
        }
    }
    Err(LaunchError::KillTimeout {
        pid,
        after: KILL_WAIT,
    })
}

/// Resolve once the recorded process is gone: exited (a zombie counts) or
/// its pid reused. Polls every [`IDENTITY_POLL`]; a check that fails
/// without proving anything (e.g. EACCES on /proc) counts as alive.
pub async fn wait_gone(identity: &ProcessIdentity) {
    loop {
        match identity.verify().await {
            Err(error) if error.proves_gone() => return,
            _ => tokio::time::sleep(IDENTITY_POLL).await,
        }
    }
}

/// Open a new QMP session on the monitor socket of a QEMU that is already
/// running (after a supervisor restart). `timeout` bounds the connect and
/// the handshake. If another client is still attached, QEMU serves this one
/// only after that one closes, so the handshake times out meanwhile.
pub async fn connect_existing(socket: &Path, timeout: Duration) -> Result<QmpConnection, QmpError> {
    let connect = UnixStream::connect(socket);
    let stream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(QmpError::Connect {
                path: socket.to_owned(),
                source,
            });
        }
        Err(_) => return Err(QmpError::GreetingTimeout { after: timeout }),
    };
    QmpClient::handshake(stream, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_monitor_args_name_the_fd() {
        let args = monitor_args(7);
        assert_eq!(args[1], "socket,id=mon,fd=7,server=on,wait=off");
        assert_eq!(args[3], "chardev=mon,mode=control");
        assert_eq!(args[4], "-S");
    }

    #[test]
    fn test_run_dir_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("a/b");
        create_run_dir(&run).expect("create");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        create_run_dir(&run).expect("again");
        let mode = std::fs::metadata(&run).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// A stand-in "QEMU" that inherits the monitor fd but never greets: the
    /// handshake times out, the launcher kills it and quotes its output.
    #[tokio::test]
    async fn test_silent_child_is_killed_after_handshake_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LaunchConfig {
            binary: PathBuf::from("sh"),
            // The monitor arguments land in $1.. and are ignored.
            args: ["-c", "echo 'fake qemu: hanging' >&2; exec sleep 600", "sh"]
                .into_iter()
                .map(OsString::from)
                .collect(),
            run_dir: dir.path().join("run"),
            log_path: dir.path().join("qemu.log"),
            handshake_timeout: Duration::from_millis(300),
            credentials: None,
            launcher: None,
        };
        let started = Instant::now();
        let result = launch(&config, Vec::new()).await;
        if let Err(error) = &result {
            let message = error.to_string();
            assert_eq!(
                message,
                "QEMU monitor handshake failed; QEMU killed (signal: 15 (SIGTERM)): fake qemu: hanging"
            );
        }
        match result {
            Err(LaunchError::Handshake {
                status,
                log_tail,
                source: QmpError::GreetingTimeout { .. },
            }) => {
                let status = status.expect("status after kill");
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&status),
                    Some(libc::SIGTERM)
                );
                assert_eq!(log_tail, "fake qemu: hanging");
            }
            other => panic!("expected a Handshake timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < STARTUP_EXIT_WAIT,
            "no wait for a silent child"
        );
    }

    #[tokio::test]
    async fn test_cancelled_launch_kills_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
        let config = LaunchConfig {
            binary: PathBuf::from("sh"),
            args: ["-c", &script, "sh"]
                .into_iter()
                .map(OsString::from)
                .collect(),
            run_dir: dir.path().join("run"),
            log_path: dir.path().join("qemu.log"),
            handshake_timeout: Duration::from_secs(60),
            credentials: None,
            launcher: None,
        };
        let mut start = Box::pin(launch(&config, Vec::new()));
        // Poll the launch until the child has written its pid, then drop it.
        let pid = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    result = &mut start => panic!("launch ended: {result:?}"),
                    () = tokio::task::yield_now() => {}
                }
                if let Ok(text) = tokio::fs::read_to_string(&pid_file).await
                    && let Ok(pid) = text.trim().parse::<u32>()
                {
                    return pid;
                }
            }
        })
        .await
        .expect("child started");
        let identity = ProcessIdentity::read(pid).await.expect("child identity");
        drop(start);
        tokio::time::timeout(Duration::from_secs(10), async {
            while identity.verify().await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("cancelled child killed");
    }

    #[tokio::test]
    async fn test_spawn_failure_names_the_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LaunchConfig {
            binary: dir.path().join("no-such-qemu"),
            args: Vec::new(),
            run_dir: dir.path().join("run"),
            log_path: dir.path().join("qemu.log"),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            credentials: None,
            launcher: None,
        };
        match launch(&config, Vec::new()).await {
            Err(LaunchError::Spawn { binary, .. }) => assert_eq!(binary, config.binary),
            other => panic!("expected Spawn error, got {other:?}"),
        }
    }
}
