//! The host side of the fleet: every event the hub stores is forwarded to
//! the JetStream stream, through the on-disk [`Outbox`], from one ordered
//! publishing loop.
//!
//! - The hub hands each stored event to a bounded channel ([`Tap`]),
//!   under its lock, so the channel holds them in sequence order. A full
//!   channel (the forwarder cannot keep up with its disk) drops the event
//!   and counts it.
//! - The forwarder runs on its own thread (file writes never stall the
//!   bus's workers). It appends each event to the outbox, then publishes
//!   from the outbox, one publish in flight ([`WINDOW`] says why),
//!   awaiting the acks in order. On any failure it resends everything from the
//!   first unacknowledged record (go-back-N): one loop and in-order acks
//!   keep the stream in the bus's order, and the message id
//!   (`HOST:EPOCH:SEQ`, kept in the outbox record) makes a resent
//!   event that was in fact stored a duplicate JetStream drops.
//! - A full outbox drops events and counts them; once there is room
//!   again, one loss marker (an `EventsLost`, OUTBOX_FULL, with the count
//!   and the bus sequence range) goes to the stream in their place.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use prost::Message as _;
use qvirt_proto::v1::publish_request::Event as PublishedEvent;
use qvirt_proto::v1::{EventsLost, EventsLostReason, PublishRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, OutboxError, Record};
use super::{NatsConfig, subject};
use crate::hub::{Envelope, Hub};
use crate::service::BusEvent;

/// Publishes in flight at once: one. With more, a failover can reorder
/// the stream: publishes written to a connection that dies are lost,
/// while later ones still in the client's buffer are sent after it
/// reconnects and stored first; going back then stores the lost ones
/// after them (seen with 64 in flight when the stream leader the client
/// was connected to was killed: a block of 32 events moved). With one,
/// an event is sent only once the one before it is stored, so the
/// stream keeps the bus's order; the cost is one round trip per event
/// (docs/FLEET.md).
pub const WINDOW: usize = 1;

/// Events the hub may have handed over that the forwarder has not yet
/// written to the outbox.
pub const TAP_CAPACITY: usize = 8192;

/// How long a publish may wait for its ack before it counts as failed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the outbox is synced to disk while it changes.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait between retries after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// Its thread could not be started.
    #[error("cannot start the forwarder thread")]
    Thread(#[source] std::io::Error),
    /// The NATS token or CA file is unusable (it was fine when the config
    /// was checked).
    #[error(transparent)]
    Access(#[from] qvirt_common::config::ConfigError),
}

/// Counters of the forwarder, for metrics and tests.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Events (and loss markers) JetStream acknowledged.
    pub acked: AtomicU64,
    /// Of those, the ones it reported as duplicates (sent again after an
    /// ack was lost, or after a restart).
    pub duplicates: AtomicU64,
    /// Events dropped: outbox or channel full, or too large for the
    /// broker.
    pub lost: AtomicU64,
    /// Records in the outbox not yet acknowledged.
    pub pending: AtomicU64,
    /// Bytes the outbox takes on disk.
    pub outbox_bytes: AtomicU64,
    /// Publish failures that made the loop go back.
    pub retries: AtomicU64,
    /// Whether the stream is known to exist (checked or created).
    pub stream_ready: AtomicBool,
}

/// Dropped events not yet reported: their count and bus sequence range.
#[derive(Debug, Default, Clone, Copy)]
struct Loss {
    count: u64,
    first: u64,
    last: u64,
}

impl Loss {
    fn add(&mut self, seq: u64) {
        if self.count == 0 {
            self.first = seq;
        }
        self.count += 1;
        self.last = seq;
    }
}

/// The hub's end: what the tap sends into.
struct Tap {
    tx: mpsc::Sender<Arc<Envelope<BusEvent>>>,
    dropped: Mutex<Loss>,
}

