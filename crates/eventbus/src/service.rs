//! The `qvirt.v1.EventBus` gRPC service over the [`Hub`]: publishing,
//! subscription requests turned into filters, hub items turned into stream
//! messages.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qvirt_proto::v1::event_bus_server::EventBus;
use qvirt_proto::v1::publish_request::Event as PublishedEvent;
use qvirt_proto::v1::{
    DomainEvent, EventsLost, EventsLostReason, MonitorEvent, MonitorEventFilterFlag,
    PublishRequest, PublishResponse, SubscribeDomainEventsRequest, SubscribeDomainEventsResponse,
    SubscribeMonitorEventsRequest, SubscribeMonitorEventsResponse, SubscriptionEstablished,
    subscribe_domain_events_response, subscribe_monitor_events_response,
};
use std::task::{Context, Poll};

use prost::Message as _;
use qvirt_common::internal_auth::InternalAuth;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::filter::{DomainFilter, EventNameFilter, FilterFlags, MonitorEventFilter};
use crate::hub::{
    Envelope, Hub, LossReason, OverflowPolicy, SubscribeOptions, SubscriberKind, Subscription,
    SubscriptionItem,
};
use crate::status;

/// Metadata key in which the gateway passes the authenticated principal.
/// Honoured only from an internal caller (one that presents the internal
/// token, see [`qvirt_common::internal_auth`]); otherwise the peer address
/// is the principal.
pub const PRINCIPAL_METADATA: &str = "x-qvirt-principal";

/// The longest `domain` or `host` a subscription may filter on, in bytes.
/// A subscription holds its filter for its whole life, so without a bound
/// a client could park a request-sized (4 MiB) string in each of its slots.
/// Domain names are at most 64 bytes, a UUID with dashes 36, a host name
/// 253.
pub const MAX_FILTER_FIELD_LEN: usize = 256;

/// The default cap on one published event's encoded size (its protobuf
/// message, before the bus numbers it). QMP events are well under 1 KiB;
/// with `queue_max_bytes` it bounds what a stalled subscriber pins
/// (`Config::subscription_bound`).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// The values `max_event_bytes` may take (gRPC refuses a Publish message
/// above 4 MiB before this cap is looked at).
pub const MAX_EVENT_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=1 << 20;

