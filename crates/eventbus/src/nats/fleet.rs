//! The gateway side of the fleet: subscriptions served from the fleet's
//! JetStream stream instead of a local hub (a bus with `fleet:`).
//!
//! Each subscription gets its own ordered consumer, filtered by subject
//! (host, domain by name, monitor event by literal name: see
//! [`super::subject`]); the bus's own filters then decide, exactly as on
//! one host (the same predicate). The cursor is `1.EPOCH.SEQ` with SEQ the
//! stream sequence and EPOCH named after the stream's creation time, so
//! every gateway issues and understands the same cursors: a client that
//! resumes at another gateway gets no gap and no duplicate, and a cursor
//! of a stream that was deleted and made again is told apart (BUS_RESTARTED).
//!
//! Host events: the bus also watches the fleet registry
//! ([`qvirt_registry::View`]) and publishes a `HostEvent` into the stream
//! when a host's heartbeat expires or comes back, its message id named
//! after the KV revision of the change, so every gateway's bus publishes
//! the same change once; domain subscriptions deliver them.
//!
//! A slow subscriber is not dropped from: its consumer is simply read no
//! faster than the client reads (the stream holds the history), so memory
//! stays bounded by the consumer's batch and the HTTP/2 stream's window.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use qvirt_proto::v1::publish_request::Event as PublishedEvent;
use qvirt_proto::v1::{EventsLost, EventsLostReason, HostEvent, HostEventType, PublishRequest};
use qvirt_registry::{HostChange, View};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{FleetConfig, subject};
use crate::cursor;
use crate::hub::{Envelope, Subscription};
use crate::service::BusEvent;
use crate::status::BusError;

/// The most events one pull brings (the consumer's `max_batch`).
pub const PULL_BATCH: i64 = 64;

/// How long one pull waits (the consumer's `max_expires`); heartbeats
/// come at half of it.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How long creating a consumer may take before it is tried again (a
/// consumer placed on a dead peer hangs until the API timeout).
const CREATE_TIMEOUT: Duration = Duration::from_secs(3);

/// How many times a consumer is tried before the subscription fails.
const CREATE_ATTEMPTS: u32 = 4;

/// The fleet's stream, as one gateway-side bus sees it.
#[derive(Clone)]
pub struct Fleet {
    js: jetstream::Context,
    stream: String,
    epoch: Arc<str>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("stream", &self.stream)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The epoch of a stream created `created_nanos` after the Unix epoch:
/// `js` and that number in hex.
pub fn epoch_of(created_nanos: i128) -> String {
    format!("js{:x}", created_nanos.max(0))
}

/// Where a fleet subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetStart {
    /// After the newest event now.
    Live,
    /// After this stream sequence (0: everything held).
    After(u64),
    /// After a cursor of another stream: BUS_RESTARTED, then everything
    /// held.
    Restarted,
}

/// What a fleet subscription's stream yields to its response stream.
#[derive(Debug)]
pub enum FleetItem {
    /// The subscription is active: the newest and oldest sequence held.
    Established {
        /// The newest event's sequence when it was set up.
        last: u64,
        /// The oldest held.
        oldest: u64,
    },
    /// A loss marker.
    Lost(EventsLost),
    /// A matching event at its stream sequence.
    Event(Arc<Envelope<BusEvent>>),
    /// A host of the subscription's became unreachable or reachable.
    Host(HostEvent),
    /// The end: an error.
    Failed(Status),
}

