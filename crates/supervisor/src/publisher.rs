//! The [`EventSink`] that feeds the event bus: events go into a bounded
//! buffer at once (a guest's watcher never waits on the bus), and one
//! `qvirt.v1.EventIngest/Publish` stream at a time takes them from there
//! (its request stream reads the buffer itself: no task relays them),
//! reconnecting with backoff while the bus is away. When the buffer is
//! full the newest event is dropped and counted ([`BusPublisher::lost`]),
//! never queued without end. A stream that ends with the bus's reply
//! counts the events it took that the bus did not store (`accepted` in the
//! reply) as lost. A stream that fails leaves the events it never took in
//! the buffer for the next one; those it took are unconfirmed
//! ([`BusPublisher::unconfirmed`]): the bus may or may not have stored
//! them, the reply that would say never comes. Losses are logged with the
//! running total, at most once per [`crate::loss::WARN_EVERY`].

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use crate::loss::LossCounter;
use std::time::{Duration, SystemTime};

use qvirt_common::internal_auth::TokenInterceptor;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::{DomainEvent, MonitorEvent, PublishRequest};
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::Endpoint;

use crate::qmp::QmpEvent;
use crate::seams::{DomainRef, EventSink, Lifecycle};

/// Events buffered for the bus while it is slow or away.
pub const PUBLISH_BUFFER: usize = 4096;
/// How long connecting to the bus may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: first and largest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Publishes to the event bus at `endpoint`; see the module docs.
#[derive(Debug, Clone)]
pub struct BusPublisher {
    tx: mpsc::Sender<Event>,
    counts: Arc<Counts>,
}

/// What the publisher could not deliver.
#[derive(Debug, Default)]
struct Counts {
    /// Dropped: the buffer was full, or a stream ended before sending them
    /// or without the bus storing them.
    lost: LossCounter,
    /// Handed to a stream that failed before the bus confirmed them.
    unconfirmed: LossCounter,
}

impl Counts {
    fn lose(&self, n: u64, why: &'static str) {
        if let Some(lost) = self.lost.add(n) {
            tracing::warn!(lost, why, "events for the event bus lost (running total)");
        }
    }
}

impl BusPublisher {
    /// Starts the publishing task for the bus at `endpoint` (a URL such as
    /// `http://127.0.0.1:50053` or `unix:PATH`), presenting the internal token through
    /// `token`; it stops when `shutdown` fires.
    pub fn spawn(endpoint: Endpoint, token: TokenInterceptor, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(PUBLISH_BUFFER);
        let counts = Arc::new(Counts::default());
        tokio::spawn(forward(endpoint, token, rx, shutdown, Arc::clone(&counts)));
        BusPublisher { tx, counts }
    }

    /// Events lost: dropped because the buffer was full, never sent on a
    /// stream that ended, or sent but not stored by the bus.
    pub fn lost(&self) -> u64 {
        self.counts.lost.total()
    }

    /// Events handed to a stream that failed: the bus may or may not have
    /// stored them.
    pub fn unconfirmed(&self) -> u64 {
        self.counts.unconfirmed.total()
    }

    fn push(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.counts.lose(1, "buffer full");
        }
    }
}

impl EventSink for BusPublisher {
    fn monitor_event(&self, domain: &DomainRef, event: &QmpEvent) {
        self.push(Event::MonitorEvent(MonitorEvent {
            sequence: 0,
            host: domain.host.clone(),
            domain_name: domain.name.clone(),
            domain_uuid: domain.uuid.clone(),
            event: event.name.clone(),
            timestamp_seconds: event.seconds,
            timestamp_microseconds: event.microseconds,
            details_json: event.data.clone(),
            // Set by the bus.
            cursor: String::new(),
        }));
    }

    fn lifecycle(&self, domain: &DomainRef, event: Lifecycle) {
        self.push(Event::DomainEvent(DomainEvent {
            host: domain.host.clone(),
            domain_name: domain.name.clone(),
            domain_uuid: domain.uuid.clone(),
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            r#type: event.kind() as i32,
            detail: Some(event.detail()),
            ..Default::default()
        }));
    }
}

