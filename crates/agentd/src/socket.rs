//! The agent connection's socket, registered with the runtime for reading
//! only.
//!
//! tokio registers a `UnixStream` for both directions, edge-triggered. A
//! unix socket signals "writable" each time its peer reads what was sent,
//! so every command woke agentd once more while it waited for the reply:
//! qemu-ga reads the command (agentd's thread wakes, finds nothing to do,
//! sleeps), then answers (it wakes again). On this project's 2-vCPU
//! machines a wake-up of a sleeping thread costs tens of microseconds.
//!
//! [`AgentSocket`] asks the runtime for readability only. Writes go straight
//! to the non-blocking socket; a command almost always fits in its buffer.
//! When one does not (a large `guest-file-write`, an agent that stopped
//! reading), the writer registers a duplicate of the descriptor for
//! writability, waits on it, and drops it when the message is flushed, so
//! the extra wake-ups happen only while a message does not fit.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected unix stream, readable through [`AgentReader`] and writable
/// through [`AgentWriter`].
#[derive(Debug)]
pub struct AgentSocket {
    fd: Arc<AsyncFd<UnixStream>>,
}

impl AgentSocket {
    /// Connects to `path`.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        Self::from_std(stream.into_std()?)
    }

    /// Wraps a connected stream (made non-blocking here).
    pub fn from_std(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        // SAFETY: the stream owns its descriptor, and the AsyncFd owns the
        // stream until it is dropped: the descriptor stays open and the same.
        let fd = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(AgentSocket { fd: Arc::new(fd) })
    }

    /// The two halves.
    pub fn split(self) -> (AgentReader, AgentWriter) {
        (
            AgentReader {
                fd: Arc::clone(&self.fd),
            },
            AgentWriter {
                fd: self.fd,
                writable: None,
            },
        )
    }
}

/// The reading half of an [`AgentSocket`].
#[derive(Debug)]
pub struct AgentReader {
    fd: Arc<AsyncFd<UnixStream>>,
}

impl AsyncRead for AgentReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next read waits
                    // for the next edge instead of finding that out by a
                    // read that fails (tokio's streams do the same).
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
}

/// The writing half of an [`AgentSocket`].
#[derive(Debug)]
pub struct AgentWriter {
    fd: Arc<AsyncFd<UnixStream>>,
    /// From a write that found the socket full until the message is
    /// flushed: a duplicate descriptor registered for writability.
    writable: Option<AsyncFd<OwnedFd>>,
}

impl AgentWriter {
    fn stream(&self) -> &UnixStream {
        self.fd.get_ref()
    }
}

