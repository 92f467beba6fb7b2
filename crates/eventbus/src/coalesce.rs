//! A connection writer that gathers what many streams send at once into
//! one write.
//!
//! hyper serves HTTP/2 with a task per stream and one task per connection
//! that writes the streams' frames to the socket. When one published event
//! wakes fifty streams of one connection, tokio runs the connection task
//! right after the first stream that woke it (its LIFO slot), so it writes
//! that stream's frame alone, then the next one's, and so on: measured in
//! the event bus's fan-out bench, four to eight frames per `writev` where
//! fifty were ready, and each loopback write also wakes the reader.
//!
//! [`Coalescing`] takes the frames into its own buffer and, the first time
//! the connection asks to flush a buffer that has new bytes, steps back
//! once: it wakes its own task and returns `Pending`, so tokio runs it
//! again after the tasks already queued (the other woken streams, which
//! add their frames meanwhile). The second flush writes everything in one
//! go. Nothing waits on a timer: an idle runtime polls the connection again
//! at once, so a lone reply costs one more poll, not a delay.
//!
//! Only small writes are gathered: [`LIMIT`] bytes or more are a batch
//! already (a busy connection, where h2 fills its own buffer), so they go
//! to the socket uncopied, after whatever is buffered; and past [`LIMIT`]
//! pending bytes a write first pushes the buffer out. Either way the
//! buffer stays under twice [`LIMIT`], and a blocked socket makes the
//! writer wait as before, so a slow reader still holds the connection
//! back.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use qvirt_common::serve::{Connection, WrapConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Wraps every connection of the bus's server in [`Coalescing`] (see
/// [`qvirt_common::serve::serve_wrapped`]).
#[derive(Debug, Clone, Copy)]
pub struct GatherWrites {
    enabled: bool,
}

impl GatherWrites {
    /// Gathering on where it helps: only tokio's multi-thread scheduler runs
    /// a woken task next (its LIFO slot), so only there does the connection
    /// task write one frame at a time; the current-thread scheduler queues
    /// it behind the other woken streams anyway, and a step back there only
    /// added a round of delay. Call inside the runtime that serves.
    pub fn here() -> Self {
        let enabled = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        GatherWrites { enabled }
    }
}

impl WrapConnection for GatherWrites {
    type Wrapped<T: Connection> = Coalescing<T>;
    fn wrap<T: Connection>(&self, io: T) -> Coalescing<T> {
        Coalescing::new(io, self.enabled)
    }
}

/// The size from which writes are not gathered: pending bytes past it
/// go out before more are taken, and a write of at least this much with
/// nothing pending goes straight to the socket. A busy connection's h2
/// hands over up to 16 KiB at a time; copying those cost the event bus
/// throughput when saturated, while the writes worth gathering are a
/// frame or a few (about 110 bytes per event at the bus).
pub const LIMIT: usize = 4 * 1024;

/// A buffer capacity above which a drained buffer is given back, so an
/// idle connection does not keep its largest burst's allocation.
const KEEP_CAPACITY: usize = 2 * LIMIT;

/// A socket whose writes are gathered until the connection flushes, with
/// one step back before the first flush of new bytes (see the module
/// docs). With `enabled` false it passes every call straight through.
#[derive(Debug)]
pub struct Coalescing<T> {
    inner: T,
    enabled: bool,
    buf: Vec<u8>,
    /// How much of `buf` the socket has taken already.
    sent: usize,
    /// The connection has stepped back once for what `buf` holds.
    stepped_back: bool,
}

