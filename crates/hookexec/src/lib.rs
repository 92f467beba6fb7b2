//! qvirt-hookexec: runs operator hook scripts (`HOOKS_DIR/DRIVER` and
//! `HOOKS_DIR/DRIVER.d/*`) with libvirt's argv, stdin and failure semantics
//! (`qvirt.v1.HookExecutor`, internal). It does not decide when hooks run:
//! the supervisor calls it.
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

pub mod config;

use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::hook_executor_server::{HookExecutor, HookExecutorServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The `qvirt.v1.HookExecutor` service. RPCs not implemented yet answer
/// `UNIMPLEMENTED` (the generated trait's default).
#[derive(Debug, Default)]
pub struct HookExecutorService;

impl HookExecutor for HookExecutorService {}

/// Serves `qvirt.v1.HookExecutor`, health and reflection on `listener` until
/// `shutdown` fires.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tracing::debug!(?config, "starting");
    let services = Services::new().with(HookExecutorServer::new(HookExecutorService));
    serve::serve(listener, services, shutdown).await
}
