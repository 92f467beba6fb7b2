//! `make bench`: what the gateway adds, beside nginx as a gRPC reverse
//! proxy (`grpc_pass`, the proxy an operator would otherwise put in
//! front), both in front of the same real backends in the same run:
//!
//! - unary: `GetDomain` (a 510-byte answer, as a booted guest's) direct
//!   to the supervisor, through nginx, and through the real
//!   `qvirt-gateway` with a bearer token (auth, rate limits and the audit
//!   file on), in interleaved rounds; p50 and p99 per
//!   round, what each proxy adds to the direct call, the gateway's added
//!   latency over nginx's as a ratio (goal: at most 1), and each proxy's
//!   CPU per call (from its threads' schedstat over its own rounds);
//! - a server stream: monitor events published to the bus, read by one
//!   subscriber direct from the bus, through nginx and through the gateway
//!   (goal: the gateway at least 0.9x direct);
//! - memory: the gateway's RSS per idle forwarded `SubscribeDomainEvents`
//!   stream (and nginx's, for reference).
//!
//! Numbers are for this machine at this moment: read the ratios. Needs
//! nginx (`bash scripts/bench-deps.sh`; `make bench` runs it). Phases can
//! be picked by name: `cargo bench -p qvirt-integration-tests --bench
//! gateway -- unary` (also `stream`, `idle`); none named: all.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use qvirt_integration_tests::measure::{cpu_ns, percentile, steal_percent, steal_ticks};
use qvirt_integration_tests::stack::{
    BearerChannel, GatewayStack, Nginx, StackOptions, backend_channel, bearer_channel,
};
use qvirt_integration_tests::{define_yaml, internal, internal_channel, rss_kib};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_domain_events_response::Kind as DomainKind;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    GetDomainRequest, MonitorEvent, PublishRequest, SubscribeDomainEventsRequest,
    SubscribeMonitorEventsRequest,
};
use tonic::transport::Channel;

/// The domain the unary phase reads: its `GetDomain` answer is 510
/// bytes, about what a booted guest's is (kernel, initrd and command line
/// paths; here metadata of the same size, which needs no files).
const BENCH_DOMAIN: &str = "name: bench\nmemory_mib: 128\naccel: tcg\nmetadata:\n  \
    owner: platform-team\n  tenant: acme-production-eu-west\n  ticket: OPS-12345\n  \
    purpose: a guest with the metadata an orchestrator keeps\n  \
    kernel: /var/lib/qvirt/images/vmlinuz-6.1.0-28-amd64\n  \
    initrd: /var/lib/qvirt/images/initrd.img-6.1.0-28-amd64\n  \
    cmdline: console=ttyS0 root=/dev/vda1 ro quiet panic=-1\n";

/// Interleaved rounds of unary calls, and calls per path per round.
const UNARY_ROUNDS: usize = 9;
const CALLS_PER_ROUND: usize = 500;
const WARMUP_CALLS: usize = 300;
/// Interleaved rounds of the stream phase, and events per path per round
/// (fewer than the bus's queue holds: a slow path is measured as slow,
/// never as lossy).
const STREAM_ROUNDS: usize = 5;
const STREAM_EVENTS: u64 = 60_000;
/// Idle streams opened through each proxy, 100 per client connection.
const IDLE_STREAMS: usize = 1000;
const STREAMS_PER_CONNECTION: usize = 100;
/// Bound on one phase: a stall ends the bench with a message.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

const BUS_CONFIG: &str = "queue_capacity: 65536\nqueue_max_bytes: 67108864\n\
    max_monitor_subscriptions: 100000\nmax_monitor_subscriptions_per_principal: 100000\n\
    max_domain_subscriptions: 100000\nmax_domain_subscriptions_per_principal: 100000\n";
/// High enough that no limit is reached; each is still checked per call.
const GATEWAY_LIMITS: &str = "  calls_per_second: 1000000\n  max_streams_per_principal: 100000\n  \
    max_monitor_subscriptions_per_principal: 1000\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    Nginx,
    Gateway,
}

const ALL: [Via; 3] = [Via::Direct, Via::Nginx, Via::Gateway];

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Nginx => "nginx",
            Via::Gateway => "gateway",
        }
    }
}

