//! qvirt-hookexec: runs operator hook scripts (`HOOKS_DIR/DRIVER` and
//! `HOOKS_DIR/DRIVER.d/*`) with libvirt's argv, stdin, environment and
//! failure semantics (`qvirt.v1.HookExecutor`, internal). It does not
//! decide when hooks run: the supervisor calls it.
//!
//! Modules: [`discovery`] (which scripts exist), [`exec`] (one script: argv,
//! environment, process group, timeout, output caps), [`run`](mod@run) (one RunHook:
//! request checks, order, filter chaining, libvirt's error text),
//! [`service`] (the gRPC face and the discovery cache), [`status`] (errors
//! to gRPC codes).
//!
//! Entry point: [`run`](fn@run), called by `main.rs` with a bound listener
//! and the shutdown token.

pub mod config;
pub mod discovery;
pub mod exec;
pub mod run;
pub mod service;
pub mod status;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::internal_auth::{InternalAuth, InternalToken};
use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::hook_executor_server::HookExecutorServer;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use service::HookExecutorService;
pub use status::HookError;

/// Why the executor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The SIGHUP handler could not be installed.
    #[error("cannot handle SIGHUP")]
    Signal(#[source] std::io::Error),
    /// The first discovery failed.
    #[error("cannot discover hooks")]
    Discovery(#[source] HookError),
    /// The internal token file is unusable (it was fine when the config
    /// was checked).
    #[error(transparent)]
    InternalToken(qvirt_common::config::ConfigError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Discovers the hooks, then serves `qvirt.v1.HookExecutor`, health and
/// reflection on `listener` until `shutdown` fires. SIGHUP discovers the
/// hooks again (it runs no hook). Scripts still running at shutdown have
/// their process groups killed.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tracing::debug!(?config, "starting");
    let options = config.serve_options();
    let token = InternalToken::load_optional(config.internal_token_file.as_ref())
        .map_err(RunError::InternalToken)?;
    let auth = InternalAuth::new(token, &config.internal_uids);
    auth.log_policy("HookExecutor/*");
    // Before anything can send it: SIGHUP's default action ends the process.
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let svc = HookExecutorService::new(config, shutdown.clone())
        .await
        .map_err(RunError::Discovery)?
        .with_internal_auth(auth);
    let reloader = svc.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!(signal = "SIGHUP", "discovering hooks again");
                    if let Err(e) = reloader.reload().await {
                        tracing::error!(error = %qvirt_common::error_chain(&e), "reload failed");
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    });
    let services = Services::new()
        .options(options)
        .with(HookExecutorServer::new(svc));
    serve::serve(listener, services, shutdown).await?;
    Ok(())
}
