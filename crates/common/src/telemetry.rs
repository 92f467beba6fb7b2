//! Logging set-up: `tracing` to stderr, as text for a terminal or JSON for
//! a collector, with levels from `RUST_LOG` (default `info`). Text has
//! colour codes only when stderr is a terminal, so log files stay plain.
//!
//! Every RPC of every service runs in an `rpc` span ([`CallSpanLayer`],
//! added by the serve helper): `method` and `peer` from the request,
//! `domain`, `request_id` and `principal` recorded by the handler
//! ([`record_call`]) where it has them. When the call's response starts, one
//! `rpc done` line carries the gRPC code and the time taken, inside that
//! span, so `--log-format json` gives a line per call to grep by domain.
//! Health and reflection calls log at debug.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, early in `main`; a second
/// call is ignored (useful in tests).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    // Already installed: keep the first one.
    drop(result);
}

/// Records on the current RPC's span what only the handler knows: the
/// domain it acts on, the request id, and the caller's principal. Empty
/// values are left unrecorded.
pub fn record_call(domain: &str, request_id: &str, principal: &str) {
    let span = tracing::Span::current();
    for (field, value) in [
        ("domain", domain),
        ("request_id", request_id),
        ("principal", principal),
    ] {
        if !value.is_empty() {
            span.record(field, value);
        }
    }
}

/// A tower layer that runs each call in an `rpc` span and logs its end.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallSpanLayer;

impl<S> tower::Layer<S> for CallSpanLayer {
    type Service = CallSpan<S>;

    fn layer(&self, inner: S) -> CallSpan<S> {
        CallSpan { inner }
    }
}

/// The service [`CallSpanLayer`] makes.
#[derive(Debug, Clone)]
pub struct CallSpan<S> {
    inner: S,
}

/// The peer of a request, as tonic's connect info records it.
fn peer_of<B>(req: &http::Request<B>) -> String {
    use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};
    if let Some(addr) = req
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
    {
        return addr.to_string();
    }
    if let Some(cred) = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        return format!("unix:uid:{}", cred.uid());
    }
    String::new()
}

/// Whether `path` is a health or reflection call (logged at debug).
fn is_plumbing(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallSpan<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tracing::Instrument as _;
        use tracing::field::Empty;
        let method = req.uri().path().to_owned();
        let plumbing = is_plumbing(&method);
        let peer = peer_of(&req);
        let span = if plumbing {
            tracing::debug_span!("rpc", %method, %peer, domain = Empty, request_id = Empty, principal = Empty)
        } else {
            tracing::info_span!("rpc", %method, %peer, domain = Empty, request_id = Empty, principal = Empty)
        };
        let started = std::time::Instant::now();
        let call = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let result = call.await;
            let _entered = span.enter();
            let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            // Errors are "trailers-only" responses, their status in the
            // headers; a call that succeeds sends its status in trailers.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Unknown as i32,
            };
            let code = tonic::Code::from_i32(code);
            if plumbing {
                tracing::debug!(code = ?code, elapsed_us, "rpc done");
            } else {
                tracing::info!(code = ?code, elapsed_us, "rpc done");
            }
            result
        })
    }
}