/// A running forwarder: wait for it with [`Forwarder::finished`].
pub struct Forwarder {
    /// Its counters.
    pub stats: Arc<ForwardStats>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Forwarder {
    /// Opens the outbox, starts the forwarder thread and taps `hub`: every
    /// event stored from now on is forwarded. `epoch` names this bus run
    /// in message ids. The forwarder drains what it can and stops when
    /// `shutdown` fires.
    pub fn start(
        config: &NatsConfig,
        hub: &Hub<BusEvent>,
        epoch: &str,
        shutdown: CancellationToken,
    ) -> Result<Forwarder, ForwardError> {
        let access = config.broker().access("nats")?;
        let dir = config.outbox_dir.clone().unwrap_or_default();
        let outbox = Outbox::open(&dir, config.outbox_max_bytes)?;
        let stats = Arc::new(ForwardStats::default());
        stats.pending.store(outbox.pending(), Ordering::Relaxed);
        stats.outbox_bytes.store(outbox.bytes(), Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TAP_CAPACITY);
        let tap = Arc::new(Tap {
            tx,
            dropped: Mutex::new(Loss::default()),
        });
        let host = config.host_id();
        let state = Loop {
            config: config.clone(),
            access,
            host: host.clone(),
            epoch: epoch.to_owned(),
            outbox,
            stats: Arc::clone(&stats),
            tap: Arc::clone(&tap),
            inflight: VecDeque::new(),
            loss: Loss::default(),
            stream_ready: false,
            retry_at: None,
            backoff: Duration::ZERO,
            failing_since: None,
        };
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("nats-forward".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(state.run(rx, shutdown)),
                    Err(e) => tracing::error!(error = %e, "nats forwarder: no runtime"),
                }
                let _ = done_tx.send(());
            })
            .map_err(ForwardError::Thread)?;
        let tapped = hub.set_tap(move |env| {
            if tap.tx.try_send(Arc::clone(env)).is_err() {
                tap.dropped
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .add(env.seq);
            }
        });
        debug_assert!(tapped, "one forwarder per hub");
        tracing::info!(%host, stream = %config.stream, outbox = %dir.display(), "forwarding events to NATS");
        Ok(Forwarder { stats, done })
    }

    /// Resolves once the forwarder thread has stopped (after `shutdown`).
    pub async fn finished(self) {
        let _ = self.done.await;
    }
}

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

struct Inflight {
    record: Record,
    /// The pending ack; `None`: to be (re)sent.
    ack: Option<AckFuture>,
}

struct Loop {
    access: qvirt_registry::NatsAccess,
    config: NatsConfig,
    host: String,
    epoch: String,
    outbox: Outbox,
    stats: Arc<ForwardStats>,
    tap: Arc<Tap>,
    inflight: VecDeque<Inflight>,
    loss: Loss,
    stream_ready: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    failing_since: Option<Instant>,
}