impl AsyncWrite for AgentWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if let Some(writable) = &this.writable {
                // The socket was full: wait for room, then write; a write
                // that still finds it full clears the readiness it used.
                let mut guard = ready!(writable.poll_write_ready(cx))?;
                match guard.try_io(|_| this.fd.get_ref().write(data)) {
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(result) => return Poll::Ready(result),
                    Err(_would_block) => continue,
                }
            }
            match this.stream().write(data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let dup = this.stream().as_fd().try_clone_to_owned()?;
                    // SAFETY: `dup` is an open descriptor owned by the
                    // AsyncFd until it is dropped.
                    let writable =
                        unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
                            .map_err(io::Error::from)?;
                    this.writable = Some(writable);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go to the socket as they are made. A whole message is out:
        // stop watching for room (a large message keeps the registration
        // across its partial writes).
        self.get_mut().writable = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writable = None;
        Poll::Ready(this.stream().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    /// The epoll event masks registered for the socket behind descriptor
    /// `fd` (by any descriptor of it, in any epoll instance of this
    /// process), from /proc/self/fdinfo. A runtime may hold its epoll
    /// under two descriptors: each registration is counted once.
    fn epoll_masks(fd: i32) -> Vec<u32> {
        // "socket:[INODE]"
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link.to_string_lossy()["socket:[".len()..]
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let mut lines = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|l| l.to_string_lossy().contains("eventpoll"));
            let info_path = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
            let info = match is_epoll {
                true => std::fs::read_to_string(info_path).unwrap_or_default(),
                false => continue,
            };
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let ino = line.split_whitespace().find_map(|w| w.strip_prefix("ino:"));
                if ino.is_some_and(|i| u64::from_str_radix(i, 16) == Ok(inode)) {
                    lines.insert(line.to_owned());
                }
            }
        }
        lines
            .iter()
            .map(|line| {
                let mut words = line.split_whitespace();
                let hex = words.find(|w| *w == "events:").and(words.next()).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            })
            .collect()
    }

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// Our socket's halves, the peer's end (its reads give up after
    /// `BOUND`), and our descriptor's number.
    fn pair() -> (AgentReader, AgentWriter, UnixStream, i32) {
        let (ours, peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(BOUND)).unwrap();
        let fd = ours.as_raw_fd();
        let (r, w) = AgentSocket::from_std(ours).unwrap().split();
        (r, w, peer, fd)
    }

    #[tokio::test]
    async fn test_the_socket_is_watched_for_reading_only() {
        let (mut r, mut w, mut peer, fd) = pair();
        assert_eq!(epoll_masks(fd).len(), 1, "registered once");
        let mask = epoll_masks(fd)[0];
        assert_ne!(mask & EPOLLIN, 0, "readable is watched: {mask:#x}");
        assert_eq!(mask & EPOLLOUT, 0, "writable is not watched: {mask:#x}");

        w.write_all(b"ping\n").await.unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping\n");
        peer.write_all(b"pong\n").unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(BOUND, r.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"pong\n");
        assert_eq!(epoll_masks(fd), vec![mask], "no other registration");
    }

    // Two workers: a writer that spun instead of waiting would still let
    // the test's own checks run and fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_a_write_into_a_full_socket_waits_for_the_reader_then_completes() {
        let (r, mut w, peer, fd) = pair();
        // Far more than a unix socket buffers.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w
        });
        // The peer reads nothing yet: the write cannot finish, and it
        // waits on a second registration that watches for room.
        let deadline = tokio::time::Instant::now() + BOUND;
        while !epoll_masks(fd).iter().any(|m| m & EPOLLOUT != 0) {
            assert!(tokio::time::Instant::now() < deadline, "never blocked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!writer.is_finished());
        let reader = std::thread::spawn(move || {
            let mut peer = peer;
            let mut got = vec![0u8; expected.len()];
            peer.read_exact(&mut got).unwrap();
            assert!(got == expected, "bytes differ");
        });
        let mut w = tokio::time::timeout(BOUND, writer).await.unwrap().unwrap();
        assert!(w.writable.is_some(), "watched for room until flushed");
        w.flush().await.unwrap();
        assert!(w.writable.is_none(), "the writable registration is gone");
        assert_eq!(epoll_masks(fd).len(), 1);
        drop((r, w));
        reader.join().unwrap();
    }

    #[tokio::test]
    async fn test_a_read_that_empties_the_socket_still_wakes_for_more() {
        let (mut r, _w, mut peer, _fd) = pair();
        peer.write_all(b"abc").unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(BOUND, r.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"abc");
        // The socket is empty: the next read waits, and data that comes
        // afterwards wakes it.
        let mut read = std::pin::pin!(r.read(&mut buf));
        assert!(futures_util::poll!(read.as_mut()).is_pending());
        peer.write_all(b"def").unwrap();
        let n = tokio::time::timeout(BOUND, read).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"def");
    }

    #[tokio::test]
    async fn test_data_and_eof_in_one_event_give_the_data_then_eof() {
        let (mut r, _w, mut peer, _fd) = pair();
        peer.write_all(b"ghi").unwrap();
        drop(peer);
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(BOUND, r.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"ghi");
        // That short read cleared readiness; EOF must still be seen.
        let n = tokio::time::timeout(BOUND, r.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "EOF");
    }
}
