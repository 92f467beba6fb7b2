//! The real `qvirt-eventbus` through its gRPC API: libvirt's monitor-event
//! filters (literal, NOCASE, REGEX), resuming after a cursor (also across
//! a bus restart), loss markers, caps, errors a program can act on, and
//! details that keep QEMU's numbers exact.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use qvirt_common::rpc::{reason_of, violated_fields};
use qvirt_integration_tests::{
    ChildGuard, InternalChannel, Service, bin_path, grpcurl, grpcurl_internal, internal,
    internal_token, rss_kib, text, with_internal_token,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_domain_events_response::Kind as DomainKind;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind as MonitorKind;
use qvirt_proto::v1::{
    DomainEvent, DomainEventType, EventsLostReason, MonitorEvent, MonitorEventFilterFlag,
    PublishRequest, SubscribeDomainEventsRequest, SubscribeMonitorEventsRequest,
    SubscribeMonitorEventsResponse,
};
use tonic::Streaming;
use tonic::transport::Channel;

/// How long one stream message may take to arrive.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(20);

const UUID_A: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

fn monitor(domain: &str, event: &str, details: &str) -> MonitorEvent {
    MonitorEvent {
        host: "node-1".into(),
        domain_name: domain.into(),
        domain_uuid: if domain == "a" {
            UUID_A.into()
        } else {
            String::new()
        },
        event: event.into(),
        timestamp_seconds: 1_700_000_000,
        timestamp_microseconds: 123_456,
        details_json: details.into(),
        ..Default::default()
    }
}

/// One connection to the bus: its public `EventBus` (what `client.` calls
/// reach) and its internal `EventIngest` (`client.ingest`).
#[derive(Clone)]
struct Client {
    events: EventBusClient<InternalChannel>,
    ingest: EventIngestClient<Channel>,
}

impl Client {
    async fn connect(url: String) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client::new(channel)
    }

    fn new(channel: Channel) -> Self {
        Client {
            events: EventBusClient::new(with_internal_token(channel.clone())),
            ingest: EventIngestClient::new(channel),
        }
    }
}

impl std::ops::Deref for Client {
    type Target = EventBusClient<InternalChannel>;

    fn deref(&self) -> &Self::Target {
        &self.events
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.events
    }
}

async fn bus(yaml: &str) -> (Service, Client) {
    let mut svc = Service::start_with_config("qvirt-eventbus", yaml, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    let client = Client::connect(svc.url()).await;
    (svc, client)
}

async fn publish(client: &mut Client, events: Vec<Event>) -> u64 {
    let reqs: Vec<PublishRequest> = events
        .into_iter()
        .map(|e| PublishRequest { event: Some(e) })
        .collect();
    let n = reqs.len() as u64;
    let reply = client
        .ingest
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, n);
    reply.last_sequence
}

async fn next(stream: &mut Streaming<SubscribeMonitorEventsResponse>) -> MonitorKind {
    tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .expect("no message in time")
        .unwrap()
        .expect("stream ended")
        .kind
        .unwrap()
}

async fn subscribe(
    client: &mut Client,
    req: SubscribeMonitorEventsRequest,
) -> (Streaming<SubscribeMonitorEventsResponse>, u64) {
    let mut stream = client
        .subscribe_monitor_events(req)
        .await
        .unwrap()
        .into_inner();
    match next(&mut stream).await {
        MonitorKind::Established(e) => (stream, e.last_sequence),
        other => panic!("first message must be established, got {other:?}"),
    }
}

fn event_of(kind: MonitorKind) -> MonitorEvent {
    match kind {
        MonitorKind::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn flags(f: &[MonitorEventFilterFlag]) -> Vec<i32> {
    f.iter().map(|f| *f as i32).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_literal_nocase_and_regex_filters_as_libvirt() {
    let (_svc, mut client) = bus("").await;
    let literal = SubscribeMonitorEventsRequest {
        event: "STOP".into(),
        ..Default::default()
    };
    let nocase = SubscribeMonitorEventsRequest {
        event: "stop".into(),
        flags: flags(&[MonitorEventFilterFlag::Nocase]),
        ..Default::default()
    };
    let regex = SubscribeMonitorEventsRequest {
        event: "^BLOCK_JOB_".into(),
        flags: flags(&[MonitorEventFilterFlag::Regex]),
        ..Default::default()
    };
    let regex_nocase = SubscribeMonitorEventsRequest {
        event: "resume$".into(),
        flags: flags(&[
            MonitorEventFilterFlag::Regex,
            MonitorEventFilterFlag::Nocase,
        ]),
        ..Default::default()
    };
    let (mut s_literal, _) = subscribe(&mut client, literal).await;
    let (mut s_nocase, _) = subscribe(&mut client, nocase).await;
    let (mut s_regex, _) = subscribe(&mut client, regex).await;
    let (mut s_regex_nocase, _) = subscribe(&mut client, regex_nocase).await;

    let names = [
        "STOP",
        "Stop",
        "STOPPED",
        "RESUME",
        "BLOCK_JOB_COMPLETED",
        "XBLOCK_JOB_",
    ];
    let events = names
        .iter()
        .map(|n| Event::MonitorEvent(monitor("a", n, "{}")))
        .collect();
    publish(&mut client, events).await;
    // A marker event every subscription matches ends each read loop below.
    let marker = ["STOP", "STOP", "BLOCK_JOB_END", "RESUME"];
    let mut collected = Vec::new();
    for (stream, last) in [
        (&mut s_literal, marker[0]),
        (&mut s_nocase, marker[1]),
        (&mut s_regex, marker[2]),
        (&mut s_regex_nocase, marker[3]),
    ] {
        publish(
            &mut client,
            vec![Event::MonitorEvent(monitor("b", last, "\"end\""))],
        )
        .await;
        let mut got = Vec::new();
        loop {
            let e = event_of(next(stream).await);
            if e.details_json == "\"end\"" {
                break;
            }
            got.push(e.event);
        }
        collected.push(got);
    }
    assert_eq!(collected[0], ["STOP"]);
    assert_eq!(collected[1], ["STOP", "Stop"]);
    assert_eq!(collected[2], ["BLOCK_JOB_COMPLETED"]);
    assert_eq!(collected[3], ["RESUME"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_event_carries_qemu_fields_exactly() {
    let (_svc, mut client) = bus("").await;
    let (mut stream, established) = subscribe(&mut client, Default::default()).await;
    let details = r#"{"offset": 9223372036854775807, "big": 18446744073709551615, "f": 0.1}"#;
    let seq = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "RTC_CHANGE", details))],
    )
    .await;
    let e = event_of(next(&mut stream).await);
    assert!(seq > established);
    assert_eq!(e.sequence, seq);
    assert_eq!(e.details_json, details);
    assert_eq!(
        (e.timestamp_seconds, e.timestamp_microseconds),
        (1_700_000_000, 123_456)
    );
    assert_eq!(
        (e.domain_name.as_str(), e.domain_uuid.as_str()),
        ("a", UUID_A)
    );
    assert_eq!(e.host, "node-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_domain_filter_by_name_or_uuid() {
    let (_svc, mut client) = bus("").await;
    let by_uuid = SubscribeMonitorEventsRequest {
        domain: UUID_A.to_uppercase(),
        ..Default::default()
    };
    let (mut stream, _) = subscribe(&mut client, by_uuid).await;
    // A literal name with a domain: the bus indexes the name, and the
    // domain must still be tested.
    let stop_of_a = SubscribeMonitorEventsRequest {
        domain: "a".into(),
        event: "STOP".into(),
        ..Default::default()
    };
    let (mut stops, _) = subscribe(&mut client, stop_of_a).await;
    publish(
        &mut client,
        vec![
            Event::MonitorEvent(monitor("b", "STOP", "1")),
            Event::MonitorEvent(monitor("a", "STOP", "2")),
            Event::MonitorEvent(monitor("a", "RESUME", "3")),
        ],
    )
    .await;
    assert_eq!(event_of(next(&mut stream).await).details_json, "2");
    assert_eq!(event_of(next(&mut stream).await).details_json, "3");
    assert_eq!(event_of(next(&mut stops).await).details_json, "2");
    publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "STOP", "4"))],
    )
    .await;
    assert_eq!(event_of(next(&mut stops).await).details_json, "4");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_invalid_and_pathological_filters() {
    // Room for the 100 KB event name below (the default cap is 64 KiB).
    let (svc, mut client) = bus("max_event_bytes: 131072\n").await;
    let err = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            event: "(unclosed".into(),
            flags: flags(&[MonitorEventFilterFlag::Regex]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The regex parser's own message, not just ours.
    assert!(
        err.message().contains("error: unclosed group"),
        "{}",
        err.message()
    );
    assert_eq!(reason_of(&err).as_deref(), Some("INVALID_EVENT_FILTER"));
    assert_eq!(violated_fields(&err), ["event"]);

    // The same through grpcurl, as an operator would see it.
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"event": "(", "flags": ["MONITOR_EVENT_FILTER_FLAG_REGEX"]}"#,
        &svc.addr.to_string(),
        "qvirt.v1.EventBus/SubscribeMonitorEvents",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("InvalidArgument"),
        "{}",
        text(&out.stderr)
    );

    // A backtracking-killer pattern over a long name still answers.
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            event: "(a+)+$".into(),
            flags: flags(&[MonitorEventFilterFlag::Regex]),
            ..Default::default()
        },
    )
    .await;
    let long = format!("{}!", "a".repeat(100_000));
    publish(
        &mut client,
        vec![
            Event::MonitorEvent(monitor("a", &long, "1")),
            Event::MonitorEvent(monitor("a", "aaaa", "2")),
        ],
    )
    .await;
    assert_eq!(event_of(next(&mut stream).await).details_json, "2");
}