/// Resolves with the front publish's ack, or never when there is none.
async fn front_ack(
    inflight: &mut VecDeque<Inflight>,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    match inflight.front_mut().and_then(|f| f.ack.as_mut()) {
        Some(ack) => ack.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Loop {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Arc<Envelope<BusEvent>>>,
        shutdown: CancellationToken,
    ) {
        let client = match qvirt_registry::connect(
            &self.config.urls,
            &format!("qvirt-eventbus {}", self.host),
            &self.access,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                // Only a bad address fails with retry on; config checks
                // them, so this is a bug.
                tracing::error!(error = %e, "nats forwarder: cannot create a client");
                return;
            }
        };
        let js = jetstream::ContextBuilder::new()
            .ack_timeout(ACK_TIMEOUT)
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        let mut sync = tokio::time::interval(SYNC_INTERVAL);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.stream_ready && self.retry_at.is_none_or(|at| Instant::now() >= at) {
                self.ensure_stream(&js).await;
            }
            if self.stream_ready
                && self.retry_at.is_none_or(|at| Instant::now() >= at)
                && client.connection_state() == async_nats::connection::State::Connected
            {
                self.fill(&js).await;
            }
            let wake = if client.connection_state() == async_nats::connection::State::Connected {
                self.retry_at
            } else {
                // Disconnected: look again shortly (the client reconnects
                // by itself).
                Some(Instant::now() + Duration::from_millis(50))
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                ack = front_ack(&mut self.inflight) => self.on_ack(ack),
                got = rx.recv() => match got {
                    Some(env) => {
                        self.take(&env);
                        // Whatever else is ready, in one go.
                        while let Ok(env) = rx.try_recv() {
                            self.take(&env);
                        }
                    }
                    None => break,
                },
                _ = sync.tick() => self.sync(),
                () = sleep_until(wake) => {}
            }
        }
        self.drain_on_shutdown(&mut rx, &js).await;
        self.sync();
    }

    /// Writes what the hub handed over to the outbox; flushes the
    /// `drain_on_shutdown` grace.
    async fn drain_on_shutdown(
        &mut self,
        rx: &mut mpsc::Receiver<Arc<Envelope<BusEvent>>>,
        js: &jetstream::Context,
    ) {
        while let Ok(env) = rx.try_recv() {
            self.take(&env);
        }
        // A short grace to get what is in flight acknowledged (the outbox
        // keeps the rest for the next run).
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.stream_ready && self.outbox.pending() > 0 && Instant::now() < deadline {
            if self.retry_at.is_some() {
                break;
            }
            self.fill(js).await;
            match tokio::time::timeout_at(deadline.into(), front_ack(&mut self.inflight)).await {
                Ok(ack) => self.on_ack(ack),
                Err(_) => break,
            }
        }
    }

    /// Creates the stream, or checks the one there.
    async fn ensure_stream(&mut self, js: &jetstream::Context) {
        let config = stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![format!("{}.>", subject::PREFIX)],
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas,
            duplicate_window: self.config.duplicate_window(),
            max_age: Duration::from_secs(self.config.max_age_secs),
            max_bytes: if self.config.max_bytes == 0 {
                -1
            } else {
                i64::try_from(self.config.max_bytes).unwrap_or(i64::MAX)
            },
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        match js.get_or_create_stream(config).await {
            Ok(mut s) => {
                let info = s.info().await.map(|i| i.config.clone());
                if let Ok(found) = info {
                    if !found
                        .subjects
                        .iter()
                        .any(|s| s == "qvirt.events.>" || s == ">")
                    {
                        tracing::warn!(stream = %found.name, subjects = ?found.subjects, "nats: the stream does not take qvirt.events.>; events will not be stored");
                    }
                    if found.num_replicas != self.config.replicas {
                        tracing::warn!(stream = %found.name, replicas = found.num_replicas, configured = self.config.replicas, "nats: the stream exists with other replicas; kept as it is");
                    }
                }
                tracing::info!(stream = %self.config.stream, "nats: stream ready");
                self.stream_ready = true;
                self.stats.stream_ready.store(true, Ordering::Relaxed);
                self.succeeded();
            }
            Err(e) => {
                self.failed(&format!("stream {}: {e}", self.config.stream));
            }
        }
    }

    /// One event from the hub: into the outbox, or counted as lost.
    fn take(&mut self, env: &Envelope<BusEvent>) {
        // Drops the tap reported come before this event in bus order.
        let dropped = std::mem::take(
            &mut *self
                .tap
                .dropped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if dropped.count > 0 {
            self.merge_loss(dropped);
        }
        let (subject, payload) = encode(&self.host, env);
        let id = format!("{}:{}:{}", self.host, self.epoch, env.seq);
        // A loss marker owed goes first, if it and this event fit.
        self.report_loss(Outbox::record_len(&id, &subject, &payload));
        let stored = if self.loss.count > 0 {
            // Still owing a marker: nothing may overtake it.
            false
        } else {
            match self.outbox.append(&id, &subject, &payload, false) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::error!(error = %e, seq = env.seq, "outbox: cannot append; event lost");
                    false
                }
            }
        };
        if !stored {
            self.loss.add(env.seq);
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
        self.update_gauges();
    }

    fn merge_loss(&mut self, other: Loss) {
        self.stats.lost.fetch_add(other.count, Ordering::Relaxed);
        if self.loss.count == 0 {
            self.loss = other;
        } else {
            self.loss.count += other.count;
            self.loss.first = self.loss.first.min(other.first);
            self.loss.last = self.loss.last.max(other.last);
        }
    }

    /// Writes the loss marker owed, if there is room for it and for
    /// `then` bytes after it (the event at hand; 0 after an ack, when the
    /// outbox must also be back under half its cap, so a marker is not
    /// followed at once by another loss). Until it is written no event
    /// may overtake it: they are dropped and counted too.
    fn report_loss(&mut self, then: u64) {
        if self.loss.count == 0 {
            return;
        }
        if then == 0 && self.outbox.bytes() > self.config.outbox_max_bytes / 2 {
            return;
        }
        let lost = EventsLost {
            reason: EventsLostReason::OutboxFull as i32,
            count: self.loss.count,
            first_sequence: self.loss.first,
            last_sequence: self.loss.last,
        };
        let id = format!("{}:{}:lost:{}", self.host, self.epoch, self.loss.first);
        let subject = subject::lost(&self.host);
        let marker = lost.encode_to_vec();
        if !self
            .outbox
            .fits(&[Outbox::record_len(&id, &subject, &marker), then])
        {
            return;
        }
        match self.outbox.append(&id, &subject, &marker, true) {
            Ok(_) => {
                tracing::warn!(
                    count = self.loss.count,
                    first = self.loss.first,
                    last = self.loss.last,
                    "outbox was full: events lost, marker queued"
                );
                self.loss = Loss::default();
            }
            Err(e) => tracing::error!(error = %e, "outbox: cannot append a loss marker"),
        }
    }

    /// Sends what is due: first the in-flight records to resend, then new
    /// ones, up to [`WINDOW`].
    async fn fill(&mut self, js: &jetstream::Context) {
        for i in 0..self.inflight.len() {
            if self.inflight[i].ack.is_some() {
                continue;
            }
            match send(js, &self.inflight[i].record).await {
                Ok(ack) => self.inflight[i].ack = Some(ack),
                Err(e) => return self.send_failed(i, e),
            }
        }
        while self.inflight.len() < WINDOW {
            let record = match self.outbox.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "outbox: cannot read");
                    self.failed("outbox read");
                    return;
                }
            };
            let sent = send(js, &record).await;
            self.inflight.push_back(Inflight { record, ack: None });
            let last = self.inflight.len() - 1;
            match sent {
                Ok(ack) => self.inflight[last].ack = Some(ack),
                Err(e) => return self.send_failed(last, e),
            }
        }
    }

    fn send_failed(&mut self, at: usize, e: jetstream::context::PublishError) {
        if e.kind() == PublishErrorKind::MaxPayloadExceeded {
            // It can never be sent: drop it, count it.
            tracing::error!(id = %self.inflight[at].record.id, "event too large for the broker; lost");
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            let _ = self.inflight.remove(at);
            return;
        }
        self.failed(&format!("publish: {e}"));
        self.go_back();
    }

    fn on_ack(
        &mut self,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) {
        match ack {
            Ok(ack) => {
                let Some(done) = self.inflight.pop_front() else {
                    return;
                };
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                if ack.duplicate {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = self.outbox.ack(done.record.index + 1) {
                    tracing::error!(error = %e, "outbox: cannot drop acknowledged segments");
                }
                self.succeeded();
                self.report_loss(0);
                self.update_gauges();
            }
            Err(e) => {
                self.failed(&format!("ack: {e}"));
                self.go_back();
            }
        }
    }

    /// Forgets every pending ack: all in flight is sent again, in order.
    fn go_back(&mut self) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        for f in &mut self.inflight {
            f.ack = None;
        }
    }

    fn failed(&mut self, what: &str) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + self.backoff);
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            tracing::warn!(error = %what, pending = self.outbox.pending(), "nats: cannot forward events; retrying (the outbox keeps them)");
        }
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        self.backoff = Duration::ZERO;
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                pending = self.outbox.pending(),
                "nats: forwarding again"
            );
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.outbox.sync() {
            tracing::error!(error = %e, "outbox: cannot sync");
        }
    }

    fn update_gauges(&self) {
        self.stats
            .pending
            .store(self.outbox.pending(), Ordering::Relaxed);
        self.stats
            .outbox_bytes
            .store(self.outbox.bytes(), Ordering::Relaxed);
    }
}

