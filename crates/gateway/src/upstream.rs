//! The gateway's connections to one backend: an HTTP/2 connection per
//! thread that calls it (the `h2` crate, driven by a task of its own on
//! that thread's runtime), opened on first use and again after it fails,
//! with keepalive PINGs. A connection thread of [`crate::serve`] thus
//! forwards its calls over a connection of its own, and no call's I/O
//! wakes another thread.
//!
//! A call opens its stream from the task that serves the caller's stream,
//! and reads the backend's answer there too: the only other task on the
//! way is the connection's own, which does the socket I/O. tonic's
//! `Channel` (a buffer task, then hyper's dispatch task and a task per
//! response) put three more wake-ups on every call.
//!
//! - A call that finds the current connection closed or failed opens a
//!   new one (once; nothing of the call has been sent yet). A stream the
//!   backend refuses (GOAWAY) fails the call with UNAVAILABLE and makes
//!   the next call reconnect.
//! - Calls on one thread that arrive while its connect attempt is under
//!   way wait for it and share its outcome, and a call on any thread
//!   that waited while an attempt failed gets that failure, so a backend
//!   that does not answer costs each call at most one
//!   [`CONNECT_TIMEOUT`], never a queue of them.
//! - Dropping a call's response (or its body) resets the backend's stream
//!   with CANCEL, so the backend sees a caller that went away.
//! - A connection whose PING is not answered within [`KEEPALIVE_TIMEOUT`]
//!   is closed; its calls end with an error, the next call reconnects.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite};

/// How long connecting (TCP or unix, then the HTTP/2 handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an open connection is PINGed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Flow-control windows, as hyper's HTTP/2 client sets them: large
/// enough that a server stream is never held back by the window on
/// loopback.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
/// The most of a request body buffered for the backend per stream.
const MAX_SEND_BUFFER: usize = 1 << 20;
/// The most header bytes accepted from a backend.
const MAX_HEADER_LIST: u32 = 16 << 10;

/// Why a call could not reach its backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend's URL is not one the gateway can dial.
    #[error(
        "cannot dial {url}: expected http://HOST:PORT or unix:PATH (the gateway speaks plaintext HTTP/2 to its backends)"
    )]
    Url {
        /// The configured URL.
        url: String,
    },
    /// Connecting failed.
    #[error("cannot connect to {url}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than [`CONNECT_TIMEOUT`].
    #[error("connecting to {url} took longer than {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        /// Where.
        url: String,
    },
    /// An attempt to connect that another call made while this one
    /// waited failed.
    #[error("connecting to {url} failed: {cause}")]
    Failed {
        /// Where.
        url: String,
        /// Why, as the attempt's error chain.
        cause: String,
    },
    /// The HTTP/2 connection or stream failed.
    #[error("HTTP/2 with {url} failed")]
    Http2 {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: h2::Error,
    },
}

#[derive(Debug, Clone)]
enum Target {
    Tcp(String),
    Unix(PathBuf),
}

/// One open connection: its request handle and whether it has ended.
#[derive(Clone)]
struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// One calling thread's connection to the backend.
struct Slot {
    thread: ThreadId,
    /// Its open connection, if any.
    current: Option<Connection>,
    /// Held while the thread connects, so that its calls share one
    /// attempt.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

/// A backend's connections, one per calling thread.
pub struct Upstream {
    url: String,
    target: Target,
    authority: Authority,
    slots: std::sync::Mutex<Vec<Slot>>,
    /// When an attempt to connect (on any thread) last failed, and why.
    failed: std::sync::Mutex<Option<(Instant, String)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("url", &self.url).finish()
    }
}

/// A request's body as the gateway sends it.
pub enum RequestBody {
    /// Read whole (unary and server-streaming calls).
    Whole(Bytes),
    /// Passed on frame by frame (client-streaming calls).
    Stream(tonic::body::Body),
}

