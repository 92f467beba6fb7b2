//! The launcher (`qvirt-vmm`): starts QEMU processes for a supervisor that
//! runs elsewhere (another container), so that they outlive it.
//!
//! It listens on a unix socket (mode 0600: whoever can connect can start
//! the allowed binaries as any user), reads one [`SpawnRequest`] per
//! connection with its descriptors (see [`crate::launch::remote`]), starts
//! the program in its own process group with exactly those descriptors
//! under the numbers the command line names, answers with the pid, and
//! reports the exit status on the same connection when the process ends.
//! A supervisor that goes away changes nothing for the processes.
//!
//! It reaps every child, including processes reparented to it when it is
//! a container's pid 1. On SIGTERM/SIGINT it stops accepting, sends
//! SIGTERM to each QEMU it started (QEMU then exits as on a host
//! shutdown), waits for them at most `stop_grace`, and returns: whatever
//! is left dies with the container's pid namespace.
//!
//! Not here: anything about domains. The launcher knows programs, fds and
//! pids; the supervisor keeps every record.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::launch::remote::{ExitReport, SpawnReply, SpawnRequest, read_request, write_line};
use crate::launch::{Credentials, sys};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/qvirt-vmm/vmm.sock";
/// Bound on receiving a request once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most processes (and connections) at once.
pub const MAX_CHILDREN: usize = 1024;

/// The launcher's settings.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// The socket to listen on (its parent dir is created, mode 0700).
    pub socket: PathBuf,
    /// The programs a request may name, exactly as it names them.
    pub allowed_binaries: Vec<String>,
    /// How long to wait for the processes after SIGTERM at shutdown.
    pub stop_grace: Duration,
}

/// Errors that stop the launcher.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Creating the socket's dir or binding it failed.
    #[error("binding {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Accepting failed in a way that is not about one connection.
    #[error("accepting connections")]
    Accept(#[source] io::Error),
}

/// Children by pid, each with where its exit status goes. The lock is
/// held across a spawn, so the reaper never reaps a child whose pid is
/// not yet recorded (nor one that std's spawn reaps itself after a failed
/// exec).
type Children = Arc<Mutex<HashMap<u32, mpsc::SyncSender<i32>>>>;

fn lock(children: &Children) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::SyncSender<i32>>> {
    children
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serve until `shutdown` resolves, then stop the children as the module
/// docs say.
pub async fn run(
    config: VmmConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), VmmError> {
    let listener = bind(&config.socket).map_err(|source| VmmError::Bind {
        path: config.socket.clone(),
        source,
    })?;
    let children: Children = Arc::default();
    let reaper_children = children.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reap_forever(&reaper_children))
        .map_err(VmmError::Accept)?;
    let active = Arc::new(AtomicUsize::new(0));
    let allowed = Arc::new(config.allowed_binaries.clone());
    info!(socket = %config.socket.display(), allowed = ?config.allowed_binaries, "launcher ready");
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "accept failed");
                    continue;
                }
                Err(error) => {
                    warn!(%error, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CHILDREN {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(false);
            let _ = write_line(&stream, &refusal("too many processes"));
            continue;
        }
        let (children, allowed, active) = (children.clone(), allowed.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                serve(stream, &children, &allowed);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(error) = spawned {
            warn!(%error, "no thread for a connection");
        }
    }
    stop_children(&children, config.stop_grace).await;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
    )
}

fn bind(path: &std::path::Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn refusal(error: &str) -> SpawnReply {
    SpawnReply {
        pid: None,
        launcher_pid: std::process::id(),
        error: Some(error.to_owned()),
    }
}

/// One connection: read the request, start the process, answer, then
/// report its exit.
fn serve(stream: UnixStream, children: &Children, allowed: &[String]) {
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .and_then(|()| read_request(&stream));
    let (request, fds) = match prepared {
        Ok(request) => request,
        Err(error) => {
            debug!(%error, "bad request");
            let _ = write_line(&stream, &refusal(&error.to_string()));
            return;
        }
    };
    if !allowed.contains(&request.binary) {
        warn!(binary = %request.binary, "refused a binary that is not allowed");
        let _ = write_line(
            &stream,
            &refusal(&format!("binary {:?} is not allowed", request.binary)),
        );
        return;
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let pid = match spawn(&request, fds, children, tx) {
        Ok(pid) => pid,
        Err(error) => {
            warn!(binary = %request.binary, %error, "spawn failed");
            let _ = write_line(
                &stream,
                &refusal(&format!("spawning {}: {error}", request.binary)),
            );
            return;
        }
    };
    info!(pid, binary = %request.binary, "started");
    let reply = SpawnReply {
        pid: Some(pid),
        launcher_pid: std::process::id(),
        error: None,
    };
    if let Err(error) = write_line(&stream, &reply) {
        debug!(pid, %error, "supervisor gone before the reply");
    }
    let Ok(wait_status) = rx.recv() else {
        return;
    };
    info!(pid, wait_status, "exited");
    // A supervisor that restarted meanwhile is not there to read it.
    let _ = write_line(&stream, &ExitReport { wait_status });
}

fn spawn(
    request: &SpawnRequest,
    fds: Vec<OwnedFd>,
    children: &Children,
    tx: mpsc::SyncSender<i32>,
) -> io::Result<u32> {
    let mut fds = fds.into_iter();
    let (Some(stdout), Some(stderr)) = (fds.next(), fds.next()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no stdio"));
    };
    // Above every target number, so no dup2 in the child overwrites a
    // descriptor a later one reads; close-on-exec, so only the targets
    // reach the program.
    let above = request
        .fds
        .iter()
        .copied()
        .max()
        .unwrap_or(2)
        .saturating_add(1);
    let moved = fds
        .map(|fd| sys::dup_cloexec_above(&fd, above))
        .collect::<io::Result<Vec<_>>>()?;
    let remap = moved
        .iter()
        .map(AsRawFd::as_raw_fd)
        .zip(request.fds.iter().copied())
        .collect();
    let credentials = request
        .credentials
        .clone()
        .map(|(uid, gid, groups)| Credentials { uid, gid, groups });
    let mut command = std::process::Command::new(&request.binary);
    command
        .args(&request.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    sys::prepare_child_remapped(&mut command, remap, request.fds.clone(), credentials);
    let mut children = lock(children);
    let child = command.spawn()?;
    let pid = child.id();
    // Not waited for through `child`: the reaper reaps every child.
    drop(child);
    children.insert(pid, tx);
    Ok(pid)
}

/// Reap every child as it exits; hand each status to its connection.
fn reap_forever(children: &Children) {
    loop {
        match sys::wait_any_child_exited() {
            Ok(Some(pid)) => {
                let mut children = lock(children);
                if let Some(status) = sys::reap(pid) {
                    match children.remove(&pid) {
                        Some(tx) => {
                            let _ = tx.try_send(status);
                        }
                        None => debug!(pid, status, "reaped a process we did not start"),
                    }
                }
            }
            // No children now: look again later (a process reparented to
            // us in the meantime is reaped then).
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(error) => {
                warn!(%error, "waitid failed");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

async fn stop_children(children: &Children, grace: Duration) {
    let pids: Vec<u32> = lock(children).keys().copied().collect();
    if pids.is_empty() {
        return;
    }
    info!(
        count = pids.len(),
        "stopping: SIGTERM to each process started here"
    );
    for &pid in &pids {
        if let Err(error) = crate::launch::signal_process_group(pid, libc::SIGTERM) {
            debug!(pid, %error, "SIGTERM failed");
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !lock(children).is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = lock(children).len();
    if left > 0 {
        warn!(left, "processes still running at exit");
    }
}
