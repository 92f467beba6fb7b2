//! Starting QEMU through a launcher (`qvirt-vmm`) instead of as our own
//! child: the wire protocol both ends speak, and the supervisor's end.
//!
//! A container restart kills every process in the container's cgroup, so
//! in a container deployment QEMU must not be the supervisor's child. The
//! launcher lives in a container of its own; the supervisor shares its
//! pid namespace (so pids, `/proc` identities and signals mean the same on
//! both sides) and its run dir (monitor and agent sockets).
//!
//! One connection per QEMU. The supervisor sends one request frame: a
//! 4-byte little-endian length, then a JSON [`SpawnRequest`], with the
//! descriptors attached (SCM_RIGHTS) to its first bytes: QEMU's stdout,
//! its stderr, then one per entry of [`SpawnRequest::fds`] (the number
//! the command line names it by). The launcher answers one JSON line,
//! [`SpawnReply`], and keeps the connection: when QEMU exits it writes a
//! second line, [`ExitReport`], with the raw wait status. A supervisor
//! that goes away closes its end; QEMU runs on, and the next supervisor
//! re-attaches by pid and monitor socket as after any restart.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Credentials, ExitWatch, IDENTITY_POLL, ProcessIdentity};

/// Most descriptors one request may carry (stdout, stderr and the fds a
/// QEMU command line names: monitor, agent, serial log, taps, disks).
pub const MAX_FDS: usize = 64;
/// Largest request frame (the JSON after the length), bytes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Longest reply line, bytes.
const MAX_REPLY_BYTES: u64 = 4096;

/// What to start: sent by the supervisor, read by the launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// The program (a bare name is looked up on the launcher's PATH).
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The number each attached descriptor after stdout and stderr must
    /// have in QEMU (each at least 3).
    pub fds: Vec<RawFd>,
    /// `[uid, gid, groups...]` to run as; absent: the launcher's own user.
    pub credentials: Option<(u32, u32, Vec<u32>)>,
}

/// The launcher's first answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnReply {
    /// QEMU's pid (its process group id too); absent on error.
    pub pid: Option<u32>,
    /// The launcher's own pid as it sees it, to check that both ends share
    /// a pid namespace.
    pub launcher_pid: u32,
    /// Why nothing was started.
    pub error: Option<String>,
}

/// The launcher's second line: QEMU exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitReport {
    /// The raw status from `waitpid`.
    pub wait_status: i32,
}

/// Errors of a launch through the launcher, named after the failed step.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The launcher's socket did not accept the connection.
    #[error("connecting to the launcher at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An argument is not UTF-8 (the request is JSON).
    #[error("argument {0:?} is not UTF-8")]
    NotUtf8(String),
    /// Sending the request failed.
    #[error("sending the request to the launcher")]
    Send(#[source] io::Error),
    /// Reading the reply failed or timed out.
    #[error("reading the launcher's reply")]
    Reply(#[source] io::Error),
    /// The reply was not a [`SpawnReply`].
    #[error("the launcher's reply is malformed")]
    Malformed,
    /// The launcher refused or failed.
    #[error("the launcher could not start QEMU: {0}")]
    Refused(String),
    /// The launcher runs in another pid namespace: its pids would be
    /// meaningless here.
    #[error(
        "the launcher reports pid {reported} but is pid {seen} here: it must share the supervisor's pid namespace"
    )]
    PidNamespace {
        /// What it said.
        reported: u32,
        /// What SO_PEERCRED says.
        seen: u32,
    },
}