impl Upstream {
    /// A backend at `url` (`http://HOST:PORT`, `unix:PATH` or
    /// `unix://PATH`); nothing is dialled until the first call.
    pub fn new(url: &str) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::Url {
            url: url.to_owned(),
        };
        let (target, authority) =
            if let Some(path) = url.strip_prefix("unix://").or(url.strip_prefix("unix:")) {
                (
                    Target::Unix(PathBuf::from(path)),
                    Authority::from_static("localhost"),
                )
            } else {
                let uri: Uri = url.parse().map_err(|_| bad())?;
                if uri.scheme() != Some(&Scheme::HTTP) {
                    return Err(bad());
                }
                let authority = uri.authority().ok_or_else(bad)?.clone();
                let host = authority.host();
                let port = authority.port_u16().unwrap_or(80);
                let addr = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                (Target::Tcp(addr), authority)
            };
        Ok(Upstream {
            url: url.to_owned(),
            target,
            authority,
            slots: std::sync::Mutex::new(Vec::new()),
            failed: std::sync::Mutex::new(None),
        })
    }

    /// The URL it was made from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `f` on this thread's slot, made if missing.
    fn with_slot<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> T {
        let me = std::thread::current().id();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let at = match slots.iter().position(|s| s.thread == me) {
            Some(at) => at,
            None => {
                slots.push(Slot {
                    thread: me,
                    current: None,
                    connecting: Arc::default(),
                });
                slots.len() - 1
            }
        };
        f(&mut slots[at])
    }

    /// This thread's open connection.
    fn live(&self) -> Option<Connection> {
        self.with_slot(|s| {
            s.current
                .as_ref()
                .filter(|c| !c.closed.load(Ordering::Acquire))
                .cloned()
        })
    }

    /// This thread's open connection, or a new one.
    async fn connection(&self) -> Result<Connection, UpstreamError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let asked = Instant::now();
        let connecting = self.with_slot(|s| Arc::clone(&s.connecting));
        let _attempt = connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        // An attempt that failed while this call waited, on this thread or
        // another, is this call's answer too: callers never queue behind
        // one dead backend's connect timeouts one after the other.
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((at, cause)) = failed
            && at >= asked
        {
            return Err(UpstreamError::Failed {
                url: self.url.clone(),
                cause,
            });
        }
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                url: self.url.clone(),
            })
            .and_then(|r| r);
        match attempt {
            Ok(c) => {
                self.with_slot(|s| s.current = Some(c.clone()));
                Ok(c)
            }
            Err(e) => {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), qvirt_common::error_chain(&e)));
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<Connection, UpstreamError> {
        let failed = |source| UpstreamError::Connect {
            url: self.url.clone(),
            source,
        };
        match &self.target {
            Target::Tcp(addr) => {
                let io = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(failed)?;
                io.set_nodelay(true).map_err(failed)?;
                self.handshake(io).await
            }
            Target::Unix(path) => {
                let io = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?;
                self.handshake(io).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<Connection, UpstreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| UpstreamError::Http2 {
                url: self.url.clone(),
                source,
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        let url = self.url.clone();
        let ping = conn.ping_pong();
        tokio::spawn(async move {
            let keepalive = async {
                let Some(mut ping) = ping else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                    let pong =
                        tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque()));
                    if !matches!(pong.await, Ok(Ok(_))) {
                        return;
                    }
                }
            };
            tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => tracing::debug!(backend = %url, "backend connection closed"),
                    Err(e) => tracing::debug!(backend = %url, error = %e, "backend connection failed"),
                },
                () = keepalive => tracing::warn!(backend = %url, timeout = ?KEEPALIVE_TIMEOUT, "backend did not answer a PING; closing its connection"),
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Connection { send, closed })
    }

    fn http2(&self, source: h2::Error) -> UpstreamError {
        UpstreamError::Http2 {
            url: self.url.clone(),
            source,
        }
    }

    /// Sends a request (`head`'s URI is given the backend's scheme and
    /// authority) and waits for the response's headers.
    pub async fn call(
        &self,
        mut head: http::request::Parts,
        body: RequestBody,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = Uri::from_parts(uri).map_err(|_| UpstreamError::Url {
            url: self.url.clone(),
        })?;
        let end = matches!(&body, RequestBody::Whole(b) if b.is_empty());
        let request = Request::from_parts(head, ());
        let (mut send, closed) = self.ready().await?;
        let (response, mut stream) = send.send_request(request, end).map_err(|e| {
            // Refused (GOAWAY): the next call opens a new connection.
            closed.store(true, Ordering::Release);
            self.http2(e)
        })?;
        let _pipe = match body {
            RequestBody::Whole(bytes) if !end => {
                stream.send_data(bytes, true).map_err(|e| self.http2(e))?;
                None
            }
            RequestBody::Whole(_) => None,
            RequestBody::Stream(body) => Some(AbortOnDrop(tokio::spawn(pipe(body, stream)))),
        };
        let response = response.await.map_err(|e| self.http2(e))?;
        Ok(response.map(|recv| Incoming {
            recv,
            data_done: false,
            _pipe,
        }))
    }

    /// A request handle ready for a new stream. A connection that cannot
    /// take one is replaced once: nothing of the call has been sent.
    async fn ready(&self) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), UpstreamError> {
        let mut retried = false;
        loop {
            let c = self.connection().await?;
            match c.send.clone().ready().await {
                Ok(send) => return Ok((send, c.closed)),
                Err(e) => {
                    c.closed.store(true, Ordering::Release);
                    if retried {
                        return Err(self.http2(e));
                    }
                    retried = true;
                }
            }
        }
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Passes a client-streaming request's frames to the backend, as the
/// backend's flow control allows; a client that breaks off resets the
/// backend's stream.
async fn pipe(mut body: tonic::body::Body, mut stream: h2::SendStream<Bytes>) {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while !data.is_empty() {
                        stream.reserve_capacity(data.len());
                        let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                        let Some(Ok(n)) = granted else {
                            return;
                        };
                        let chunk = data.split_to(n.min(data.len()));
                        if stream.send_data(chunk, false).is_err() {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                }
            },
        }
    }
}