/// Subscribes with `req` and returns the stream and its
/// SubscriptionEstablished.
async fn subscribe_established(
    client: &mut Client,
    req: SubscribeMonitorEventsRequest,
) -> (
    Streaming<SubscribeMonitorEventsResponse>,
    qvirt_proto::v1::SubscriptionEstablished,
) {
    let mut stream = client
        .subscribe_monitor_events(req)
        .await
        .unwrap()
        .into_inner();
    match next(&mut stream).await {
        MonitorKind::Established(e) => (stream, e),
        other => panic!("first message must be established, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_resume_after_a_cursor_then_live_without_gap_or_duplicate() {
    let (_svc, mut client) = bus("").await;
    let first = (1..=5)
        .map(|i| Event::MonitorEvent(monitor("a", "E", &i.to_string())))
        .collect();
    let last = publish(&mut client, first).await;
    // Every event held, each with its cursor.
    let (mut all, established) = subscribe_established(
        &mut client,
        SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(established.last_sequence, last);
    let held: Vec<MonitorEvent> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(event_of(next(&mut all).await));
        }
        v
    };
    assert_eq!(established.last_cursor, held[4].cursor);
    let cursors: std::collections::HashSet<&str> = held.iter().map(|e| e.cursor.as_str()).collect();
    assert_eq!(cursors.len(), 5, "every event has a cursor of its own");
    // Resume after the second: the three after it, then live.
    let (mut stream, established) = subscribe_established(
        &mut client,
        SubscribeMonitorEventsRequest {
            resume_after: held[1].cursor.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(established.last_sequence, last);
    publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "E", "6"))],
    )
    .await;
    let got: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(event_of(next(&mut stream).await).details_json);
        }
        v
    };
    assert_eq!(got, ["3", "4", "5", "6"]);
    // Resuming after SubscriptionEstablished.last_cursor is "from now":
    // the event published after that subscription is the first one.
    let (mut from_now, _) = subscribe_established(
        &mut client,
        SubscribeMonitorEventsRequest {
            resume_after: established.last_cursor,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(event_of(next(&mut from_now).await).details_json, "6");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_replay_beyond_the_ring_reports_the_loss() {
    let (_svc, mut client) = bus("ring_capacity: 3\n").await;
    let events = (1..=10)
        .map(|i| Event::MonitorEvent(monitor("a", "E", &i.to_string())))
        .collect();
    publish(&mut client, events).await;
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        },
    )
    .await;
    match next(&mut stream).await {
        MonitorKind::Lost(lost) => {
            assert_eq!(lost.reason, EventsLostReason::ReplayExpired as i32);
            assert_eq!(
                (lost.count, lost.first_sequence, lost.last_sequence),
                (7, 1, 7)
            );
        }
        other => panic!("expected a loss marker, got {other:?}"),
    }
    for want in ["8", "9", "10"] {
        assert_eq!(event_of(next(&mut stream).await).details_json, want);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_resume_across_a_bus_restart_is_bus_restarted() {
    let (mut svc, mut client) = bus("").await;
    let events = (1..=3)
        .map(|i| Event::MonitorEvent(monitor("a", "OLD", &i.to_string())))
        .collect();
    publish(&mut client, events).await;
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        },
    )
    .await;
    event_of(next(&mut stream).await);
    let cursor = event_of(next(&mut stream).await).cursor;
    drop((stream, client));

    // The bus restarts on the same address, empty: its sequence numbers
    // start again at 1, so the cursor's number 2 now names another event.
    let addr = svc.addr;
    assert!(svc.terminate().success());
    drop(svc);
    let mut svc = Service::start_at("qvirt-eventbus", addr, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    let mut client = Client::connect(svc.url()).await;
    let events = (1..=3)
        .map(|i| Event::MonitorEvent(monitor("a", "NEW", &i.to_string())))
        .collect();
    publish(&mut client, events).await;
    let (mut stream, established) = subscribe_established(
        &mut client,
        SubscribeMonitorEventsRequest {
            resume_after: cursor.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_ne!(established.last_cursor, cursor);
    // The explicit marker, then everything the new bus holds, then live.
    match next(&mut stream).await {
        MonitorKind::Lost(lost) => {
            assert_eq!(
                lost.reason,
                EventsLostReason::BusRestarted as i32,
                "{lost:?}"
            );
        }
        other => panic!("expected BUS_RESTARTED, got {other:?}"),
    }
    publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "NEW", "4"))],
    )
    .await;
    for want in ["1", "2", "3", "4"] {
        let e = event_of(next(&mut stream).await);
        assert_eq!((e.event.as_str(), e.details_json.as_str()), ("NEW", want));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_bad_cursors_get_an_explicit_answer() {
    let (svc, mut client) = bus("").await;
    let last = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "E", "{}"))],
    )
    .await;
    let (_stream, established) = subscribe_established(&mut client, Default::default()).await;
    assert_eq!(established.last_sequence, last);
    // Malformed: INVALID_ARGUMENT, a BadRequest violation on resume_after.
    for malformed in ["12", "not a cursor", &"1".repeat(4096)] {
        let err = client
            .subscribe_domain_events(SubscribeDomainEventsRequest {
                resume_after: malformed.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert_eq!(reason_of(&err).as_deref(), Some("INVALID_CURSOR"), "{err}");
        assert_eq!(violated_fields(&err), ["resume_after"], "{err}");
    }
    // A cursor of this bus beyond its newest event (the last cursor with
    // its number raised): never issued, OUT_OF_RANGE naming the newest.
    let (prefix, seq) = established.last_cursor.rsplit_once('.').unwrap();
    let ahead = format!("{prefix}.{}", seq.parse::<u64>().unwrap() + 5);
    let err = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            resume_after: ahead,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert_eq!(reason_of(&err).as_deref(), Some("CURSOR_BEYOND_HEAD"));
    // The same malformed cursor through grpcurl, as an operator sees it:
    // the details name the reason, the domain and the field.
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"resume_after": "bogus"}"#,
        &svc.addr.to_string(),
        "qvirt.v1.EventBus/SubscribeDomainEvents",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for needle in [
        "\"INVALID_CURSOR\"",
        "\"qvirt.dev\"",
        "google.rpc.BadRequest",
        "\"resume_after\"",
    ] {
        assert!(stderr.contains(needle), "{needle} in:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_slow_consumer_gets_exact_loss_counts() {
    let (_svc, mut client) = bus("queue_capacity: 4\n").await;
    let (mut stream, established) = subscribe(&mut client, Default::default()).await;
    const N: u64 = 20_000;
    let events = (0..N)
        .map(|i| Event::MonitorEvent(monitor("a", "E", &i.to_string())))
        .collect();
    let last = publish(&mut client, events).await;
    assert_eq!(last, established + N);
    // Read until all N are accounted for. No end marker may be published
    // before that: while the queue is still full it is dropped and counted
    // like any other event (the bus's sender for this stream can be kept
    // off the CPU for longer than a publish round trip).
    let (mut received, mut lost, mut last_seen) = (0u64, 0u64, established);
    while received + lost < N {
        match next(&mut stream).await {
            MonitorKind::Event(e) => {
                assert!(
                    e.sequence > last_seen && e.sequence <= last,
                    "{} after {last_seen}, last published {last}",
                    e.sequence
                );
                last_seen = e.sequence;
                received += 1;
            }
            MonitorKind::Lost(l) => {
                assert_eq!(l.reason, EventsLostReason::SlowConsumer as i32);
                lost += l.count;
            }
            MonitorKind::Established(_) => panic!("established twice"),
        }
    }
    assert!(lost > 0, "a queue of 4 cannot take {N} events unread");
    assert_eq!(received + lost, N, "every event delivered or counted lost");
    // Nothing more is owed: the queue is empty now, so an event published
    // next is the very next message, with no loss marker before it.
    let end = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "END", "0"))],
    )
    .await;
    match next(&mut stream).await {
        MonitorKind::Event(e) if e.event == "END" => assert_eq!(e.sequence, end),
        other => panic!("expected END right after the {N} events, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_publish_burst_leaves_room_for_delivery_on_one_thread() {
    // One runtime thread, and a reader that keeps up: a burst of buffered
    // Publish messages must not keep the thread from delivering until the
    // burst is over (the subscriber's queue would overflow).
    // A queue of 1,024: eight times what a 128-event slice of the burst
    // needs, a twentieth of the burst.
    let (svc, _) = bus("worker_threads: 1\nqueue_capacity: 1024\n").await;
    let mut sub_client = Client::connect(svc.url()).await;
    let mut pub_client = Client::connect(svc.url()).await;
    let (mut stream, established) = subscribe(&mut sub_client, Default::default()).await;
    const N: u64 = 20_000;
    let reader = tokio::spawn(async move {
        let (mut received, mut lost) = (0u64, 0u64);
        while received + lost < N {
            match next(&mut stream).await {
                MonitorKind::Event(_) => received += 1,
                MonitorKind::Lost(l) => lost += l.count,
                MonitorKind::Established(_) => panic!("established twice"),
            }
        }
        (received, lost)
    });
    let events = (0..N)
        .map(|i| Event::MonitorEvent(monitor("a", "E", &i.to_string())))
        .collect();
    assert_eq!(publish(&mut pub_client, events).await, established + N);
    let (received, lost) = reader.await.unwrap();
    assert_eq!(
        (received, lost),
        (N, 0),
        "events lost behind a publish burst"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_subscription_caps_and_freeing() {
    let (_svc, mut client) = bus("max_monitor_subscriptions_per_principal: 2\n").await;
    let (s1, _) = subscribe(&mut client, Default::default()).await;
    let (_s2, _) = subscribe(&mut client, Default::default()).await;
    let err = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("per-principal cap of 2"),
        "{}",
        err.message()
    );
    assert_eq!(reason_of(&err).as_deref(), Some("SUBSCRIPTION_CAP"));
    drop(s1);
    // The slot is freed once the server sees the stream go.
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    loop {
        match client
            .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_domain_events_are_filtered_and_typed() {
    let (_svc, mut client) = bus("").await;
    let mut stream = client
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(DomainKind::Established(_))));
    let domain_event = |name: &str, t: DomainEventType| DomainEvent {
        domain_name: name.into(),
        r#type: t as i32,
        ..Default::default()
    };
    publish(
        &mut client,
        vec![
            Event::MonitorEvent(monitor("a", "STOP", "{}")),
            Event::DomainEvent(domain_event("b", DomainEventType::Suspended)),
            Event::DomainEvent(domain_event("a", DomainEventType::Suspended)),
        ],
    )
    .await;
    let msg = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match msg.kind {
        Some(DomainKind::Event(e)) => {
            assert_eq!(e.domain_name, "a");
            assert_eq!(e.r#type, DomainEventType::Suspended as i32);
            assert_eq!(e.sequence, 3);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_metrics_endpoint_counts_published_and_subscribers() {
    let port = qvirt_integration_tests::free_port();
    let mut svc = Service::start(
        "qvirt-eventbus",
        &["--metrics-listen", &format!("127.0.0.1:{port}")],
    );
    svc.wait_serving("qvirt.v1.EventBus").await;
    let mut client = Client::connect(svc.url()).await;
    let (_stream, _) = subscribe(&mut client, Default::default()).await;
    publish(
        &mut client,
        vec![
            Event::MonitorEvent(monitor("a", "STOP", "{}")),
            Event::MonitorEvent(monitor("a", "RESUME", "{}")),
        ],
    )
    .await;
    let body = scrape(port).await;
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    assert!(
        body.contains("\nqvirt_eventbus_events_published_total 2\n"),
        "{body}"
    );
    assert!(
        body.contains("\nqvirt_eventbus_subscribers{kind=\"monitor\"} 1\n"),
        "{body}"
    );
}

/// Opens `n` idle subscriptions, 100 per connection.
async fn open_many(url: &str, n: usize) -> Vec<Streaming<SubscribeMonitorEventsResponse>> {
    let mut streams = Vec::with_capacity(n);
    let mut client = Client::connect(url.to_owned()).await;
    for i in 0..n {
        if i > 0 && i % 100 == 0 {
            client = Client::connect(url.to_owned()).await;
        }
        streams.push(
            subscribe(&mut client, SubscribeMonitorEventsRequest::default())
                .await
                .0,
        );
    }
    streams
}

#[tokio::test(flavor = "multi_thread")]
async fn test_dropped_subscriptions_give_their_memory_back() {
    let config =
        "max_monitor_subscriptions: 20000\nmax_monitor_subscriptions_per_principal: 20000\n";
    let (svc, _client) = bus(config).await;
    let pid = svc.pid();
    // Warm up the server's allocator and connection machinery first.
    drop(open_many(&svc.url(), 200).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = rss_kib(pid);

    let streams = open_many(&svc.url(), 10_000).await;
    let peak = rss_kib(pid);
    drop(streams);

    let allowed = baseline + 8 * 1024;
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    loop {
        let now = rss_kib(pid);
        if now <= allowed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RSS {now} KiB after dropping 10,000 subscriptions; baseline {baseline} KiB, peak {peak} KiB"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A socket that stops being read once `stalled` is set: reads then stay
/// Pending for good, as for a client process that hangs (SIGSTOP, a
/// deadlock) with its connection open.
struct Stalling {
    inner: tokio::net::TcpStream,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for Stalling {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stalled.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Stalling {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects tonic to `addr` through a [`Stalling`] socket, from `local`
/// if given (any of 127.0.0.0/8 is local: each is a principal of its own).
#[derive(Clone)]
struct StallingConnector {
    addr: std::net::SocketAddr,
    local: Option<std::net::IpAddr>,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tower_service::Service<http::Uri> for StallingConnector {
    type Response = hyper_util::rt::TokioIo<Stalling>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, local, stalled) = (self.addr, self.local, self.stalled.clone());
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(ip) = local {
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
            }
            let inner = socket.connect(addr).await?;
            inner.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(Stalling { inner, stalled }))
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_client_that_stops_reading_its_socket_pins_bounded_memory() {
    // 64 subscriptions (the default per-principal cap) from a client that
    // grants HTTP/2's largest windows and then stops reading its socket;
    // 30 MB of events published to each. What the bus may hold for them:
    // its queues (256 events or 256 KiB each, shared with the ring), the
    // ring (16 MiB) and 64 KiB per stream in hyper and h2: ~25 MiB, not
    // the 1.9 GB offered.
    const STREAMS: usize = 64;
    const EVENTS: usize = 30_000;
    let config = "max_monitor_subscriptions_per_principal: 128\n";
    let (svc, mut client) = bus(config).await;
    let addr = svc.url().trim_start_matches("http://").parse().unwrap();
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let channel = tonic::transport::Endpoint::from_static("http://stalling.invalid")
        .initial_stream_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .connect_with_connector(StallingConnector {
            addr,
            local: None,
            stalled: stalled.clone(),
        })
        .await
        .unwrap();
    let mut stalling = Client::new(channel);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (s, _) = subscribe(&mut stalling, SubscribeMonitorEventsRequest::default()).await;
        streams.push(s);
    }
    stalled.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut watcher, _) = subscribe(&mut client, SubscribeMonitorEventsRequest::default()).await;
    let baseline = rss_kib(svc.pid());

    // Published in batches, each acknowledged: a stalled subscriber never
    // slows the publisher down.
    let details = format!("{{\"pad\": \"{}\"}}", "x".repeat(1000));
    let mut last_big = 0;
    for _ in 0..EVENTS / 1000 {
        let batch = (0..1000)
            .map(|_| Event::MonitorEvent(monitor("a", "BIG", &details)))
            .collect();
        last_big = tokio::time::timeout(MESSAGE_TIMEOUT, publish(&mut client, batch))
            .await
            .expect("publish held back by a stalled subscriber");
    }
    let grown = rss_kib(svc.pid()).saturating_sub(baseline);
    assert!(
        grown < 96 * 1024,
        "bus RSS grew {grown} KiB for {STREAMS} stalled subscriptions"
    );
    // The bus still serves everybody else: the live subscriber (as slow as
    // the stalled ones while this test published) gets every event or a
    // count of those it lost, then a new one at once.
    let mut accounted = 0;
    while accounted < last_big {
        match next(&mut watcher).await {
            MonitorKind::Event(_) => accounted += 1,
            MonitorKind::Lost(l) => accounted += l.count,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accounted, last_big);
    let end = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "END", "{}"))],
    )
    .await;
    assert_eq!(event_of(next(&mut watcher).await).sequence, end);
    eprintln!("bus RSS grew {grown} KiB for {STREAMS} stalled subscriptions");
    drop(streams);
}

/// Stalled subscriptions from several source addresses (each address a
/// principal), each reading nothing: a client that grants HTTP/2's largest
/// windows and then stops reading its socket, with one literal filter per
/// subscription so that no two queues share an event (the worst case).
/// The publisher sends every one of them many times what its queue and its
/// send buffers hold. The bus's RSS must stay within the memory bound it
/// documents for this config, and a reader beside them must get every one
/// of its own events.
#[tokio::test(flavor = "multi_thread")]
async fn test_stalled_subscribers_from_many_addresses_stay_within_the_memory_bound() {
    const ADDRESSES: u8 = 4;
    const PER_ADDRESS: usize = 6;
    const STALLED: usize = ADDRESSES as usize * PER_ADDRESS;
    const EVENT_BYTES: usize = 16 * 1024;
    // Per round, this many events to each stalled subscription; 4 MiB to
    // each in all: 4 times its old event-count bound (64 x 16 KiB x 2,
    // the event and its wire form) and 10 times hyper's send buffer.
    const PER_ROUND: usize = 4;
    const ROUNDS: usize = 64;
    let yaml = format!(
        "queue_capacity: 64\nqueue_max_bytes: 65536\nmax_event_bytes: {EVENT_BYTES}\n\
         ring_capacity: 16\nring_max_bytes: 262144\n\
         max_monitor_subscriptions: {}\nmax_monitor_subscriptions_per_principal: {PER_ADDRESS}\n\
         max_domain_subscriptions: 0\n",
        // Direct callers may hold half of the total (the other half is the
        // gateway's): room for every stalled one and the reader.
        2 * (STALLED + 1)
    );
    // The bound the bus documents for this config (every subscription it
    // allows, and its ring), plus what the publisher's connection may hold
    // (HTTP/2's receive window).
    let config: qvirt_eventbus::Config = serde_yaml::from_str(&yaml).unwrap();
    let bound_kib =
        (config.memory_bound() + qvirt_eventbus::config::CONNECTION_BYTES) as u64 / 1024;

    let (svc, mut publisher) = bus(&yaml).await;
    let addr: std::net::SocketAddr = svc.url().trim_start_matches("http://").parse().unwrap();
    let mut stalled_conns = Vec::new();
    let mut streams = Vec::new();
    for a in 0..ADDRESSES {
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let channel = tonic::transport::Endpoint::from_static("http://stalling.invalid")
            .initial_stream_window_size(i32::MAX as u32)
            .initial_connection_window_size(i32::MAX as u32)
            .connect_with_connector(StallingConnector {
                addr,
                local: Some(std::net::Ipv4Addr::new(127, 0, 0, 2 + a).into()),
                stalled: stalled.clone(),
            })
            .await
            .unwrap();
        let mut client = Client::new(channel);
        for s in 0..PER_ADDRESS {
            let req = SubscribeMonitorEventsRequest {
                event: format!("S{}", usize::from(a) * PER_ADDRESS + s),
                ..Default::default()
            };
            streams.push(subscribe(&mut client, req).await.0);
        }
        // Each address is at its per-principal cap.
        let refused = client
            .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        stalled.store(true, std::sync::atomic::Ordering::Relaxed);
        stalled_conns.push(client);
    }
    // A live reader on a connection of its own, for its own events.
    let mut reader_client = Client::connect(svc.url()).await;
    let live_req = SubscribeMonitorEventsRequest {
        event: "LIVE".into(),
        ..Default::default()
    };
    let (mut live, _) = subscribe(&mut reader_client, live_req).await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < ROUNDS {
            match next(&mut live).await {
                MonitorKind::Event(e) => got.push(e.sequence),
                other => panic!("the live reader lost events: {other:?}"),
            }
        }
        got
    });
    let baseline = rss_kib(svc.pid());

    let details = format!("\"{}\"", "x".repeat(EVENT_BYTES - 200));
    let mut live_seqs = Vec::new();
    let mut peak = baseline;
    for _ in 0..ROUNDS {
        let mut batch: Vec<Event> = Vec::with_capacity(STALLED * PER_ROUND + 1);
        for _ in 0..PER_ROUND {
            for i in 0..STALLED {
                batch.push(Event::MonitorEvent(monitor(
                    "a",
                    &format!("S{i}"),
                    &details,
                )));
            }
        }
        batch.push(Event::MonitorEvent(monitor("a", "LIVE", "{}")));
        let last = tokio::time::timeout(MESSAGE_TIMEOUT, publish(&mut publisher, batch))
            .await
            .expect("publish held back by stalled subscribers");
        live_seqs.push(last);
        peak = peak.max(rss_kib(svc.pid()));
    }
    let got = tokio::time::timeout(MESSAGE_TIMEOUT, reader)
        .await
        .expect("the live reader got its events in time")
        .unwrap();
    assert_eq!(
        got, live_seqs,
        "the live reader got every one of its events"
    );
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "bus RSS grew {grown} KiB (baseline {baseline} KiB) for {STALLED} stalled subscriptions from {ADDRESSES} addresses; bound {bound_kib} KiB"
    );
    assert!(
        grown <= bound_kib,
        "bus RSS grew {grown} KiB for {STALLED} stalled subscriptions, over the bound of {bound_kib} KiB"
    );
    drop(streams);
    drop(stalled_conns);
}

/// A subscription request carrying `principal` and, if given, an internal
/// token in its metadata.
fn as_principal(
    principal: &str,
    token: Option<&str>,
) -> tonic::Request<SubscribeMonitorEventsRequest> {
    let mut req = tonic::Request::new(SubscribeMonitorEventsRequest::default());
    let md = req.metadata_mut();
    md.insert("x-qvirt-principal", principal.parse().unwrap());
    if let Some(t) = token {
        md.insert("x-qvirt-internal-token", t.parse().unwrap());
    }
    req
}

/// Subscribes with `req` and returns the stream (past Established) or the
/// refusal.
async fn try_subscribe(
    client: &mut Client,
    req: tonic::Request<SubscribeMonitorEventsRequest>,
) -> Result<Streaming<SubscribeMonitorEventsResponse>, tonic::Status> {
    let mut stream = client.subscribe_monitor_events(req).await?.into_inner();
    match next(&mut stream).await {
        MonitorKind::Established(_) => Ok(stream),
        other => panic!("first message must be established, got {other:?}"),
    }
}

fn refused_for(result: Result<Streaming<SubscribeMonitorEventsResponse>, tonic::Status>) -> String {
    match result {
        Ok(_) => panic!("subscription accepted past the per-principal cap"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
            e.message().to_owned()
        }
    }
}

/// A subscription from `url` on a connection presenting no token of its
/// own (only what `req` carries): a caller outside the internal plane.
async fn subscribe_uninvited(
    url: &str,
    req: tonic::Request<SubscribeMonitorEventsRequest>,
) -> tonic::Status {
    let mut raw = EventBusClient::new(
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    match raw.subscribe_monitor_events(req).await {
        Ok(_) => panic!("a subscription without the internal token was served"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_principal_metadata_is_honoured_only_with_the_internal_token() {
    let (svc, mut client) = bus("max_monitor_subscriptions_per_principal: 1\n").await;
    let token = Some(internal_token());
    // Without the token, or with a wrong one, a caller is refused whatever
    // principal it claims, and takes no slot.
    for guess in [None, Some("0123456789abcdef".repeat(4))] {
        let refused =
            subscribe_uninvited(&svc.url(), as_principal("alice", guess.as_deref())).await;
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        assert!(
            refused.message().contains("through the gateway"),
            "{refused}"
        );
    }
    // With the token, the gateway's principals have slots of their own.
    let _alice = try_subscribe(&mut client, as_principal("alice", token))
        .await
        .unwrap();
    let _bob = try_subscribe(&mut client, as_principal("bob", token))
        .await
        .unwrap();
    let msg = refused_for(try_subscribe(&mut client, as_principal("alice", token)).await);
    assert!(msg.contains("\"alice\""), "{msg}");
    // An internal caller naming no principal counts as its peer.
    let plain = || tonic::Request::new(SubscribeMonitorEventsRequest::default());
    let _peer = try_subscribe(&mut client, plain()).await.unwrap();
    let msg = refused_for(try_subscribe(&mut client, plain()).await);
    assert!(msg.contains("\"peer:127.0.0.1\""), "{msg}");
}

/// A client connecting from `local` (any of 127.0.0.0/8).
async fn client_from(url: &str, local: std::net::Ipv4Addr) -> Client {
    let channel = tonic::transport::Endpoint::from_static("http://from.invalid")
        .connect_with_connector(StallingConnector {
            addr: url.trim_start_matches("http://").parse().unwrap(),
            local: Some(local.into()),
            stalled: Default::default(),
        })
        .await
        .unwrap();
    Client::new(channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn test_direct_callers_leave_half_the_total_to_the_gateway() {
    let (svc, _client) =
        bus("max_monitor_subscriptions: 4\nmax_monitor_subscriptions_per_principal: 1\n").await;
    // Internal callers naming no principal (not the gateway's callers),
    // from three addresses: two take the half left to them.
    let mut direct = Vec::new();
    for last in 2..=4 {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, last);
        let mut c = client_from(&svc.url(), ip).await;
        let sub = try_subscribe(&mut c, tonic::Request::new(Default::default())).await;
        direct.push((c, sub));
    }
    assert!(direct[0].1.is_ok() && direct[1].1.is_ok());
    let third = direct.pop().unwrap().1;
    let msg = refused_for(third);
    assert!(
        msg.contains("kept for callers through the gateway"),
        "{msg}"
    );
    // The gateway's principals still find the other half.
    let mut gateway = client_from(&svc.url(), std::net::Ipv4Addr::new(127, 0, 0, 9)).await;
    let _alice = try_subscribe(&mut gateway, as_principal("alice", Some(internal_token())))
        .await
        .unwrap();
    let _bob = try_subscribe(&mut gateway, as_principal("bob", Some(internal_token())))
        .await
        .unwrap();
    let msg = refused_for(
        try_subscribe(&mut gateway, as_principal("carol", Some(internal_token()))).await,
    );
    assert!(msg.contains("total cap of 4"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_without_a_configured_token_every_tcp_subscriber_is_refused() {
    let mut svc = Service::start_without_internal_token(
        "qvirt-eventbus",
        "max_monitor_subscriptions_per_principal: 1\n",
        &[],
    );
    svc.wait_serving("qvirt.v1.EventBus").await;
    let refused =
        subscribe_uninvited(&svc.url(), as_principal("alice", Some(internal_token()))).await;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("no internal token configured"),
        "{refused}"
    );
}

/// Events in the shared-connection test, each with a ~1 KiB payload: about
/// 20 MiB, far over every HTTP/2 flow-control window on the connection.
const SHARED_EVENTS: u64 = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn test_publisher_and_subscriber_share_one_connection() {
    // A queue that holds both bursts if need be (40,000 events of ~2.5
    // KiB each with their wire form).
    let (_svc, mut client) = bus("queue_capacity: 65536\nqueue_max_bytes: 134217728\n").await;
    // One channel: the publish stream and the subscription are two streams
    // of one HTTP/2 connection.
    let mut publisher = client.clone();
    let (mut sub, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            event: "BIG".into(),
            ..Default::default()
        },
    )
    .await;
    let payload = format!("\"{}\"", "x".repeat(1024));
    let burst = move |from: u64| {
        let payload = payload.clone();
        (from..from + SHARED_EVENTS).map(move |i| PublishRequest {
            event: Some(Event::MonitorEvent(monitor(
                "a",
                "BIG",
                &format!("[{i},{payload}]"),
            ))),
        })
    };
    // The subscriber reads nothing while the burst is published: the
    // publish must still complete (its stream is read and answered while
    // the subscription's stream is blocked on flow control).
    let reply = tokio::time::timeout(
        MESSAGE_TIMEOUT,
        publisher
            .ingest
            .publish(internal(tokio_stream::iter(burst(0)))),
    )
    .await
    .expect("publish blocked behind an unread subscription on its connection")
    .unwrap()
    .into_inner();
    assert_eq!(reply.accepted, SHARED_EVENTS);
    // Now both at once: the subscriber drains while a second burst goes
    // out on the same connection.
    let second = tokio::spawn(async move {
        publisher
            .ingest
            .publish(internal(tokio_stream::iter(burst(SHARED_EVENTS))))
            .await
            .unwrap()
            .into_inner()
    });
    let mut expected = 0u64;
    while expected < 2 * SHARED_EVENTS {
        let e = event_of(next(&mut sub).await);
        let n: u64 = e.details_json[1..e.details_json.find(',').unwrap()]
            .parse()
            .unwrap();
        assert_eq!(n, expected, "in order, none lost or repeated");
        expected += 1;
    }
    let reply = tokio::time::timeout(MESSAGE_TIMEOUT, second)
        .await
        .expect("second publish answered")
        .unwrap();
    assert_eq!(reply.accepted, SHARED_EVENTS);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_shutdown_ends_subscriptions_with_unavailable() {
    let (mut svc, mut client) = bus("").await;
    let (mut sub, _) = subscribe(&mut client, SubscribeMonitorEventsRequest::default()).await;
    // SIGTERM without waiting: the stream must end with the bus's own
    // UNAVAILABLE, not a broken connection.
    // SAFETY: kill only sends a signal to the bus this test started.
    assert_eq!(unsafe { libc::kill(svc.pid() as i32, libc::SIGTERM) }, 0);
    let end = tokio::time::timeout(MESSAGE_TIMEOUT, sub.message())
        .await
        .expect("the stream ends in time");
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("event bus closed"), "{status}");
    assert_eq!(reason_of(&status).as_deref(), Some("BUS_SHUTTING_DOWN"));
    assert!(svc.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_filter_fields_are_bounded() {
    let (_svc, mut client) = bus("").await;
    // A subscription keeps its filter for life: a huge one in every slot
    // would be a way to make the bus hold memory.
    let big = "d".repeat(1024);
    let err = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            domain: big.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().starts_with("domain: "), "{err}");
    assert_eq!(reason_of(&err).as_deref(), Some("FIELD_TOO_LONG"));
    assert_eq!(violated_fields(&err), ["domain"]);
    let err = client
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            host: big,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().starts_with("host: "), "{err}");
    // A request far over any sane size is not even decoded.
    let err = client
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "d".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    // A UUID with dashes and a real host name fit.
    let (_s, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            domain: UUID_A.into(),
            host: "h".repeat(253),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_cut_off_slow_consumer_and_total_cap() {
    let (_svc, mut client) =
        bus("queue_capacity: 4\nslow_consumer: cut-off\nmax_monitor_subscriptions: 2\n").await;
    // As principals the gateway vouches for (direct callers would stop at
    // the half of the total cap left to them).
    let token = Some(internal_token());
    let mut slow = try_subscribe(&mut client, as_principal("p1", token))
        .await
        .unwrap();
    let _other = try_subscribe(&mut client, as_principal("p2", token))
        .await
        .unwrap();
    // Past the total cap: RESOURCE_EXHAUSTED naming that cap.
    let err = client
        .subscribe_monitor_events(as_principal("p3", token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("total cap of 2"),
        "{}",
        err.message()
    );
    // The slow one reads nothing while far more than its queue and every
    // flow-control window are published: the publisher is not held up,
    // and the stream ends with RESOURCE_EXHAUSTED after what it was sent.
    const N: u64 = 20_000;
    let payload = format!("\"{}\"", "x".repeat(512));
    let events = (0..N)
        .map(|_| Event::MonitorEvent(monitor("a", "E", &payload)))
        .collect();
    tokio::time::timeout(MESSAGE_TIMEOUT, publish(&mut client, events))
        .await
        .expect("publish not slowed by the slow subscriber");
    let mut received = 0u64;
    let status = loop {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, slow.message())
            .await
            .expect("message in time");
        match msg {
            Ok(Some(m)) => match m.kind.unwrap() {
                MonitorKind::Event(_) => received += 1,
                other => panic!("no loss marker under cut-off: {other:?}"),
            },
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("cut off"), "{status}");
    assert_eq!(reason_of(&status).as_deref(), Some("SLOW_CONSUMER_CUT_OFF"));
    assert!(received < N, "{received}");
}

/// The bus's `/metrics` page on `port`.
async fn scrape(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(MESSAGE_TIMEOUT)).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_cut_off_regex_subscriber_ends_once_without_a_gap() {
    let port = qvirt_integration_tests::free_port();
    let (svc, mut client) = bus(&format!(
        "queue_capacity: 2\nslow_consumer: cut-off\nmetrics_listen: 127.0.0.1:{port}\n"
    ))
    .await;
    // A regex filter is not indexed by event name, unlike a literal one.
    let (mut slow, established) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            event: "^E$".into(),
            flags: flags(&[MonitorEventFilterFlag::Regex]),
            ..Default::default()
        },
    )
    .await;
    // Publishing on a connection of its own, so the unread stream's
    // connection window cannot hold a PublishResponse back.
    let mut publisher = Client::connect(svc.url()).await;
    let event = || Event::MonitorEvent(monitor("a", "E", &format!("\"{}\"", "x".repeat(30_000))));
    // It reads nothing while 6 MB are published, one event per call (a
    // burst could cut it off before its stream is stalled): far more than
    // its stream's HTTP/2 window (2 MiB in tonic's client), the bus's send
    // buffer and its queue of 2 hold. So it is cut off, and the events
    // after that find its queue still full.
    let mut phase_one = 0;
    for _ in 0..200 {
        phase_one = publish(&mut publisher, vec![event()]).await;
    }
    // It reads while more events are published: none may reach it.
    let more = tokio::spawn(async move {
        for _ in 0..100 {
            publish(&mut publisher, vec![event()]).await;
        }
    });
    let mut last_seen = established;
    let status = loop {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, slow.message())
            .await
            .expect("message in time");
        match msg {
            Ok(Some(m)) => match m.kind.unwrap() {
                MonitorKind::Event(e) => {
                    assert_eq!(e.sequence, last_seen + 1, "a gap without a marker");
                    last_seen = e.sequence;
                }
                other => panic!("no loss marker under cut-off: {other:?}"),
            },
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("cut off"), "{status}");
    assert!(last_seen < phase_one, "{last_seen} of {phase_one} arrived");
    tokio::time::timeout(MESSAGE_TIMEOUT, more)
        .await
        .expect("publishing done in time")
        .unwrap();
    let body = scrape(port).await;
    assert!(
        body.contains("\nqvirt_eventbus_events_dropped_total{reason=\"cut_off\"} 1\n"),
        "one cut-off subscriber counts once: {body}"
    );
}

/// A monitor event whose encoded size is exactly `size` bytes.
fn monitor_of_size(size: usize) -> MonitorEvent {
    use prost::Message as _;
    let mut e = monitor("a", "E", "");
    let mut len = size;
    loop {
        e.details_json = format!("\"{}\"", "x".repeat(len));
        match e.encoded_len().cmp(&size) {
            std::cmp::Ordering::Equal => return e,
            std::cmp::Ordering::Greater => len -= 1,
            std::cmp::Ordering::Less => panic!("no event of exactly {size} bytes"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_publish_refuses_an_event_over_max_event_bytes() {
    let (_svc, mut client) = bus("max_event_bytes: 4096\n").await;
    let (mut stream, established) = subscribe(&mut client, Default::default()).await;
    // At the cap: stored and delivered.
    let at_cap = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor_of_size(4096))],
    )
    .await;
    assert_eq!(at_cap, established + 1);
    assert_eq!(event_of(next(&mut stream).await).sequence, at_cap);
    // One byte over, after one that fits: the call ends with
    // INVALID_ARGUMENT naming the cap; the event before it is stored.
    let reqs = [monitor("a", "BEFORE", "{}"), monitor_of_size(4097)]
        .into_iter()
        .map(|e| PublishRequest {
            event: Some(Event::MonitorEvent(e)),
        })
        .collect::<Vec<_>>();
    let status = client
        .ingest
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .expect_err("an event over the cap is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(
        status
            .message()
            .contains("4097 bytes encoded, over the bus's max_event_bytes of 4096"),
        "{status}"
    );
    assert_eq!(reason_of(&status).as_deref(), Some("EVENT_TOO_LARGE"));
    assert_eq!(event_of(next(&mut stream).await).event, "BEFORE");
    // The bus keeps serving: the next call is accepted and delivered, with
    // nothing of the refused event in between.
    let after = publish(
        &mut client,
        vec![Event::MonitorEvent(monitor("a", "AFTER", "{}"))],
    )
    .await;
    let e = event_of(next(&mut stream).await);
    assert_eq!((e.event.as_str(), e.sequence), ("AFTER", after));
    assert_eq!(after, at_cap + 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unix_socket_peer_is_its_uid() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus.sock");
    let config = dir.path().join("bus.yaml");
    // No slot at all: the refusal names the principal it counted.
    std::fs::write(&config, "max_monitor_subscriptions_per_principal: 0\n").unwrap();
    let mut child = ChildGuard::spawn(
        std::process::Command::new(bin_path("qvirt-eventbus"))
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(std::process::Stdio::null()),
    );
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let want = format!("principal \"peer:uid:{uid}\"");
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    let stderr = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on the socket"
        );
        assert!(child.try_wait().is_none(), "qvirt-eventbus exited");
        if sock.exists() {
            let out = grpcurl(&[
                "-plaintext",
                "-unix",
                "-authority",
                "localhost",
                "-d",
                "{}",
                sock.to_str().unwrap(),
                "qvirt.v1.EventBus/SubscribeMonitorEvents",
            ]);
            let stderr = text(&out.stderr);
            if stderr.contains("ResourceExhausted") {
                break stderr;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(stderr.contains(&want), "{stderr}");
    assert!(child.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_many_subscribers_and_concurrent_publishers() {
    const SUBSCRIBERS: usize = 200;
    const PER_PUBLISHER: u64 = 500;
    let (svc, _client) =
        bus("queue_capacity: 4096\nqueue_max_bytes: 4194304\nmax_monitor_subscriptions: 512\nmax_monitor_subscriptions_per_principal: 256\n").await;
    // Every fourth subscriber on a connection of its own kind of filter:
    // all events, a literal name, a regex, and one domain.
    let filters = [
        SubscribeMonitorEventsRequest::default(),
        SubscribeMonitorEventsRequest {
            event: "EVEN".into(),
            ..Default::default()
        },
        SubscribeMonitorEventsRequest {
            event: "^od".into(),
            flags: flags(&[
                MonitorEventFilterFlag::Regex,
                MonitorEventFilterFlag::Nocase,
            ]),
            ..Default::default()
        },
        SubscribeMonitorEventsRequest {
            domain: "b".into(),
            ..Default::default()
        },
    ];
    let mut subs = Vec::new();
    for conn in 0..4 {
        let mut c = Client::connect(svc.url()).await;
        for i in 0..SUBSCRIBERS / 4 {
            let which = (conn + i) % filters.len();
            let (stream, _) = subscribe(&mut c, filters[which].clone()).await;
            subs.push((which, stream));
        }
    }
    // Two publishers at once, on connections of their own: publisher p
    // sends domain "a" or "b", names EVEN / ODD alternately, and its own
    // counter in the details.
    let publishers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|domain| {
            let url = svc.url();
            tokio::spawn(async move {
                let mut c = Client::connect(url).await;
                let events = (0..PER_PUBLISHER)
                    .map(|i| {
                        let name = if i % 2 == 0 { "EVEN" } else { "ODD" };
                        Event::MonitorEvent(monitor(domain, name, &i.to_string()))
                    })
                    .collect();
                publish(&mut c, events).await
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    // All events, or half of them (one name, or one domain).
    let expected = |which: usize| {
        if which == 0 {
            2 * PER_PUBLISHER
        } else {
            PER_PUBLISHER
        }
    };
    let readers: Vec<_> = subs
        .into_iter()
        .map(|(which, mut stream)| {
            tokio::spawn(async move {
                let mut last_seq = 0;
                // Per domain, the publisher's counter in order.
                let mut next_of = std::collections::HashMap::<String, u64>::new();
                for _ in 0..expected(which) {
                    let e = event_of(next(&mut stream).await);
                    assert!(e.sequence > last_seq, "bus order");
                    last_seq = e.sequence;
                    let n: u64 = e.details_json.parse().unwrap();
                    let step = if which == 0 || which == 3 { 1 } else { 2 };
                    let first = if which == 2 { 1 } else { 0 };
                    let want = next_of.entry(e.domain_name.clone()).or_insert(first);
                    assert_eq!(n, *want, "filter {which}: {e:?}");
                    *want += step;
                    match which {
                        1 => assert_eq!(e.event, "EVEN"),
                        2 => assert_eq!(e.event, "ODD"),
                        3 => assert_eq!(e.domain_name, "b"),
                        _ => {}
                    }
                }
                which
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_host_field_and_host_filter() {
    let (_svc, mut client) = bus("").await;
    let mut lifecycle = client
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            host: "node-2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first.kind, Some(DomainKind::Established(_))));
    let (mut monitor_sub, _) = subscribe(
        &mut client,
        SubscribeMonitorEventsRequest {
            host: "node-2".into(),
            // A literal name too: the host must still be tested.
            event: "STOP".into(),
            ..Default::default()
        },
    )
    .await;
    let on = |host: &str| {
        let mut m = monitor("a", "STOP", "{}");
        m.host = host.into();
        let d = DomainEvent {
            host: host.into(),
            domain_name: "a".into(),
            r#type: DomainEventType::Suspended as i32,
            ..Default::default()
        };
        [Event::MonitorEvent(m), Event::DomainEvent(d)]
    };
    let events = on("node-1").into_iter().chain(on("node-2")).collect();
    let last = publish(&mut client, events).await;
    let e = event_of(next(&mut monitor_sub).await);
    assert_eq!((e.host.as_str(), e.sequence), ("node-2", last - 1));
    let msg = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match msg.kind {
        Some(DomainKind::Event(e)) => {
            assert_eq!((e.host.as_str(), e.sequence), ("node-2", last));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_public_subscriptions_and_internal_ingest_are_separate_services() {
    let (svc, _client) = bus("").await;
    let addr = svc.addr.to_string();
    let out = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    for name in ["qvirt.v1.EventBus", "qvirt.v1.EventIngest"] {
        assert!(listed.lines().any(|l| l == name), "{name} in:\n{listed}");
    }
    // The public service has the two subscriptions and nothing else.
    let out = grpcurl(&["-plaintext", &addr, "list", "qvirt.v1.EventBus"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut methods: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    methods.sort();
    assert_eq!(
        methods,
        [
            "qvirt.v1.EventBus.SubscribeDomainEvents",
            "qvirt.v1.EventBus.SubscribeMonitorEvents"
        ]
    );
    let out = grpcurl(&["-plaintext", &addr, "list", "qvirt.v1.EventIngest"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "qvirt.v1.EventIngest.Publish");
    // The old path is gone: nothing publishes through the public service.
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &format!("x-qvirt-internal-token: {}", internal_token()),
        "-d",
        "{}",
        &addr,
        "qvirt.v1.EventBus/Publish",
    ]);
    assert!(!out.status.success());
}
