//! The gateway's own HTTP/2 server for every listener (TCP, TLS, unix
//! sockets), built the way nginx serves: a fixed set of connection threads,
//! each a single-threaded runtime that accepts on every listener itself
//! and serves each of its connections as one task. A call is read, checked,
//! forwarded and answered on the thread that accepted its connection, and
//! that thread also holds its own connection to each backend
//! ([`crate::upstream`]), so nothing on a call's path wakes another thread.
//!
//! tonic's server (which the gateway used before) runs every call as a
//! task of its own on a work-stealing runtime, behind hyper's and tonic's service
//! layers: measured in the same runs, that cost about 25 µs more per
//! forwarded unary call than this (PERFORMANCE.md).
//!
//! - Public methods go straight to the [`Proxy`]; anything else (health,
//!   reflection, an unknown path) to tonic's router.
//! - TLS (rustls, [`crate::tls`]): the handshake, then the HTTP/2
//!   preface, each due within the preface timeout.
//! - HTTP/2: the same stream cap as every qvirt server, keepalive PINGs
//!   (a client that does not answer one in time is dropped), the preface
//!   deadline of [`qvirt_common::accept`], bounded header lists and send
//!   buffers.
//! - A client that resets a stream, or goes away, drops its call at once:
//!   the backend's stream is reset with it.
//! - On shutdown each connection is sent GOAWAY and may finish its calls
//!   for [`SHUTDOWN_GRACE`]; then its thread stops.

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use qvirt_common::accept::{Incoming, PrefaceDeadline};
use qvirt_common::serve::{Listener, SHUTDOWN_GRACE, ServeOptions};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::transport::server::Connected;

use crate::proxy::Proxy;
use crate::tls::TlsAcceptor;
use crate::upstream;

/// Flow-control windows offered to clients unless the serve options set
/// them, as for backends: a server stream to a client on loopback is
/// never held back by the window.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
/// The most of a response buffered per stream for a slow client (as
/// hyper's server).
const MAX_SEND_BUFFER: usize = 400 << 10;
/// The most header bytes accepted from a client.
const MAX_HEADER_LIST: u32 = 16 << 10;

/// What answers the calls of one listener.
#[derive(Clone)]
pub struct Handler {
    proxy: Proxy,
    router: axum::Router,
}

impl Handler {
    /// Public methods to `proxy`, everything else to `router`.
    pub fn new(proxy: Proxy, router: axum::Router) -> Self {
        Handler { proxy, router }
    }

    fn handle(&self, req: Request<Body>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        if self.proxy.serves(req.uri().path()) {
            return Box::pin(self.proxy.handle(req));
        }
        let router = self.router.clone();
        Box::pin(async move {
            match tower::ServiceExt::oneshot(router, req).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            }
        })
    }
}

/// A listener in a form every connection thread can accept on.
enum Shared {
    Tcp(std::net::TcpListener, Option<TlsAcceptor>),
    Unix(std::os::unix::net::UnixListener),
}

impl Shared {
    fn try_clone(&self) -> std::io::Result<Shared> {
        Ok(match self {
            Shared::Tcp(l, tls) => Shared::Tcp(l.try_clone()?, tls.clone()),
            Shared::Unix(l) => Shared::Unix(l.try_clone()?),
        })
    }
}

/// Serves `listeners` on `threads` connection threads until `shutdown`
/// fires and their connections have ended (or [`SHUTDOWN_GRACE`] has
/// passed); then removes the unix sockets' files.
pub async fn serve(
    listeners: Vec<(Listener, Option<TlsAcceptor>, Handler)>,
    threads: usize,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut shared = Vec::new();
    let mut paths = Vec::new();
    for (listener, tls, handler) in listeners {
        let l = match listener {
            Listener::Tcp(l) => Shared::Tcp(l.into_std()?, tls),
            Listener::Unix(l, path) => {
                paths.push(path);
                Shared::Unix(l.into_std()?)
            }
        };
        shared.push((l, handler));
    }
    let mut done = Vec::new();
    let mut result = Ok(());
    for i in 0..threads.max(1) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let options = options.clone();
        let stop = shutdown.clone();
        let failed = shutdown.clone();
        let spawned = shared
            .iter()
            .map(|(l, h)| Ok((l.try_clone()?, h.clone())))
            .collect::<std::io::Result<Vec<_>>>()
            .and_then(|mine| {
                std::thread::Builder::new()
                    .name(format!("gateway-conn-{i}"))
                    .spawn(move || {
                        let outcome = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .and_then(|rt| rt.block_on(thread(mine, options, stop)));
                        if outcome.is_err() {
                            // The gateway stops rather than serve on
                            // fewer threads than it was asked for.
                            failed.cancel();
                        }
                        let _ = tx.send(outcome);
                    })
            });
        // Threads already serving are stopped, and waited for, below.
        match spawned {
            Ok(_) => done.push(rx),
            Err(e) => {
                shutdown.cancel();
                result = Err(e);
                break;
            }
        }
    }
    // Each thread has its own copies: closing these lets a listener go
    // away as soon as the threads stop accepting, so that a client
    // connecting during the grace period is refused, not left hanging.
    drop(shared);
    for rx in done {
        let outcome = rx
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("a connection thread panicked")));
        if let Err(e) = outcome
            && result.is_ok()
        {
            shutdown.cancel();
            result = Err(e);
        }
    }
    for path in paths {
        // Best effort: the socket file is ours and useless now.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// One connection thread: accepts on every listener, serves each
/// connection as a task, and on shutdown lets them finish for the grace
/// period.
async fn thread(
    listeners: Vec<(Shared, Handler)>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    let mut accepting = Vec::new();
    for (listener, handler) in listeners {
        let serving = Serving {
            handler,
            tracker: tracker.clone(),
            options: options.clone(),
            shutdown: shutdown.clone(),
        };
        let preface = options.preface_timeout;
        let accept: Pin<Box<dyn Future<Output = ()>>> = match listener {
            Shared::Tcp(l, tls) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                Box::pin(accept(Incoming::new(l, preface), serving, tls))
            }
            Shared::Unix(l) => {
                let l = tokio::net::UnixListener::from_std(l)?;
                Box::pin(accept(Incoming::new(l, preface), serving, None))
            }
        };
        accepting.push(accept);
    }
    futures_util::future::join_all(accepting).await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still running after the grace period; stopping anyway");
    }
    Ok(())
}