/// Refuses a `field` value longer than [`MAX_FILTER_FIELD_LEN`].
fn bounded(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_FILTER_FIELD_LEN {
        return Err(Status::invalid_argument(format!(
            "{field}: is {} bytes, at most {MAX_FILTER_FIELD_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// An event's shared envelope: the allocation behind its `Arc` (two
/// counters and the envelope itself).
const ENVELOPE_BYTES: usize =
    2 * std::mem::size_of::<usize>() + std::mem::size_of::<Envelope<BusEvent>>();

/// What an event's wire form adds to its strings, at most: every field's
/// tag and length or value, the sequence number, the response's oneof and
/// the `Bytes` header (well under 128 bytes for seven fields).
pub const WIRE_OVERHEAD: usize = 128;

/// One event on the bus: both kinds share one sequence space.
#[derive(Debug, Clone, PartialEq)]
pub enum BusEvent {
    /// A typed lifecycle event.
    Domain(DomainEvent),
    /// A raw QMP event.
    Monitor(MonitorEvent),
}

impl BusEvent {
    /// The hub's index key: a monitor event's name (subscribers with a
    /// literal name filter are filed under it).
    pub fn key(&self) -> Option<&str> {
        match self {
            BusEvent::Monitor(e) => Some(&e.event),
            BusEvent::Domain(_) => None,
        }
    }

    /// Bytes the event holds once stored and sent, for the ring's and the
    /// queues' byte bounds: its envelope, its strings, and its wire form,
    /// which the envelope keeps once the first subscriber has sent it (the
    /// strings again, plus the fields' tags and numbers: at most
    /// [`WIRE_OVERHEAD`]).
    pub fn weight(&self) -> usize {
        let strings = match self {
            BusEvent::Domain(e) => e.host.len() + e.domain_name.len() + e.domain_uuid.len(),
            BusEvent::Monitor(e) => {
                e.host.len()
                    + e.domain_name.len()
                    + e.domain_uuid.len()
                    + e.event.len()
                    + e.details_json.len()
            }
        };
        ENVELOPE_BYTES + 2 * strings + WIRE_OVERHEAD
    }

    /// The largest [`BusEvent::weight`] of an event whose encoded size is at
    /// most `max_event_bytes`: its strings are at most that long.
    pub fn max_weight(max_event_bytes: usize) -> usize {
        ENVELOPE_BYTES + 2 * max_event_bytes + WIRE_OVERHEAD
    }
}

/// The event bus service: a hub plus the bus's identity.
#[derive(Debug, Clone)]
pub struct EventBusService {
    hub: Hub<BusEvent>,
    epoch: Arc<str>,
    policy: OverflowPolicy,
    next_subscription: Arc<AtomicU64>,
    shutdown: CancellationToken,
    auth: InternalAuth,
    max_event_bytes: usize,
}

impl EventBusService {
    /// A service over `hub`. `epoch` names this run's sequence space;
    /// `policy` is what happens to slow subscribers; streams end when
    /// `shutdown` fires.
    pub fn new(
        hub: Hub<BusEvent>,
        epoch: String,
        policy: OverflowPolicy,
        shutdown: CancellationToken,
    ) -> Self {
        EventBusService {
            hub,
            epoch: epoch.into(),
            policy,
            next_subscription: Arc::new(AtomicU64::new(1)),
            shutdown,
            auth: InternalAuth::new(None, &[]),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }

    /// Refuses a published event whose encoded size is above `bytes`
    /// (default [`DEFAULT_MAX_EVENT_BYTES`]).
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// The event a Publish message carries, if it carries exactly one
    /// within the size cap; otherwise INVALID_ARGUMENT saying why.
    fn published_event(&self, req: PublishRequest) -> Result<BusEvent, Status> {
        let (event, size) = match req.event {
            Some(PublishedEvent::DomainEvent(e)) => {
                let size = e.encoded_len();
                (BusEvent::Domain(e), size)
            }
            Some(PublishedEvent::MonitorEvent(e)) => {
                let size = e.encoded_len();
                (BusEvent::Monitor(e), size)
            }
            None => return Err(Status::invalid_argument("event: exactly one must be set")),
        };
        if size > self.max_event_bytes {
            return Err(Status::invalid_argument(format!(
                "event: {size} bytes encoded, over the bus's max_event_bytes of {}",
                self.max_event_bytes
            )));
        }
        Ok(event)
    }

    /// Who may Publish and name a principal: `auth`'s internal callers.
    /// The default accepts only unix-socket peers running as root or as
    /// the bus's own user.
    pub fn with_internal_auth(mut self, auth: InternalAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Who is asking: the principal an internal caller (the gateway)
    /// vouches for in [`PRINCIPAL_METADATA`] (`true`), else the peer: its
    /// IP address over TCP, its uid over a unix socket.
    fn principal<T>(&self, request: &Request<T>) -> (String, bool) {
        let named = request
            .metadata()
            .get(PRINCIPAL_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|p| !p.is_empty());
        if let Some(p) = named
            && self.auth.is_internal(request)
        {
            return (p.to_owned(), true);
        }
        if let Some(addr) = request.remote_addr() {
            return (format!("peer:{}", addr.ip()), false);
        }
        // On a unix socket the peer is its user: every local client would
        // otherwise share one principal (and one user could fill the cap
        // for all).
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        let peer = match uid {
            Some(uid) => format!("peer:uid:{uid}"),
            None => "peer:local".to_owned(),
        };
        (peer, false)
    }

    /// The hub (for metrics).
    pub fn hub(&self) -> &Hub<BusEvent> {
        &self.hub
    }

    /// The first message of a subscription, with the ring's bounds as the
    /// hub read them when it registered the subscription (not when the
    /// message is sent: the ring may have moved on since).
    fn established(&self, last_sequence: u64, oldest_sequence: u64) -> SubscriptionEstablished {
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        SubscriptionEstablished {
            last_sequence,
            oldest_sequence,
            epoch: self.epoch.to_string(),
            subscription_id: format!("{}-{id}", self.epoch),
        }
    }

    /// Registers a subscription; its response stream turns hub items into
    /// messages with `wrap`, polling the subscription directly (no task or
    /// channel per subscription: an idle one costs its hub entry and its
    /// HTTP/2 stream, little else).
    fn stream<T, F>(
        &self,
        options: SubscribeOptions,
        predicate: impl Fn(&BusEvent) -> bool + Send + Sync + 'static,
        wrap: F,
    ) -> Result<ResponseStream<T>, Status>
    where
        T: Send + Unpin + 'static,
        F: Fn(StreamItem) -> Option<T> + Send + Unpin + 'static,
    {
        let since = options.since;
        let sub = self
            .hub
            .subscribe(options, predicate)
            .map_err(status::subscribe)?;
        Ok(Box::pin(SubscriptionStream {
            sub,
            since,
            service: self.clone(),
            wrap,
            pending: None,
            done: false,
        }))
    }

    fn options(
        &self,
        kind: SubscriberKind,
        (principal, vouched): (String, bool),
        since: Option<u64>,
        key: Option<&str>,
        key_decides: bool,
    ) -> SubscribeOptions {
        SubscribeOptions {
            principal,
            vouched,
            kind,
            since,
            policy: self.policy,
            key: key.map(Into::into),
            key_decides,
        }
    }
}

/// One subscription's response stream.
struct SubscriptionStream<T, F> {
    sub: Subscription<BusEvent>,
    since: Option<u64>,
    service: EventBusService,
    wrap: F,
    /// A message due after the one just returned (the replay loss after
    /// SubscriptionEstablished).
    pending: Option<T>,
    done: bool,
}

impl<T, F> SubscriptionStream<T, F>
where
    F: Fn(StreamItem) -> Option<T>,
{
    /// The message for one hub item, and the one to follow it, if any.
    fn message(&self, item: SubscriptionItem<BusEvent>) -> (Option<T>, Option<T>) {
        match item {
            SubscriptionItem::Established {
                last_seq,
                oldest_seq,
                lost,
            } => {
                let first = (self.wrap)(StreamItem::Established(
                    self.service.established(last_seq, oldest_seq),
                ));
                let then = (lost > 0).then(|| {
                    let from = self.since.unwrap_or(0) + 1;
                    StreamItem::Lost(EventsLost {
                        reason: EventsLostReason::ReplayExpired as i32,
                        count: lost,
                        first_sequence: from,
                        last_sequence: from + lost - 1,
                    })
                });
                (first, then.and_then(&self.wrap))
            }
            SubscriptionItem::Event(env) => ((self.wrap)(StreamItem::Event(env)), None),
            SubscriptionItem::Lost { count, reason } => (
                (self.wrap)(StreamItem::Lost(EventsLost {
                    reason: match reason {
                        LossReason::QueueFull => EventsLostReason::SlowConsumer,
                        LossReason::RingEvicted => EventsLostReason::ReplayExpired,
                    } as i32,
                    count,
                    first_sequence: 0,
                    last_sequence: 0,
                })),
                None,
            ),
        }
    }
}

impl<T, F> Stream for SubscriptionStream<T, F>
where
    T: Unpin,
    F: Fn(StreamItem) -> Option<T> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(msg) = this.pending.take() {
            return Poll::Ready(Some(Ok(msg)));
        }
        while !this.done {
            match this.sub.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status::recv(e))));
                }
                Poll::Ready(Ok(item)) => {
                    let (first, then) = this.message(item);
                    match (first, then) {
                        (Some(msg), then) => {
                            this.pending = then;
                            return Poll::Ready(Some(Ok(msg)));
                        }
                        (None, Some(msg)) => return Poll::Ready(Some(Ok(msg))),
                        (None, None) => {}
                    }
                }
            }
        }
        Poll::Ready(None)
    }
}

