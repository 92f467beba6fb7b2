//! qvirt-supervisor: the QEMU driver (`qvirt.v1.Supervisor`). It owns
//! domain definitions, launches QEMU with a monitor socket it opened itself,
//! drives QMP, follows each guest's state, and survives its own restart by
//! re-attaching to the QEMUs still running. It does not fan events out (the
//! event bus does) nor talk to guest agents (agentd does); events and hooks
//! go through the seams in [`seams`].
//!
//! Modules: [`config`]; [`lock`] (one supervisor per state dir);
//! [`domain`] (spec checks, QEMU argv, on-disk store, the domain table and
//! lifecycle); [`service`] and [`status`] (the gRPC face and its error
//! table); [`launch`] and [`qmp`] (spawning QEMU, the QMP client);
//! [`request_ids`] (idempotent retries of writes);
//! [`publisher`], [`hooks`] and [`agent`] (the event bus, hook executor
//! and agent service clients); [`hook_xml`] (libvirt-style domain XML
//! for hook scripts); [`reload`] (SIGHUP); [`vmm`] (the launcher that
//! starts QEMU for a supervisor in another container, `qvirt-vmm`);
//! [`fleet`] (heartbeat and domain mirror in the fleet registry).
//!
//! Entry point: [`run`] (or [`run_reloadable`], which also reads the
//! config again on SIGHUP), called by `main.rs` with a bound listener and
//! the shutdown token.

pub mod agent;
pub mod config;
pub mod domain;
pub mod fleet;
pub mod hook_xml;
pub mod hooks;
pub mod launch;
pub mod lock;
pub mod loss;
pub mod publisher;
pub mod qmp;
pub mod reload;
pub mod request_ids;
pub mod seams;
pub mod service;
pub mod status;
pub mod vmm;

use std::sync::Arc;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::internal_auth::{InternalAuth, InternalToken, TokenInterceptor};
use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::supervisor_server::SupervisorServer;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use reload::Reloader;
pub use service::SupervisorService;

use domain::{DomainError, Manager};
use seams::{DaemonHookOp, EventSink, GuestPower, Hooks, LogEvents, NoHooks};

/// Why the supervisor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Another supervisor holds the state dir (or the lock failed).
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// The internal token, the NATS token or the NATS CA file is unusable
    /// (it was fine when the config was checked).
    #[error(transparent)]
    Secret(qvirt_common::config::ConfigError),
    /// Loading the state dir (or re-attaching to guests) failed.
    #[error("opening the domain store")]
    Open(#[source] DomainError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The `eventbus` URL is not usable.
    #[error("invalid eventbus URL {url:?}")]
    EventBus {
        /// The URL configured.
        url: String,
        /// Why it was refused.
        #[source]
        source: tonic::transport::Error,
    },
    /// The `agentd` URL is not usable.
    #[error("invalid agentd URL {url:?}")]
    AgentService {
        /// The URL configured.
        url: String,
        /// Why it was refused.
        #[source]
        source: tonic::transport::Error,
    },
    /// The `hookexec` URL is not usable.
    #[error("invalid hookexec URL {url:?}")]
    HookExec {
        /// The URL configured.
        url: String,
        /// Why it was refused.
        #[source]
        source: tonic::transport::Error,
    },
    /// The SIGHUP listener could not be installed.
    #[error("cannot handle SIGHUP")]
    Signal(#[source] std::io::Error),
}

/// [`run_reloadable`] without a config to read again: SIGHUP runs only
/// the daemon `reload` hook.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_reloadable(config, listener, shutdown, None).await
}

