//! Stand-in for the registry's view until `qvirt-registry` lands.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Snapshot;

/// The view's snapshots and connectedness.
pub async fn start(
    urls: &[String],
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Snapshot>>, watch::Receiver<bool>) {
    let _ = urls;
    let (snap_tx, snap) = watch::channel(Arc::new(Snapshot::default()));
    let (conn_tx, conn) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drop((snap_tx, conn_tx));
    });
    (snap, conn)
}
