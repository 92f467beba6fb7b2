//! `make bench`: events through the fleet path beside what users would
//! pick instead, measured in the same run on a real 3-node JetStream
//! cluster (R3 stream) on loopback:
//!
//! - qmp: a QMP event of a real QEMU guest (stop/cont through the
//!   supervisor) to a subscriber at a gateway in front of a fleet bus
//!   (host bus -> outbox -> JetStream -> ordered consumer -> fleet bus ->
//!   gateway), beside the same event at a single-host gateway in front of
//!   the host's own bus: both subscribers see the same events, so the
//!   two paths are timed from the same command;
//! - hop: one event published into the host bus (EventIngest, a
//!   long-lived stream as the supervisor keeps) to the subscriber at the
//!   fleet gateway, interleaved with a bare JetStream publish to the same
//!   stream read by an ordered pull consumer with the fleet bus's own
//!   settings (async-nats, the same client library): goal, qvirt's
//!   fleet path at most 1.5x the bare hop (median);
//! - rate: events/s sustained from the host bus to the fleet subscriber
//!   with loss counted, beside a bare publisher that waits for each ack
//!   (one in flight, as the host's forwarder does);
//! - list: `ListDomains` of 300 domains on 3 hosts (3 supervisors with
//!   `fleet:`) at a fleet gateway, answered from its registry view,
//!   beside what a client without the fleet does: ask the 3 supervisors
//!   one after the other and merge (interleaved rounds).
//!
//! Numbers are for this machine at this moment: read the ratios. Phases
//! can be picked by name: `cargo bench -p qvirt-integration-tests --bench
//! fleet -- hop` (also `qmp`, `rate`, `list`); none named: all.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures_util::StreamExt as _;
use qvirt_integration_tests::measure::percentile;
use qvirt_integration_tests::nats::{Nats, fleet_bus, fleet_supervisor};
use qvirt_integration_tests::stack::{
    BearerChannel, GatewayStack, StackOptions, backend_channel, bearer_channel, token_new,
};
use qvirt_integration_tests::{Service, define_yaml, internal, internal_channel, kill_domain_qemu};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, MonitorCommandRequest, MonitorEvent, PublishRequest, StartDomainRequest,
    SubscribeMonitorEventsRequest,
};
use tokio::sync::mpsc;

/// stop/cont round trips in the qmp phase.
const QMP_RUNS: usize = 40;
/// Events in the rate phase, per side.
const RATE_EVENTS: u64 = 10_000;
/// Domains per host in the list phase, and hosts.
const LIST_PER_HOST: usize = 100;
const LIST_HOSTS: usize = 3;
/// Rounds of the list phase.
const LIST_RUNS: usize = 40;
/// Bound on any one wait.
const WAIT: Duration = Duration::from_secs(60);
/// The stream the host bus makes.
const STREAM: &str = "QVIRT_EVENTS";

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// `name n=.. min .. median .. p99 .. max ..` in µs.
fn line(name: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let median = percentile(samples, 0.5);
    println!(
        "  {name:<48} n={:<4} min {:>8.1} µs  median {:>8.1} µs  p99 {:>8.1} µs  max {:>8.1} µs",
        samples.len(),
        us(samples[0]),
        us(median),
        us(percentile(samples, 0.99)),
        us(samples[samples.len() - 1]),
    );
    median
}

struct Fleet {
    nats: Nats,
    stack: GatewayStack,
    fleet_bus: Service,
    fleet_gw: Service,
    /// The fleet gateway's read-write token (the stack's gateway has its
    /// own).
    fleet_token: String,
    /// The bare path's publisher, on the server the host bus uses, and
    /// its consumer, on the fleet bus's: each bare message crosses the
    /// cluster as qvirt's events do.
    js_pub: jetstream::Context,
    js_sub: jetstream::Context,
    _outbox: tempfile::TempDir,
}

/// The server (index into the cluster) the host bus and the bare
/// publisher use, and the one the fleet bus and the bare consumer use.
const PUBLISH_NODE: usize = 0;
const CONSUME_NODE: usize = 1;

