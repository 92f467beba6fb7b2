//! The registry's view for a fleet gateway: a NATS client on the
//! configured servers and a [`qvirt_registry::View`] of both buckets.

use std::sync::Arc;

use qvirt_registry::{NatsAccess, RegistryError, Snapshot, View};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Starts the view on `urls`, presenting `access` (the client keeps
/// reconnecting in the background, so a broker that is away now is found
/// later) and returns its snapshots and whether it is connected, until
/// `shutdown`.
pub async fn start(
    urls: &[String],
    access: &NatsAccess,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<Snapshot>>, watch::Receiver<bool>), RegistryError> {
    let client = qvirt_registry::connect(urls, "qvirt-gateway", access).await?;
    let view = View::start(client, shutdown);
    Ok((view.changed(), view.connected_changes()))
}
