//! Accepting connections without spinning, and not holding connections
//! that never speak.
//!
//! - [`AcceptBackoff`]: the one rule for a failed `accept(2)`, shared by
//!   every accept loop (the gRPC servers and the bus's `/metrics`). A
//!   failure that belongs to one connection (the peer reset it while it
//!   waited in the backlog) is skipped at once; any other failure, above
//!   all EMFILE/ENFILE (out of file descriptors), fails again at once on
//!   every retry, so the loop pauses [`ACCEPT_ERROR_PAUSE`] and warns at
//!   most once per [`ACCEPT_WARN_INTERVAL`], saying how many failures it
//!   did not report.
//! - [`Incoming`]: a TCP or unix listener as a stream of connections that
//!   follows that rule (tonic's own incoming streams retry at once).
//! - [`PrefaceDeadline`]: a connection that fails its reads once `timeout`
//!   passes before the client sent the 24 bytes of the HTTP/2 preface, so
//!   the server closes it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// How long an accept loop pauses after a failed accept that is not one
/// connection's own failure. Out of file descriptors, accept fails at once
/// every time: retrying at once would burn a core (~10,000 tries a second)
/// and starve the connections that are being served.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one warning about failed accepts per this long.
pub const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The length of the HTTP/2 client connection preface
/// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HTTP2_PREFACE_LEN: usize = 24;

/// The failed-accept rule (see the module docs): what to do after each
/// failure, and rate-limited warnings. One per accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    last_warned: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    /// The rule for an accept loop named `what` in its warnings (e.g.
    /// `"grpc"`, `"metrics"`).
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            last_warned: None,
            suppressed: 0,
        }
    }

    /// Records the failed accept `err`: `None` when it was one
    /// connection's failure (accept again at once), else the pause to take
    /// before the next accept. Warns on the first such failure and then at
    /// most once per [`ACCEPT_WARN_INTERVAL`].
    pub fn failed(&mut self, err: &io::Error) -> Option<Duration> {
        self.failed_at(err, Instant::now())
    }

    fn failed_at(&mut self, err: &io::Error, now: Instant) -> Option<Duration> {
        if is_connection_error(err) {
            tracing::debug!(accept = self.what, error = %err, "a connection failed before it was accepted");
            return None;
        }
        if let Some(unreported) = self.due(now) {
            tracing::warn!(
                accept = self.what,
                error = %err,
                unreported,
                pause = ?ACCEPT_ERROR_PAUSE,
                "accept failed; pausing after each failure"
            );
        }
        Some(ACCEPT_ERROR_PAUSE)
    }

    /// `Some(failures not reported since the last warning)` when a warning
    /// is due at `now`; otherwise counts this failure and gives `None`.
    fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last_warned {
            Some(then) if now.saturating_duration_since(then) < ACCEPT_WARN_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_warned = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Failures of one pending connection (as hyper's and axum's accept loops
/// sort them): the listener itself is fine.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || err.raw_os_error() == Some(libc::EPROTO)
}

/// A listener that can be polled for its next connection.
pub trait PollAccept {
    /// The accepted connection.
    type Conn;
    /// Polls for the next connection.
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl PollAccept for TcpListener {
    type Conn = TcpStream;
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        self.poll_accept(cx).map_ok(|(conn, _)| {
            // gRPC messages are small and latency matters: no Nagle.
            if let Err(e) = conn.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            conn
        })
    }
}

impl PollAccept for UnixListener {
    type Conn = UnixStream;
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        self.poll_accept(cx).map_ok(|(conn, _)| conn)
    }
}

/// A listener as a stream of connections following [`AcceptBackoff`]'s
/// rule; each connection is wrapped in a [`PrefaceDeadline`]. It never
/// yields an error: failures are handled here.
pub struct Incoming<L> {
    listener: L,
    backoff: AcceptBackoff,
    pause: Option<Pin<Box<Sleep>>>,
    preface_timeout: Duration,
}