impl Fleet {
    async fn start() -> Fleet {
        let nats = Nats::cluster3();
        nats.wait_ready();
        let outbox = tempfile::tempdir().unwrap();
        let bus_yaml = format!(
            "nats:\n  urls: [{}]\n  token_file: {}\n  host: h1\n  replicas: 3\n  outbox_dir: {}\n",
            nats.urls()[PUBLISH_NODE],
            nats.token_file().display(),
            outbox.path().display()
        );
        let stack = GatewayStack::start_with(&StackOptions {
            bus_yaml,
            supervisor_args: vec!["--node-name".into(), "h1".into()],
            ..Default::default()
        })
        .await;
        let (mut fleet_bus, _) = fleet_bus(&nats, CONSUME_NODE).await;
        fleet_bus.wait_serving("qvirt.v1.EventBus").await;
        let rw = token_new("operator", "read-write");
        let yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: {}\ninternal_token_file: {}\nhealth_poll_ms: 200\ntokens:\n{}",
            stack.sup.url(),
            fleet_bus.url(),
            stack.agentd.url(),
            stack.dir.path().join("internal-token").display(),
            rw.entry
        );
        let mut fleet_gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        fleet_gw.wait_serving("qvirt.v1.EventBus").await;

        let js_pub = jetstream::new(nats.client_of(PUBLISH_NODE).await);
        let js_sub = jetstream::new(nats.client_of(CONSUME_NODE).await);
        Fleet {
            nats,
            stack,
            fleet_bus,
            fleet_gw,
            fleet_token: rw.token,
            js_pub,
            js_sub,
            _outbox: outbox,
        }
    }

    async fn single_channel(&self) -> BearerChannel {
        bearer_channel(&self.stack.gw.url(), Some(self.stack.bearer())).await
    }

    async fn fleet_channel(&self) -> BearerChannel {
        bearer_channel(
            &self.fleet_gw.url(),
            Some(qvirt_integration_tests::stack::bearer_value(
                &self.fleet_token,
            )),
        )
        .await
    }
}

/// A subscription's events as (event name, details, arrival) on a channel,
/// read by a task of its own so that arrival times are not skewed by the
/// other subscription.
async fn watch(
    channel: BearerChannel,
    request: SubscribeMonitorEventsRequest,
) -> mpsc::UnboundedReceiver<(String, String, Instant)> {
    let mut client = EventBusClient::new(channel);
    let mut stream = tokio::time::timeout(WAIT, client.subscribe_monitor_events(request))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Kind::Established(_))));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let sent = match m.kind {
                Some(Kind::Event(e)) => tx.send((e.event, e.details_json, Instant::now())),
                Some(Kind::Lost(l)) => panic!("events lost: {l:?}"),
                _ => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    });
    rx
}

async fn next_named(
    rx: &mut mpsc::UnboundedReceiver<(String, String, Instant)>,
    name: &str,
) -> (String, Instant) {
    loop {
        let (event, details, at) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {name} within {WAIT:?}"))
            .unwrap();
        if event == name {
            return (details, at);
        }
    }
}

