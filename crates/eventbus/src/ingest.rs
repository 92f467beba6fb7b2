//! The `qvirt.v1.EventIngest` gRPC service: supervisors publish events
//! into the [`Hub`]. Internal: every call passes the internal-caller check
//! before a single message is read.

use std::sync::Arc;

use prost::Message as _;
use qvirt_common::internal_auth::InternalAuth;
use qvirt_proto::v1::event_ingest_server::EventIngest;
use qvirt_proto::v1::publish_request::Event as PublishedEvent;
use qvirt_proto::v1::{PublishRequest, PublishResponse};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::cursor;
use crate::hub::Hub;
use crate::service::BusEvent;
use crate::status::BusError;

/// The default cap on one published event's encoded size (its protobuf
/// message, before the bus numbers it). QMP events are well under 1 KiB;
/// with `queue_max_bytes` it bounds what a stalled subscriber pins
/// (`Config::subscription_bound`).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// The values `max_event_bytes` may take (gRPC refuses a Publish message
/// above 4 MiB before this cap is looked at).
pub const MAX_EVENT_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=1 << 20;

/// The ingest service: publishes into the same hub the
/// [`EventBusService`](crate::EventBusService) serves subscriptions from.
#[derive(Debug, Clone)]
pub struct EventIngestService {
    hub: Hub<BusEvent>,
    epoch: Arc<str>,
    shutdown: CancellationToken,
    auth: InternalAuth,
    max_event_bytes: usize,
}

impl EventIngestService {
    /// A service publishing into `hub`, whose run is `epoch`; open streams
    /// are answered when `shutdown` fires. Until
    /// [`with_internal_auth`](Self::with_internal_auth) it accepts only
    /// unix-socket peers running as root or as the bus's own user.
    pub fn new(hub: Hub<BusEvent>, epoch: &str, shutdown: CancellationToken) -> Self {
        EventIngestService {
            hub,
            epoch: epoch.into(),
            shutdown,
            auth: InternalAuth::new(None, &[]),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }

    /// Who may publish: `auth`'s internal callers.
    pub fn with_internal_auth(mut self, auth: InternalAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Refuses a published event whose encoded size is above `bytes`
    /// (default [`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// The event a Publish message carries, if it carries exactly one
    /// within the size cap, with the fields the bus sets cleared.
    fn published_event(&self, req: PublishRequest) -> Result<BusEvent, BusError> {
        let (event, size) = match req.event {
            Some(PublishedEvent::DomainEvent(e)) => {
                let size = e.encoded_len();
                (BusEvent::Domain(e), size)
            }
            Some(PublishedEvent::MonitorEvent(e)) => {
                let size = e.encoded_len();
                (BusEvent::Monitor(e), size)
            }
            None => return Err(BusError::NoEvent),
        };
        if size > self.max_event_bytes {
            return Err(BusError::EventTooLarge {
                size,
                max: self.max_event_bytes,
            });
        }
        Ok(event.published())
    }
}

#[tonic::async_trait]
impl EventIngest for EventIngestService {
    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishResponse>, Status> {
        // Before a single message is read: a forged event must not reach
        // anyone.
        self.auth.check(&request, "Publish")?;
        let mut stream = request.into_inner();
        let (mut last_sequence, mut accepted) = (0, 0);
        loop {
            // On shutdown the stream is answered at once, so the publisher
            // learns where it stands and the server need not wait for it.
            let next = tokio::select! {
                m = stream.message() => m.map_err(BusError::PublishStream)?,
                () = self.shutdown.cancelled() => None,
            };
            let Some(req) = next else { break };
            // A bad event ends the call: the events before it are stored,
            // none after it.
            let event = self.published_event(req)?;
            last_sequence = self.hub.publish(event);
            accepted += 1;
            // Reading a message already buffered never waits, so without
            // this a burst would keep the worker (the only one with
            // `worker_threads: 1`) from delivering anything until it is
            // all published; this steps aside once tokio's budget (128
            // units) is spent.
            tokio::task::coop::consume_budget().await;
        }
        let last_cursor = if accepted > 0 {
            cursor::format(&self.epoch, last_sequence)
        } else {
            String::new()
        };
        Ok(Response::new(PublishResponse {
            last_sequence,
            accepted,
            epoch: self.epoch.to_string(),
            last_cursor,
        }))
    }
}

#[cfg(test)]
mod tests {
    use qvirt_proto::v1::{DomainEvent, MonitorEvent};

    use super::*;
    use crate::hub::HubConfig;

    fn service() -> EventIngestService {
        let hub = Hub::with_size_and_key_fn(HubConfig::default(), BusEvent::weight, BusEvent::key)
            .expect("valid config");
        EventIngestService::new(hub, "e", CancellationToken::new())
    }

    /// A monitor event whose encoded size is exactly `size` bytes.
    fn monitor_event_of(size: usize) -> MonitorEvent {
        let mut e = MonitorEvent {
            event: "BLOCK_IO_ERROR".into(),
            ..Default::default()
        };
        // The length prefix grows with the string: shrink until it fits.
        let mut len = size;
        loop {
            e.details_json = "x".repeat(len);
            match e.encoded_len().cmp(&size) {
                std::cmp::Ordering::Equal => return e,
                std::cmp::Ordering::Greater => len -= 1,
                std::cmp::Ordering::Less => panic!("no event of exactly {size} bytes"),
            }
        }
    }

    #[test]
    fn test_published_event_is_bounded_by_max_event_bytes() {
        let svc = service().with_max_event_bytes(2048);
        let req = |e| PublishRequest {
            event: Some(PublishedEvent::MonitorEvent(e)),
        };
        assert!(svc.published_event(req(monitor_event_of(2048))).is_ok());
        let status = Status::from(
            svc.published_event(req(monitor_event_of(2049)))
                .expect_err("over the cap"),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert!(
            status
                .message()
                .contains("2049 bytes encoded, over the bus's max_event_bytes of 2048"),
            "{status}"
        );
        // Domain events are bounded too.
        let domain = DomainEvent {
            domain_name: "d".repeat(4096),
            ..Default::default()
        };
        let err = svc
            .published_event(PublishRequest {
                event: Some(PublishedEvent::DomainEvent(domain)),
            })
            .expect_err("over the cap");
        assert!(matches!(err, BusError::EventTooLarge { .. }), "{err}");
        // The default.
        let svc = service();
        assert!(
            svc.published_event(req(monitor_event_of(DEFAULT_MAX_EVENT_BYTES)))
                .is_ok()
        );
        assert!(
            svc.published_event(req(monitor_event_of(DEFAULT_MAX_EVENT_BYTES + 1)))
                .is_err()
        );
    }

    #[test]
    fn test_fields_the_bus_sets_are_cleared_on_publish() {
        let svc = service();
        let forged = MonitorEvent {
            sequence: 99,
            cursor: "1.other.99".into(),
            event: "STOP".into(),
            ..Default::default()
        };
        let event = svc
            .published_event(PublishRequest {
                event: Some(PublishedEvent::MonitorEvent(forged)),
            })
            .expect("accepted");
        let BusEvent::Monitor(stored) = event else {
            panic!("{event:?}")
        };
        assert_eq!((stored.sequence, stored.cursor.as_str()), (0, ""));
        assert_eq!(stored.event, "STOP");
        let err = svc
            .published_event(PublishRequest { event: None })
            .expect_err("no event");
        assert!(matches!(err, BusError::NoEvent), "{err}");
    }
}