/// Send a request frame with `fds` attached to its first bytes.
pub fn send_request(
    stream: &UnixStream,
    request: &SpawnRequest,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let body = serde_json::to_vec(request).map_err(io::Error::other)?;
    let length = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_REQUEST_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))?;
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut frame = length.to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("no room for the descriptors"));
    }
    let sent = sendmsg(
        stream,
        &[io::IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    (&*stream).write_all(&frame[sent..])
}

/// Read a request frame: the request and its descriptors (close-on-exec).
/// A frame over [`MAX_REQUEST_BYTES`], with more than [`MAX_FDS`]
/// descriptors, or with a descriptor count that does not match the
/// request is an error.
pub fn read_request(stream: &UnixStream) -> io::Result<(SpawnRequest, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut header = [0u8; 4];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        stream,
        &mut [io::IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(invalid("too many descriptors"));
    }
    if received.bytes == 0 {
        return Err(invalid("connection closed before a request"));
    }
    let mut reader = stream;
    io::Read::read_exact(&mut reader, &mut header[received.bytes..])?;
    let length = u32::from_le_bytes(header) as usize;
    if length > MAX_REQUEST_BYTES {
        return Err(invalid("request too large"));
    }
    let mut body = vec![0u8; length];
    io::Read::read_exact(&mut reader, &mut body)?;
    let request: SpawnRequest =
        serde_json::from_slice(&body).map_err(|_| invalid("request is not a spawn request"))?;
    if fds.len() != request.fds.len() + 2 {
        return Err(invalid("descriptor count does not match the request"));
    }
    if request.fds.iter().any(|&fd| fd < 3) {
        return Err(invalid("a descriptor number is below 3"));
    }
    Ok((request, fds))
}

/// Write one JSON line.
pub fn write_line<T: Serialize>(mut stream: &UnixStream, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// A QEMU started by the launcher.
pub(super) struct Spawned {
    pub pid: u32,
    pub exit: ExitWatch,
}

/// Ask the launcher at `socket` to start `binary args` with `stdout`,
/// `stderr` and `fds` (each with the number the command line names it by),
/// as `credentials`. `timeout` bounds the connect and the reply. The
/// descriptors are closed here once sent.
pub(super) async fn spawn(
    socket: &Path,
    binary: &Path,
    args: &[std::ffi::OsString],
    stdio: (OwnedFd, OwnedFd),
    fds: Vec<OwnedFd>,
    credentials: Option<Credentials>,
    timeout: Duration,
) -> Result<Spawned, RemoteError> {
    let utf8 = |s: &std::ffi::OsStr| {
        s.to_str()
            .map(str::to_owned)
            .ok_or_else(|| RemoteError::NotUtf8(s.to_string_lossy().into_owned()))
    };
    let request = SpawnRequest {
        binary: utf8(binary.as_os_str())?,
        args: args.iter().map(|a| utf8(a)).collect::<Result<_, _>>()?,
        fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
        credentials: credentials.map(|c| (c.uid, c.gid, c.groups)),
    };
    let socket = socket.to_owned();
    let (stream, reply) = tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&socket).map_err(|source| RemoteError::Connect {
            path: socket.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(RemoteError::Send)?;
        let mut attached = vec![stdio.0.as_fd(), stdio.1.as_fd()];
        attached.extend(fds.iter().map(AsFd::as_fd));
        send_request(&stream, &request, &attached).map_err(RemoteError::Send)?;
        drop(attached);
        drop(stdio);
        drop(fds);
        let line = read_reply_line(&stream).map_err(RemoteError::Reply)?;
        let reply: SpawnReply =
            serde_json::from_slice(&line).map_err(|_| RemoteError::Malformed)?;
        let seen = rustix::net::sockopt::socket_peercred(&stream)
            .ok()
            .and_then(|c| u32::try_from(c.pid.as_raw_nonzero().get()).ok())
            .unwrap_or(0);
        if seen != reply.launcher_pid {
            return Err(RemoteError::PidNamespace {
                reported: reply.launcher_pid,
                seen,
            });
        }
        Ok((stream, reply))
    })
    .await
    .map_err(|error| RemoteError::Reply(io::Error::other(error.to_string())))??;
    let pid = match (reply.pid, reply.error) {
        (Some(pid), None) => pid,
        (_, Some(error)) => return Err(RemoteError::Refused(error)),
        (None, None) => return Err(RemoteError::Malformed),
    };
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_nonblocking(true))
        .map_err(RemoteError::Reply)?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(RemoteError::Reply)?;
    Ok(Spawned {
        pid,
        exit: watch_exit(stream, pid),
    })
}

/// The reply line, read a byte at a time: a buffered read could swallow
/// the exit report that follows it when QEMU exits at once.
fn read_reply_line(stream: &UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if io::Read::read(&mut &*stream, &mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() as u64 >= MAX_REPLY_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
        }
        line.push(byte[0]);
    }
}

/// An [`ExitWatch`] fed by the launcher's exit report on `stream`. If the
/// launcher goes away first, the status is unknown: the watch then waits
/// until the process is gone and reports it as killed (SIGKILL), since a
/// launcher that ends takes its children's pid namespace with it.
fn watch_exit(stream: tokio::net::UnixStream, pid: u32) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // Start time now (it survives the exec): how a reused pid is told
        // from our QEMU if we must poll.
        let started = ProcessIdentity::read(pid).await.ok();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let reported = match lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str::<ExitReport>(&line).ok(),
            Ok(None) => None,
            Err(error) => {
                debug!(pid, %error, "reading the launcher's exit report failed");
                None
            }
        };
        let status = match reported {
            Some(report) => ExitStatus::from_raw(report.wait_status),
            None => {
                warn!(
                    pid,
                    "lost the launcher before QEMU's exit; watching the pid"
                );
                if let Some(started) = started {
                    loop {
                        match ProcessIdentity::read(pid).await {
                            Ok(now) if now.start_time == started.start_time => {
                                tokio::time::sleep(IDENTITY_POLL).await;
                            }
                            _ => break,
                        }
                    }
                }
                ExitStatus::from_raw(libc::SIGKILL)
            }
        };
        debug!(pid, %status, "QEMU exited (launcher)");
        tx.send_replace(Some(status));
    });
    ExitWatch { rx }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(fds: Vec<RawFd>) -> SpawnRequest {
        SpawnRequest {
            binary: "qemu-system-x86_64".into(),
            args: vec!["-S".into()],
            fds,
            credentials: Some((64055, 64055, vec![])),
        }
    }

    #[test]
    fn test_request_round_trips_with_its_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_fd();
        send_request(&a, &request(vec![7]), &[fd, fd, fd]).unwrap();
        let (got, fds) = read_request(&b).unwrap();
        assert_eq!(got, request(vec![7]));
        assert_eq!(fds.len(), 3);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn test_descriptor_count_must_match() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_fd();
        send_request(&a, &request(vec![7, 8]), &[fd, fd, fd]).unwrap();
        let error = read_request(&b).unwrap_err();
        assert_eq!(
            error.to_string(),
            "descriptor count does not match the request"
        );
    }

    #[test]
    fn test_oversized_frame_is_refused_before_reading_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = u32::MAX.to_le_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        (&a).write_all(&frame).unwrap();
        let error = read_request(&b).unwrap_err();
        assert_eq!(error.to_string(), "request too large");
    }

    #[test]
    fn test_low_descriptor_numbers_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_fd();
        send_request(&a, &request(vec![1]), &[fd, fd, fd]).unwrap();
        let error = read_request(&b).unwrap_err();
        assert_eq!(error.to_string(), "a descriptor number is below 3");
    }
}