async fn qmp(f: &Fleet) {
    // Commands go to the supervisor itself: only the events' paths differ.
    let mut sup = SupervisorClient::new(internal_channel(f.stack.sup.url()).await);
    define_yaml(&mut sup, "name: lat\nmemory_mib: 128\naccel: tcg\n".into())
        .await
        .unwrap();
    let request = SubscribeMonitorEventsRequest {
        domain: "lat".into(),
        ..Default::default()
    };
    let mut single = watch(f.single_channel().await, request.clone()).await;
    let mut fleet = watch(f.fleet_channel().await, request).await;
    let started = sup
        .start_domain(StartDomainRequest {
            domain: "lat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    struct Guard(u32, String);
    impl Drop for Guard {
        fn drop(&mut self) {
            kill_domain_qemu(self.0, &self.1);
        }
    }
    let _guest = Guard(started.pid, started.spec.unwrap().uuid);
    next_named(&mut single, "RESUME").await;
    next_named(&mut fleet, "RESUME").await;
    let (mut s, mut fl) = (Vec::new(), Vec::new());
    for _ in 0..QMP_RUNS {
        for (command, event) in [("stop", "STOP"), ("cont", "RESUME")] {
            let t0 = Instant::now();
            sup.monitor_command(MonitorCommandRequest {
                domain: "lat".into(),
                command_json: format!("{{\"execute\": \"{command}\"}}"),
                ..Default::default()
            })
            .await
            .unwrap();
            s.push(next_named(&mut single, event).await.1 - t0);
            fl.push(next_named(&mut fleet, event).await.1 - t0);
        }
    }
    sup.destroy_domain(DestroyDomainRequest {
        domain: "lat".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    println!("\nqmp: MonitorCommand stop/cont to the event at a gateway's subscriber");
    let single = line("single host (gateway -> host bus)", &mut s);
    let fleet = line("fleet (gateway -> fleet bus -> JetStream R3)", &mut fl);
    println!(
        "  fleet / single host: {:.2}x (median)",
        fleet.as_secs_f64() / single.as_secs_f64()
    );
}

/// A long-lived EventIngest stream into the host bus, as the supervisor
/// keeps one.
fn ingest(url: String) -> mpsc::UnboundedSender<PublishRequest> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut client = EventIngestClient::connect(url).await.unwrap();
        let reply = client
            .publish(internal(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            ))
            .await;
        reply.unwrap();
    });
    tx
}

fn bench_event(name: &str, details: String) -> PublishRequest {
    PublishRequest {
        event: Some(Event::MonitorEvent(MonitorEvent {
            domain_name: "bench".into(),
            event: name.into(),
            details_json: details,
            ..Default::default()
        })),
    }
}

/// An ordered pull consumer of the bare subjects with the fleet bus's
/// settings (pulls of 64, expiring after 5 s), from the stream's end.
/// Right after the cluster forms, making a consumer can time out while
/// the stream's replicas settle: it is tried again, as the fleet bus
/// does, for up to [`WAIT`].
async fn bare_consumer(js: &jetstream::Context) -> jetstream::consumer::pull::Ordered {
    let deadline = Instant::now() + WAIT;
    let stream = js.get_stream(STREAM).await.unwrap();
    let config = jetstream::consumer::pull::OrderedConfig {
        filter_subjects: vec!["qvirt.events.bare.>".into()],
        deliver_policy: jetstream::consumer::DeliverPolicy::New,
        max_batch: 64,
        max_expires: Duration::from_secs(5),
        ..Default::default()
    };
    loop {
        match stream.create_consumer(config.clone()).await {
            Ok(consumer) => return consumer.messages().await.unwrap(),
            Err(e) if Instant::now() < deadline => {
                eprintln!("bare consumer not made yet ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no bare consumer within {WAIT:?}: {e}"),
        }
    }
}

/// Rounds of the hop phase (after 2 to warm up), and events per path per
/// round.
const HOP_ROUNDS: usize = 12;
const HOP_PER_ROUND: usize = 25;

async fn hop(f: &Fleet) {
    // Each path gets events of its own name, so each measured event
    // reaches one subscriber only: the others' deliveries would otherwise
    // share the two cores with the one timed.
    let watched = |event: &str, host: &str| SubscribeMonitorEventsRequest {
        domain: "bench".into(),
        event: event.into(),
        host: host.into(),
        ..Default::default()
    };
    let mut fleet = watch(f.fleet_channel().await, watched("HOP", "h1")).await;
    // At the fleet bus itself, to show the gateway's share.
    let bus = backend_channel(&f.fleet_bus.url()).await;
    let mut at_bus = watch(bus, watched("HOPB", "h1")).await;
    // And at the host's own bus, where the event enters. (Locally the
    // events carry no host: the bus names its host only in what it
    // forwards.)
    let host = backend_channel(&f.stack.bus.url()).await;
    let mut at_host = watch(host, watched("HOPH", "")).await;
    let publish = ingest(f.stack.bus.url());
    let mut bare = Box::pin(bare_consumer(&f.js_sub).await);
    // Per path, per round: the samples.
    const PATHS: usize = 4;
    let mut rounds: Vec<[Vec<Duration>; PATHS]> = Vec::new();
    for round in 0..HOP_ROUNDS + 2 {
        let mut this: [Vec<Duration>; PATHS] = Default::default();
        for i in 0..HOP_PER_ROUND {
            // Rotate which path goes first.
            for k in 0..PATHS {
                let path = (i + k) % PATHS;
                let (name, rx) = match path {
                    0 => ("HOP", &mut fleet),
                    1 => ("HOPB", &mut at_bus),
                    2 => ("HOPH", &mut at_host),
                    _ => {
                        let t0 = Instant::now();
                        let ack = f
                            .js_pub
                            .publish("qvirt.events.bare.b.monitor.HOP", i.to_string().into())
                            .await
                            .unwrap();
                        tokio::time::timeout(WAIT, bare.next())
                            .await
                            .unwrap()
                            .unwrap()
                            .unwrap();
                        this[path].push(t0.elapsed());
                        ack.await.unwrap();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                };
                let t0 = Instant::now();
                publish
                    .send(bench_event(name, format!("{}", now_ns())))
                    .unwrap();
                let (_, at) = next_named(rx, name).await;
                this[path].push(at - t0);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if round >= 2 {
            rounds.push(this);
        }
    }
    let mut all: [Vec<Duration>; PATHS] = Default::default();
    for r in &rounds {
        for (p, samples) in r.iter().enumerate() {
            all[p].extend_from_slice(samples);
        }
    }
    println!(
        "\nhop: one event into a host, out at a fleet subscriber ({HOP_ROUNDS} interleaved rounds of {HOP_PER_ROUND} per path)"
    );
    let q = line(
        "qvirt (host bus -> R3 -> fleet bus -> gateway)",
        &mut all[0],
    );
    line("  the same at the fleet bus (no gateway)", &mut all[1]);
    let local = line("  the same at the host's bus (local delivery)", &mut all[2]);
    let b = line("bare JetStream (publish -> ordered consumer)", &mut all[3]);
    // Per round: the ratio of medians.
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        percentile(&v, 0.5).as_secs_f64()
    };
    let spread = |path: usize| {
        let mut ratios: Vec<f64> = rounds
            .iter()
            .map(|r| median(&r[path]) / median(&r[3]))
            .collect();
        ratios.sort_by(f64::total_cmp);
        (
            ratios[0],
            percentile(&ratios, 0.5),
            ratios[ratios.len() - 1],
        )
    };
    let (lo, mid, hi) = spread(0);
    println!(
        "  qvirt / bare, per round: min {lo:.2} / median {mid:.2} / max {hi:.2} (goal: at most 1.5)"
    );
    let (lo, mid, hi) = spread(1);
    println!("  at the fleet bus / bare, per round: min {lo:.2} / median {mid:.2} / max {hi:.2}");
    let added = q.saturating_sub(local);
    println!(
        "  what the fleet adds to the host's local delivery (median minus median): {:.1} µs, {:.2}x the bare hop",
        added.as_secs_f64() * 1e6,
        added.as_secs_f64() / b.as_secs_f64()
    );
}

async fn rate(f: &Fleet) {
    let request = SubscribeMonitorEventsRequest {
        domain: "bench".into(),
        event: "RATE".into(),
        host: "h1".into(),
        ..Default::default()
    };
    let mut fleet = watch(f.fleet_channel().await, request).await;
    let publish = ingest(f.stack.bus.url());
    let t0 = Instant::now();
    for i in 0..RATE_EVENTS {
        publish.send(bench_event("RATE", i.to_string())).unwrap();
    }
    let mut expected = 0u64;
    while expected < RATE_EVENTS {
        let (details, _) = next_named(&mut fleet, "RATE").await;
        assert_eq!(
            details,
            expected.to_string(),
            "an event missing or out of order"
        );
        expected += 1;
    }
    let ours = RATE_EVENTS as f64 / t0.elapsed().as_secs_f64();

    let mut bare = Box::pin(bare_consumer(&f.js_sub).await);
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..RATE_EVENTS {
            tokio::time::timeout(WAIT, bare.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    });
    for i in 0..RATE_EVENTS {
        f.js_pub
            .publish("qvirt.events.bare.b.monitor.RATE", i.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    reader.await.unwrap();
    let theirs = RATE_EVENTS as f64 / t0.elapsed().as_secs_f64();
    println!("\nrate: {RATE_EVENTS} events published flat out, all read at a fleet subscriber");
    println!(
        "  {:<48} {ours:>8.0} events/s, 0 lost, in order",
        "qvirt (host bus -> fleet gateway)"
    );
    println!(
        "  {:<48} {theirs:>8.0} events/s",
        "bare JetStream (one publish in flight)"
    );
    println!("  qvirt / bare: {:.2}x", ours / theirs);
}

async fn list(f: &Fleet) {
    let dir = tempfile::tempdir().unwrap();
    let mut sups = Vec::new();
    for h in 1..=LIST_HOSTS {
        let sup = fleet_supervisor(&f.nats, dir.path(), &format!("lh{h}"), "  replicas: 3\n").await;
        let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
        for i in 0..LIST_PER_HOST {
            define_yaml(&mut client, format!("name: lh{h}-{i:03}\naccel: tcg\n"))
                .await
                .unwrap();
        }
        sups.push((sup, client));
    }
    let rw = token_new("operator", "read-write");
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir(&gw_dir).unwrap();
    let yaml = format!(
        "fleet:\n  urls: [{}]\n  token_file: {}\neventbus: http://127.0.0.1:{}\n\
         internal_token_file: {}\ntokens:\n{}",
        f.nats.urls().join(", "),
        f.nats.token_file().display(),
        qvirt_integration_tests::free_port(),
        qvirt_integration_tests::write_internal_token(&gw_dir).display(),
        rw.entry
    );
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
    gw.wait_serving("qvirt.v1.Supervisor").await;
    let mut fleet = SupervisorClient::new(
        bearer_channel(
            &gw.url(),
            Some(qvirt_integration_tests::stack::bearer_value(&rw.token)),
        )
        .await,
    );
    let whole = qvirt_proto::v1::ListDomainsRequest {
        page_size: 1000,
        ..Default::default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let n = fleet
            .list_domains(whole.clone())
            .await
            .unwrap()
            .into_inner()
            .domains
            .len();
        if n == LIST_HOSTS * LIST_PER_HOST {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet lists {n} domains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..LIST_RUNS {
        let t0 = Instant::now();
        let got = fleet
            .list_domains(whole.clone())
            .await
            .unwrap()
            .into_inner();
        ours.push(t0.elapsed());
        assert_eq!(got.domains.len(), LIST_HOSTS * LIST_PER_HOST);

        let t0 = Instant::now();
        let mut all = Vec::new();
        for (_, client) in &mut sups {
            all.extend(
                client
                    .list_domains(whole.clone())
                    .await
                    .unwrap()
                    .into_inner()
                    .domains,
            );
        }
        all.sort_by(|a, b| {
            let name = |d: &qvirt_proto::v1::Domain| d.spec.as_ref().map(|s| s.name.clone());
            name(a).cmp(&name(b))
        });
        theirs.push(t0.elapsed());
        assert_eq!(all.len(), LIST_HOSTS * LIST_PER_HOST);
    }
    println!(
        "\nlist: ListDomains of {} domains on {LIST_HOSTS} hosts (interleaved)",
        LIST_HOSTS * LIST_PER_HOST
    );
    let q = line("fleet gateway (from its registry view)", &mut ours);
    let b = line("each host's supervisor in turn, merged", &mut theirs);
    println!(
        "  fleet / per host: {:.2}x (median)",
        q.as_secs_f64() / b.as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let f = Fleet::start().await;
        println!("fleet: 3 nats-server (JetStream, R3 stream), one host, two gateways, loopback");
        if run("qmp") {
            qmp(&f).await;
        }
        if run("hop") {
            hop(&f).await;
        }
        if run("rate") {
            rate(&f).await;
        }
        if run("list") {
            list(&f).await;
        }
    });
}
