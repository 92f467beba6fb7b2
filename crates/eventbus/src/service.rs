//! The `qvirt.v1.EventBus` gRPC service over the [`Hub`]: subscription
//! requests turned into filters and a start point (`resume_after`), hub
//! items turned into stream messages with their cursors. Publishing is
//! [`crate::ingest`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qvirt_proto::v1::event_bus_server::EventBus;
use qvirt_proto::v1::{
    DomainEvent, EventsLost, EventsLostReason, MonitorEvent, MonitorEventFilterFlag,
    SubscribeDomainEventsRequest, SubscribeDomainEventsResponse, SubscribeMonitorEventsRequest,
    SubscribeMonitorEventsResponse, SubscriptionEstablished, subscribe_domain_events_response,
    subscribe_monitor_events_response,
};
use std::task::{Context, Poll};

use qvirt_common::internal_auth::InternalAuth;
use tokio_stream::Stream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::cursor::{self, MAX_CURSOR_LEN};
use crate::filter::{DomainFilter, EventNameFilter, FilterFlags, MonitorEventFilter};
use crate::hub::{
    Envelope, Hub, LossReason, OverflowPolicy, SubscribeOptions, SubscriberKind, Subscription,
    SubscriptionItem,
};
use crate::nats::fleet::{self as fleet_mode, FleetItem, FleetStart};
use crate::status::BusError;
use tokio_stream::StreamExt as _;

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

/// Refuses a `field` value longer than [`MAX_FILTER_FIELD_LEN`].
fn bounded(field: &'static str, value: &str) -> Result<(), BusError> {
    if value.len() > MAX_FILTER_FIELD_LEN {
        return Err(BusError::FieldTooLong {
            field,
            len: value.len(),
            max: MAX_FILTER_FIELD_LEN,
        });
    }
    Ok(())
}

/// An event's shared envelope: the allocation behind its `Arc` (two
/// counters and the envelope itself).
const ENVELOPE_BYTES: usize =
    2 * std::mem::size_of::<usize>() + std::mem::size_of::<Envelope<BusEvent>>();

/// What an event's wire form adds to its strings, at most: its cursor
/// (at most [`MAX_CURSOR_LEN`]), every field's tag and length or value,
/// the sequence number, the response's oneof and the `Bytes` header (well
/// under 128 bytes for nine fields).
pub const WIRE_OVERHEAD: usize = MAX_CURSOR_LEN + 128;

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

    /// The event as the bus stores it: what a publisher put in the fields
    /// the bus sets (`sequence`, `cursor`) is dropped.
    pub fn published(self) -> Self {
        match self {
            BusEvent::Domain(e) => BusEvent::Domain(DomainEvent {
                sequence: 0,
                cursor: String::new(),
                ..e
            }),
            BusEvent::Monitor(e) => BusEvent::Monitor(MonitorEvent {
                sequence: 0,
                cursor: String::new(),
                ..e
            }),
        }
    }
}

/// Where a subscription starts, from its `resume_after` and `replay_held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Live events only.
    Live,
    /// After this sequence number of the current run (0: every event held).
    After(u64),
    /// The cursor is of another run: BUS_RESTARTED, then every event held.
    Restarted,
}

impl Start {
    /// The hub's replay point.
    fn since(self) -> Option<u64> {
        match self {
            Start::Live => None,
            Start::After(seq) => Some(seq),
            Start::Restarted => Some(0),
        }
    }
}

/// The event bus service: a hub plus the bus's identity.
#[derive(Debug, Clone)]
pub struct EventBusService {
    hub: Hub<BusEvent>,
    /// Fleet mode: subscriptions come from the fleet's stream; the hub
    /// only keeps their slots under the caps.
    /// Set once the stream is found (until then subscriptions are
    /// UNAVAILABLE).
    fleet: Option<Arc<std::sync::OnceLock<crate::nats::fleet::Fleet>>>,
    epoch: Arc<str>,
    policy: OverflowPolicy,
    next_subscription: Arc<AtomicU64>,
    auth: InternalAuth,
}

impl EventBusService {
    /// A service over `hub`. `epoch` names this run's sequence space;
    /// `policy` is what happens to slow subscribers; streams end when the
    /// hub is closed ([`Hub::close`]).
    pub fn new(hub: Hub<BusEvent>, epoch: String, policy: OverflowPolicy) -> Self {
        EventBusService {
            hub,
            fleet: None,
            epoch: epoch.into(),
            policy,
            next_subscription: Arc::new(AtomicU64::new(1)),
            auth: InternalAuth::new(None, &[]),
        }
    }

