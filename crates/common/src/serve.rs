//! The gRPC serving scaffold: bind, health, reflection, graceful stop.
//!
//! A service collects its tonic services in a [`Services`] set and calls
//! [`serve`] with a [`Listener`] bound by its caller (so tests can bind port
//! 0 or a temp-dir socket). Every service then answers
//! `grpc.health.v1.Health` (SERVING for each of its services while it runs,
//! NOT_SERVING once shutdown starts) and server reflection (v1 and v1alpha,
//! for grpcurl of any age), listing exactly its own services.
//!
//! Connections are accepted by [`crate::accept`] (no spinning when out of
//! file descriptors; a connection that sends no HTTP/2 preface within
//! [`ServeOptions::preface_timeout`] is closed), and every connection gets
//! HTTP/2 keepalive pings and a cap on its concurrent streams
//! ([`ServeOptions`], which a service may tune with [`Services::options`]).

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::accept::Incoming;
use crate::config::{ConfigError, ListenAddr};

/// How long in-flight calls and streams may run on after shutdown starts
/// before the server stops waiting for them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Default `preface_timeout_ms` config value.
pub const DEFAULT_PREFACE_TIMEOUT_MS: u64 = 10_000;

/// Default [`ServeOptions::preface_timeout`] (the `preface_timeout_ms`
/// config key).
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_millis(DEFAULT_PREFACE_TIMEOUT_MS);

/// The values `preface_timeout_ms` may take, in milliseconds.
pub const PREFACE_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;

/// Default [`ServeOptions::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);

/// Default [`ServeOptions::keepalive_timeout`].
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default [`ServeOptions::max_concurrent_streams`]. tonic sets none (h2
/// then allows any number), so one connection could open streams without
/// end; the bus's benches open 100 subscriptions per connection and the
/// gateway will multiplex its callers over a few connections, so the cap
/// is well above what one legitimate client uses.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

/// How a server treats its connections. Every service starts from
/// [`ServeOptions::default`] with `preface_timeout` from its config
/// (`ServiceConfig::serve_options`), and may override any field for its
/// own traffic (e.g. the bus's flow-control windows) before handing them
/// to [`Services::options`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// A new connection that has not sent the 24-byte HTTP/2 preface
    /// within this long is closed (it would otherwise hold a file
    /// descriptor and a task for ever).
    pub preface_timeout: Duration,
    /// An HTTP/2 PING goes to each connection this often, so dead peers
    /// are noticed.
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this long is closed.
    pub keepalive_timeout: Duration,
    /// Concurrent streams (calls) one connection may have open
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// HTTP/2 initial stream flow-control window, bytes; `None`: tonic's
    /// default.
    pub initial_stream_window_size: Option<u32>,
    /// HTTP/2 initial connection flow-control window, bytes; `None`:
    /// tonic's default.
    pub initial_connection_window_size: Option<u32>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            preface_timeout: DEFAULT_PREFACE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            initial_stream_window_size: None,
            initial_connection_window_size: None,
        }
    }
}

/// Checks a `preface_timeout_ms` config value.
pub fn check_preface_timeout_ms(ms: u64) -> Result<(), ConfigError> {
    if PREFACE_TIMEOUT_MS_RANGE.contains(&ms) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        field: "preface_timeout_ms",
        value: ms.to_string(),
        reason: format!(
            "must be between {} and {}",
            PREFACE_TIMEOUT_MS_RANGE.start(),
            PREFACE_TIMEOUT_MS_RANGE.end()
        ),
    })
}

/// The reflection service names, listed alongside a service's own.
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: ListenAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
    /// A unix socket path is taken by a live server or by something that
    /// is not a socket.
    #[error("cannot listen on unix:{}: {reason}", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
        /// What holds it.
        reason: &'static str,
    },
    /// The reflection service could not be built from the descriptor set.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The embedded descriptor set does not decode (a build defect).
    #[error("cannot decode the embedded protobuf descriptor set")]
    Descriptors(#[source] prost::DecodeError),
    /// The transport failed while serving.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// A bound listening socket, TCP or unix.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix listener and the path it owns (removed when serving ends).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file (nobody accepting on it) is
    /// replaced; a live one, or a non-socket file, is an error.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServeError> {
        let bind_err = |source| ServeError::Bind {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Self::Tcp).map_err(bind_err),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                UnixListener::bind(path)
                    .map(|l| Self::Unix(l, path.clone()))
                    .map_err(bind_err)
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Self::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

/// Removes a stale unix socket file at `path` (nobody accepting on it);
/// a live socket, or a non-socket file, is an error. No file: nothing to
/// do.
pub async fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    let Ok(meta) = tokio::fs::symlink_metadata(path).await else {
        return Ok(());
    };
    let in_use = |reason| ServeError::SocketInUse {
        path: path.to_owned(),
        reason,
    };
    if !meta.file_type().is_socket() {
        return Err(in_use("the path exists and is not a socket"));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(in_use("another server is accepting on it"));
    }
    tokio::fs::remove_file(path)
        .await
        .map_err(|source| ServeError::Bind {
            addr: ListenAddr::Unix(path.to_owned()),
            source,
        })
}