/// A received HTTP/2 body (a backend's response, or a client's request):
/// its DATA frames (their window given back as they are passed on), then
/// its trailers.
#[derive(Debug)]
pub struct Incoming {
    recv: h2::RecvStream,
    data_done: bool,
    _pipe: Option<AbortOnDrop>,
}

impl Incoming {
    /// The body of a stream received from a client (no request piped).
    pub fn from_recv(recv: h2::RecvStream) -> Self {
        Incoming {
            recv,
            data_done: false,
            _pipe: None,
        }
    }
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// An [`Upstream`] as a tower service, for tonic's generated clients (the
/// health checks): the request body is read whole first.
#[derive(Debug, Clone)]
pub struct UpstreamService(pub Arc<Upstream>);

/// The most of a request body [`UpstreamService`] reads.
const MAX_SERVICE_REQUEST: usize = 64 << 10;

impl tower::Service<Request<tonic::body::Body>> for UpstreamService {
    type Response = Response<tonic::body::Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let upstream = Arc::clone(&self.0);
        Box::pin(async move {
            use http_body_util::BodyExt as _;
            let (head, body) = req.into_parts();
            let bytes = http_body_util::Limited::new(body, MAX_SERVICE_REQUEST)
                .collect()
                .await?
                .to_bytes();
            let response = upstream.call(head, RequestBody::Whole(bytes)).await?;
            Ok(response.map(tonic::body::Body::new))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn test_urls_it_dials_and_refuses() {
        let tcp = Upstream::new("http://127.0.0.1:50052").unwrap();
        assert!(matches!(&tcp.target, Target::Tcp(a) if a == "127.0.0.1:50052"));
        assert_eq!(tcp.authority.as_str(), "127.0.0.1:50052");
        let v6 = Upstream::new("http://[::1]:7").unwrap();
        assert!(matches!(&v6.target, Target::Tcp(a) if a == "[::1]:7"));
        let default_port = Upstream::new("http://localhost").unwrap();
        assert!(matches!(&default_port.target, Target::Tcp(a) if a == "localhost:80"));
        for unix in ["unix:/run/bus.sock", "unix:///run/bus.sock"] {
            let u = Upstream::new(unix).unwrap();
            assert!(
                matches!(&u.target, Target::Unix(p) if p == std::path::Path::new("/run/bus.sock"))
            );
        }
        for bad in ["https://127.0.0.1:1", "127.0.0.1:1", "ftp://x", ""] {
            assert!(
                matches!(Upstream::new(bad), Err(UpstreamError::Url { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn test_a_backend_that_is_not_there_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let u = Upstream::new(&format!("unix:{}", path.display())).unwrap();
        let head = Request::post("/qvirt.v1.Supervisor/GetDomain")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let err = u
            .call(head, RequestBody::Whole(Bytes::from_static(b"\0\0\0\0\0")))
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn test_callers_at_once_to_a_missing_backend_all_fail_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let url = format!("unix:{}", path.display());
        let u = Arc::new(Upstream::new(&url).unwrap());
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let u = Arc::clone(&u);
                tokio::spawn(async move {
                    let head = Request::post("/qvirt.v1.Supervisor/GetDomain")
                        .body(())
                        .unwrap()
                        .into_parts()
                        .0;
                    u.call(head, RequestBody::Whole(Bytes::from_static(b"\0\0\0\0\0")))
                        .await
                        .unwrap_err()
                })
            })
            .collect();
        for call in calls {
            let err = call.await.unwrap();
            assert!(
                matches!(
                    err,
                    UpstreamError::Connect { .. } | UpstreamError::Failed { .. }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains(&url), "{err}");
        }
    }
}
