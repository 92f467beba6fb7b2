//! A host's real `qvirt-eventbus` forwarding to a real nats-server
//! (JetStream): every stored event reaches the stream once and in order,
//! also across a broker outage (the outbox) and a bus restart (message-id
//! dedup); a full outbox becomes a counted loss marker.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use prost::Message as _;
use qvirt_integration_tests::nats::Nats;
use qvirt_integration_tests::{Service, free_port, internal};
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::{
    DomainEvent, DomainEventType, EventsLost, EventsLostReason, MonitorEvent, PublishRequest,
};

/// How long forwarding may take to catch up after a change.
const CATCH_UP: Duration = Duration::from_secs(60);

const STREAM: &str = "QVIRT_EVENTS";

fn bus_config(nats: &Nats, outbox: &Path, max_bytes: u64, metrics: u16) -> String {
    format!(
        "metrics_listen: 127.0.0.1:{metrics}\nnats:\n  urls: [{}]\n  token_file: {}\n  \
         host: h1\n  outbox_dir: {}\n  outbox_max_bytes: {max_bytes}\n",
        nats.urls().join(", "),
        nats.token_file().display(),
        outbox.display()
    )
}

async fn start_bus(config: &str) -> Service {
    let mut svc = Service::start_with_config("qvirt-eventbus", config, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    svc
}

/// The `n`th test event: lifecycle and monitor events over domains whose
/// names need escaping in subjects.
fn event(n: u64, details: &str) -> Event {
    let domain = ["web.1", "db server", "*>", "plain"][(n % 4) as usize];
    if n.is_multiple_of(3) {
        Event::DomainEvent(DomainEvent {
            domain_name: domain.into(),
            r#type: DomainEventType::Started as i32,
            ..Default::default()
        })
    } else {
        Event::MonitorEvent(MonitorEvent {
            domain_name: domain.into(),
            event: "BLOCK_IO_ERROR".into(),
            details_json: format!("{{\"n\":{n},\"pad\":\"{details}\"}}"),
            ..Default::default()
        })
    }
}

async fn publish(bus: &Service, from: u64, to: u64, details: &str) {
    let mut ingest = EventIngestClient::connect(bus.url()).await.unwrap();
    let reqs: Vec<PublishRequest> = (from..to)
        .map(|n| PublishRequest {
            event: Some(event(n, details)),
        })
        .collect();
    let reply = ingest
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, to - from);
}

/// One message of the stream, decoded.
#[derive(Debug)]
enum Stored {
    /// A forwarded event: its `n` (from the test's numbering, -1 for a
    /// lifecycle event), its host bus sequence, its subject, its msg id.
    Event {
        seq: u64,
        subject: String,
        id: String,
        n: Option<u64>,
    },
    Lost(EventsLost),
}

async fn js(nats: &Nats) -> jetstream::Context {
    let client = nats.client().await;
    jetstream::new(client)
}

