//! `make bench`: the event bus end to end (the real `qvirt-eventbus`
//! binary over loopback gRPC) beside its reference, the same work done by
//! a direct call into the in-process hub, measured in the same run.
//!
//! Prints one table: throughput (1 publisher, 1 subscriber), fan-out to
//! 1,000 filtered subscribers (half matching) at a fixed publish rate with
//! publish-to-deliver latency, and the bus's RSS with 10,000 idle
//! subscriptions. Numbers are for this machine at this moment: read the
//! ratios, not the absolutes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qvirt_eventbus::hub::{Hub, HubConfig, SubscribeOptions, SubscriptionItem};
use qvirt_integration_tests::{Service, rss_kib};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
use qvirt_proto::v1::{MonitorEvent, PublishRequest, SubscribeMonitorEventsRequest};
use tonic::transport::Channel;

const THROUGHPUT_EVENTS: u64 = 200_000;
const FANOUT_SUBSCRIBERS: usize = 1000;
const FANOUT_RATE: u64 = 10_000;
const FANOUT_SECONDS: u64 = 2;
const IDLE_SUBSCRIPTIONS: usize = 10_000;
/// Streams per HTTP/2 connection when opening many subscriptions.
const STREAMS_PER_CONNECTION: usize = 100;

const CONFIG: &str = "queue_capacity: 65536\nmax_monitor_subscriptions: 100000\nmax_monitor_subscriptions_per_principal: 100000\n";

fn event(name: &str, details: String) -> Event {
    Event::MonitorEvent(MonitorEvent {
        host: "bench".into(),
        domain_name: "vm".into(),
        domain_uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
        event: name.into(),
        timestamp_seconds: 1,
        timestamp_microseconds: 2,
        details_json: details,
        ..Default::default()
    })
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn subscribe(
    client: &mut EventBusClient<Channel>,
    filter: &str,
) -> tonic::Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse> {
    let mut s = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            event: filter.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Kind::Established(_))));
    s
}

/// Events/s delivered from one publisher stream (publishing flat out) to
/// one subscriber over gRPC, and how many the subscriber lost.
async fn grpc_throughput(url: &str) -> (f64, u64) {
    // Publisher and subscriber on their own connections, as the supervisor
    // and a client would be.
    let mut sub_client = EventBusClient::connect(url.to_owned()).await.unwrap();
    let mut client = EventBusClient::connect(url.to_owned()).await.unwrap();
    let mut sub = subscribe(&mut sub_client, "").await;
    let reader = tokio::spawn(async move {
        let mut lost = 0u64;
        loop {
            match sub.message().await.unwrap().unwrap().kind {
                Some(Kind::Event(e)) if e.details_json == "\"END\"" => break,
                Some(Kind::Event(_)) => {}
                Some(Kind::Lost(l)) => lost += l.count,
                other => panic!("unexpected {other:?}"),
            }
        }
        lost
    });
    let start = Instant::now();
    let reqs = (0..THROUGHPUT_EVENTS).map(|_| PublishRequest {
        event: Some(event("E", "{}".into())),
    });
    client.publish(tokio_stream::iter(reqs)).await.unwrap();
    let lost = finish(&mut client, "E", reader).await;
    (
        (THROUGHPUT_EVENTS - lost) as f64 / start.elapsed().as_secs_f64(),
        lost,
    )
}

/// Bound on one phase of the bench: a phase that stalls ends the bench
/// with a message instead of hanging `make bench`.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

async fn bounded<T>(phase: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PHASE_TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => {
            eprintln!("event bus bench: the {phase} phase did not finish within {PHASE_TIMEOUT:?}");
            std::process::exit(1);
        }
    }
}

