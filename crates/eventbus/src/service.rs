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
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::filter::{DomainFilter, EventNameFilter, FilterFlags, MonitorEventFilter};
use crate::hub::{
    Hub, LossReason, OverflowPolicy, RecvError, SubscribeOptions, SubscriberKind, SubscriptionItem,
};
use crate::status;

/// Metadata key in which the gateway passes the authenticated principal.
/// Without it (a direct, internal caller) the peer address is the principal.
pub const PRINCIPAL_METADATA: &str = "x-qvirt-principal";

/// Messages buffered between a subscription's hub queue and its gRPC stream;
/// the hub queue is the real bound, this only decouples the two tasks.
const STREAM_BUFFER: usize = 16;

/// One event on the bus: both kinds share one sequence space.
#[derive(Debug, Clone, PartialEq)]
pub enum BusEvent {
    /// A typed lifecycle event.
    Domain(DomainEvent),
    /// A raw QMP event.
    Monitor(MonitorEvent),
}

impl BusEvent {
    /// Approximate bytes the event holds, for the ring's byte bound.
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
        std::mem::size_of::<BusEvent>() + strings
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
        }
    }

    /// The hub (for metrics).
    pub fn hub(&self) -> &Hub<BusEvent> {
        &self.hub
    }

    fn established(&self, last_sequence: u64) -> SubscriptionEstablished {
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        // The ring holds consecutive sequence numbers ending at the last one.
        let stats = self.hub.stats();
        let oldest_sequence = match stats.ring_len as u64 {
            0 => 0,
            n => stats.last_seq + 1 - n,
        };
        SubscriptionEstablished {
            last_sequence,
            oldest_sequence,
            epoch: self.epoch.to_string(),
            subscription_id: format!("{}-{id}", self.epoch),
        }
    }

    /// Registers a subscription and spawns the task that turns its hub items
    /// into stream messages with `wrap`.
    fn stream<T, F>(
        &self,
        options: SubscribeOptions,
        predicate: impl Fn(&BusEvent) -> bool + Send + Sync + 'static,
        wrap: F,
    ) -> Result<ResponseStream<T>, Status>
    where
        T: Send + 'static,
        F: Fn(StreamItem) -> Option<T> + Send + 'static,
    {
        let since = options.since;
        let mut sub = self
            .hub
            .subscribe(options, predicate)
            .map_err(status::subscribe)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        let shutdown = self.shutdown.child_token();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = sub.recv() => item,
                    () = shutdown.cancelled() => Err(RecvError::Closed),
                    () = tx.closed() => return,
                };
                let message = match item {
                    Ok(SubscriptionItem::Established { last_seq, lost }) => {
                        let first = service.established(last_seq);
                        if let Some(msg) = wrap(StreamItem::Established(first))
                            && tx.send(Ok(msg)).await.is_err()
                        {
                            return;
                        }
                        if lost == 0 {
                            continue;
                        }
                        let from = since.unwrap_or(0) + 1;
                        StreamItem::Lost(EventsLost {
                            reason: EventsLostReason::ReplayExpired as i32,
                            count: lost,
                            first_sequence: from,
                            last_sequence: from + lost - 1,
                        })
                    }
                    Ok(SubscriptionItem::Event(env)) => {
                        StreamItem::Event(env.seq, env.event.clone())
                    }
                    Ok(SubscriptionItem::Lost { count, reason }) => StreamItem::Lost(EventsLost {
                        reason: match reason {
                            LossReason::QueueFull => EventsLostReason::SlowConsumer,
                            LossReason::RingEvicted => EventsLostReason::ReplayExpired,
                        } as i32,
                        count,
                        first_sequence: 0,
                        last_sequence: 0,
                    }),
                    Err(e) => {
                        let _ = tx.send(Err(status::recv(e))).await;
                        return;
                    }
                };
                let Some(msg) = wrap(message) else { continue };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn options(
        &self,
        kind: SubscriberKind,
        principal: String,
        since: Option<u64>,
    ) -> SubscribeOptions {
        SubscribeOptions {
            principal,
            kind,
            since,
            policy: self.policy,
        }
    }
}

/// What a subscription task hands to a stream's message builder.
pub enum StreamItem {
    /// The first message.
    Established(SubscriptionEstablished),
    /// An event with its sequence number.
    Event(u64, BusEvent),
    /// A loss marker.
    Lost(EventsLost),
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Who is asking: the gateway's principal header, else the peer address.
fn principal<T>(request: &Request<T>) -> String {
    if let Some(p) = request
        .metadata()
        .get(PRINCIPAL_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|p| !p.is_empty())
    {
        return p.to_owned();
    }
    match request.remote_addr() {
        Some(addr) => format!("peer:{}", addr.ip()),
        None => "peer:local".to_owned(),
    }
}

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
            let event = match req.event {
                Some(PublishedEvent::DomainEvent(e)) => BusEvent::Domain(e),
                Some(PublishedEvent::MonitorEvent(e)) => BusEvent::Monitor(e),
                None => return Err(Status::invalid_argument("event: exactly one must be set")),
            };
            last_sequence = self.hub.publish(event);
            accepted += 1;
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
        let who = principal(&request);
        let req = request.into_inner();
        let domain = DomainFilter::new(&req.domain);
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Domain(d) => {
                (host.is_empty() || d.host == host)
                    && domain.matches(&d.domain_name, &d.domain_uuid)
            }
            BusEvent::Monitor(_) => false,
        };
        use subscribe_domain_events_response::Kind;
        let stream = self.stream(
            self.options(SubscriberKind::Domain, who, req.since),
            predicate,
            |item| {
                let kind = match item {
                    StreamItem::Established(e) => Kind::Established(e),
                    StreamItem::Lost(l) => Kind::Lost(l),
                    StreamItem::Event(seq, BusEvent::Domain(mut e)) => {
                        e.sequence = seq;
                        Kind::Event(e)
                    }
                    StreamItem::Event(_, BusEvent::Monitor(_)) => return None,
                };
                Some(SubscribeDomainEventsResponse { kind: Some(kind) })
            },
        )?;
        Ok(Response::new(stream))
    }

    async fn subscribe_monitor_events(
        &self,
        request: Request<SubscribeMonitorEventsRequest>,
    ) -> Result<Response<ResponseStream<SubscribeMonitorEventsResponse>>, Status> {
        let who = principal(&request);
        let req = request.into_inner();
        let filter = MonitorEventFilter {
            domain: DomainFilter::new(&req.domain),
            event: EventNameFilter::new(&req.event, flags(&req.flags)?).map_err(status::filter)?,
        };
        let host = req.host;
        let predicate = move |e: &BusEvent| match e {
            BusEvent::Monitor(m) => {
                (host.is_empty() || m.host == host)
                    && filter.matches(&m.domain_name, &m.domain_uuid, &m.event)
            }
            BusEvent::Domain(_) => false,
        };
        use subscribe_monitor_events_response::Kind;
        let stream = self.stream(
            self.options(SubscriberKind::Monitor, who, req.since),
            predicate,
            |item| {
                let kind = match item {
                    StreamItem::Established(e) => Kind::Established(e),
                    StreamItem::Lost(l) => Kind::Lost(l),
                    StreamItem::Event(seq, BusEvent::Monitor(mut e)) => {
                        e.sequence = seq;
                        Kind::Event(e)
                    }
                    StreamItem::Event(_, BusEvent::Domain(_)) => return None,
                };
                Some(SubscribeMonitorEventsResponse { kind: Some(kind) })
            },
        )?;
        Ok(Response::new(stream))
    }
}
