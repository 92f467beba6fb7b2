//! The gateway's health: the whole server (`""`) is SERVING while it runs;
//! each public service follows its backend's own health check, polled
//! every `health_poll_ms` (a backend that does not answer within that
//! time, or answers anything but SERVING, makes its service NOT_SERVING).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::proxy::Backend;
use crate::upstream::UpstreamService;

/// Polls `backend` until `shutdown`, mirroring its health at the gateway.
pub async fn follow(
    reporter: HealthReporter,
    backend: Backend,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut client = HealthClient::new(UpstreamService(Arc::clone(&backend.upstream)));
    let mut last = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: backend.service.to_owned(),
        });
        request.set_timeout(every);
        let check = tokio::time::timeout(every, client.check(request)).await;
        let serving = matches!(
            check,
            Ok(Ok(ref reply)) if reply.get_ref().status() == PbStatus::Serving
        );
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(serving) {
            match (&check, serving) {
                (_, true) => {
                    tracing::info!(service = backend.service, backend = %backend.upstream.url(), "backend serving")
                }
                (Ok(Err(e)), false) => {
                    tracing::warn!(service = backend.service, backend = %backend.upstream.url(), error = %e.message(), "backend not serving")
                }
                _ => {
                    tracing::warn!(service = backend.service, backend = %backend.upstream.url(), "backend not serving")
                }
            }
            last = Some(serving);
        }
        if shutdown.is_cancelled() {
            return;
        }
        reporter.set_service_status(backend.service, status).await;
    }
}
