//! Forwarding by method path: every call to a public method is
//! authenticated, checked against its role and the caller's limits, and
//! passed to its backend as bytes, headers and trailers unchanged except
//! for the gateway's own metadata (`x-qvirt-*` from the client and its
//! `authorization` are removed; the internal token and
//! `x-qvirt-principal` are added). Messages are never decoded: the one
//! request message of a call is read whole (to bound its size, and, for
//! audited calls, to read `domain` and `request_id` from its raw bytes).
//!
//! - In fleet mode ([`crate::fleet`]) a Supervisor or GuestAgent call is
//!   sent to its domain's host, found from the request's `domain` and
//!   `host` read from the raw bytes, or answered by the gateway
//!   (ListDomains and DefineDomain requests are decoded for that).
//! - Backend statuses, messages and details reach the client unchanged.
//! - An unreachable backend, or one that dies while a call or stream is
//!   open, ends the call with UNAVAILABLE naming the service.
//! - A client that goes away drops the call here, which resets the
//!   backend's stream at once (the backend sees the cancellation).
//! - `grpc-timeout` travels to the backend with the other headers, and the
//!   gateway ends the call itself [`DEADLINE_OFFSET`] before the caller's
//!   deadline, with DEADLINE_EXCEEDED. tonic's server answers its own
//!   expiry of `grpc-timeout` with CANCELLED ("Timeout expired"); ending
//!   the call a little earlier, as Envoy's `grpc_timeout_header_offset`
//!   does, keeps that answer from reaching callers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt as _, Limited};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

use crate::audit::{self, Audit, Record};
use crate::auth::{self, Caller, Tokens, Transport};
use crate::descriptors::{self, Method};
use crate::fleet::{Dispatch, Fleet};
use crate::limits::{LimitError, Limiter, StreamPermit};
use crate::roles::{self, Role};
use crate::status::GatewayError;
use crate::tls::ClientMap;
use crate::upstream::{RequestBody, Upstream};

/// The metadata key carrying the caller's principal to backends.
pub const PRINCIPAL_METADATA: &str = "x-qvirt-principal";

/// gRPC's frame prefix: a compressed flag and a 4-byte length.
const FRAME_PREFIX: usize = 5;

/// How long before the caller's deadline the gateway ends a call (at most a
/// tenth of the caller's timeout).
pub const DEADLINE_OFFSET: Duration = Duration::from_millis(10);

/// The `grpc-timeout` of `headers`, if valid.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    qvirt_common::rpc::parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// When the gateway ends a call that arrived `now` with `headers`.
fn deadline_of(headers: &HeaderMap, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
    let timeout = grpc_timeout(headers)?;
    Some(now + qvirt_common::rpc::within_deadline(timeout, DEADLINE_OFFSET))
}

/// A backend: the service it serves and the connection to it (opened on
/// first use and again after a failure).
#[derive(Debug, Clone)]
pub struct Backend {
    /// `qvirt.v1.Supervisor` etc.
    pub service: &'static str,
    /// The connection, shared by every call.
    pub upstream: Arc<Upstream>,
}

/// What every connection's proxy shares.
#[derive(Debug)]
pub struct Shared {
    /// Every public method by path.
    pub methods: HashMap<String, Method>,
    /// Backends by service name (in fleet mode only the event bus).
    pub backends: HashMap<&'static str, Backend>,
    /// Fleet mode: the hosts' backends, chosen per call.
    pub fleet: Option<Arc<Fleet>>,
    /// The bearer tokens.
    pub tokens: Tokens,
    /// With mTLS: client certificates to principals.
    pub clients: Option<ClientMap>,
    /// The internal secret presented to backends.
    pub internal_token: Option<HeaderValue>,
    /// Per-principal limits.
    pub limiter: Limiter,
    /// The audit trail.
    pub audit: Audit,
}

/// The gateway's handler for one listener (its transport decides how
/// callers authenticate).
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    transport: Transport,
}

impl Proxy {
    /// A handler for calls arriving over `transport`.
    pub fn new(shared: Arc<Shared>, transport: Transport) -> Self {
        Proxy { shared, transport }
    }

    /// Whether `path` is a public method's (the rest is unknown here).
    pub fn serves(&self, path: &str) -> bool {
        self.shared.methods.contains_key(path)
    }

    /// Handles one call: authenticated, checked and forwarded, or refused.
    /// The caller's deadline counts from now.
    pub fn handle(&self, req: Request<Body>) -> impl Future<Output = Response<Body>> + use<> {
        let deadline = deadline_of(req.headers(), tokio::time::Instant::now());
        handle(Arc::clone(&self.shared), self.transport, deadline, req)
    }
}