/// The three paths in round `r`'s order: each path takes each place in
/// turn, so drift in the machine's load hits all alike.
fn order(r: usize) -> [Via; 3] {
    let mut o = ALL;
    o.rotate_left(r % 3);
    o
}

struct Bench {
    stack: GatewayStack,
    nginx: Nginx,
}

impl Bench {
    /// Where a path's client connects, and with which token.
    async fn channel(&self, via: Via, backend: &str) -> BearerChannel {
        match via {
            Via::Direct => backend_channel(backend).await,
            // nginx passes the internal token on, as it would have to.
            Via::Nginx => backend_channel(&self.nginx.url()).await,
            Via::Gateway => bearer_channel(&self.stack.gw.url(), Some(self.stack.bearer())).await,
        }
    }

    /// CPU the proxy of `via` has used so far, ns (0 for direct).
    fn proxy_cpu(&self, via: Via) -> u64 {
        match via {
            Via::Direct => 0,
            Via::Nginx => self.nginx.pids().into_iter().map(cpu_ns).sum(),
            Via::Gateway => cpu_ns(self.stack.gw.pid()),
        }
    }

    fn proxy_rss_kib(&self, via: Via) -> u64 {
        match via {
            Via::Direct => rss_kib(self.stack.bus.pid()),
            Via::Nginx => self.nginx.pids().into_iter().map(rss_kib).sum(),
            Via::Gateway => rss_kib(self.stack.gw.pid()),
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `min / median / max` of `v`, each with `decimals` decimals.
fn mmm(mut v: Vec<f64>, decimals: usize) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.decimals$} / {:.decimals$} / {:.decimals$}",
        v[0],
        percentile(&v, 0.5),
        v[v.len() - 1]
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

async fn bounded<T>(phase: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PHASE_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            panic!("gateway bench: {phase} did not finish within {PHASE_TIMEOUT:?}")
        })
}

async fn get_calls(client: &mut SupervisorClient<BearerChannel>, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let reply = client
            .get_domain(GetDomainRequest {
                domain: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        samples.push(t.elapsed());
        assert!(reply.into_inner().domain.is_some());
    }
    samples
}

/// p50 and p99 per round and path, and each proxy's CPU per call.
async fn unary(b: &Bench) {
    let sup_url = b.stack.sup.url();
    let mut clients = Vec::new();
    for via in ALL {
        let mut c = SupervisorClient::new(b.channel(via, &sup_url).await);
        get_calls(&mut c, WARMUP_CALLS).await;
        clients.push(c);
    }
    // [via][round] -> (p50, p99) in µs; proxy CPU per call per round.
    let mut p = vec![Vec::new(); 3];
    let mut cpu = vec![Vec::new(); 3];
    for r in 0..UNARY_ROUNDS {
        for via in order(r) {
            let i = via as usize;
            let before = b.proxy_cpu(via);
            let mut samples = get_calls(&mut clients[i], CALLS_PER_ROUND).await;
            let used = b.proxy_cpu(via) - before;
            samples.sort();
            p[i].push((
                us(percentile(&samples, 0.5)),
                us(percentile(&samples, 0.99)),
            ));
            cpu[i].push(used as f64 / 1e3 / CALLS_PER_ROUND as f64);
        }
    }
    println!(
        "\nunary GetDomain, {UNARY_ROUNDS} interleaved rounds of {CALLS_PER_ROUND} calls per path, one client, one call at a time (min / median / max over rounds)"
    );
    for via in ALL {
        let i = via as usize;
        println!(
            "  {:<8} p50 {} µs   p99 {} µs",
            via.name(),
            mmm(p[i].iter().map(|x| x.0).collect(), 1),
            mmm(p[i].iter().map(|x| x.1).collect(), 1),
        );
    }
    let added = |via: Via, q: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        (0..UNARY_ROUNDS)
            .map(|r| q(&p[via as usize][r]) - q(&p[0][r]))
            .collect()
    };
    let p50 = |x: &(f64, f64)| x.0;
    let p99 = |x: &(f64, f64)| x.1;
    for via in [Via::Nginx, Via::Gateway] {
        println!(
            "  {} adds: p50 {} µs   p99 {} µs",
            via.name(),
            mmm(added(via, p50), 1),
            mmm(added(via, p99), 1),
        );
    }
    let ratio = |q: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        let (g, n) = (added(Via::Gateway, q), added(Via::Nginx, q));
        g.iter().zip(&n).map(|(g, n)| g / n).collect()
    };
    // Per round, and of the medians over rounds: a round where nginx
    // added almost nothing makes its own ratio large, the median less so.
    let of_medians =
        |q: fn(&(f64, f64)) -> f64| median(added(Via::Gateway, q)) / median(added(Via::Nginx, q));
    println!(
        "  gateway's added latency / nginx's: p50 {:.2} (per round {})   p99 {:.2} (per round {})   goal <= 1",
        of_medians(p50),
        mmm(ratio(p50), 2),
        of_medians(p99),
        mmm(ratio(p99), 2),
    );
    let (g, n) = (&cpu[Via::Gateway as usize], &cpu[Via::Nginx as usize]);
    println!(
        "  proxy CPU per call: gateway {} µs, nginx {} µs, ratio {}",
        mmm(g.clone(), 1),
        mmm(n.clone(), 1),
        mmm(g.iter().zip(n).map(|(g, n)| g / n).collect(), 2),
    );
}