impl Fleet {
    /// Connects to the broker (presenting `access`) and waits for the
    /// stream (a gateway may start before any host has made it), trying
    /// again every second until `shutdown`; `None` if it fired first.
    pub async fn connect(
        config: &FleetConfig,
        access: &qvirt_registry::NatsAccess,
        shutdown: &CancellationToken,
    ) -> Option<Fleet> {
        let broker = config.broker();
        let client = tokio::select! {
            c = qvirt_registry::connect(&broker.urls, "qvirt-eventbus fleet", access) => c,
            () = shutdown.cancelled() => return None,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "fleet: cannot create a NATS client");
                return None;
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client);
        let mut warned = false;
        loop {
            match js.get_stream(&broker.stream).await {
                Ok(mut s) => match s.info().await {
                    Ok(info) => {
                        let epoch = epoch_of(info.created.unix_timestamp_nanos());
                        tracing::info!(stream = %broker.stream, %epoch, "fleet: serving subscriptions from the stream");
                        return Some(Fleet {
                            js,
                            stream: broker.stream,
                            epoch: epoch.into(),
                        });
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "fleet: waiting for the stream");
                    }
                    Err(_) => {}
                },
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(stream = %broker.stream, error = %e, "fleet: waiting for the stream (NATS, or a host to create it)");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    /// Publishes a `HostEvent` into the stream for every host liveness
    /// change `view` reports, until `shutdown`. Its message id names the
    /// change by its KV revision, so the same change published by every
    /// gateway's bus is stored once.
    pub fn publish_host_events(&self, view: &View, shutdown: CancellationToken) {
        let mut changes = view.host_changes();
        let js = self.js.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    () = shutdown.cancelled() => return,
                };
                match change {
                    Ok(change) => {
                        tokio::select! {
                            () = publish_host_event(&js, &change) => {}
                            () = shutdown.cancelled() => return,
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "fleet: host events missed (this bus fell behind; another gateway's bus publishes them too)"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// The broker connection.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// The epoch every cursor of this stream carries.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// A subscription: the stream of what an ordered consumer on
    /// `subjects` delivers from `start`, of which the events `predicate`
    /// accepts. The response stream polls it directly, as it polls a hub
    /// subscription on one host: no task or channel between the consumer
    /// and the client, so an event costs no extra wake-up. It ends with
    /// [`FleetItem::Failed`] when the consumer cannot be made or read, or
    /// `slot` (the subscription's place under the caps) ends.
    pub fn subscribe(
        &self,
        start: FleetStart,
        subjects: Vec<String>,
        predicate: Arc<dyn Fn(&BusEvent) -> bool + Send + Sync>,
        slot: Subscription<BusEvent>,
    ) -> impl Stream<Item = FleetItem> + Send + 'static {
        let opening = Feed::Opening(Box::new(Opening {
            fleet: self.clone(),
            start,
            subjects,
            predicate,
            slot,
        }));
        futures_util::stream::unfold(opening, |mut feed| async move {
            loop {
                feed = match feed {
                    Feed::Done => return None,
                    Feed::Opening(opening) => {
                        let Opening {
                            fleet,
                            start,
                            subjects,
                            predicate,
                            slot,
                        } = *opening;
                        match fleet.open(start, subjects).await {
                            Ok((queued, messages, next_seq)) => Feed::Open(Box::new(Open {
                                queued,
                                messages,
                                next_seq,
                                predicate,
                                slot,
                            })),
                            Err(status) => return Some((FleetItem::Failed(status), Feed::Done)),
                        }
                    }
                    Feed::Open(mut open) => {
                        return Some(match open.next().await {
                            Ok(item) => (item, Feed::Open(open)),
                            Err(status) => (FleetItem::Failed(status), Feed::Done),
                        });
                    }
                };
            }
        })
    }

    /// Makes the consumer of a subscription; returns what to hand on
    /// first (`Established`, loss markers), the consumer's messages and
    /// the first stream sequence that may be handed on.
    async fn open(
        &self,
        start: FleetStart,
        subjects: Vec<String>,
    ) -> Result<(VecDeque<FleetItem>, consumer::pull::Ordered, u64), Status> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| unavailable("the stream is not reachable", &e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable("the stream is not reachable", &e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if epoch_of(info.created.unix_timestamp_nanos()) != *self.epoch {
            // The stream was made again under this gateway: its cursors
            // would mean other events.
            return Err(unavailable(
                "the stream was recreated; restart this bus",
                &"epoch",
            ));
        }
        // The first sequence to deliver, and what is lost before it.
        let mut queued = VecDeque::from([FleetItem::Established {
            last,
            oldest: first.max(1),
        }]);
        let from = match start {
            FleetStart::Live => last + 1,
            FleetStart::After(seq) if seq > last => {
                return Err(BusError::CursorBeyondHead {
                    seq,
                    last,
                    last_cursor: cursor::format(&self.epoch, last),
                }
                .into());
            }
            FleetStart::After(seq) => seq + 1,
            FleetStart::Restarted => {
                queued.push_back(FleetItem::Lost(EventsLost {
                    reason: EventsLostReason::BusRestarted as i32,
                    ..Default::default()
                }));
                1
            }
        };
        // An empty stream reports first = last + 1 (1 when new).
        let oldest = first.max(1);
        if from < oldest && start != FleetStart::Restarted {
            let count = oldest - from;
            queued.push_back(FleetItem::Lost(EventsLost {
                reason: EventsLostReason::ReplayExpired as i32,
                count,
                first_sequence: from,
                last_sequence: oldest - 1,
            }));
        }
        let from = from.max(oldest);
        let config = consumer::pull::OrderedConfig {
            filter_subjects: subjects,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            // Pulls of at most 64 events (what a subscription may hold
            // besides what its HTTP/2 stream buffers), expiring after
            // 5 s: heartbeats every 2.5 s, so a consumer lost with its
            // server is made again after about 5 s rather than 30.
            max_batch: PULL_BATCH,
            max_expires: PULL_EXPIRES,
            ..Default::default()
        };
        let mut attempt = 0;
        let consumer = loop {
            attempt += 1;
            match tokio::time::timeout(CREATE_TIMEOUT, stream.create_consumer(config.clone())).await
            {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if attempt >= CREATE_ATTEMPTS => {
                    return Err(unavailable("cannot create a consumer", &e));
                }
                Err(_) if attempt >= CREATE_ATTEMPTS => {
                    return Err(unavailable("cannot create a consumer", &"timed out"));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("cannot read the stream", &e))?;
        Ok((queued, messages, from))
    }
}

/// A fleet subscription's state between two items.
enum Feed {
    /// Its consumer is still to be made.
    Opening(Box<Opening>),
    /// Reading its consumer.
    Open(Box<Open>),
    /// Ended.
    Done,
}

/// A fleet subscription whose consumer is still to be made.
struct Opening {
    fleet: Fleet,
    start: FleetStart,
    subjects: Vec<String>,
    predicate: Arc<dyn Fn(&BusEvent) -> bool + Send + Sync>,
    slot: Subscription<BusEvent>,
}

/// An open fleet subscription.
struct Open {
    /// Items due before the next message (`Established`, loss markers).
    queued: VecDeque<FleetItem>,
    messages: consumer::pull::Ordered,
    /// The first stream sequence this subscription may hand on.
    next_seq: u64,
    predicate: Arc<dyn Fn(&BusEvent) -> bool + Send + Sync>,
    slot: Subscription<BusEvent>,
}

impl Open {
    /// The next item to hand on.
    async fn next(&mut self) -> Result<FleetItem, Status> {
        if let Some(item) = self.queued.pop_front() {
            return Ok(item);
        }
        loop {
            let next = tokio::select! {
                m = self.messages.next() => m,
                // The slot ends when the bus shuts down.
                end = self.slot.recv() => match end {
                    Err(e) => return Err(BusError::from(e).into()),
                    Ok(_) => continue,
                },
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // The ordered consumer recreates itself; report and go on.
                    tracing::debug!(error = %e, "fleet: consumer hiccup");
                    continue;
                }
                None => return Err(unavailable("the consumer ended", &"closed")),
            };
            let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
                continue;
            };
            // async-nats remakes an ordered consumer that has delivered
            // nothing yet with DeliverPolicy::All, not from our start:
            // after such a reset the stream's history comes again.
            // Only what follows the last sequence handed on counts.
            if seq < self.next_seq {
                continue;
            }
            self.next_seq = seq + 1;
            if subject::is_host_event(&message.subject) {
                // The consumer's subjects name only the hosts covered.
                if let Ok(h) = HostEvent::decode(message.payload.clone()) {
                    return Ok(FleetItem::Host(h));
                }
            } else if subject::is_lost(&message.subject) {
                if let Ok(host_loss) = EventsLost::decode(message.payload.clone()) {
                    return Ok(FleetItem::Lost(EventsLost {
                        reason: EventsLostReason::OutboxFull as i32,
                        count: host_loss.count,
                        first_sequence: 0,
                        last_sequence: 0,
                    }));
                }
            } else {
                let Some(event) = decode(&message.payload) else {
                    tracing::debug!(seq, subject = %message.subject, "fleet: skipping a message that is not an event");
                    continue;
                };
                if (self.predicate)(&event) {
                    return Ok(FleetItem::Event(Arc::new(Envelope::new(seq, event))));
                }
            }
        }
    }
}

/// UNAVAILABLE for a fleet failure, logged.
fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Status {
    tracing::warn!(error = %e, "fleet: {what}");
    Status::from(BusError::Fleet(what.to_owned()))
}

/// How many times a host event is tried before it is left to the other
/// gateways' buses.
const HOST_EVENT_ATTEMPTS: u32 = 5;

/// The `Nats-Msg-Id` of a host liveness change: the same on every bus.
pub fn host_event_id(change: &HostChange) -> String {
    let what = if change.live {
        "reachable"
    } else {
        "unreachable"
    };
    format!("host:{}:{what}:{}", change.host, change.revision)
}

async fn publish_host_event(js: &jetstream::Context, change: &HostChange) {
    let event = HostEvent {
        host: change.host.clone(),
        r#type: if change.live {
            HostEventType::Reachable
        } else {
            HostEventType::Unreachable
        } as i32,
        time: Some(std::time::SystemTime::now().into()),
    };
    let id = host_event_id(change);
    let subject = subject::host_event(&change.host);
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=HOST_EVENT_ATTEMPTS {
        let message = jetstream::message::PublishMessage::build()
            .payload(event.encode_to_vec().into())
            .message_id(&id);
        let sent = async {
            let ack = js
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(CREATE_TIMEOUT, sent).await {
            Ok(Ok(ack)) => {
                tracing::info!(host = %change.host, live = change.live, duplicate = ack.duplicate, "fleet: host event");
                return;
            }
            Ok(Err(e)) if attempt == HOST_EVENT_ATTEMPTS => {
                tracing::warn!(%id, error = %e, "fleet: cannot publish a host event");
            }
            Err(_) if attempt == HOST_EVENT_ATTEMPTS => {
                tracing::warn!(%id, "fleet: cannot publish a host event: timed out");
            }
            _ => {}
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

/// A forwarded event from its payload.
pub fn decode(payload: &[u8]) -> Option<BusEvent> {
    let req = PublishRequest::decode(payload).ok()?;
    Some(match req.event? {
        PublishedEvent::DomainEvent(e) => BusEvent::Domain(e),
        PublishedEvent::MonitorEvent(e) => BusEvent::Monitor(e),
    })
}

/// Subject filters for a subscription's host, domain and monitor event:
/// a domain filter that is a UUID cannot be put in a subject (events are
/// filed by name), so it is left to the bus's filter.
pub fn subject_filter<'a>(
    host: &'a str,
    domain: &'a str,
    event: Option<&'a str>,
) -> subject::SubjectFilter<'a> {
    let is_uuid = domain.len() == 36
        && domain.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    subject::SubjectFilter {
        host: (!host.is_empty()).then_some(host),
        domain: (!domain.is_empty() && !is_uuid).then_some(domain),
        event,
    }
}