    /// Serves subscriptions from the fleet's stream once `fleet` is set
    /// (its epoch replaces this service's); until then they are
    /// UNAVAILABLE.
    pub fn with_fleet(
        mut self,
        fleet: Arc<std::sync::OnceLock<crate::nats::fleet::Fleet>>,
    ) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// In fleet mode, the fleet once its stream is known: UNAVAILABLE
    /// before.
    fn fleet_ready(&self) -> Result<Option<&crate::nats::fleet::Fleet>, BusError> {
        match &self.fleet {
            None => Ok(None),
            Some(cell) => cell.get().map(Some).ok_or_else(|| {
                BusError::Fleet("the fleet's event stream is not reachable yet".into())
            }),
        }
    }

    /// The name of this run's sequence space.
    pub fn epoch(&self) -> &Arc<str> {
        match self.fleet.as_ref().and_then(|cell| cell.get()) {
            Some(fleet) => fleet.epoch(),
            None => &self.epoch,
        }
    }

    /// Who may name a principal ([`PRINCIPAL_METADATA`]): `auth`'s
    /// internal callers. The default accepts only unix-socket peers
    /// running as root or as the bus's own user.
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
            epoch: self.epoch().to_string(),
            subscription_id: format!("{}-{id}", self.epoch()),
            last_cursor: cursor::format(self.epoch(), last_sequence),
        }
    }

    /// Where a subscription with `resume_after` and `replay_held` starts.
    /// A cursor of another run is [`Start::Restarted`]; one of this run
    /// beyond the newest event was never issued: OUT_OF_RANGE.
    fn start(&self, resume_after: &str, replay_held: bool) -> Result<Start, BusError> {
        if resume_after.is_empty() {
            return Ok(if replay_held {
                Start::After(0)
            } else {
                Start::Live
            });
        }
        if replay_held {
            return Err(BusError::ReplayWithCursor);
        }
        let cursor = cursor::parse(resume_after).map_err(BusError::Cursor)?;
        if cursor.epoch != &**self.epoch() {
            return Ok(Start::Restarted);
        }
        if self.fleet.is_some() {
            // The stream's head is read when the consumer is made.
            return Ok(Start::After(cursor.seq));
        }
        // Sequence numbers only grow: a cursor beyond the newest event now
        // stays beyond the one the hub reads when it registers us.
        let last = self.hub.last_seq();
        if cursor.seq > last {
            return Err(BusError::CursorBeyondHead {
                seq: cursor.seq,
                last,
                last_cursor: cursor::format(&self.epoch, last),
            });
        }
        Ok(Start::After(cursor.seq))
    }

    /// Registers a subscription; its response stream turns hub items into
    /// messages with `wrap`, polling the subscription directly (no task or
    /// channel per subscription: an idle one costs its hub entry and its
    /// HTTP/2 stream, little else).
    fn stream<T, F>(
        &self,
        options: SubscribeOptions,
        start: Start,
        predicate: impl Fn(&BusEvent) -> bool + Send + Sync + 'static,
        subjects: Vec<String>,
        wrap: F,
    ) -> Result<ResponseStream<T>, BusError>
    where
        T: Send + Unpin + 'static,
        F: Fn(StreamItem) -> Option<T> + Send + Unpin + 'static,
    {
        if let Some(fleet) = self.fleet_ready()? {
            // The hub holds the slot (caps, shutdown); the events come
            // from the stream.
            let slot = self.hub.subscribe(
                SubscribeOptions {
                    since: None,
                    key: None,
                    key_decides: false,
                    ..options
                },
                |_| false,
            )?;
            let start = match start {
                Start::Live => FleetStart::Live,
                Start::After(seq) => FleetStart::After(seq),
                Start::Restarted => FleetStart::Restarted,
            };
            let items = fleet.subscribe(start, subjects, Arc::new(predicate), slot);
            let service = self.clone();
            let stream = items.filter_map(move |item| {
                let item = match item {
                    FleetItem::Established { last, oldest } => {
                        StreamItem::Established(service.established(last, oldest))
                    }
                    FleetItem::Lost(l) => StreamItem::Lost(l),
                    FleetItem::Event(env) => StreamItem::Event(env),
                    FleetItem::Host(h) => StreamItem::Host(h),
                    FleetItem::Failed(status) => return Some(Err(status)),
                };
                wrap(item).map(Ok)
            });
            return Ok(Box::pin(stream));
        }
        let sub = self.hub.subscribe(options, predicate)?;
        Ok(Box::pin(SubscriptionStream {
            sub,
            start,
            service: self.clone(),
            wrap,
            pending: VecDeque::new(),
            done: false,
        }))
    }

    fn options(
        &self,
        kind: SubscriberKind,
        (principal, vouched): (String, bool),
        start: Start,
        key: Option<&str>,
        key_decides: bool,
    ) -> SubscribeOptions {
        SubscribeOptions {
            principal,
            vouched,
            kind,
            since: start.since(),
            policy: self.policy,
            key: key.map(Into::into),
            key_decides,
        }
    }
}