impl tower::Service<Request<axum::body::Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<axum::body::Body>) -> Self::Future {
        // The deadline is taken here, as the call arrives, not when the
        // future first runs.
        let handled = self.handle(req.map(Body::new));
        Box::pin(async move { Ok(handled.await) })
    }
}

fn reply(err: &GatewayError) -> Response<Body> {
    err.to_status().into_http()
}

const EVENT_BUS: &str = "qvirt.v1.EventBus";

/// A unary answer the gateway gives itself: `message` (encoded) in one
/// uncompressed frame, then an OK status.
fn answer(message: Bytes) -> Response<Body> {
    let mut frame = Vec::with_capacity(FRAME_PREFIX + message.len());
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(Bytes::from(frame))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(Body::new(http_body_util::StreamBody::new(
        tokio_stream::iter(frames),
    )));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Who is at the other end of a call's connection.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(Option<std::net::SocketAddr>),
    Unix { uid: u32, pid: Option<i32> },
    Unknown,
}

impl Peer {
    fn of<B>(req: &Request<B>) -> Peer {
        if let Some(info) = req.extensions().get::<TcpConnectInfo>() {
            return Peer::Tcp(info.remote_addr());
        }
        if let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
            return Peer::Tcp(info.get_ref().remote_addr());
        }
        match req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
        {
            Some(cred) => Peer::Unix {
                uid: cred.uid(),
                pid: cred.pid(),
            },
            None => Peer::Unknown,
        }
    }

    fn uid(self) -> Option<u32> {
        match self {
            Peer::Unix { uid, .. } => Some(uid),
            _ => None,
        }
    }

    /// As audit lines show it: `IP:PORT`, or `uid:N,pid:N` on a unix
    /// socket.
    fn text(self) -> String {
        match self {
            Peer::Tcp(Some(addr)) => addr.to_string(),
            Peer::Unix {
                uid,
                pid: Some(pid),
            } => format!("uid:{uid},pid:{pid}"),
            Peer::Unix { uid, pid: None } => format!("uid:{uid}"),
            Peer::Tcp(None) | Peer::Unknown => String::new(),
        }
    }
}

/// What an audit line needs from a call's arrival; the line itself is
/// built only for a call that is audited (a write, or a denial).
struct Arrival {
    at: SystemTime,
    started: Instant,
    peer: Peer,
    transport: Transport,
}