/// The set of tonic services one server offers, remembered by name for
/// health and reflection.
#[derive(Default)]
pub struct Services {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    options: ServeOptions,
    gates: Vec<(&'static str, Gate)>,
}

/// A service's readiness, as it changes: `true` while the service can
/// answer.
type Gate = tokio::sync::watch::Receiver<bool>;

impl Services {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a generated tonic server (e.g. `SupervisorServer::new(svc)`).
    pub fn with<S>(mut self, svc: S) -> Self
    where
        S: tower_service::Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self.names.push(S::NAME);
        self
    }

    /// How connections are treated (default: [`ServeOptions::default`]).
    pub fn options(mut self, options: ServeOptions) -> Self {
        self.options = options;
        self
    }

    /// Reports service `name` SERVING while `ready` holds `true` and
    /// NOT_SERVING while it holds `false` (for a service that serves at
    /// once but whose calls fail while something outside it is missing).
    /// When the sender is dropped the last value stays.
    pub fn health_follows(mut self, name: &'static str, ready: Gate) -> Self {
        self.gates.push((name, ready));
        self
    }

    /// The fully-qualified names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Adds health and reflection and returns the routes to serve, plus the
    /// health reporter (every service already marked SERVING).
    pub async fn finish(self) -> Result<(Routes, HealthReporter), ServeError> {
        let Services {
            mut routes,
            names,
            gates,
            ..
        } = self;
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in &names {
            let serving = gates
                .iter()
                .find(|(g, _)| g == name)
                .is_none_or(|(_, ready)| *ready.borrow());
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(*name, status).await;
        }
        for (name, mut ready) in gates {
            let reporter = reporter.clone();
            tokio::spawn(async move {
                while ready.changed().await.is_ok() {
                    let status = if *ready.borrow_and_update() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    reporter.set_service_status(name, status).await;
                }
            });
        }
        let files = descriptors_for(qvirt_proto::FILE_DESCRIPTOR_SET, &names)?;
        let listed = names
            .iter()
            .copied()
            .chain(["grpc.health.v1.Health"])
            .chain(REFLECTION_SERVICES);
        let mut v1 = reflection_builder(files.clone());
        let mut v1alpha = reflection_builder(files);
        for name in listed {
            v1 = v1.with_service_name(name);
            v1alpha = v1alpha.with_service_name(name);
        }
        routes
            .add_service(health)
            .add_service(v1.build_v1().map_err(ServeError::Reflection)?)
            .add_service(v1alpha.build_v1alpha().map_err(ServeError::Reflection)?);
        Ok((routes.routes(), reporter))
    }
}

/// A reflection builder for `files`, with health's descriptors and
/// google.rpc's error details (so every server describes the details its
/// errors carry). The gateway, which builds its own file set, uses it too.
pub fn reflection_builder(files: FileDescriptorSet) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(files)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.ErrorInfo and BadRequest: so grpcurl and other
        // reflection clients can print the details of every error status.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// The files of the encoded set `encoded` that define one of `services`,
/// with everything they import: what reflection may describe. Files of
/// services this server does not offer (e.g. internal ones at the gateway)
/// stay out, so they cannot be looked up by symbol either.
fn descriptors_for(encoded: &[u8], services: &[&str]) -> Result<FileDescriptorSet, ServeError> {
    let all = FileDescriptorSet::decode(encoded).map_err(ServeError::Descriptors)?;
    let defines = |f: &FileDescriptorProto, svc: &str| {
        f.service
            .iter()
            .any(|s| format!("{}.{}", f.package(), s.name()) == svc)
    };
    let mut wanted: Vec<&str> = all
        .file
        .iter()
        .filter(|f| services.iter().any(|svc| defines(f, svc)))
        .map(|f| f.name())
        .collect();
    let mut i = 0;
    while let Some(name) = wanted.get(i).copied() {
        if let Some(file) = all.file.iter().find(|f| f.name() == name) {
            for dep in &file.dependency {
                if !wanted.contains(&dep.as_str()) {
                    wanted.push(dep);
                }
            }
        }
        i += 1;
    }
    let file = all
        .file
        .iter()
        .filter(|f| wanted.contains(&f.name()))
        .cloned()
        .collect();
    Ok(FileDescriptorSet { file })
}

