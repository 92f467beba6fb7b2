//! A bound, in bytes, on what one response stream has handed to HTTP/2
//! and the socket has not yet taken.
//!
//! hyper takes a stream's next chunk whenever h2 grants the stream send
//! capacity, and h2 grants it up to the smaller of the window the client
//! advertised and hyper's per-stream send buffer (400 KB, not settable
//! through tonic). A client that advertises HTTP/2's largest windows and
//! then stops reading its socket thus made the bus hold ~400 KB per
//! subscription in h2, on top of its queue. [`InFlightBody`] counts the
//! bytes of every chunk it yields until h2 drops the chunk (written to
//! the socket, or the stream reset), and yields nothing more while that
//! count is at [`SEND_BUFFER`] or above: whatever the client's windows, a
//! stream holds at most [`SEND_BUFFER`] plus one chunk in hyper and h2.
//! Events it cannot send wait in its hub queue, which is bounded and
//! counts what it drops.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The bytes one subscription stream may have handed to HTTP/2 and not yet
/// written to the socket before it stops taking more (one chunk may cross
/// it). The socket takes a live reader's data as soon as h2 has it, so
/// this only binds for a reader that stops reading or a full window.
pub const SEND_BUFFER: usize = 64 * 1024;

/// The count shared by a stream's body and the chunks it has yielded.
#[derive(Debug, Default)]
struct Shared {
    bytes: AtomicUsize,
    /// The body's task, left when it stopped at the bound.
    waker: Mutex<Option<Waker>>,
}

impl Shared {
    fn full(&self, limit: usize) -> bool {
        self.bytes.load(Ordering::Acquire) >= limit
    }

    fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        let waker = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A yielded chunk: gives its bytes back to the count when h2 drops it.
struct Tracked {
    data: Bytes,
    shared: Arc<Shared>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.shared.release(self.data.len());
    }
}

/// A response body that stops yielding while [`SEND_BUFFER`] bytes of it
/// (or `limit`) are still held by HTTP/2 (see the module docs).
pub struct InFlightBody<B> {
    inner: B,
    limit: usize,
    shared: Arc<Shared>,
}

impl<B> InFlightBody<B> {
    /// Wraps `inner` with the bound [`SEND_BUFFER`].
    pub fn new(inner: B) -> Self {
        Self::with_limit(inner, SEND_BUFFER)
    }

    /// Wraps `inner` with the bound `limit` (at least one chunk is always
    /// taken).
    pub fn with_limit(inner: B, limit: usize) -> Self {
        InFlightBody {
            inner,
            limit: limit.max(1),
            shared: Arc::default(),
        }
    }

    /// The bytes yielded and not yet dropped by HTTP/2.
    pub fn in_flight(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

impl<B> Body for InFlightBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.shared.full(this.limit) {
            *this
                .shared
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            // A chunk dropped between the look and the registration has
            // found no waker: look again.
            if this.shared.full(this.limit) {
                return Poll::Pending;
            }
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        match frame.into_data() {
            Ok(data) => {
                this.shared.bytes.fetch_add(data.len(), Ordering::AcqRel);
                let tracked = Tracked {
                    data,
                    shared: Arc::clone(&this.shared),
                };
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(tracked)))))
            }
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::poll_fn;

    use super::*;

    /// Yields its chunks, then ends.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunk(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    fn poll_once(body: &mut InFlightBody<Chunks>) -> Poll<Option<Bytes>> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|f| f.map(|f| f.unwrap().into_data().unwrap()))
    }

    #[test]
    fn test_stops_at_the_bound_until_chunks_are_dropped() {
        let mut body = InFlightBody::with_limit(Chunks((0..5).map(|_| chunk(40)).collect()), 100);
        let Poll::Ready(Some(a)) = poll_once(&mut body) else {
            panic!("first chunk")
        };
        let Poll::Ready(Some(b)) = poll_once(&mut body) else {
            panic!("second chunk")
        };
        // The third crosses the bound; it is still taken.
        let Poll::Ready(Some(c)) = poll_once(&mut body) else {
            panic!("third chunk")
        };
        assert_eq!(body.in_flight(), 120);
        assert!(poll_once(&mut body).is_pending(), "at the bound");
        drop(a);
        assert_eq!(body.in_flight(), 80);
        let Poll::Ready(Some(d)) = poll_once(&mut body) else {
            panic!("room again")
        };
        assert_eq!(&d[..], &[7u8; 40][..]);
        drop((b, c, d));
        assert_eq!(body.in_flight(), 0);
    }

    #[tokio::test]
    async fn test_dropping_a_chunk_wakes_the_stopped_body() {
        let mut body = InFlightBody::with_limit(Chunks((0..3).map(|_| chunk(64)).collect()), 64);
        let first = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(first);
        });
        // Pending at the bound until the "writer" drops the first chunk.
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)),
        )
        .await
        .expect("woken when the chunk was dropped");
        assert!(second.is_some());
        writer.await.unwrap();
    }
}