/// Waits for `reader` while publishing an END marker every 50 ms: losses
/// are reported before the next event a subscriber gets, so a reader that
/// lost the tail of a burst learns it only from a later event.
async fn finish<T>(
    client: &mut EventBusClient<Channel>,
    name: &str,
    reader: tokio::task::JoinHandle<T>,
) -> T {
    let mut reader = reader;
    loop {
        let end = PublishRequest {
            event: Some(event(name, "\"END\"".into())),
        };
        client.publish(tokio_stream::iter([end])).await.unwrap();
        tokio::select! {
            r = &mut reader => return r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The same through the hub in-process: the direct backend call.
async fn hub_throughput() -> f64 {
    let hub: Hub<Event> = Hub::new(HubConfig {
        queue_capacity: 65536,
        ..Default::default()
    })
    .unwrap();
    let mut sub = hub
        .subscribe(SubscribeOptions::default(), |_| true)
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < THROUGHPUT_EVENTS {
            if let SubscriptionItem::Event(_) = sub.recv().await.unwrap() {
                n += 1;
            }
        }
    });
    let start = Instant::now();
    for i in 1..=THROUGHPUT_EVENTS {
        hub.publish(event("E", "{}".into()));
        if i.is_multiple_of(4096) {
            tokio::task::yield_now().await;
        }
    }
    reader.await.unwrap();
    THROUGHPUT_EVENTS as f64 / start.elapsed().as_secs_f64()
}

struct FanOut {
    delivered_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    lost: u64,
}

/// 1,000 subscribers (half on "MATCH", half on "NEVER"), one publisher at
/// FANOUT_RATE events/s; latency = deliver time - the send time carried in
/// the event.
async fn grpc_fanout(url: &str) -> FanOut {
    let total = FANOUT_RATE * FANOUT_SECONDS;
    let mut readers = Vec::new();
    let mut clients = Vec::new();
    for i in 0..FANOUT_SUBSCRIBERS {
        if i % STREAMS_PER_CONNECTION == 0 {
            clients.push(EventBusClient::connect(url.to_owned()).await.unwrap());
        }
        let client = clients.last_mut().unwrap();
        let matching = i % 2 == 0;
        let mut s = subscribe(client, if matching { "MATCH" } else { "NEVER" }).await;
        if matching {
            readers.push(tokio::spawn(async move {
                let (mut lat, mut lost) = (Vec::with_capacity(total as usize), 0u64);
                loop {
                    match s.message().await.unwrap().unwrap().kind {
                        Some(Kind::Event(e)) if e.details_json == "\"END\"" => break,
                        Some(Kind::Event(e)) => {
                            let sent: u128 = e.details_json.parse().unwrap();
                            lat.push(((now_ns() - sent) / 1000) as u64);
                        }
                        Some(Kind::Lost(l)) => lost += l.count,
                        _ => {}
                    }
                }
                (lat, lost)
            }));
        } else {
            // Keep the stream open and idle.
            tokio::spawn(async move { while let Ok(Some(_)) = s.message().await {} });
        }
    }
    let mut publisher = EventBusClient::connect(url.to_owned()).await.unwrap();
    let mut streamer = publisher.clone();
    let start = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let send = tokio::spawn(async move {
        streamer
            .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
    });
    let tick = Duration::from_secs(1) / (FANOUT_RATE / 100) as u32;
    let mut interval = tokio::time::interval(tick);
    let mut sent = 0;
    while sent < total {
        interval.tick().await;
        for _ in 0..100 {
            tx.send(PublishRequest {
                event: Some(event("MATCH", now_ns().to_string())),
            })
            .await
            .unwrap();
            sent += 1;
        }
    }
    drop(tx);
    send.await.unwrap();
    let (mut all, mut lost) = (Vec::new(), 0);
    for r in readers {
        let (l, x) = finish(&mut publisher, "MATCH", r).await;
        all.extend(l);
        lost += x;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    FanOut {
        delivered_per_s: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        lost,
    }
}

/// RSS of the bus before and with IDLE_SUBSCRIPTIONS open, and after they
/// are dropped.
async fn idle_rss(svc: &Service) -> (u64, u64, u64) {
    let before = rss_kib(svc.pid());
    let mut streams = Vec::new();
    let mut client = None;
    for i in 0..IDLE_SUBSCRIPTIONS {
        if i % STREAMS_PER_CONNECTION == 0 {
            client = Some(EventBusClient::connect(svc.url()).await.unwrap());
        }
        streams.push(subscribe(client.as_mut().unwrap(), "IDLE").await);
    }
    let with = rss_kib(svc.pid());
    drop(streams);
    drop(client);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(svc.pid());
    (before, with, after)
}

#[tokio::main]
async fn main() {
    let mut svc = Service::start_with_config("qvirt-eventbus", CONFIG, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    let url = svc.url();

    let (grpc, grpc_lost) = bounded("throughput", grpc_throughput(&url)).await;
    let direct = bounded("direct hub", hub_throughput()).await;
    let fan = bounded("fan-out", grpc_fanout(&url)).await;
    drop(svc);
    // A fresh bus with default queues, so the figure is about subscriptions.
    let mut idle = Service::start_with_config(
        "qvirt-eventbus",
        "max_monitor_subscriptions: 100000\nmax_monitor_subscriptions_per_principal: 100000\n",
        &[],
    );
    idle.wait_serving("qvirt.v1.EventBus").await;
    let (before, with, after) = bounded("idle RSS", idle_rss(&idle)).await;

    println!("\nevent bus (qvirt-eventbus over loopback gRPC vs the hub called in-process)");
    println!(
        "  throughput, 1 publisher -> 1 subscriber: {grpc:.0} events/s delivered, {grpc_lost} of {THROUGHPUT_EVENTS} lost to a full queue (direct hub: {direct:.0}/s, ratio {:.2}; target >= 200000/s)",
        grpc / direct
    );
    println!(
        "  fan-out, {FANOUT_SUBSCRIBERS} subscribers (half match) at {FANOUT_RATE}/s: delivered {:.0}/s, publish->deliver p50 {} us, p99 {} us (target p99 < 5000 us), lost {}",
        fan.delivered_per_s, fan.p50_us, fan.p99_us, fan.lost
    );
    println!(
        "  RSS: {:.1} MiB idle, {:.1} MiB with {IDLE_SUBSCRIPTIONS} idle subscriptions (target < 64 MiB), {:.1} MiB after dropping them",
        before as f64 / 1024.0,
        with as f64 / 1024.0,
        after as f64 / 1024.0
    );
}