/// What a subscription stream hands to its message builder.
pub enum StreamItem {
    /// The first message.
    Established(SubscriptionEstablished),
    /// An event with its sequence number (shared with every subscriber).
    Event(Arc<Envelope<BusEvent>>),
    /// A loss marker.
    Lost(EventsLost),
}

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn flags(raw: &[i32]) -> Result<FilterFlags, Status> {
    let mut flags = FilterFlags::default();
    for &f in raw {
        match MonitorEventFilterFlag::try_from(f) {
            Ok(MonitorEventFilterFlag::Regex) => flags.regex = true,
            Ok(MonitorEventFilterFlag::Nocase) => flags.nocase = true,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "flags: unknown monitor event filter flag {f}"
                )));
            }
        }
    }
    Ok(flags)
}

#[tonic::async_trait]
impl EventBus for EventBusService {
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
                m = stream.message() => m?,
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
        Ok(Response::new(PublishResponse {
            last_sequence,
            accepted,
            epoch: self.epoch.to_string(),
        }))
    }

    async fn subscribe_domain_events(
        &self,
        request: Request<SubscribeDomainEventsRequest>,
    ) -> Result<Response<ResponseStream<SubscribeDomainEventsResponse>>, Status> {
        use subscribe_domain_events_response::Kind;
        let stream = self.domain_subscription(request, |item| {
            let kind = match item {
                StreamItem::Established(e) => Kind::Established(e),
                StreamItem::Lost(l) => Kind::Lost(l),
                StreamItem::Event(env) => Kind::Event(domain_event(&env)?),
            };
            Some(SubscribeDomainEventsResponse { kind: Some(kind) })
        })?;
        Ok(Response::new(stream))
    }

    async fn subscribe_monitor_events(
        &self,
        request: Request<SubscribeMonitorEventsRequest>,
    ) -> Result<Response<ResponseStream<SubscribeMonitorEventsResponse>>, Status> {
        use subscribe_monitor_events_response::Kind;
        let stream = self.monitor_subscription(request, |item| {
            let kind = match item {
                StreamItem::Established(e) => Kind::Established(e),
                StreamItem::Lost(l) => Kind::Lost(l),
                StreamItem::Event(env) => Kind::Event(monitor_event(&env)?),
            };
            Some(SubscribeMonitorEventsResponse { kind: Some(kind) })
        })?;
        Ok(Response::new(stream))
    }
}

