//! qvirt-eventbus: fans QEMU monitor events and typed domain lifecycle
//! events out to subscribers (`qvirt.v1.EventBus`), with libvirt's
//! event-name filters, bounded per-subscriber queues and replay by sequence
//! number. It does not produce events: the supervisor publishes them.
//!
//! Entry point: [`run`], called by `main.rs` with a bound listener and the
//! shutdown token.

pub mod config;
pub mod filter;
pub mod hub;

use qvirt_common::serve::{self, Listener, ServeError, Services};
use qvirt_proto::v1::event_bus_server::{EventBus, EventBusServer};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The `qvirt.v1.EventBus` service. RPCs not implemented yet answer
/// `UNIMPLEMENTED` (the generated trait's default).
#[derive(Debug, Default)]
pub struct EventBusService;

impl EventBus for EventBusService {}

/// Serves `qvirt.v1.EventBus`, health and reflection on `listener` until
/// `shutdown` fires.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tracing::debug!(?config, "starting");
    let services = Services::new().with(EventBusServer::new(EventBusService));
    serve::serve(listener, services, shutdown).await
}
