//! Fleet subscriptions: two gateway-side `qvirt-eventbus` (`fleet:`)
//! serve the events two hosts' buses forwarded to one 3-node JetStream
//! cluster (R3 stream). Cursors are the stream's: resuming at the other
//! gateway gives no gap and no duplicate; the bus's filters apply.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use qvirt_integration_tests::nats::{Nats, fleet_bus as gateway_bus, host_bus};
use qvirt_integration_tests::{InternalChannel, Service, internal, internal_channel};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_domain_events_response::Kind as DomainKind;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind as MonitorKind;
use qvirt_proto::v1::{
    DomainEvent, DomainEventType, EventsLostReason, MonitorEvent, MonitorEventFilterFlag,
    PublishRequest, SubscribeDomainEventsRequest, SubscribeMonitorEventsRequest,
};

/// Bound on one message or call; a stream leader's loss (a 4-9 s election,
/// then the consumer made again) on 2 loaded cores needs its share.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until a fleet bus has found the stream: a subscription is
/// accepted rather than UNAVAILABLE.
async fn wait_fleet_ready(client: &EventBusClient<InternalChannel>) {
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    loop {
        let mut c = client.clone();
        match c
            .subscribe_domain_events(SubscribeDomainEventsRequest::default())
            .within()
            .await
        {
            Ok(_) => return,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
                assert!(std::time::Instant::now() < deadline, "{e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn monitor(domain: &str, event: &str, n: u32) -> Event {
    Event::MonitorEvent(MonitorEvent {
        domain_name: domain.into(),
        event: event.into(),
        details_json: format!("{{\"n\":{n}}}"),
        ..Default::default()
    })
}

fn lifecycle(domain: &str) -> Event {
    Event::DomainEvent(DomainEvent {
        domain_name: domain.into(),
        r#type: DomainEventType::Started as i32,
        ..Default::default()
    })
}

async fn publish(bus: &Service, events: Vec<Event>) {
    let mut ingest = EventIngestClient::connect(bus.url()).await.unwrap();
    let n = events.len() as u64;
    let reqs: Vec<PublishRequest> = events
        .into_iter()
        .map(|e| PublishRequest { event: Some(e) })
        .collect();
    let reply = ingest
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, n);
}

/// The next `n` monitor events of a subscription (failing on anything
/// else after SubscriptionEstablished), as (host, domain, event, n,
/// cursor).
async fn monitor_events(
    stream: &mut tonic::Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>,
    n: usize,
) -> Vec<(String, String, String, u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("stream open");
        match msg.kind.unwrap() {
            MonitorKind::Established(_) => {}
            MonitorKind::Event(e) => {
                let v: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
                out.push((
                    e.host,
                    e.domain_name,
                    e.event,
                    v["n"].as_u64().unwrap(),
                    e.cursor,
                ));
            }
            MonitorKind::Lost(l) => panic!("unexpected loss {l:?}"),
        }
    }
    out
}

/// Nothing more arrives within a short while (the stream has nothing
/// else matching).
async fn assert_quiet(
    stream: &mut tonic::Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>,
) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        panic!("unexpected message {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_resume_at_another_gateway_without_gap_or_duplicate() {
    // Over TLS, to the clients and on the routes that replicate the
    // stream between the nodes (FLEET.md's configuration): a peer that
    // speaks plaintext to a route port gets no INFO, and the node says
    // why.
    let nats = Nats::cluster3_tls();
    assert_eq!(nats.route_greeting(0), "", "a route port spoke plaintext");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !nats.nodes[0].log().contains("TLS route handshake error") {
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS handshake error logged: {}",
            nats.nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (o1, o2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h1 = host_bus(&nats, "h1", o1.path()).await;
    let h2 = host_bus(&nats, "h2", o2.path()).await;
    let (_g1, mut c1) = gateway_bus(&nats, 0).await;
    wait_fleet_ready(&c1).await;
    let (_g2, mut c2) = gateway_bus(&nats, 1).await;
    wait_fleet_ready(&c2).await;

    // 40 events from each host, interleaved in batches.
    for batch in 0..4u32 {
        let events = |host: u32| {
            (0..10)
                .map(|i| {
                    let n = host * 1000 + batch * 10 + i;
                    if i % 5 == 4 {
                        lifecycle("web.1")
                    } else {
                        monitor(if i % 2 == 0 { "web.1" } else { "db" }, "BLOCK_IO_ERROR", n)
                    }
                })
                .collect::<Vec<_>>()
        };
        publish(&h1, events(1)).await;
        publish(&h2, events(2)).await;
    }
    // Everything held, at gateway 1: 32 monitor events per host.
    let mut all = c1
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = monitor_events(&mut all, 64).await;
    assert_quiet(&mut all).await;
    for host in ["h1", "h2"] {
        let mine: Vec<u64> = got.iter().filter(|e| e.0 == host).map(|e| e.3).collect();
        let mut sorted = mine.clone();
        sorted.sort_unstable();
        assert_eq!(mine, sorted, "{host}'s events in its bus's order");
        assert_eq!(mine.len(), 32);
    }
    // Cursors are the stream's sequence numbers: strictly increasing.
    let seq = |c: &str| c.rsplit('.').next().unwrap().parse::<u64>().unwrap();
    assert!(got.windows(2).all(|w| seq(&w[0].4) < seq(&w[1].4)));

    // Resume at gateway 2 after the 20th: exactly the 44 after it.
    let mut resumed = c2
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            resume_after: got[19].4.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rest = monitor_events(&mut resumed, 44).await;
    assert_eq!(rest, got[20..]);
    assert_quiet(&mut resumed).await;

    // Live events arrive at both, with the same cursors.
    publish(&h2, vec![monitor("db", "BLOCK_IO_ERROR", 9999)]).await;
    let a = monitor_events(&mut all, 1).await;
    let b = monitor_events(&mut resumed, 1).await;
    assert_eq!(a, b);
    assert_eq!((a[0].0.as_str(), a[0].3), ("h2", 9999));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_fleet_filters_are_the_bus_filters() {
    let nats = Nats::cluster3();
    let (o1, o2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h1 = host_bus(&nats, "h1", o1.path()).await;
    let h2 = host_bus(&nats, "h2", o2.path()).await;
    let (_g1, mut c1) = gateway_bus(&nats, 2).await;
    wait_fleet_ready(&c1).await;
    let sub = |req: SubscribeMonitorEventsRequest| {
        let mut c = c1.clone();
        async move { c.subscribe_monitor_events(req).await.unwrap().into_inner() }
    };
    // Live subscriptions, set up before the events.
    let mut nocase = sub(SubscribeMonitorEventsRequest {
        event: "block_io_error".into(),
        flags: vec![MonitorEventFilterFlag::Nocase as i32],
        ..Default::default()
    })
    .await;
    let mut regex_h2 = sub(SubscribeMonitorEventsRequest {
        event: "^(STOP|RESUME)$".into(),
        flags: vec![MonitorEventFilterFlag::Regex as i32],
        host: "h2".into(),
        ..Default::default()
    })
    .await;
    let mut literal_domain = sub(SubscribeMonitorEventsRequest {
        event: "STOP".into(),
        domain: "a b".into(),
        ..Default::default()
    })
    .await;
    let mut lifecycle_sub = c1
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "a b".into(),
            host: "h1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Each stream's first message says it is active.
    for s in [&mut nocase, &mut regex_h2, &mut literal_domain] {
        let m = tokio::time::timeout(MESSAGE_TIMEOUT, s.message())
            .await
            .unwrap();
        assert!(matches!(
            m.unwrap().unwrap().kind,
            Some(MonitorKind::Established(_))
        ));
    }
    let m = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle_sub.message())
        .await
        .unwrap();
    assert!(matches!(
        m.unwrap().unwrap().kind,
        Some(DomainKind::Established(_))
    ));

    publish(
        &h1,
        vec![
            monitor("a b", "STOP", 1),
            monitor("a b", "Block_IO_Error", 2),
            lifecycle("a b"),
            monitor("c", "RESUME", 3),
        ],
    )
    .await;
    publish(
        &h2,
        vec![
            monitor("a b", "STOP", 4),
            monitor("c", "RESUME", 5),
            monitor("c", "BLOCK_IO_ERROR", 6),
            lifecycle("a b"),
        ],
    )
    .await;
    let ns =
        |v: Vec<(String, String, String, u64, String)>| v.iter().map(|e| e.3).collect::<Vec<_>>();
    let got = ns(monitor_events(&mut nocase, 2).await);
    assert_eq!(got.len(), 2);
    assert!(got.contains(&2) && got.contains(&6), "{got:?}");
    assert_eq!(ns(monitor_events(&mut regex_h2, 2).await), [4, 5]);
    let got = ns(monitor_events(&mut literal_domain, 2).await);
    assert!(got.contains(&1) && got.contains(&4), "{got:?}");
    let m = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle_sub.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(DomainKind::Event(e)) = m.kind else {
        panic!("{m:?}")
    };
    assert_eq!((e.host.as_str(), e.domain_name.as_str()), ("h1", "a b"));
    for s in [&mut nocase, &mut regex_h2, &mut literal_domain] {
        assert_quiet(s).await;
    }
}

/// What a subscription delivered: events by their `n`, and losses.
#[derive(Debug, PartialEq)]
enum Got {
    Event(u64),
    Lost(EventsLostReason, u64),
}

/// Reads a monitor subscription until `done` says it has enough.
async fn collect(
    stream: &mut tonic::Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>,
    done: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let mut out = Vec::new();
    while !done(&out) {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} messages: {out:?}", out.len()))
            .unwrap()
            .expect("stream open");
        match msg.kind.unwrap() {
            MonitorKind::Established(_) => {}
            MonitorKind::Event(e) => {
                let v: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
                out.push(Got::Event(v["n"].as_u64().unwrap()));
            }
            MonitorKind::Lost(l) => out.push(Got::Lost(l.reason(), l.count)),
        }
    }
    out
}

fn metric(port: u16, name: &str) -> u64 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("qvirt_eventbus_nats_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_hosts_outbox_loss_reaches_fleet_subscribers() {
    let mut nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let port = qvirt_integration_tests::free_port();
    let config = format!(
        "metrics_listen: 127.0.0.1:{port}\nnats:\n  urls: [{}]\n  token_file: {}\n  \
         host: h1\n  outbox_dir: {}\n  outbox_max_bytes: 1048576\n",
        nats.urls()[0],
        nats.token_file().display(),
        outbox.path().display()
    );
    let mut h1 = Service::start_with_config("qvirt-eventbus", &config, &[]);
    h1.wait_serving("qvirt.v1.EventBus").await;
    let (_g, mut gw) = gateway_bus(&nats, 0).await;
    wait_fleet_ready(&gw).await;
    publish(&h1, (0..5).map(|n| monitor("vm", "STOP", n)).collect()).await;
    let mut first = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = monitor_events(&mut first, 5).await;
    let cursor = got[4].4.clone();
    drop(first);

    // The broker goes away; the host's outbox (1 MiB) overflows.
    nats.nodes[0].stop(libc::SIGKILL);
    let pad = "p".repeat(8 * 1024);
    for batch in 0..6u32 {
        let events = (0..50)
            .map(|i| {
                let n = 100 + batch * 50 + i;
                Event::MonitorEvent(MonitorEvent {
                    domain_name: "vm".into(),
                    event: "STOP".into(),
                    details_json: format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"),
                    ..Default::default()
                })
            })
            .collect();
        publish(&h1, events).await;
    }
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    while metric(port, "outbox_records") + metric(port, "lost_total") < 300 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = metric(port, "lost_total");
    assert!(lost > 0);
    nats.nodes[0].start();
    nats.wait_ready();
    // Once the outbox has drained, the marker is in the stream.
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    while metric(port, "outbox_records") > 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(
        &h1,
        (1000..1003).map(|n| monitor("vm", "STOP", n)).collect(),
    )
    .await;

    // Resuming after event 5 (any gateway would do): the events the
    // outbox kept, one loss marker with the host's count, the rest.
    let mut resumed = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            resume_after: cursor,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = collect(&mut resumed, |g| g.last() == Some(&Got::Event(1002))).await;
    let kept = 300 - lost;
    let mut want: Vec<Got> = (100..100 + kept).map(Got::Event).collect();
    want.push(Got::Lost(EventsLostReason::OutboxFull, lost));
    want.extend((1000..1003).map(Got::Event));
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_leader_loss_keeps_exactly_once_in_order() {
    let mut nats = Nats::cluster3();
    let outbox = tempfile::tempdir().unwrap();
    let h1 = host_bus(&nats, "h1", outbox.path()).await;
    let (_g, mut gw) = gateway_bus(&nats, 0).await;
    wait_fleet_ready(&gw).await;
    let mut live = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = live.message().within().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(MonitorKind::Established(_))));
    let js = async_nats::jetstream::new(nats.client().await);
    const TOTAL: u32 = 2000;
    for batch in 0..TOTAL / 100 {
        publish(
            &h1,
            (batch * 100..(batch + 1) * 100)
                .map(|n| monitor("vm", "STOP", n))
                .collect(),
        )
        .await;
        if batch == 5 {
            // Kill the stream's leader while events are in flight.
            // One stream info can show no leader (e.g. while a replica
            // catches up): ask until one is named.
            let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
            let leader = loop {
                if let Ok(mut stream) = js.get_stream("QVIRT_EVENTS").await
                    && let Ok(info) = stream.info().await
                    && let Some(leader) = info.cluster.clone().and_then(|c| c.leader)
                {
                    break leader;
                }
                assert!(std::time::Instant::now() < deadline, "no stream leader");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let node = nats.nodes.iter_mut().find(|n| n.name == leader).unwrap();
            node.stop(libc::SIGKILL);
        }
    }
    let got = collect(&mut live, |g| g.len() >= TOTAL as usize).await;
    let want: Vec<Got> = (0..u64::from(TOTAL)).map(Got::Event).collect();
    assert_eq!(got, want);
    // And the stream itself holds each once (asked until a leader
    // answers).
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    let stored = loop {
        if let Ok(mut stream) = js.get_stream("QVIRT_EVENTS").await
            && let Ok(info) = stream.info().await
        {
            break info.state.messages;
        }
        assert!(std::time::Instant::now() < deadline, "no stream info");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stored, u64::from(TOTAL));
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_gateway_in_front_of_a_fleet_bus_keeps_roles_and_caps() {
    let nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let h1 = host_bus(&nats, "h1", outbox.path()).await;
    let config = format!(
        "fleet:\n  urls: [{}]\n  token_file: {}\nmax_monitor_subscriptions_per_principal: 2\n",
        nats.urls()[0],
        nats.token_file().display()
    );
    let mut fleet_bus = Service::start_with_config("qvirt-eventbus", &config, &[]);
    fleet_bus.wait_serving("qvirt.v1.EventBus").await;
    wait_fleet_ready(&EventBusClient::new(
        internal_channel(fleet_bus.url()).await,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let viewer = qvirt_integration_tests::token_new("viewer", "read-only");
    let operator = qvirt_integration_tests::token_new("operator", "read-write");
    let dead = format!("http://127.0.0.1:{}", qvirt_integration_tests::free_port());
    let yaml = format!(
        "supervisor: {dead}\neventbus: {}\nagentd: {dead}\ninternal_token_file: {}\n\
         health_poll_ms: 200\ntokens:\n{}{}",
        fleet_bus.url(),
        qvirt_integration_tests::write_internal_token(dir.path()).display(),
        viewer.entry,
        operator.entry
    );
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
    gw.wait_serving("qvirt.v1.EventBus").await;
    let mut client = EventBusClient::connect(gw.url()).await.unwrap();

    // Raw monitor events need read-write, as on one host.
    let denied = client
        .subscribe_monitor_events(bearer(
            SubscribeMonitorEventsRequest::default(),
            &viewer.token,
        ))
        .await
        .expect_err("a viewer is refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    // Lifecycle events are for readers.
    let mut lifecycle_sub = client
        .subscribe_domain_events(bearer(
            SubscribeDomainEventsRequest::default(),
            &viewer.token,
        ))
        .await
        .unwrap()
        .into_inner();
    // The bus's per-principal cap (2) counts the principal the gateway
    // vouches for.
    let mut subs = Vec::new();
    for _ in 0..2 {
        let mut s = client
            .subscribe_monitor_events(bearer(
                SubscribeMonitorEventsRequest::default(),
                &operator.token,
            ))
            .within()
            .await
            .unwrap()
            .into_inner();
        let m = tokio::time::timeout(MESSAGE_TIMEOUT, s.message())
            .await
            .unwrap();
        assert!(matches!(
            m.unwrap().unwrap().kind,
            Some(MonitorKind::Established(_))
        ));
        subs.push(s);
    }
    let third = client
        .subscribe_monitor_events(bearer(
            SubscribeMonitorEventsRequest::default(),
            &operator.token,
        ))
        .await
        .expect_err("past the cap");
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third}");
    assert!(third.message().contains("operator"), "{third}");

    publish(&h1, vec![lifecycle("vm"), monitor("vm", "STOP", 7)]).await;
    let got = monitor_events(&mut subs[0], 1).await;
    assert_eq!((got[0].0.as_str(), got[0].3), ("h1", 7));
    loop {
        let m = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle_sub.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(DomainKind::Event(e)) = m.kind {
            assert_eq!((e.host.as_str(), e.domain_name.as_str()), ("h1", "vm"));
            assert!(e.cursor.starts_with("1.js"), "{}", e.cursor);
            break;
        }
    }
}

/// A call's future with [`MESSAGE_TIMEOUT`]: a hang fails the test.
trait Within: std::future::Future + Sized {
    async fn within(self) -> Self::Output {
        tokio::time::timeout(MESSAGE_TIMEOUT, self)
            .await
            .expect("an answer in time")
    }
}

impl<F: std::future::Future> Within for F {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_fleet_bus_serves_before_the_stream_exists() {
    // Over TLS: the host's bus and the gateway's reach the broker with
    // `ca_file` (Nats::access_yaml).
    let nats = Nats::single_tls();
    // No host has made the stream yet: the gateway's bus serves, and
    // says the fleet's events are not available.
    let (mut bus, mut gw) = gateway_bus(&nats, 0).await;
    let refused = gw
        .subscribe_domain_events(SubscribeDomainEventsRequest::default())
        .within()
        .await
        .expect_err("no stream yet");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert_eq!(
        qvirt_common::rpc::reason_of(&refused).as_deref(),
        Some("FLEET_UNAVAILABLE")
    );
    // Its health says so too (a gateway in front shows EventBus
    // NOT_SERVING).
    assert_eq!(
        bus.health("qvirt.v1.EventBus").await,
        Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    );
    // A host comes up and makes it; the gateway's bus finds it.
    let outbox = tempfile::tempdir().unwrap();
    let h1 = host_bus(&nats, "h1", outbox.path()).await;
    bus.wait_serving("qvirt.v1.EventBus").await;
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    let mut sub = loop {
        match gw
            .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
            .within()
            .await
        {
            Ok(s) => break s.into_inner(),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first = sub.message().within().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(MonitorKind::Established(_))));
    publish(&h1, vec![monitor("vm", "STOP", 1)]).await;
    let got = monitor_events(&mut sub, 1).await;
    assert_eq!(got[0].3, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_live_fleet_subscription_rides_out_a_broker_restart() {
    let mut nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let h1 = host_bus(&nats, "h1", outbox.path()).await;
    let (mut bus, mut gw) = gateway_bus(&nats, 0).await;
    wait_fleet_ready(&gw).await;
    let mut live = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
        .within()
        .await
        .unwrap()
        .into_inner();
    // Events after SubscriptionEstablished are the subscription's.
    let first = live.message().within().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(MonitorKind::Established(_))));
    publish(&h1, vec![monitor("vm", "STOP", 1)]).await;
    assert_eq!(collect(&mut live, |g| !g.is_empty()).await, [Got::Event(1)]);
    nats.nodes[0].stop(libc::SIGKILL);
    // While the broker is away, the gateway's bus says EventBus is not
    // serving (a gateway in front shows it too).
    let deadline = std::time::Instant::now() + MESSAGE_TIMEOUT;
    loop {
        let status = bus.health("qvirt.v1.EventBus").await;
        if status == Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish(&h1, vec![monitor("vm", "STOP", 2)]).await;
    nats.nodes[0].start();
    nats.wait_ready();
    bus.wait_serving("qvirt.v1.EventBus").await;
    publish(&h1, vec![monitor("vm", "STOP", 3)]).await;
    assert_eq!(
        collect(&mut live, |g| g.len() >= 2).await,
        [Got::Event(2), Got::Event(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_broker_restart_before_the_first_event_replays_no_history() {
    let mut nats = Nats::single();
    let outbox = tempfile::tempdir().unwrap();
    let h1 = host_bus(&nats, "h1", outbox.path()).await;
    let (mut bus, mut gw) = gateway_bus(&nats, 0).await;
    wait_fleet_ready(&gw).await;
    // History the live subscription must never see.
    publish(
        &h1,
        vec![monitor("vm", "STOP", 1), monitor("vm", "STOP", 2)],
    )
    .await;
    let mut history = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            replay_held: true,
            ..Default::default()
        })
        .within()
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        collect(&mut history, |g| g.len() >= 2).await,
        [Got::Event(1), Got::Event(2)]
    );
    let mut live = gw
        .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
        .within()
        .await
        .unwrap()
        .into_inner();
    let first = live.message().within().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(MonitorKind::Established(_))));
    // The broker goes away before the subscription's first event: its
    // consumer is made again having delivered nothing.
    nats.nodes[0].stop(libc::SIGKILL);
    nats.nodes[0].start();
    nats.wait_ready();
    bus.wait_serving("qvirt.v1.EventBus").await;
    publish(&h1, vec![monitor("vm", "STOP", 3)]).await;
    assert_eq!(collect(&mut live, |g| !g.is_empty()).await, [Got::Event(3)]);
    assert_quiet(&mut live).await;
}