/// The request stream of one Publish call: it takes events straight from
/// the buffer, so an event goes from the watcher to the transport with no
/// task in between, and ends (cleanly) when `shutdown` fires. Holding the
/// buffer's lock, it gives the buffer back when the transport drops it.
struct Requests {
    rx: OwnedMutexGuard<mpsc::Receiver<Event>>,
    taken: Arc<AtomicU64>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for Requests {
    type Item = PublishRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PublishRequest>> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let event = ready!(self.rx.poll_recv(cx));
        Poll::Ready(event.map(|event| {
            self.taken.fetch_add(1, Ordering::Relaxed);
            PublishRequest { event: Some(event) }
        }))
    }
}

/// Streams buffered events to the bus, one Publish call per connection, and
/// reconnects when a call ends. Events left in the buffer go on the next
/// call.
async fn forward(
    endpoint: Endpoint,
    token: TokenInterceptor,
    rx: mpsc::Receiver<Event>,
    shutdown: CancellationToken,
    counts: Arc<Counts>,
) {
    let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut backoff = BACKOFF_MIN;
    loop {
        let channel = tokio::select! {
            c = endpoint.connect() => c,
            () = shutdown.cancelled() => return,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, uri = %endpoint.uri(), "event bus not reachable");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(uri = %endpoint.uri(), "publishing to the event bus");
        backoff = BACKOFF_MIN;
        // The previous call's stream gives the buffer back once its
        // transport has dropped it.
        let buffer = tokio::select! {
            b = Arc::clone(&rx).lock_owned() => b,
            () = shutdown.cancelled() => return,
        };
        if buffer.is_closed() && buffer.is_empty() {
            return;
        }
        let taken = Arc::new(AtomicU64::new(0));
        let requests = Requests {
            rx: buffer,
            taken: Arc::clone(&taken),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        };
        let mut client = EventIngestClient::with_interceptor(channel, token.clone());
        let result = tokio::select! {
            r = client.publish(requests) => r,
            // The stream ends at shutdown; a bus that does not answer
            // then is not waited for long.
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(CONNECT_TIMEOUT).await;
            } => return,
        };
        if shutdown.is_cancelled() {
            return;
        }
        let taken = taken.load(Ordering::Relaxed);
        // A refused caller (no or a wrong internal token) stays refused
        // until the operator fixes the config: retry slowly. Anything
        // else may be a restarting bus: retry soon, but never at once (a
        // bus that ends every stream at once would otherwise be spun on).
        let pause = match &result {
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                BACKOFF_MAX
            }
            _ => BACKOFF_MIN,
        };
        match result {
            Ok(reply) => {
                let reply = reply.into_inner();
                tracing::info!(
                    last = reply.last_sequence,
                    sent = taken,
                    accepted = reply.accepted,
                    "event bus stream ended"
                );
                counts.lose(
                    taken.saturating_sub(reply.accepted),
                    "not stored by the bus",
                );
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "event bus stream failed");
                if let Some(unconfirmed) = counts.unconfirmed.add(taken) {
                    tracing::warn!(
                        unconfirmed,
                        "events handed to a failed event bus stream are unconfirmed (running total)"
                    );
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use qvirt_proto::v1::event_ingest_server::{EventIngest, EventIngestServer};
    use qvirt_proto::v1::{
        DomainEventSuspendedDetail, DomainEventType, PublishResponse, domain_event, publish_request,
    };
    use tonic::transport::server::TcpIncoming;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// A bus that only records what is published (the fault here, a bus
    /// that is away and comes back, is what the test controls).
    struct Recorder(mpsc::UnboundedSender<Event>);

    #[tonic::async_trait]
    impl EventIngest for Recorder {
        async fn publish(
            &self,
            request: Request<Streaming<PublishRequest>>,
        ) -> Result<Response<PublishResponse>, Status> {
            let mut stream = request.into_inner();
            while let Some(req) = stream.message().await? {
                if let Some(e) = req.event {
                    let _ = self.0.send(e);
                }
            }
            Ok(Response::new(PublishResponse::default()))
        }
    }

    fn domain() -> DomainRef {
        DomainRef {
            name: "vm".into(),
            uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
            host: "node".into(),
        }
    }

    fn qmp_event(name: &str) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            seconds: 1,
            microseconds: 2,
            data: r#"{"big": 18446744073709551615}"#.into(),
        }
    }

    #[tokio::test]
    async fn test_events_wait_for_a_late_bus_then_arrive_in_order() {
        // Bound but not served yet: the bus is "away".
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let publisher = BusPublisher::spawn(
            Endpoint::from_shared(url).unwrap(),
            TokenInterceptor::new(None),
            shutdown.clone(),
        );
        publisher.monitor_event(&domain(), &qmp_event("STOP"));
        publisher.lifecycle(
            &domain(),
            Lifecycle::Suspended(DomainEventSuspendedDetail::Paused),
        );
        publisher.monitor_event(&domain(), &qmp_event("RESUME"));

        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EventIngestServer::new(Recorder(tx)))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("event not delivered in time")
                .unwrap();
            got.push(e);
        }
        match &got[0] {
            publish_request::Event::MonitorEvent(m) => {
                assert_eq!(m.event, "STOP");
                assert_eq!(m.details_json, r#"{"big": 18446744073709551615}"#);
                assert_eq!((m.timestamp_seconds, m.timestamp_microseconds), (1, 2));
                assert_eq!((m.domain_name.as_str(), m.host.as_str()), ("vm", "node"));
            }
            other => panic!("{other:?}"),
        }
        match &got[1] {
            publish_request::Event::DomainEvent(d) => {
                assert_eq!(d.r#type, DomainEventType::Suspended as i32);
                assert_eq!(d.detail, Some(domain_event::Detail::Suspended(1)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&got[2], publish_request::Event::MonitorEvent(m) if m.event == "RESUME"));
        assert_eq!(publisher.lost(), 0);
        shutdown.cancel();
        server.abort();
    }

    /// A bus that stores the first `keep` events of each stream, then
    /// answers (with `accepted: keep`) without reading the rest.
    struct Impatient {
        keep: u64,
        tx: mpsc::UnboundedSender<Event>,
    }

    #[tonic::async_trait]
    impl EventIngest for Impatient {
        async fn publish(
            &self,
            request: Request<Streaming<PublishRequest>>,
        ) -> Result<Response<PublishResponse>, Status> {
            let mut stream = request.into_inner();
            let mut accepted = 0;
            while accepted < self.keep {
                match stream.message().await? {
                    Some(PublishRequest { event: Some(e) }) => {
                        let _ = self.tx.send(e);
                        accepted += 1;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            Ok(Response::new(PublishResponse {
                accepted,
                ..Default::default()
            }))
        }
    }

    #[tokio::test]
    async fn test_events_a_stream_sent_but_the_bus_did_not_store_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let publisher = BusPublisher::spawn(
            Endpoint::from_shared(url).unwrap(),
            TokenInterceptor::new(None),
            shutdown.clone(),
        );
        const EVENTS: u64 = 10;
        for _ in 0..EVENTS {
            publisher.monitor_event(&domain(), &qmp_event("E"));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EventIngestServer::new(Impatient { keep: 3, tx }))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        // Every event is either stored or counted lost, none vanishes.
        let mut stored = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while stored + publisher.lost() < EVENTS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stored {stored}, lost {}",
                publisher.lost()
            );
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                stored += 1;
            }
        }
        assert!(stored >= 3, "{stored}");
        assert_eq!(stored + publisher.lost(), EVENTS);
        shutdown.cancel();
        server.abort();
    }

    #[tokio::test]
    async fn test_a_full_buffer_drops_and_counts_never_blocks() {
        // Nothing ever listens here; every event beyond the buffer is lost.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let shutdown = CancellationToken::new();
        let publisher = BusPublisher::spawn(
            Endpoint::from_shared(url).unwrap(),
            TokenInterceptor::new(None),
            shutdown.clone(),
        );
        let extra = 10;
        for _ in 0..PUBLISH_BUFFER + extra {
            publisher.monitor_event(&domain(), &qmp_event("E"));
        }
        // Nothing is taken from the buffer before a stream is open.
        assert_eq!(publisher.lost(), extra as u64);
        shutdown.cancel();
    }
}