fn event(name: &str, details: &str) -> Event {
    Event::MonitorEvent(MonitorEvent {
        host: "bench".into(),
        domain_name: "vm".into(),
        domain_uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
        event: name.into(),
        timestamp_seconds: 1,
        timestamp_microseconds: 2,
        details_json: details.into(),
        ..Default::default()
    })
}

/// Events/s from the bus's publisher to one subscriber reached `via`,
/// events lost, and the proxy's CPU per 1,000 events (µs).
async fn stream_once(
    b: &Bench,
    via: Via,
    publisher: &mut EventIngestClient<Channel>,
    name: &str,
) -> (f64, u64, f64) {
    let mut client = EventBusClient::new(b.channel(via, &b.stack.bus.url()).await);
    let mut sub = client
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            event: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = sub.message().await.unwrap().unwrap();
    assert!(
        matches!(first.kind, Some(Kind::Established(_))),
        "{first:?}"
    );
    let reader = tokio::spawn(async move {
        let (mut n, mut lost) = (0u64, 0u64);
        loop {
            match sub.message().await.unwrap().unwrap().kind {
                Some(Kind::Event(e)) if e.details_json == "\"END\"" => break,
                Some(Kind::Event(_)) => n += 1,
                Some(Kind::Lost(l)) => lost += l.count,
                other => panic!("unexpected {other:?}"),
            }
        }
        (n, lost, Instant::now())
    });
    let cpu_before = b.proxy_cpu(via);
    let start = Instant::now();
    let owned = name.to_owned();
    let reqs = (0..STREAM_EVENTS).map(move |_| PublishRequest {
        event: Some(event(&owned, "{}")),
    });
    publisher
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .unwrap();
    // The END marker, again every 50 ms until the reader has it (a reader
    // that lost the tail learns it only from a later event).
    let mut reader = reader;
    let (n, lost, end) = loop {
        publisher
            .publish(internal(tokio_stream::iter([PublishRequest {
                event: Some(event(name, "\"END\"")),
            }])))
            .await
            .unwrap();
        tokio::select! {
            r = &mut reader => break r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    let cpu = b.proxy_cpu(via) - cpu_before;
    (
        n as f64 / (end - start).as_secs_f64(),
        lost,
        cpu as f64 / 1e3 / (n.max(1) as f64 / 1e3),
    )
}

async fn stream(b: &Bench) {
    let mut publisher = EventIngestClient::connect(b.stack.bus.url()).await.unwrap();
    // Warm-up: one short run per path.
    let mut rates = vec![Vec::new(); 3];
    let mut cpu = vec![Vec::new(); 3];
    let mut lost_total = [0u64; 3];
    for via in ALL {
        stream_once(b, via, &mut publisher, &format!("W{}", via as usize)).await;
    }
    for r in 0..STREAM_ROUNDS {
        for via in order(r) {
            let (rate, lost, per_k) =
                stream_once(b, via, &mut publisher, &format!("E{r}-{}", via.name())).await;
            rates[via as usize].push(rate);
            cpu[via as usize].push(per_k);
            lost_total[via as usize] += lost;
        }
    }
    println!(
        "\nserver stream: {STREAM_EVENTS} monitor events published to the bus as fast as it takes them, one subscriber, {STREAM_ROUNDS} interleaved rounds (min / median / max)"
    );
    for via in ALL {
        let i = via as usize;
        println!(
            "  {:<8} {} k events/s  ({} lost)",
            via.name(),
            mmm(rates[i].iter().map(|x| x / 1e3).collect(), 0),
            lost_total[i],
        );
    }
    for via in [Via::Nginx, Via::Gateway] {
        let i = via as usize;
        let ratio: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(x, d)| x / d).collect();
        let goal = if via == Via::Gateway {
            "   (goal >= 0.9)"
        } else {
            ""
        };
        println!(
            "  {} / direct: {}{goal};  its CPU per 1,000 events {} µs",
            via.name(),
            mmm(ratio, 2),
            mmm(cpu[i].clone(), 0),
        );
    }
}

/// RSS per idle `SubscribeDomainEvents` stream held open through `via`.
async fn idle_once(b: &Bench, via: Via) -> (f64, u64) {
    let rss_before = b.proxy_rss_kib(via);
    let mut streams = Vec::with_capacity(IDLE_STREAMS);
    let mut clients = Vec::new();
    for i in 0..IDLE_STREAMS {
        if i % STREAMS_PER_CONNECTION == 0 {
            clients.push(EventBusClient::new(
                b.channel(via, &b.stack.bus.url()).await,
            ));
        }
        let c = clients.last_mut().unwrap();
        let mut s = c
            .subscribe_domain_events(SubscribeDomainEventsRequest {
                domain: format!("idle-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(DomainKind::Established(_))));
        streams.push(s);
    }
    // Let allocations settle (HTTP/2 windows, timers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = b.proxy_rss_kib(via);
    let per = (rss_after as f64 - rss_before as f64) / IDLE_STREAMS as f64;
    drop(streams);
    drop(clients);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (per, rss_after)
}

async fn idle(b: &Bench) {
    println!(
        "\nidle forwarded streams: {IDLE_STREAMS} SubscribeDomainEvents held open, {STREAMS_PER_CONNECTION} per client connection"
    );
    for via in [Via::Gateway, Via::Nginx] {
        let (per, total) = idle_once(b, via).await;
        println!(
            "  {:<8} RSS {:+.1} KiB per stream ({:.1} MiB with them open)",
            via.name(),
            per,
            total as f64 / 1024.0
        );
    }
}

#[tokio::main]
async fn main() {
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |phase: &str| picked.is_empty() || picked.iter().any(|p| p == phase);
    let stack = GatewayStack::start_with(&StackOptions {
        bus_yaml: BUS_CONFIG.into(),
        gateway_limits_yaml: GATEWAY_LIMITS.into(),
        ..Default::default()
    })
    .await;
    let nginx = Nginx::start(&[
        ("qvirt.v1.Supervisor", stack.sup.url()),
        ("qvirt.v1.EventBus", stack.bus.url()),
    ]);
    let mut sup = SupervisorClient::new(internal_channel(stack.sup.url()).await);
    define_yaml(&mut sup, BENCH_DOMAIN.into()).await.unwrap();
    let b = Bench { stack, nginx };
    println!(
        "\ngateway (qvirt-gateway, bearer token, audit file on) vs nginx {} (grpc_pass, upstream keepalive, no access log) vs direct",
        nginx_version()
    );
    let steal = steal_ticks();
    // Idle streams first, while the gateway's heap has not yet grown for
    // the busier phases (memory it frees, it keeps, and would reuse).
    if run("idle") {
        bounded("the idle-stream phase", idle(&b)).await;
    }
    if run("unary") {
        bounded("the unary phase", unary(&b)).await;
    }
    if run("stream") {
        bounded("the stream phase", stream(&b)).await;
    }
    println!(
        "\n  CPU stolen by the hypervisor meanwhile: {:.1}%",
        steal_percent(steal, steal_ticks())
    );
    let audited = std::fs::read_to_string(&b.stack.audit)
        .unwrap_or_default()
        .lines()
        .count();
    println!("  audit lines written: {audited} (reads are not audited)");
}

fn nginx_version() -> String {
    let out = qvirt_integration_tests::run(
        &qvirt_integration_tests::stack::nginx_path(),
        &["-v"],
        Duration::from_secs(10),
    );
    let text = qvirt_integration_tests::text(&out.stderr);
    text.trim().rsplit('/').next().unwrap_or("").to_owned()
}
