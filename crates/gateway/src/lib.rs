//! qvirt-gateway: the one public endpoint. It serves the public qvirt
//! services (`qvirt.v1.Supervisor`, `qvirt.v1.EventBus`,
//! `qvirt.v1.GuestAgent`) on one port, and reflection lists those only:
//! internal services (`qvirt.v1.HookExecutor`) are never reachable here.
//! Authentication, per-method roles, audit and forwarding to the backends
//! are not implemented yet: until they are, every public RPC answers
//! `UNIMPLEMENTED`.
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

pub mod config;

use qvirt_common::cli::ServiceConfig as _;
use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::event_bus_server::{EventBus, EventBusServer};
use qvirt_proto::v1::guest_agent_server::{GuestAgent, GuestAgentServer};
use qvirt_proto::v1::supervisor_server::{Supervisor, SupervisorServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The public face of every service, before forwarding exists: each RPC
/// answers `UNIMPLEMENTED` (the generated traits' default).
#[derive(Debug, Default, Clone, Copy)]
pub struct Gateway;

impl Supervisor for Gateway {}
impl EventBus for Gateway {}
impl GuestAgent for Gateway {}

/// Serves the public services, health and reflection on `listener` until
/// `shutdown` fires.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tracing::debug!(?config, "starting");
    let services = Services::new()
        .options(config.serve_options())
        .with(SupervisorServer::new(Gateway))
        .with(EventBusServer::new(Gateway))
        .with(GuestAgentServer::new(Gateway));
    serve::serve(listener, services, shutdown).await
}
