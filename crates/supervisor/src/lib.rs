//! qvirt-supervisor: the QEMU driver (`qvirt.v1.Supervisor`). It owns
//! domain definitions, launches QEMU with a monitor socket it opened itself,
//! drives QMP, publishes events to the bus and calls hooks. It does not fan
//! events out (the event bus does) nor talk to guest agents (agentd does).
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

pub mod config;
pub mod launch;
pub mod qmp;

use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::supervisor_server::{Supervisor, SupervisorServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The `qvirt.v1.Supervisor` service. RPCs not implemented yet answer
/// `UNIMPLEMENTED` (the generated trait's default).
#[derive(Debug, Default)]
pub struct SupervisorService;

impl Supervisor for SupervisorService {}

/// Serves `qvirt.v1.Supervisor`, health and reflection on `listener` until
/// `shutdown` fires.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tracing::debug!(?config, "starting");
    let services = Services::new().with(SupervisorServer::new(SupervisorService));
    serve::serve(listener, services, shutdown).await
}
