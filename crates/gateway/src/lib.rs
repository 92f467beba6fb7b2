//! qvirt-gateway: the one public endpoint. It serves the public qvirt
//! services (`qvirt.v1.Supervisor`, `qvirt.v1.EventBus`,
//! `qvirt.v1.GuestAgent`) by forwarding each call, by method path and as
//! raw bytes, to the backend that serves it, after authenticating the
//! caller (bearer tokens, mTLS client certificates ([`tls`]), or
//! libvirt-style read-write and read-only unix sockets), checking the
//! method's role ([`roles`]) and the caller's limits ([`limits`]), and
//! before auditing it ([`audit`]). Reflection
//! lists exactly the public services; internal services and methods are
//! UNIMPLEMENTED here. Health follows each backend's ([`health`]).
//!
//! Modules: [`proxy`] (forwarding by method path), [`auth`] (tokens and
//! socket peers), [`tls`] (server TLS and client certificates), [`roles`]
//! (the one role table), [`limits`] (per-principal streams, rate, size),
//! [`upstream`] (the HTTP/2 connection to each backend),
//! [`audit`] (the JSON-lines trail), [`health`], [`descriptors`] (the
//! public API and reflection), [`fleet`] (fleet mode: routing by the
//! registry, fleet-wide ListDomains, placement), [`config`], and
//! [`status`] (the gateway's own errors).
//!
//! Entry point: [`run`], called by `main.rs` with the bound `listen`
//! listener (served over TLS when the config has a `tls` section), the
//! shutdown token and the config file's path (tokens are reloaded from it
//! on SIGHUP).

pub mod audit;
pub mod auth;
pub mod config;
pub mod descriptors;
pub mod fleet;
pub mod health;
pub mod limits;
pub mod proxy;
pub mod roles;
pub mod serve;
pub mod status;
pub mod tls;
pub mod upstream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::config::{ConfigError, ListenAddr};
use qvirt_common::internal_auth::{InternalToken, TOKEN_METADATA};
use qvirt_common::serve::{Listener, ServeError};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

pub use config::Config;