/// Waits until the stream holds `count` messages (panicking after
/// [`CATCH_UP`]) and returns them all, in stream order.
async fn stream_messages(js: &jetstream::Context, count: u64) -> Vec<Stored> {
    let deadline = Instant::now() + CATCH_UP;
    let stream = loop {
        if let Ok(mut s) = js.get_stream(STREAM).await
            && let Ok(info) = s.info().await
            && info.state.messages >= count
        {
            assert_eq!(info.state.messages, count, "more messages than sent");
            assert_eq!(info.state.first_sequence, 1);
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not reach {count} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = Vec::new();
    for seq in 1..=count {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        if m.subject.ends_with(".%.lost") {
            out.push(Stored::Lost(EventsLost::decode(m.payload).unwrap()));
            continue;
        }
        let req = PublishRequest::decode(m.payload).unwrap();
        let (seq, n) = match req.event.unwrap() {
            Event::DomainEvent(e) => {
                assert_eq!(e.host, "h1");
                (e.sequence, None)
            }
            Event::MonitorEvent(e) => {
                assert_eq!(e.host, "h1");
                let v: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
                (e.sequence, v["n"].as_u64())
            }
        };
        out.push(Stored::Event {
            seq,
            subject: m.subject.to_string(),
            id,
            n,
        });
    }
    out
}

/// The host bus sequences of the events, in stream order.
fn seqs(stored: &[Stored]) -> Vec<u64> {
    stored
        .iter()
        .filter_map(|s| match s {
            Stored::Event { seq, .. } => Some(*seq),
            Stored::Lost(_) => None,
        })
        .collect()
}

/// The bus's metrics text.
fn metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(port: u16, name: &str) -> u64 {
    let text = metrics(port);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("qvirt_eventbus_nats_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn wait_metric(port: u16, name: &str, want: u64) {
    let deadline = Instant::now() + CATCH_UP;
    while metric(port, name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} stayed {} (want {want})",
            metric(port, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_events_reach_the_stream_once_in_order_with_escaped_subjects() {
    let nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let port = free_port();
    let bus = start_bus(&bus_config(&nats, outbox.path(), 64 << 20, port)).await;
    publish(&bus, 0, 300, "x").await;
    let js = js(&nats).await;
    let stored = stream_messages(&js, 300).await;
    assert_eq!(seqs(&stored), (1..=300).collect::<Vec<_>>());
    let Stored::Event { subject, id, .. } = &stored[0] else {
        panic!("{stored:?}")
    };
    // Event 0 is a lifecycle event of "web.1".
    assert_eq!(subject, "qvirt.events.h1.web%2E1.lifecycle");
    assert!(id.starts_with("h1:") && id.ends_with(":1"), "{id}");
    let Stored::Event { subject, n, .. } = &stored[2] else {
        panic!("{stored:?}")
    };
    assert_eq!(subject, "qvirt.events.h1.%2A%3E.monitor.BLOCK_IO_ERROR");
    assert_eq!(*n, Some(2));
    let Stored::Event { subject, .. } = &stored[1] else {
        panic!("{stored:?}")
    };
    assert_eq!(
        subject,
        "qvirt.events.h1.db%20server.monitor.BLOCK_IO_ERROR"
    );
    wait_metric(port, "outbox_records", 0).await;
    assert_eq!(metric(port, "acked_total"), 300);
    assert_eq!(metric(port, "lost_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_outbox_drains_in_order_after_the_broker_comes_back() {
    let mut nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let port = free_port();
    let bus = start_bus(&bus_config(&nats, outbox.path(), 64 << 20, port)).await;
    publish(&bus, 0, 50, "x").await;
    wait_metric(port, "acked_total", 50).await;
    // The broker crashes while the host keeps producing events.
    nats.nodes[0].stop(libc::SIGKILL);
    publish(&bus, 50, 150, "y").await;
    wait_metric(port, "outbox_records", 100).await;
    publish(&bus, 150, 250, "z").await;
    nats.nodes[0].start();
    nats.wait_ready();
    let js = js(&nats).await;
    let stored = stream_messages(&js, 250).await;
    assert_eq!(seqs(&stored), (1..=250).collect::<Vec<_>>());
    wait_metric(port, "outbox_records", 0).await;
    assert_eq!(metric(port, "lost_total"), 0);
    // And live forwarding goes on after the drain.
    publish(&bus, 250, 260, "w").await;
    let stored = stream_messages(&js, 260).await;
    assert_eq!(seqs(&stored), (1..=260).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_full_outbox_is_counted_in_loss_markers() {
    let mut nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let port = free_port();
    let bus = start_bus(&bus_config(&nats, outbox.path(), 1 << 20, port)).await;
    publish(&bus, 0, 10, "x").await;
    wait_metric(port, "acked_total", 10).await;
    nats.nodes[0].stop(libc::SIGKILL);
    // 300 events of ~8 KiB: about 2.4 MiB for an outbox of 1 MiB.
    let pad = "p".repeat(8 * 1024);
    for batch in 0..6 {
        publish(&bus, 10 + batch * 50, 60 + batch * 50, &pad).await;
    }
    // Once the forwarder has taken all 300 in, each is either in the
    // outbox or counted as lost.
    let deadline = Instant::now() + CATCH_UP;
    while metric(port, "outbox_records") + metric(port, "lost_total") < 300 {
        assert!(Instant::now() < deadline, "{}", metrics(port));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = metric(port, "lost_total");
    assert!(lost > 100 && lost < 300, "lost {lost}");
    nats.nodes[0].start();
    nats.wait_ready();
    wait_metric(port, "outbox_records", 0).await;
    // Events after the loss follow the marker; the stream's count is read
    // once JetStream has acknowledged all ten.
    let acked = metric(port, "acked_total");
    publish(&bus, 310, 320, "after").await;
    wait_metric(port, "acked_total", acked + 10).await;
    let js = js(&nats).await;
    let info = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let stored = stream_messages(&js, info.state.messages).await;
    // Walking the stream in order: every bus sequence number 1..=320 is
    // either an event, in order, or inside the range of the loss marker
    // standing in its place; the markers add up to the count.
    let (mut next, mut counted, mut markers) = (1u64, 0u64, 0);
    for s in &stored {
        match s {
            Stored::Event { seq, .. } => {
                assert_eq!(*seq, next, "{stored:?}");
                next += 1;
            }
            Stored::Lost(l) => {
                assert_eq!(l.reason(), EventsLostReason::OutboxFull);
                assert_eq!(l.first_sequence, next, "{stored:?}");
                assert_eq!(l.last_sequence - l.first_sequence + 1, l.count);
                next = l.last_sequence + 1;
                counted += l.count;
                markers += 1;
            }
        }
    }
    assert_eq!(next, 321);
    assert_eq!(counted, lost);
    assert!(markers >= 1);
    // The 8 KiB events were lost in one run; only small lifecycle events
    // that still fit split it.
    assert!(markers <= 1 + lost / 3 + 1, "{markers} markers for {lost}");
    assert_eq!(metric(port, "outbox_records"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bus_restart_resends_without_duplicates() {
    let nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = bus_config(&nats, outbox.path(), 64 << 20, port);
    let mut bus = start_bus(&config).await;
    publish(&bus, 0, 40, "x").await;
    wait_metric(port, "acked_total", 40).await;
    bus.terminate();
    drop(bus);
    // A crash before the acknowledged index reached the disk: the next
    // run sends all 40 again.
    std::fs::write(outbox.path().join("acked"), "0\n").unwrap();
    let bus = start_bus(&config).await;
    wait_metric(port, "acked_total", 40).await;
    assert_eq!(metric(port, "duplicates_total"), 40);
    let js = js(&nats).await;
    let stored = stream_messages(&js, 40).await;
    assert_eq!(seqs(&stored), (1..=40).collect::<Vec<_>>());
    // The new run's events have ids of their own: none is taken for a
    // duplicate of the old run's.
    publish(&bus, 40, 45, "new").await;
    let stored = stream_messages(&js, 45).await;
    assert_eq!(seqs(&stored)[40..], [1, 2, 3, 4, 5]);
    let ids: std::collections::HashSet<&String> = stored
        .iter()
        .filter_map(|s| match s {
            Stored::Event { id, .. } => Some(id),
            Stored::Lost(_) => None,
        })
        .collect();
    assert_eq!(ids.len(), 45);
}