/// The lifecycle event of `env` with its sequence number, if it is one.
pub(crate) fn domain_event(env: &Envelope<BusEvent>) -> Option<DomainEvent> {
    match &env.event {
        BusEvent::Domain(e) => Some(DomainEvent {
            sequence: env.seq,
            ..e.clone()
        }),
        BusEvent::Monitor(_) => None,
    }
}

/// The monitor event of `env` with its sequence number, if it is one.
pub(crate) fn monitor_event(env: &Envelope<BusEvent>) -> Option<MonitorEvent> {
    match &env.event {
        BusEvent::Monitor(e) => Some(MonitorEvent {
            sequence: env.seq,
            ..e.clone()
        }),
        BusEvent::Domain(_) => None,
    }
}

impl EventBusService {
    /// A domain-event subscription for `request`, its messages built by
    /// `wrap`.
    pub(crate) fn domain_subscription<T, F>(
        &self,
        request: Request<SubscribeDomainEventsRequest>,
        wrap: F,
    ) -> Result<ResponseStream<T>, Status>
    where
        T: Send + Unpin + 'static,
        F: Fn(StreamItem) -> Option<T> + Send + Unpin + 'static,
    {
        let who = self.principal(&request);
        let req = request.into_inner();
        bounded("domain", &req.domain)?;
        bounded("host", &req.host)?;
        let domain = DomainFilter::new(&req.domain);
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Domain(d) => {
                (host.is_empty() || d.host == host)
                    && domain.matches(&d.domain_name, &d.domain_uuid)
            }
            BusEvent::Monitor(_) => false,
        };
        self.stream(
            self.options(SubscriberKind::Domain, who, req.since, None, false),
            predicate,
            wrap,
        )
    }

    /// A monitor-event subscription for `request`, its messages built by
    /// `wrap`.
    pub(crate) fn monitor_subscription<T, F>(
        &self,
        request: Request<SubscribeMonitorEventsRequest>,
        wrap: F,
    ) -> Result<ResponseStream<T>, Status>
    where
        T: Send + Unpin + 'static,
        F: Fn(StreamItem) -> Option<T> + Send + Unpin + 'static,
    {
        let who = self.principal(&request);
        let req = request.into_inner();
        bounded("domain", &req.domain)?;
        bounded("host", &req.host)?;
        let filter = MonitorEventFilter {
            domain: DomainFilter::new(&req.domain),
            event: EventNameFilter::new(&req.event, flags(&req.flags)?).map_err(status::filter)?,
        };
        let key = filter.event.exact_name().map(Box::<str>::from);
        // A literal name with no domain or host filter: the hub's index by
        // name is the whole test.
        let key_decides = key.is_some() && filter.domain.is_all() && req.host.is_empty();
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Monitor(m) => {
                (host.is_empty() || m.host == host)
                    && filter.matches(&m.domain_name, &m.domain_uuid, &m.event)
            }
            BusEvent::Domain(_) => false,
        };
        self.stream(
            self.options(
                SubscriberKind::Monitor,
                who,
                req.since,
                key.as_deref(),
                key_decides,
            ),
            predicate,
            wrap,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::hub::HubConfig;

    fn service(ring_capacity: usize) -> EventBusService {
        let config = HubConfig {
            ring_capacity,
            ..HubConfig::default()
        };
        let hub = Hub::with_size_and_key_fn(config, BusEvent::weight, BusEvent::key)
            .expect("valid config");
        EventBusService::new(
            hub,
            "e".into(),
            OverflowPolicy::MarkLost,
            CancellationToken::new(),
        )
    }

    fn publish_domain_events(svc: &EventBusService, n: u64) {
        for _ in 0..n {
            svc.hub().publish(BusEvent::Domain(DomainEvent::default()));
        }
    }

    #[test]
    fn test_bad_flags_and_fields_are_invalid_argument() {
        let svc = service(4);
        let refused = |req: SubscribeMonitorEventsRequest| match svc
            .monitor_subscription(Request::new(req), Some)
        {
            Ok(_) => panic!("accepted"),
            Err(status) => status,
        };
        // UNSPECIFIED is not a flag, nor is an unknown number.
        for bad in [0, 3, -1] {
            let status = refused(SubscribeMonitorEventsRequest {
                event: "STOP".into(),
                flags: vec![MonitorEventFilterFlag::Regex as i32, bad],
                ..Default::default()
            });
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            assert!(status.message().starts_with("flags: "), "{status}");
        }
        let status = refused(SubscribeMonitorEventsRequest {
            event: "x".repeat(crate::filter::MAX_PATTERN_LEN + 1),
            ..Default::default()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        let status = refused(SubscribeMonitorEventsRequest {
            host: "h".repeat(MAX_FILTER_FIELD_LEN + 1),
            ..Default::default()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        // Nothing refused holds a slot.
        assert_eq!(svc.hub().stats().subscribers_monitor, 0);
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
        let svc = service(4).with_max_event_bytes(2048);
        let req = |e| PublishRequest {
            event: Some(PublishedEvent::MonitorEvent(e)),
        };
        assert!(svc.published_event(req(monitor_event_of(2048))).is_ok());
        let status = svc
            .published_event(req(monitor_event_of(2049)))
            .expect_err("over the cap");
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
        let status = svc
            .published_event(PublishRequest {
                event: Some(PublishedEvent::DomainEvent(domain)),
            })
            .expect_err("over the cap");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        // The default.
        let svc = service(4);
        assert!(
            svc.published_event(req(monitor_event_of(DEFAULT_MAX_EVENT_BYTES)))
                .is_ok()
        );
        assert!(
            svc.published_event(req(monitor_event_of(DEFAULT_MAX_EVENT_BYTES + 1)))
                .is_err()
        );
    }

    #[tokio::test]
    async fn test_established_bounds_are_those_of_the_subscription() {
        let svc = service(4);
        publish_domain_events(&svc, 2);
        let mut stream = svc
            .domain_subscription(Request::new(SubscribeDomainEventsRequest::default()), Some)
            .expect("subscribed");
        // The ring moves on before the first message is sent.
        publish_domain_events(&svc, 10);
        let first = poll_fn(|cx| stream.as_mut().poll_next(cx)).await;
        let Some(Ok(StreamItem::Established(e))) = first else {
            panic!("first message must be established");
        };
        assert_eq!((e.last_sequence, e.oldest_sequence), (2, 1));
        // And the 10 events after it follow.
        for want in 3..=12 {
            match stream.next().await {
                Some(Ok(StreamItem::Event(env))) => assert_eq!(env.seq, want),
                _ => panic!("event {want} expected"),
            }
        }
    }
}