use crate::auth::{Tokens, Transport};
use crate::proxy::{Backend, Proxy, Shared};

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayRunError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The descriptor set does not match the role table.
    #[error(transparent)]
    Descriptors(#[from] descriptors::DescriptorError),
    /// The fleet registry's client cannot be set up.
    #[error("fleet registry")]
    Registry(#[from] qvirt_registry::RegistryError),
    /// The audit file cannot be opened.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// The TLS files are unusable (e.g. the key does not match the
    /// certificate).
    #[error("cannot set up TLS")]
    Tls(#[source] tls::TlsSetupError),
    /// The connection threads could not be started or failed.
    #[error("cannot serve on the connection threads")]
    Threads(#[source] std::io::Error),
    /// A unix socket could not be given its mode or owner.
    #[error("cannot set up the unix socket {path}")]
    Socket {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The backend configured as `field`: a plaintext `http://` URL or a
/// unix socket (the gateway does not speak TLS to its backends).
fn backend(field: &'static str, service: &'static str, url: &str) -> Result<Backend, ConfigError> {
    let upstream = upstream::Upstream::new(url).map_err(|e| ConfigError::Invalid {
        field,
        value: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Backend {
        service,
        upstream: Arc::new(upstream),
    })
}

fn internal_header(path: Option<&PathBuf>) -> Result<Option<http::HeaderValue>, ConfigError> {
    let Some(token) = InternalToken::load_optional(path)? else {
        tracing::warn!(
            "no internal_token_file: backends refuse the gateway's calls unless they reach it over a unix socket as one of their internal uids"
        );
        return Ok(None);
    };
    let request =
        tonic::service::Interceptor::call(&mut token.interceptor(), tonic::Request::new(())).ok();
    Ok(request
        .as_ref()
        .and_then(|r| r.metadata().get(TOKEN_METADATA))
        .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok()))
}

/// Serves the public services on `listener` (and the configured unix
/// sockets) until `shutdown` fires. `config_path` is where tokens are
/// reloaded from on SIGHUP.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
    config_path: Option<PathBuf>,
) -> Result<(), GatewayRunError> {
    let methods = descriptors::methods()?;
    let internal_token = internal_header(config.internal_token_file.as_ref())?;
    let mut backends = HashMap::new();
    for (field, service, url) in [
        ("supervisor", "qvirt.v1.Supervisor", &config.supervisor),
        ("eventbus", "qvirt.v1.EventBus", &config.eventbus),
        ("agentd", "qvirt.v1.GuestAgent", &config.agentd),
    ] {
        // In fleet mode the hosts' records name the supervisors and
        // agent services.
        if config.fleet.is_none() || service == "qvirt.v1.EventBus" {
            backends.insert(service, backend(field, service, url)?);
        }
    }
    let fleet = config.fleet.as_ref().map(|_| fleet::Fleet::new());
    let tls = config.tls.as_ref().map(tls::Material::load).transpose()?;
    let clients = config
        .tls
        .as_ref()
        .filter(|t| t.client_ca_file.is_some())
        .map(|t| tls::ClientMap::new(&t.clients));
    if config.tokens.is_empty() && clients.is_none() {
        tracing::warn!("no tokens configured: TCP callers are all refused (UNAUTHENTICATED)");
    }
    let shared = Arc::new(Shared {
        methods,
        backends,
        fleet: fleet.as_ref().map(|(f, _)| Arc::clone(f)),
        tokens: Tokens::new(&config.tokens),
        clients,
        internal_token,
        limiter: limits::Limiter::new(config.limits.clone()),
        audit: audit::Audit::open(config.audit_file.as_deref())?,
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let poll = Duration::from_millis(config.health_poll_ms);
    if let (Some((fleet, updater)), Some(f)) = (fleet, &config.fleet) {
        for service in fleet::ROUTED_SERVICES {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let access = f.access()?;
        let (snapshots, connected) = fleet::view::start(&f.urls, &access, shutdown.clone()).await?;
        tokio::spawn(fleet::follow(
            fleet,
            updater,
            snapshots,
            connected,
            reporter.clone(),
            shutdown.clone(),
        ));
    }
    for backend in shared.backends.values() {
        reporter
            .set_service_status(backend.service, ServingStatus::NotServing)
            .await;
        tokio::spawn(health::follow(
            reporter.clone(),
            backend.clone(),
            poll,
            shutdown.clone(),
        ));
    }
    let files = descriptors::reflection_files()?;
    let mut v1 = qvirt_common::serve::reflection_builder(files.clone());
    let mut v1alpha = qvirt_common::serve::reflection_builder(files);
    let listed = roles::PUBLIC_SERVICES.into_iter().chain([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    for name in listed {
        v1 = v1.with_service_name(name);
        v1alpha = v1alpha.with_service_name(name);
    }
    let v1 = v1.build_v1().map_err(ServeError::Reflection)?;
    let v1alpha = v1alpha.build_v1alpha().map_err(ServeError::Reflection)?;
    let router = |transport| {
        Routes::new(health.clone())
            .add_service(v1.clone())
            .add_service(v1alpha.clone())
            .into_axum_router()
            .fallback_service(Proxy::new(Arc::clone(&shared), transport))
    };

    let options = config.serve_options();
    // A key that does not match its certificate fails here, before
    // anything is served.
    let acceptor = tls
        .as_ref()
        .map(tls::Material::acceptor)
        .transpose()
        .map_err(GatewayRunError::Tls)?;
    let main_transport = match &acceptor {
        Some(_) => Transport::Tls,
        None => Transport::Tcp,
    };
    let mut listeners = vec![(listener, main_transport, acceptor)];
    for (socket, transport, default_mode) in [
        (&config.rw_socket, Transport::UnixRw, 0o600),
        (&config.ro_socket, Transport::UnixRo, 0o666),
    ] {
        if let Some(s) = socket {
            listeners.push((bind_socket(s, default_mode).await?, transport, None));
        }
    }

    // Listening before anything serves: a SIGHUP that arrives once a
    // client can see the gateway serving is never missed (this runtime
    // may not run the task before the connection threads answer).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tokio::spawn(reload_on_hangup(
        Arc::clone(&shared),
        config_path,
        hup,
        shutdown.clone(),
    ));
    let idle = {
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => shared.limiter.forget_idle(),
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    tokio::spawn(idle);

    let mut endpoints = Vec::new();
    for (l, transport, acceptor) in listeners {
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let mtls = transport == Transport::Tls && shared.clients.is_some();
        tracing::info!(listen = %addr, transport = transport.as_str(), mtls, services = ?roles::PUBLIC_SERVICES, "serving");
        let proxy = Proxy::new(Arc::clone(&shared), transport);
        endpoints.push((l, acceptor, serve::Handler::new(proxy, router(transport))));
    }
    let threads = match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let serving = serve::serve(endpoints, threads, options, shutdown.clone());
    let stopping = {
        let reporter = reporter.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            for name in roles::PUBLIC_SERVICES.into_iter().chain([""]) {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        }
    };
    tokio::spawn(stopping);
    let result = serving.await.map_err(GatewayRunError::Threads);
    if result.is_err() {
        shutdown.cancel();
    }
    tracing::info!("stopped");
    result
}

/// Binds a unix socket with its configured mode, owner and group, never
/// showing a wider mode at its path: it is bound in a fresh directory only
/// the gateway can enter (mode 0700), given its mode and owner there, and
/// then renamed into place.
async fn bind_socket(
    s: &config::SocketConfig,
    default_mode: u32,
) -> Result<Listener, GatewayRunError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let fail = |source| GatewayRunError::Socket {
        path: s.path.display().to_string(),
        source,
    };
    let mode = s
        .mode_bits(default_mode)
        .map_err(|e| fail(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let uid = s
        .owner
        .as_deref()
        .map(|o| lookup_id(Path::new("/etc/passwd"), o))
        .transpose()
        .map_err(fail)?;
    let gid = s
        .group
        .as_deref()
        .map(|g| lookup_id(Path::new("/etc/group"), g))
        .transpose()
        .map_err(fail)?;
    let name = s
        .path
        .file_name()
        .ok_or_else(|| fail(std::io::Error::other("the path names no file")))?;
    let parent = match s.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(
        ".{}.{}.bind",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover of a gateway that died here with this pid: ours to clear.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(fail)?;
    let staged = private.join(name);
    let placed = async {
        let l = match Listener::bind(&ListenAddr::Unix(staged.clone())).await? {
            Listener::Unix(l, _) => l,
            Listener::Tcp(_) => return Err(fail(std::io::Error::other("not a unix listener"))),
        };
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&staged, uid, gid).map_err(fail)?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        qvirt_common::serve::remove_stale_socket(&s.path).await?;
        std::fs::rename(&staged, &s.path).map_err(fail)?;
        Ok::<_, GatewayRunError>(Listener::Unix(l, s.path.clone()))
    }
    .await;
    // Best effort: the directory is empty once the socket moved out.
    let _ = std::fs::remove_dir_all(&private);
    placed
}

/// A numeric id, or the id of `name` in `/etc/passwd` or `/etc/group`
/// (`name:x:ID:...`).
fn lookup_id(db: &Path, name: &str) -> std::io::Result<u32> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(db)?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {name:?} in {}", db.display()),
            )
        })
}

/// Reloads the tokens from the config file on each SIGHUP, and says which
/// other keys changed in the file since start (those need a restart). A
/// file that does not load keeps the current tokens (and says why).
async fn reload_on_hangup(
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    hup: std::io::Result<tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: tokens will not reload");
            return;
        }
    };
    let at_start = path
        .as_deref()
        .and_then(|p| qvirt_common::config::load::<Config>(Some(p)).ok());
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            () = shutdown.cancelled() => return,
        }
        let Some(path) = &path else {
            tracing::warn!("SIGHUP: no config file to reload tokens from; nothing reloaded");
            continue;
        };
        let loaded = qvirt_common::config::load::<Config>(Some(path))
            .and_then(|c| config::check_tokens(&c.tokens).map(|()| c));
        match loaded {
            Ok(c) => {
                let revoked = shared.tokens.replace(&c.tokens);
                tracing::info!(
                    tokens = c.tokens.len(),
                    revoked,
                    "SIGHUP: tokens reloaded; streams of revoked tokens end"
                );
                let pending = at_start
                    .as_ref()
                    .map(|s| changed_keys(s, &c))
                    .unwrap_or_default();
                if !pending.is_empty() {
                    tracing::warn!(
                        keys = %pending.join(", "),
                        "SIGHUP: other keys changed in the config file since start; they take effect after a restart"
                    );
                }
            }
            Err(e) => tracing::error!(
                error = %qvirt_common::error_chain(&e),
                "SIGHUP: the config does not load; keeping the current tokens"
            ),
        }
    }
}

/// The top-level keys other than `tokens` whose values differ.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_yaml::Value::Mapping(old)), Ok(serde_yaml::Value::Mapping(new))) =
        (serde_yaml::to_value(old), serde_yaml::to_value(new))
    else {
        return Vec::new();
    };
    old.iter()
        .filter(|(k, v)| k.as_str() != Some("tokens") && new.get(*k) != Some(*v))
        .filter_map(|(k, _)| k.as_str().map(str::to_owned))
        .collect()
}