impl Arrival {
    fn record(&self, principal: &str, method: &str) -> Record {
        Record {
            time: audit::rfc3339(self.at),
            principal: principal.to_owned(),
            peer: self.peer.text(),
            transport: self.transport.as_str(),
            method: method.to_owned(),
            domain: None,
            request_id: None,
            status: "",
            code: 0,
            duration_ms: 0.0,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    transport: Transport,
    deadline: Option<tokio::time::Instant>,
    req: Request<Body>,
) -> Response<Body> {
    let arrival = Arrival {
        at: SystemTime::now(),
        started: Instant::now(),
        peer: Peer::of(&req),
        transport,
    };
    let Some(method) = shared.methods.get(req.uri().path()).cloned() else {
        let method = req.uri().path().to_owned();
        return reply(&GatewayError::UnknownMethod { method });
    };
    let path = req.uri().path().to_owned();
    let deny = |mut record: Record, err: GatewayError| {
        let status = err.to_status();
        record.code = status.code() as i32;
        record.status = audit::code_name(record.code);
        record.duration_ms = arrival.started.elapsed().as_secs_f64() * 1e3;
        shared.audit.write_after_turn(record);
        status.into_http::<Body>()
    };
    let connection = match transport {
        Transport::Tls => certificate_caller(shared.clients.as_ref(), &req),
        _ => Ok(auth::socket_caller(transport, arrival.peer.uid())),
    };
    let authenticated = connection.and_then(|connection| {
        auth::authenticate(
            &shared.tokens,
            connection,
            req.headers().get(http::header::AUTHORIZATION),
        )
    });
    let caller = match authenticated {
        Ok(c) => c,
        Err(source) => {
            return deny(
                arrival.record("", &path),
                GatewayError::Unauthenticated {
                    method: path,
                    source,
                },
            );
        }
    };
    if caller.role < method.role {
        let err = GatewayError::PermissionDenied {
            method: path.clone(),
            required: method.role,
            principal: caller.principal.to_string(),
            role: caller.role,
        };
        return deny(arrival.record(&caller.principal, &path), err);
    }
    let limited = |source: LimitError| GatewayError::Limit {
        method: path.clone(),
        source,
    };
    if let Err(e) = shared.limiter.check_rate(&caller.principal) {
        return deny(arrival.record(&caller.principal, &path), limited(e));
    }
    let permit = if method.server_streaming || method.client_streaming {
        let monitor = path == roles::MONITOR_SUBSCRIPTION;
        match shared.limiter.open_stream(&caller.principal, monitor) {
            Ok(p) => Some(p),
            Err(e) => return deny(arrival.record(&caller.principal, &path), limited(e)),
        }
    } else {
        None
    };
    // Only writes are audited once they pass: reads build no line.
    let mut record =
        (method.role == Role::ReadWrite).then(|| arrival.record(&caller.principal, &path));

    let (mut parts, body) = req.into_parts();
    let body = if method.client_streaming {
        RequestBody::Stream(body)
    } else {
        let max = shared.limiter.limits().max_request_bytes as usize + FRAME_PREFIX;
        match Limited::new(body, max).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                if let Some(record) = &mut record {
                    record.domain = method
                        .domain_field
                        .and_then(|n| descriptors::string_in_frame(&bytes, n));
                    record.request_id = method
                        .request_id_field
                        .and_then(|n| descriptors::string_in_frame(&bytes, n));
                }
                RequestBody::Whole(bytes)
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let limit = shared.limiter.limits().max_request_bytes;
                let record = record.unwrap_or_else(|| arrival.record(&caller.principal, &path));
                return deny(record, limited(LimitError::RequestSize { limit }));
            }
            Err(_) => return reply(&GatewayError::RequestIncomplete { method: path }),
        }
    };
    rewrite_metadata(&mut parts.headers, &caller, shared.internal_token.as_ref());
    let mut finish = Finish {
        audit: record.map(|r| (Arc::clone(&shared), r, arrival.started)),
        code: None,
        _permit: permit,
    };
    let routed = match (&shared.fleet, &body) {
        (Some(fleet), RequestBody::Whole(bytes)) if method.service != EVENT_BUS => {
            match fleet.dispatch(&method, &path, bytes) {
                Ok(Dispatch::Forward {
                    backend,
                    host,
                    placed,
                }) => Some((backend, placed.map(|name| (Arc::clone(fleet), name, host)))),
                Ok(Dispatch::Answer(message)) => {
                    finish.code = Some(tonic::Code::Ok as i32);
                    return answer(message);
                }
                Err(err) => {
                    let status = err.to_status();
                    finish.code = Some(status.code() as i32);
                    return status.into_http::<Body>();
                }
            }
        }
        _ => None,
    };
    let (backend, placed) = match routed {
        Some((backend, placed)) => (backend, placed),
        None => match shared.backends.get(method.service) {
            Some(b) => (b.clone(), None),
            None => {
                let err = GatewayError::UnknownMethod { method: path };
                let status = err.to_status();
                finish.code = Some(status.code() as i32);
                return status.into_http::<Body>();
            }
        },
    };
    let service = backend.service;
    // A placed define that fails is no longer counted on its host.
    let unplace = |code: i32| {
        if code != tonic::Code::Ok as i32
            && let Some((fleet, name, host)) = &placed
        {
            fleet.unplace(name, host);
        }
    };
    tracing::debug!(method = %path, principal = %caller.principal, "forwarding");
    let call = backend.upstream.call(parts, body);
    let revoked = caller.revoked.clone();
    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        r = call => Outcome::Answered(r),
        () = async {
            match &revoked {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        } => Outcome::Revoked,
        () = expired => Outcome::Expired,
    };
    match outcome {
        Outcome::Revoked | Outcome::Expired => {
            let err = match outcome {
                Outcome::Revoked => GatewayError::Revoked { method: path },
                _ => GatewayError::DeadlineExceeded {
                    method: path,
                    service,
                },
            };
            let status = err.to_status();
            finish.code = Some(status.code() as i32);
            unplace(status.code() as i32);
            status.into_http::<Body>()
        }
        Outcome::Answered(Err(e)) => {
            let err = GatewayError::BackendUnavailable {
                method: path,
                service,
                cause: qvirt_common::error_chain(&e),
            };
            let status = err.to_status();
            finish.code = Some(status.code() as i32);
            unplace(status.code() as i32);
            status.into_http::<Body>()
        }
        Outcome::Answered(Ok(resp)) => {
            let (parts, body) = resp.into_parts();
            let trailers_only = grpc_status(&parts.headers);
            let body = match trailers_only {
                // A trailers-only answer: its headers end the stream, so
                // the client must get them with END_STREAM, as sent.
                Some(code) => {
                    finish.code = Some(code);
                    unplace(code);
                    Body::empty()
                }
                None => Body::new(body),
            };
            let guarded = Guarded {
                done: trailers_only.is_some(),
                inner: body,
                method: path,
                service,
                revoked: revoked.map(|t| Box::pin(t.cancelled_owned())),
                finish,
            };
            Response::from_parts(parts, Body::new(guarded))
        }
    }
}