/// What a listener's accept loop hands each of its connections.
struct Serving {
    handler: Handler,
    tracker: TaskTracker,
    options: ServeOptions,
    shutdown: CancellationToken,
}

/// Accepts connections (with `tls`, each completes its handshake within
/// the preface timeout) and serves each as a task of its own.
async fn accept<S, IO>(mut incoming: S, serving: Serving, tls: Option<TlsAcceptor>)
where
    S: futures_util::Stream<Item = std::io::Result<IO>> + Unpin,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let Serving {
        handler,
        tracker,
        options,
        shutdown,
    } = serving;
    loop {
        let io = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(_)) => continue,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (handler, options, shutdown) = (handler.clone(), options.clone(), shutdown.clone());
        let Some(acceptor) = tls.clone() else {
            let info = io.connect_info();
            tracker.spawn(connection(io, info, handler, options, shutdown));
            continue;
        };
        tracker.spawn(async move {
            let timeout = options.preface_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?timeout, "TLS handshake took too long");
                    return;
                }
            };
            // The HTTP/2 preface is due within the timeout too.
            let io = PrefaceDeadline::new(tls, timeout);
            let info = io.connect_info();
            connection(io, info, handler, options, shutdown).await;
        });
    }
}

/// Serves one client connection: its calls, its keepalive PINGs and, on
/// shutdown, its GOAWAY.
async fn connection<IO, I>(
    io: IO,
    info: I,
    handler: Handler,
    options: ServeOptions,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(options.max_concurrent_streams)
        .initial_window_size(options.initial_stream_window_size.unwrap_or(STREAM_WINDOW))
        .initial_connection_window_size(
            options
                .initial_connection_window_size
                .unwrap_or(CONNECTION_WINDOW),
        )
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        r = handshake => match r {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
        },
        () = shutdown.cancelled() => return,
    };
    let keepalive = keepalive(
        conn.ping_pong(),
        options.keepalive_interval,
        options.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let mut calls = FuturesUnordered::new();
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    // A call that panics ends alone (its stream is
                    // reset), as when each call was a task of its own.
                    let call = AssertUnwindSafe(call(req, respond, info.clone(), handler.clone()));
                    calls.push(call.catch_unwind().map(|outcome| {
                        if outcome.is_err() {
                            tracing::error!("a call panicked; its stream was reset");
                        }
                    }));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "client connection failed");
                    return;
                }
                None => return,
            },
            Some(()) = calls.next(), if !calls.is_empty() => {}
            () = &mut keepalive => {
                tracing::debug!(timeout = ?options.keepalive_timeout, "client did not answer a PING; closing its connection");
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// PINGs the client every `interval`; ends when one is not answered
/// within `timeout`.
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        let pong = tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await;
        if !matches!(pong, Ok(Ok(_))) {
            return;
        }
    }
}

/// One call: handled, then its response passed to the client as the
/// client's flow control allows. A client's reset ends it at once.
async fn call<I>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    info: I,
    handler: Handler,
) where
    I: Clone + Send + Sync + 'static,
{
    let mut req = req.map(|recv| Body::new(upstream::Incoming::from_recv(recv)));
    req.extensions_mut().insert(info);
    let response = tokio::select! {
        r = handler.handle(req) => r,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (parts, mut body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(mut send) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return,
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                    }
                    return;
                }
            },
            Some(Err(_)) => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
        };
        if send_data(&mut send, data).await.is_err() {
            return;
        }
    }
}

/// Sends `data` once the client's window has room for some of it (h2
/// holds the rest, so at most one frame's worth waits per stream).
async fn send_data(send: &mut h2::SendStream<Bytes>, data: Bytes) -> Result<(), h2::Error> {
    if data.is_empty() {
        return Ok(());
    }
    send.reserve_capacity(data.len());
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        }
    }
    send.send_data(data, false)
}