impl<T> Coalescing<T> {
    /// Wraps `inner`; `enabled` false makes the wrapper transparent.
    pub fn new(inner: T, enabled: bool) -> Self {
        Self {
            inner,
            enabled,
            buf: Vec::new(),
            sent: 0,
            stepped_back: false,
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        // A new batch starts: its first flush steps back again.
        self.stepped_back = false;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Before a write of `len` bytes: the buffer goes out first when it
    /// is full, or when the write is large (large writes go straight to
    /// the socket and must not overtake what is buffered).
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.pending() >= LIMIT || (self.pending() > 0 && len >= LIMIT) {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether a write of `len` bytes goes straight to the socket (once
    /// [`Self::poll_room`] has made room, nothing is pending then).
    fn direct(&self, len: usize) -> bool {
        !self.enabled || len >= LIMIT
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, data.len()))?;
        if this.direct(data.len()) {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.direct(len) {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let mut taken = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            taken += b.len();
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        // Gathered slices are copied anyway and direct ones go to a
        // vectored socket write: either way one call takes them all.
        self.enabled || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() > 0 {
            if !this.stepped_back && this.pending() < LIMIT {
                // Let the tasks already queued (other streams of this
                // connection, woken by the same event) add their frames.
                this.stepped_back = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.stepped_back = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: Connected> Connected for Coalescing<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{Future, poll_fn};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bound on every wait in these tests.
    const STEP: Duration = Duration::from_secs(5);

    async fn bounded<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(STEP, f).await.expect("timed out")
    }

    /// Records the writes that reach it. With `max` set, it takes at most
    /// that many bytes per call and answers every other call Pending
    /// (waking the caller), like a socket whose buffer keeps filling up.
    #[derive(Default)]
    struct Recording {
        writes: usize,
        bytes: Vec<u8>,
        max: Option<usize>,
        calls: usize,
    }

    impl Recording {
        fn choppy(max: usize) -> Self {
            Recording {
                max: Some(max),
                ..Default::default()
            }
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            if this.max.is_some() && this.calls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = data.len().min(this.max.unwrap_or(usize::MAX));
            this.writes += 1;
            this.bytes.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes all of `parts` as one vectored write after another, the way
    /// h2 hands over a frame's header and payload.
    async fn write_vectored_all(io: &mut Coalescing<Recording>, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0;
        while done < total {
            let mut skip = done;
            let mut slices = Vec::new();
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                } else {
                    slices.push(IoSlice::new(&p[skip..]));
                    skip = 0;
                }
            }
            let n = bounded(poll_fn(|cx| {
                Pin::new(&mut *io).poll_write_vectored(cx, &slices)
            }))
            .await
            .unwrap();
            assert!(n > 0);
            done += n;
        }
    }

    #[tokio::test]
    async fn test_writes_gathered_until_the_second_flush() {
        let mut io = Coalescing::new(Recording::default(), true);
        for frame in [&b"one "[..], b"two ", b"three"] {
            bounded(io.write_all(frame)).await.unwrap();
        }
        assert_eq!(io.inner.writes, 0, "nothing is written before a flush");
        // The first flush steps back and wakes itself; the second writes.
        let mut polls = 0;
        bounded(poll_fn(|cx| {
            polls += 1;
            let r = Pin::new(&mut io).poll_flush(cx);
            if polls == 1 {
                assert!(r.is_pending(), "the first flush of new bytes steps back");
                assert_eq!(io.inner.writes, 0);
            }
            r
        }))
        .await
        .unwrap();
        assert_eq!(polls, 2, "woken once, then written");
        assert_eq!(io.inner.writes, 1, "three writes went out as one");
        assert_eq!(io.inner.bytes, b"one two three");
        // Nothing pending: a flush does not step back.
        bounded(poll_fn(|cx| {
            let r = Pin::new(&mut io).poll_flush(cx);
            assert!(r.is_ready());
            r
        }))
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn test_full_buffer_goes_out_before_more_is_taken() {
        let mut io = Coalescing::new(Recording::default(), true);
        let chunk = vec![7u8; LIMIT / 4];
        for _ in 0..5 {
            bounded(io.write_all(&chunk)).await.unwrap();
        }
        assert_eq!(io.inner.writes, 1, "the fifth chunk found the buffer full");
        assert_eq!(io.inner.bytes.len(), LIMIT);
        bounded(io.flush()).await.unwrap();
        assert_eq!(io.inner.bytes.len(), 5 * LIMIT / 4);
    }

    #[tokio::test]
    async fn test_large_write_goes_straight_out_after_what_is_buffered() {
        let mut io = Coalescing::new(Recording::default(), true);
        bounded(io.write_all(b"small")).await.unwrap();
        let large = vec![1u8; LIMIT];
        bounded(io.write_all(&large)).await.unwrap();
        assert_eq!(io.inner.writes, 2, "the buffer, then the large write");
        assert_eq!(io.pending(), 0, "the large write was not copied");
        assert_eq!(&io.inner.bytes[..5], b"small");
        assert_eq!(io.inner.bytes.len(), 5 + LIMIT);
        // A small write after it is gathered again.
        bounded(io.write_all(b"x")).await.unwrap();
        assert_eq!(io.inner.writes, 2);
        assert_eq!(io.pending(), 1);
    }

    #[tokio::test]
    async fn test_partial_and_pending_socket_writes_keep_every_byte_in_order() {
        // A socket that takes 1000 bytes at most and says Pending every
        // other call; gathered, direct, vectored writes and flushes mixed.
        let mut io = Coalescing::new(Recording::choppy(1000), true);
        let mut want = Vec::new();
        let mut n = 0u8;
        let mut next = |len: usize| {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    n = n.wrapping_add(1);
                    n
                })
                .collect();
            v
        };
        for round in 0..20 {
            let header = next(9);
            let payload = next(if round % 3 == 0 { LIMIT + 500 } else { 300 });
            write_vectored_all(&mut io, &[&header, &payload]).await;
            want.extend_from_slice(&header);
            want.extend_from_slice(&payload);
            if round % 4 == 3 {
                bounded(io.flush()).await.unwrap();
                assert_eq!(io.pending(), 0);
            }
        }
        bounded(io.flush()).await.unwrap();
        assert_eq!(io.inner.bytes, want);
        assert!(io.buf.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test]
    async fn test_disabled_passes_through() {
        let mut io = Coalescing::new(Recording::default(), false);
        bounded(io.write_all(b"a")).await.unwrap();
        bounded(io.write_all(b"b")).await.unwrap();
        assert_eq!(io.inner.writes, 2);
        assert!(!io.is_write_vectored());
    }

    #[tokio::test]
    async fn test_shutdown_sends_what_is_buffered() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = Coalescing::new(a, true);
        bounded(io.write_all(b"last words")).await.unwrap();
        bounded(io.shutdown()).await.unwrap();
        let mut got = Vec::new();
        bounded(b.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"last words");
    }
}