/// How the wait for a backend's response headers ended.
enum Outcome<T> {
    /// The backend (or its channel) answered.
    Answered(T),
    /// The caller's token was revoked.
    Revoked,
    /// The caller's deadline, less the offset, passed.
    Expired,
}

/// With mTLS (`clients` configured), the caller the connection's verified
/// client certificate maps to; without, `None` (tokens decide).
fn certificate_caller<B>(
    clients: Option<&ClientMap>,
    req: &Request<B>,
) -> Result<Option<Caller>, auth::AuthError> {
    let Some(clients) = clients else {
        return Ok(None);
    };
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs);
    let leaf = certs.as_deref().and_then(|c| c.first()).ok_or_else(|| {
        auth::AuthError::Certificate("the connection presented no client certificate".into())
    })?;
    clients.caller(leaf).map(Some)
}

/// Removes the client's `x-qvirt-*` metadata and `authorization`, and adds
/// the gateway's: the internal token and the caller's principal.
fn rewrite_metadata(headers: &mut HeaderMap, caller: &Caller, internal: Option<&HeaderValue>) {
    let ours: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-qvirt-") || *k == http::header::AUTHORIZATION)
        .cloned()
        .collect();
    for k in ours {
        headers.remove(&k);
    }
    if let Some(token) = internal {
        headers.insert(qvirt_common::internal_auth::TOKEN_METADATA, token.clone());
    }
    if let Ok(principal) = HeaderValue::from_str(&caller.principal) {
        headers.insert(PRINCIPAL_METADATA, principal);
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// What is done when a forwarded call ends: its audit line (read-write
/// calls) and its place in the stream limits.
struct Finish {
    audit: Option<(Arc<Shared>, Record, Instant)>,
    code: Option<i32>,
    _permit: Option<StreamPermit>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some((shared, mut record, started)) = self.audit.take() {
            // No status seen: the client went away first.
            record.code = self.code.unwrap_or(tonic::Code::Cancelled as i32);
            record.status = audit::code_name(record.code);
            record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
            shared.audit.write_after_turn(record);
        }
    }
}

/// A backend's response body on its way to the client: a backend failure
/// becomes UNAVAILABLE trailers, a revoked token TOKEN_REVOKED ones.
struct Guarded {
    inner: Body,
    method: String,
    service: &'static str,
    done: bool,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    finish: Finish,
}

impl Guarded {
    fn end_with(&mut self, err: GatewayError) -> Frame<Bytes> {
        self.done = true;
        // Dropping the backend's body resets its stream.
        self.inner = Body::empty();
        let status = err.to_status();
        self.finish.code = Some(status.code() as i32);
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
        }
        Frame::trailers(trailers)
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(revoked) = &mut this.revoked
            && revoked.as_mut().poll(cx).is_ready()
        {
            let method = this.method.clone();
            return Poll::Ready(Some(Ok(this.end_with(GatewayError::Revoked { method }))));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.done = true;
                    this.finish.code = grpc_status(trailers).or(this.finish.code);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let err = GatewayError::BackendUnavailable {
                    method: this.method.clone(),
                    service: this.service,
                    cause: format!("the stream broke off: {e}"),
                };
                Poll::Ready(Some(Ok(this.end_with(err))))
            }
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.revoked.is_none() && self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_deadline_comes_before_the_callers_by_the_offset_or_a_tenth() {
        let now = tokio::time::Instant::now();
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static("5S"));
        assert_eq!(
            deadline_of(&headers, now),
            Some(now + Duration::from_secs(5) - DEADLINE_OFFSET)
        );
        headers.insert("grpc-timeout", HeaderValue::from_static("20m"));
        assert_eq!(
            deadline_of(&headers, now),
            Some(now + Duration::from_millis(18))
        );
        assert_eq!(deadline_of(&HeaderMap::new(), now), None);
    }
}