/// Publishes one record with its message id; the ack to await.
async fn send(
    js: &jetstream::Context,
    record: &Record,
) -> Result<AckFuture, jetstream::context::PublishError> {
    let message = jetstream::message::PublishMessage::build()
        .payload(record.payload.clone())
        .message_id(&record.id);
    let ack = tokio::time::timeout(
        ACK_TIMEOUT,
        js.send_publish(record.subject.clone(), message),
    )
    .await
    .map_err(|_| jetstream::context::PublishError::new(PublishErrorKind::TimedOut))??;
    Ok(ack.into_future())
}

/// The subject and payload of `env` as forwarded: the event as a
/// `PublishRequest`, its `host` set to `host` when the publisher left it
/// empty, its `sequence` the host bus's.
pub fn encode(host: &str, env: &Envelope<BusEvent>) -> (String, Bytes) {
    let (subject, event) = match &env.event {
        BusEvent::Domain(e) => {
            let mut e = e.clone();
            if e.host.is_empty() {
                e.host = host.to_owned();
            }
            e.sequence = env.seq;
            (
                subject::lifecycle(&e.host, &e.domain_name),
                PublishedEvent::DomainEvent(e),
            )
        }
        BusEvent::Monitor(e) => {
            let mut e = e.clone();
            if e.host.is_empty() {
                e.host = host.to_owned();
            }
            e.sequence = env.seq;
            (
                subject::monitor(&e.host, &e.domain_name, &e.event),
                PublishedEvent::MonitorEvent(e),
            )
        }
    };
    let payload = PublishRequest { event: Some(event) }.encode_to_vec();
    (subject, Bytes::from(payload))
}