/// Loads the domains (re-attaching to running QEMUs), then serves
/// `qvirt.v1.Supervisor`, health and reflection on `listener` until
/// `shutdown` fires. QEMUs keep running after the supervisor stops. On
/// SIGHUP, `reloader` (when given) reads the config again; see
/// [`reload`].
pub async fn run_reloadable(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
    reloader: Option<Reloader>,
) -> Result<(), RunError> {
    // From now on each SIGHUP is kept for the reload task.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(RunError::Signal)?;
    tracing::debug!(?config, "starting");
    let options = config.serve_options();
    let state_dir = config.state_dir.clone();
    // Held until this function returns, i.e. for the life of the service.
    let _lock = tokio::task::spawn_blocking(move || lock::lock_state_dir(&state_dir))
        .await
        .map_err(|e| {
            RunError::Lock(lock::LockError::Io {
                path: config.state_dir.join(lock::LOCK_FILE_NAME),
                source: std::io::Error::other(e.to_string()),
            })
        })??;
    let token = InternalToken::load_optional(config.internal_token_file.as_ref())
        .map_err(RunError::Secret)?;
    if token.is_none()
        && (config.eventbus.is_some() || config.hookexec.is_some() || config.agentd.is_some())
    {
        tracing::warn!(
            "no internal_token_file: the event bus, the hook executor and the agent service will refuse this supervisor's calls"
        );
    }
    let auth = InternalAuth::new(token.clone(), &config.internal_uids);
    auth.log_policy("Supervisor/*");
    let token = TokenInterceptor::new(token.as_ref());
    let executor = match &config.hookexec {
        Some(url) => {
            let endpoint =
                qvirt_common::config::endpoint(url).map_err(|source| RunError::HookExec {
                    url: url.clone(),
                    source,
                })?;
            let timeout = std::time::Duration::from_secs(config.hook_call_timeout_secs);
            Some(
                hooks::ExecutorHooks::new(endpoint, timeout, token.clone())
                    .with_stdin_format(config.hook_stdin_format),
            )
        }
        None => None,
    };
    let hooks: Arc<dyn Hooks> = match &executor {
        Some(executor) => Arc::new(executor.clone()),
        None => Arc::new(NoHooks),
    };
    let agent = match &config.agentd {
        Some(url) => {
            let endpoint =
                qvirt_common::config::endpoint(url).map_err(|source| RunError::AgentService {
                    url: url.clone(),
                    source,
                })?;
            let timeout = std::time::Duration::from_secs(config.command_timeout_secs);
            Some(
                Arc::new(agent::AgentService::new(endpoint, timeout, token.clone()))
                    as Arc<dyn GuestPower>,
            )
        }
        None => None,
    };
    hooks.daemon(DaemonHookOp::Start).await;
    let running = config.clone();
    let events: Arc<dyn EventSink> = match &config.eventbus {
        Some(url) => {
            let endpoint =
                qvirt_common::config::endpoint(url).map_err(|source| RunError::EventBus {
                    url: url.clone(),
                    source,
                })?;
            Arc::new(publisher::BusPublisher::spawn(
                endpoint,
                token,
                shutdown.child_token(),
            ))
        }
        None => Arc::new(LogEvents),
    };
    let fleet = config.fleet.clone();
    let fleet_config = config.clone();
    let manager = Manager::open(config, events, Arc::clone(&hooks), agent)
        .await
        .map_err(RunError::Open)?;
    if let Some(fleet) = fleet {
        let access = fleet.access().map_err(RunError::Secret)?;
        fleet::spawn(
            &fleet_config,
            fleet,
            access,
            manager.clone(),
            shutdown.child_token(),
        );
    }
    reload::Reload {
        hooks: Arc::clone(&hooks),
        executor,
        manager: manager.clone(),
        running,
        reloader,
    }
    .spawn(hup, shutdown.clone());
    let requests = {
        let state_dir = manager.state_dir().to_owned();
        let defined = manager.uuids();
        tokio::task::spawn_blocking(move || {
            request_ids::RequestIds::load(&state_dir, |uuid| defined.contains(uuid))
        })
        .await
        .map_err(|e| {
            RunError::Open(DomainError::Internal(format!(
                "request id task failed: {e}"
            )))
        })?
        .map_err(|e| RunError::Open(DomainError::Store(e)))?
    };
    // Defines whose own record a crash prevented: their definition files
    // name the call, and the answer is the domain as loaded.
    for (mark, name, at) in manager.take_request_marks() {
        if let Ok(domain) = manager.get(&name) {
            let answer = qvirt_proto::v1::DefineDomainResponse {
                domain: Some(domain),
            };
            requests.adopt(
                "DefineDomain",
                &mark.id,
                mark.fingerprint,
                at,
                request_ids::Outcome::of(&Ok::<_, tonic::Status>(answer)),
            );
        }
    }
    let services = Services::new()
        .options(options)
        .with(auth.only(SupervisorServer::new(SupervisorService::new(
            manager.clone(),
            requests,
        ))));
    let served = serve::serve(listener, services, shutdown).await;
    manager.close().await;
    hooks.daemon(DaemonHookOp::Shutdown).await;
    served.map_err(RunError::from)
}