impl<L: PollAccept> Incoming<L> {
    /// Connections from `listener`; each must send the HTTP/2 preface
    /// within `preface_timeout`.
    pub fn new(listener: L, preface_timeout: Duration) -> Self {
        Incoming {
            listener,
            backoff: AcceptBackoff::new("grpc"),
            pause: None,
            preface_timeout,
        }
    }
}

impl<L: PollAccept + Unpin> Stream for Incoming<L> {
    type Item = io::Result<PrefaceDeadline<L::Conn>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept_conn(cx)) {
                Ok(conn) => {
                    return Poll::Ready(Some(Ok(PrefaceDeadline::new(conn, this.preface_timeout))));
                }
                Err(e) => {
                    if let Some(pause) = this.backoff.failed(&e) {
                        this.pause = Some(Box::pin(tokio::time::sleep(pause)));
                    }
                }
            }
        }
    }
}

/// A server-side connection whose reads fail with `TimedOut` once its
/// deadline passes before [`HTTP2_PREFACE_LEN`] bytes arrived; after that
/// it is the plain connection.
#[derive(Debug)]
pub struct PrefaceDeadline<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl<T> PrefaceDeadline<T> {
    /// `inner`, which must send the preface within `timeout`.
    pub fn new(inner: T, timeout: Duration) -> Self {
        PrefaceDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            received: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = &mut this.deadline else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) => {
                this.received += buf.filled().len() - before;
                if this.received >= HTTP2_PREFACE_LEN {
                    this.deadline = None;
                }
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        received = this.received,
                        "closing a connection that sent no HTTP/2 preface in time"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the preface timeout",
                    )));
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for PrefaceDeadline<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    #[test]
    fn test_connection_errors_retry_at_once_others_pause() {
        let mut b = AcceptBackoff::new("test");
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            assert_eq!(b.failed(&io::Error::from(kind)), None);
        }
        assert_eq!(b.failed(&io::Error::from_raw_os_error(libc::EPROTO)), None);
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(
                b.failed(&io::Error::from_raw_os_error(errno)),
                Some(ACCEPT_ERROR_PAUSE),
                "{errno}"
            );
        }
    }

    #[test]
    fn test_accept_error_warnings_are_rate_limited() {
        let mut errors = AcceptBackoff::new("test");
        let t0 = Instant::now();
        assert_eq!(errors.due(t0), Some(0), "the first failure warns");
        // A failing loop paced at ACCEPT_ERROR_PAUSE stays quiet for the
        // rest of the interval, counting.
        let per_interval = ACCEPT_WARN_INTERVAL.as_millis() / ACCEPT_ERROR_PAUSE.as_millis();
        let mut at = t0;
        for _ in 1..per_interval {
            at += ACCEPT_ERROR_PAUSE;
            assert_eq!(errors.due(at), None);
        }
        // Then one warning with what went unreported.
        at += ACCEPT_ERROR_PAUSE;
        assert_eq!(errors.due(at), Some(per_interval as u64 - 1));
        assert_eq!(errors.due(at + ACCEPT_ERROR_PAUSE), None);
        assert_eq!(errors.due(at + ACCEPT_WARN_INTERVAL), Some(1));
        // A pause is long enough that a loop failing at once cannot spin.
        assert!(ACCEPT_ERROR_PAUSE >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn test_silent_connection_fails_its_read_after_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, Duration::from_millis(100));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
            .await
            .expect("the deadline ends the read");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn test_silent_unix_connection_fails_its_read_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut incoming = Incoming::new(
            UnixListener::bind(&path).unwrap(),
            Duration::from_millis(100),
        );
        let _silent = UnixStream::connect(&path).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
            .await
            .expect("the deadline ends the read");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn test_a_connection_that_sent_the_preface_has_no_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, Duration::from_millis(100));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; HTTP2_PREFACE_LEN];
        conn.read_exact(&mut buf).await.unwrap();
        // Well past the deadline, a read still waits for data.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        conn.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    }
}
