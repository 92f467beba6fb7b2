//! qvirt-agentd: the gRPC face of guest agents (`qvirt.v1.GuestAgent`). It
//! finds a domain's agent socket, resynchronises the channel, and sends
//! qemu-ga commands with timeouts. It does not run guests (the supervisor
//! does) and does not run inside them (`qvirt-ga` does).
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

pub mod config;

use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::guest_agent_server::{GuestAgent, GuestAgentServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The `qvirt.v1.GuestAgent` service. RPCs not implemented yet answer
/// `UNIMPLEMENTED` (the generated trait's default).
#[derive(Debug, Default)]
pub struct GuestAgentService;

impl GuestAgent for GuestAgentService {}

/// Serves `qvirt.v1.GuestAgent`, health and reflection on `listener` until
/// `shutdown` fires.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tracing::debug!(?config, "starting");
    let services = Services::new().with(GuestAgentServer::new(GuestAgentService));
    serve::serve(listener, services, shutdown).await
}