/// Serves `services` on `listener` until `shutdown` is cancelled, then marks
/// every service NOT_SERVING, stops accepting, and waits up to
/// [`SHUTDOWN_GRACE`] for calls in flight.
pub async fn serve(
    listener: Listener,
    services: Services,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_wrapped(listener, services, shutdown, Plain).await
}

/// A connection as the HTTP/2 server takes it.
pub trait Connection:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected
    + Unpin
    + Send
    + 'static
{
}

impl<T> Connection for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static
{
}

/// Wraps each accepted connection before the HTTP/2 server sees it, for a
/// service that treats its sockets specially (the event bus gathers
/// writes).
pub trait WrapConnection: Clone + Send + 'static {
    /// A wrapped connection.
    type Wrapped<T: Connection>: Connection;
    /// Wraps `io`.
    fn wrap<T: Connection>(&self, io: T) -> Self::Wrapped<T>;
}

/// Connections as accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl WrapConnection for Plain {
    type Wrapped<T: Connection> = T;
    fn wrap<T: Connection>(&self, io: T) -> T {
        io
    }
}

/// [`serve`], with each accepted connection wrapped by `wrap`.
pub async fn serve_wrapped<W: WrapConnection>(
    listener: Listener,
    services: Services,
    shutdown: CancellationToken,
    wrap: W,
) -> Result<(), ServeError> {
    let names = services.names().to_vec();
    let options = services.options.clone();
    let (routes, reporter) = services.finish().await?;
    let addr = listener.local_addr().ok();
    tracing::info!(listen = %addr.map(|a| a.to_string()).unwrap_or_default(), services = ?names, "serving");

    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            // "" is the whole server: it stops serving too.
            for name in names.into_iter().chain([""]) {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        }
    };
    let result = match listener {
        Listener::Tcp(l) => {
            let wrap = wrap.clone();
            let incoming =
                Incoming::new(l, options.preface_timeout).map(move |r| r.map(|io| wrap.wrap(io)));
            run_until(routes, &options, incoming, stopping, &shutdown).await
        }
        Listener::Unix(l, path) => {
            let incoming =
                Incoming::new(l, options.preface_timeout).map(move |r| r.map(|io| wrap.wrap(io)));
            let r = run_until(routes, &options, incoming, stopping, &shutdown).await;
            // Best effort: the socket file is ours and useless now.
            let _ = std::fs::remove_file(&path);
            r
        }
    };
    tracing::info!("stopped");
    result
}

async fn run_until<I, IO, IE>(
    routes: Routes,
    options: &ServeOptions,
    incoming: I,
    stopping: impl Future<Output = ()>,
    shutdown: &CancellationToken,
) -> Result<(), ServeError>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = Server::builder()
        .layer(crate::telemetry::CallSpanLayer)
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .max_concurrent_streams(options.max_concurrent_streams)
        .initial_stream_window_size(options.initial_stream_window_size)
        .initial_connection_window_size(options.initial_connection_window_size)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stopping);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(ServeError::Transport),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still running after the grace period; stopping anyway");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &FileDescriptorSet) -> Vec<&str> {
        let mut v: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        v.sort();
        v
    }

    #[test]
    fn test_descriptors_hold_only_served_services_and_their_imports() {
        let set =
            descriptors_for(qvirt_proto::FILE_DESCRIPTOR_SET, &["qvirt.v1.Supervisor"]).unwrap();
        let files = names(&set);
        assert!(files.contains(&"qvirt/v1/supervisor.proto"), "{files:?}");
        assert!(files.contains(&"qvirt/v1/common.proto"), "{files:?}");
        assert!(!files.contains(&"qvirt/v1/hookexec.proto"), "{files:?}");
        assert!(!files.contains(&"qvirt/v1/agent.proto"), "{files:?}");
    }

    #[test]
    fn test_descriptors_for_nothing_is_empty() {
        let set = descriptors_for(qvirt_proto::FILE_DESCRIPTOR_SET, &[]).unwrap();
        assert!(set.file.is_empty());
    }
}