/// One subscription's response stream.
struct SubscriptionStream<T, F> {
    sub: Subscription<BusEvent>,
    start: Start,
    service: EventBusService,
    wrap: F,
    /// Messages due after the one just returned (the loss markers after
    /// SubscriptionEstablished).
    pending: VecDeque<T>,
    done: bool,
}

impl<T, F> SubscriptionStream<T, F>
where
    F: Fn(StreamItem) -> Option<T>,
{
    /// The messages for one hub item, in order: the first one to return,
    /// the rest queued in `pending`.
    fn messages(&mut self, item: SubscriptionItem<BusEvent>) -> Option<T> {
        match item {
            SubscriptionItem::Established {
                last_seq,
                oldest_seq,
                lost,
            } => {
                let mut items = vec![StreamItem::Established(
                    self.service.established(last_seq, oldest_seq),
                )];
                if self.start == Start::Restarted {
                    items.push(StreamItem::Lost(EventsLost {
                        reason: EventsLostReason::BusRestarted as i32,
                        ..Default::default()
                    }));
                }
                if lost > 0 {
                    let from = self.start.since().unwrap_or(0) + 1;
                    items.push(StreamItem::Lost(EventsLost {
                        reason: EventsLostReason::ReplayExpired as i32,
                        count: lost,
                        first_sequence: from,
                        last_sequence: from + lost - 1,
                    }));
                }
                let mut messages = items.into_iter().filter_map(&self.wrap);
                let first = messages.next();
                self.pending.extend(messages);
                first
            }
            SubscriptionItem::Event(env) => (self.wrap)(StreamItem::Event(env)),
            SubscriptionItem::Lost { count, reason } => (self.wrap)(StreamItem::Lost(EventsLost {
                reason: match reason {
                    LossReason::QueueFull => EventsLostReason::SlowConsumer,
                    LossReason::RingEvicted => EventsLostReason::ReplayExpired,
                } as i32,
                count,
                first_sequence: 0,
                last_sequence: 0,
            })),
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
        if let Some(msg) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(msg)));
        }
        while !this.done {
            match this.sub.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(BusError::from(e).into())));
                }
                Poll::Ready(Ok(item)) => {
                    if let Some(msg) = this.messages(item) {
                        return Poll::Ready(Some(Ok(msg)));
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
    /// A fleet host's liveness (fleet buses, domain subscriptions only).
    Host(qvirt_proto::v1::HostEvent),
}

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn flags(raw: &[i32]) -> Result<FilterFlags, BusError> {
    let mut flags = FilterFlags::default();
    for (index, &value) in raw.iter().enumerate() {
        match MonitorEventFilterFlag::try_from(value) {
            Ok(MonitorEventFilterFlag::Regex) => flags.regex = true,
            Ok(MonitorEventFilterFlag::Nocase) => flags.nocase = true,
            _ => return Err(BusError::Flag { index, value }),
        }
    }
    Ok(flags)
}

#[tonic::async_trait]
impl EventBus for EventBusService {
    async fn subscribe_domain_events(
        &self,
        request: Request<SubscribeDomainEventsRequest>,
    ) -> Result<Response<ResponseStream<SubscribeDomainEventsResponse>>, Status> {
        use subscribe_domain_events_response::Kind;
        let epoch = Arc::clone(self.epoch());
        let stream = self.domain_subscription(request, move |item| {
            let kind = match item {
                StreamItem::Established(e) => Kind::Established(e),
                StreamItem::Lost(l) => Kind::Lost(l),
                StreamItem::Host(h) => Kind::HostEvent(h),
                StreamItem::Event(env) => Kind::Event(domain_event(&epoch, &env)?),
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
        let epoch = Arc::clone(self.epoch());
        let stream = self.monitor_subscription(request, move |item| {
            let kind = match item {
                StreamItem::Established(e) => Kind::Established(e),
                StreamItem::Lost(l) => Kind::Lost(l),
                StreamItem::Host(_) => return None,
                StreamItem::Event(env) => Kind::Event(monitor_event(&epoch, &env)?),
            };
            Some(SubscribeMonitorEventsResponse { kind: Some(kind) })
        })?;
        Ok(Response::new(stream))
    }
}

/// The lifecycle event of `env` with its sequence number and its cursor
/// in run `epoch`, if it is one.
pub(crate) fn domain_event(epoch: &str, env: &Envelope<BusEvent>) -> Option<DomainEvent> {
    match &env.event {
        BusEvent::Domain(e) => Some(DomainEvent {
            sequence: env.seq,
            cursor: cursor::format(epoch, env.seq),
            ..e.clone()
        }),
        BusEvent::Monitor(_) => None,
    }
}

/// The monitor event of `env` with its sequence number and its cursor in
/// run `epoch`, if it is one.
pub(crate) fn monitor_event(epoch: &str, env: &Envelope<BusEvent>) -> Option<MonitorEvent> {
    match &env.event {
        BusEvent::Monitor(e) => Some(MonitorEvent {
            sequence: env.seq,
            cursor: cursor::format(epoch, env.seq),
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
        self.fleet_ready()?;
        let who = self.principal(&request);
        let req = request.into_inner();
        bounded("domain", &req.domain)?;
        bounded("host", &req.host)?;
        let start = self.start(&req.resume_after, req.replay_held)?;
        let subjects =
            fleet_mode::subject_filter(&req.host, &req.domain, None).lifecycle_subjects();
        let domain = DomainFilter::new(&req.domain);
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Domain(d) => {
                (host.is_empty() || d.host == host)
                    && domain.matches(&d.domain_name, &d.domain_uuid)
            }
            BusEvent::Monitor(_) => false,
        };
        Ok(self.stream(
            self.options(SubscriberKind::Domain, who, start, None, false),
            start,
            predicate,
            subjects,
            wrap,
        )?)
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
        self.fleet_ready()?;
        let who = self.principal(&request);
        let req = request.into_inner();
        bounded("domain", &req.domain)?;
        bounded("host", &req.host)?;
        let filter = MonitorEventFilter {
            domain: DomainFilter::new(&req.domain),
            event: EventNameFilter::new(&req.event, flags(&req.flags)?)
                .map_err(BusError::Filter)?,
        };
        let start = self.start(&req.resume_after, req.replay_held)?;
        let key = filter.event.exact_name().map(Box::<str>::from);
        // A literal name with no domain or host filter: the hub's index by
        // name is the whole test.
        let key_decides = key.is_some() && filter.domain.is_all() && req.host.is_empty();
        let subjects =
            fleet_mode::subject_filter(&req.host, &req.domain, key.as_deref()).monitor_subjects();
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Monitor(m) => {
                (host.is_empty() || m.host == host)
                    && filter.matches(&m.domain_name, &m.domain_uuid, &m.event)
            }
            BusEvent::Domain(_) => false,
        };
        Ok(self.stream(
            self.options(
                SubscriberKind::Monitor,
                who,
                start,
                key.as_deref(),
                key_decides,
            ),
            start,
            predicate,
            subjects,
            wrap,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use qvirt_common::rpc;
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
        EventBusService::new(hub, "e".into(), OverflowPolicy::MarkLost)
    }

    fn publish_domain_events(svc: &EventBusService, n: u64) {
        for _ in 0..n {
            svc.hub().publish(BusEvent::Domain(DomainEvent::default()));
        }
    }

    /// Every message of a domain-event subscription with `req` that is
    /// ready now.
    async fn ready_messages(
        svc: &EventBusService,
        req: SubscribeDomainEventsRequest,
    ) -> Vec<StreamItem> {
        let mut stream = svc
            .domain_subscription(Request::new(req), Some)
            .expect("subscribed");
        let mut got = Vec::new();
        while let Some(item) = poll_fn(|cx| match stream.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Ready(None),
            ready => ready,
        })
        .await
        {
            got.push(item.expect("no error"));
        }
        got
    }

    fn describe(item: &StreamItem) -> String {
        match item {
            StreamItem::Established(e) => format!("established {}", e.last_cursor),
            StreamItem::Event(env) => format!("event {}", env.seq),
            StreamItem::Lost(l) => format!(
                "lost {:?} {} {}..{}",
                l.reason(),
                l.count,
                l.first_sequence,
                l.last_sequence
            ),
            StreamItem::Host(h) => format!("host {} {:?}", h.host, h.r#type()),
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
            assert!(status.message().starts_with("flags[1]: "), "{status}");
            assert_eq!(rpc::violated_fields(&status), ["flags[1]"]);
        }
        let status = refused(SubscribeMonitorEventsRequest {
            event: "x".repeat(crate::filter::MAX_PATTERN_LEN + 1),
            ..Default::default()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert_eq!(rpc::violated_fields(&status), ["event"]);
        let status = refused(SubscribeMonitorEventsRequest {
            host: "h".repeat(MAX_FILTER_FIELD_LEN + 1),
            ..Default::default()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert_eq!(rpc::violated_fields(&status), ["host"]);
        // Nothing refused holds a slot.
        assert_eq!(svc.hub().stats().subscribers_monitor, 0);
    }

    #[test]
    fn test_bad_resume_points_are_refused_before_taking_a_slot() {
        let svc = service(4);
        publish_domain_events(&svc, 3);
        let refused = |resume_after: &str, replay_held: bool| match svc.domain_subscription(
            Request::new(SubscribeDomainEventsRequest {
                resume_after: resume_after.into(),
                replay_held,
                ..Default::default()
            }),
            Some,
        ) {
            Ok(_) => panic!("{resume_after:?} accepted"),
            Err(status) => status,
        };
        for malformed in ["3", "1.e", "1.e.x", "2.e.3", &"1".repeat(129)] {
            let status = refused(malformed, false);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            assert_eq!(rpc::reason_of(&status).as_deref(), Some("INVALID_CURSOR"));
            assert_eq!(rpc::violated_fields(&status), ["resume_after"]);
        }
        // Event 4 of this run was never published: OUT_OF_RANGE, naming
        // the newest cursor.
        let status = refused("1.e.4", false);
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
        assert_eq!(
            rpc::reason_of(&status).as_deref(),
            Some("CURSOR_BEYOND_HEAD")
        );
        assert!(
            status.message().contains("beyond its newest (3)"),
            "{status}"
        );
        let status = refused("1.e.0", true);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert_eq!(rpc::violated_fields(&status), ["replay_held"]);
        assert_eq!(svc.hub().stats().subscribers_domain, 0);
    }

    #[tokio::test]
    async fn test_resume_points() {
        let svc = service(4);
        // Before any event, the cursor names the start of the run, and
        // resuming after it later misses nothing.
        let now = ready_messages(&svc, Default::default()).await;
        let [StreamItem::Established(e)] = &now[..] else {
            panic!("{:?}", now.iter().map(describe).collect::<Vec<_>>());
        };
        assert_eq!(e.last_cursor, "1.e.0");
        publish_domain_events(&svc, 6);
        let cases: [(&str, bool, &[&str]); 5] = [
            // Live only.
            ("", false, &["established 1.e.6"]),
            // Everything held: the ring of 4 lost 1 and 2.
            (
                "",
                true,
                &[
                    "established 1.e.6",
                    "lost ReplayExpired 2 1..2",
                    "event 3",
                    "event 4",
                    "event 5",
                    "event 6",
                ],
            ),
            (
                "1.e.0",
                false,
                &[
                    "established 1.e.6",
                    "lost ReplayExpired 2 1..2",
                    "event 3",
                    "event 4",
                    "event 5",
                    "event 6",
                ],
            ),
            ("1.e.4", false, &["established 1.e.6", "event 5", "event 6"]),
            // Another run: the history is gone, then everything held.
            (
                "1.other-run.4",
                false,
                &[
                    "established 1.e.6",
                    "lost BusRestarted 0 0..0",
                    "lost ReplayExpired 2 1..2",
                    "event 3",
                    "event 4",
                    "event 5",
                    "event 6",
                ],
            ),
        ];
        for (resume_after, replay_held, want) in cases {
            let got = ready_messages(
                &svc,
                SubscribeDomainEventsRequest {
                    resume_after: resume_after.into(),
                    replay_held,
                    ..Default::default()
                },
            )
            .await;
            let got: Vec<String> = got.iter().map(describe).collect();
            assert_eq!(
                got, want,
                "resume_after {resume_after:?} replay_held {replay_held}"
            );
        }
    }

    #[test]
    fn test_events_carry_their_cursor() {
        let env = Envelope::new(7, BusEvent::Domain(DomainEvent::default()));
        let e = domain_event("run", &env).expect("a domain event");
        assert_eq!((e.sequence, e.cursor.as_str()), (7, "1.run.7"));
        assert!(monitor_event("run", &env).is_none());
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
        assert_eq!(e.last_cursor, "1.e.2");
        // And the 10 events after it follow.
        for want in 3..=12 {
            match stream.next().await {
                Some(Ok(StreamItem::Event(env))) => assert_eq!(env.seq, want),
                _ => panic!("event {want} expected"),
            }
        }
    }
}
