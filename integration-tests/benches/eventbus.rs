//! `make bench`: the event bus end to end (the real `qvirt-eventbus`
//! binary over loopback gRPC) beside its reference, the same work done by
//! a direct call into the in-process hub, measured in the same run.
//!
//! Prints one table: throughput (1 publisher, 1 subscriber), fan-out to
//! 1,000 filtered subscribers (half matching) at a fixed publish rate with
//! publish-to-deliver latency (at the target rate and at a rate this
//! machine can carry), the bus's RSS with 10,000 idle subscriptions, and a
//! QMP event of a real QEMU guest through the supervisor and the bus to a
//! gRPC subscriber beside the same event read straight from a bare QEMU's
//! QMP socket. Numbers are for this machine at this moment: read the
//! ratios, not the absolutes.
//!
//! Phases can be picked by name: `cargo bench -p qvirt-integration-tests
//! --bench eventbus -- fan-out` (also `throughput`, `idle-rss`,
//! `qmp-latency`); none named: all.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "eventbus/lean.rs"]
mod lean;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qvirt_eventbus::hub::{Caps, Hub, HubConfig, SubscribeOptions, SubscriptionItem};
use qvirt_integration_tests::measure::{Spread, cpu_ns, percentile};
use qvirt_integration_tests::reference::MachineSpeed;
use qvirt_integration_tests::{
    ChildGuard, InternalChannel, Service, define_yaml, internal, internal_channel,
    kill_domain_qemu, rss_kib, start_supervisor, tool_path,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, MonitorCommandRequest, MonitorEvent, PublishRequest, StartDomainRequest,
    SubscribeMonitorEventsRequest,
};
use tonic::transport::Channel;

use lean::Delivery;

const THROUGHPUT_EVENTS: u64 = 200_000;
const FANOUT_SUBSCRIBERS: usize = 1000;
const FANOUT_RATE: u64 = 10_000;
/// Lower rates, so the bus's own latency shows where the machine (shared
/// with the bench's 1,000 clients) can carry the load.
const FANOUT_LOW_RATES: [u64; 2] = [1_000, 100];
const FANOUT_SECONDS: u64 = 2;
/// stop/cont round trips per side in the QMP latency phase.
const QMP_RUNS: usize = 40;
const IDLE_SUBSCRIPTIONS: usize = 10_000;
/// Streams per HTTP/2 connection when opening many subscriptions.
const STREAMS_PER_CONNECTION: usize = 100;

const CONFIG: &str = "queue_capacity: 65536\nqueue_max_bytes: 67108864\nmax_monitor_subscriptions: 100000\nmax_monitor_subscriptions_per_principal: 100000\n";

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

fn now_ns() -> u64 {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    u64::try_from(ns).unwrap()
}

async fn subscribe(
    client: &mut EventBusClient<InternalChannel>,
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
    let mut sub_client = EventBusClient::new(internal_channel(url.to_owned()).await);
    let mut client = EventIngestClient::connect(url.to_owned()).await.unwrap();
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
    client
        .publish(internal(tokio_stream::iter(reqs)))
        .await
        .unwrap();
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
        // A panic, not an exit: unwinding drops the phase's services and
        // QEMU guards, which kill their processes by pid.
        Err(_) => {
            panic!("event bus bench: the {phase} phase did not finish within {PHASE_TIMEOUT:?}")
        }
    }
}

/// Waits for `reader` while publishing an END marker every 50 ms: losses
/// are reported before the next event a subscriber gets, so a reader that
/// lost the tail of a burst learns it only from a later event.
async fn finish<T>(
    client: &mut EventIngestClient<Channel>,
    name: &str,
    reader: tokio::task::JoinHandle<T>,
) -> T {
    let mut reader = reader;
    loop {
        let end = PublishRequest {
            event: Some(event(name, "\"END\"".into())),
        };
        client
            .publish(internal(tokio_stream::iter([end])))
            .await
            .unwrap();
        tokio::select! {
            r = &mut reader => return r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The same through the hub in-process: the direct backend call.
async fn hub_throughput() -> (f64, u64) {
    // A queue that holds the whole run: in-process, the publisher can run
    // ahead of the reader by more than the bus's queue (it lost thousands
    // with 65,536), and a reference that drops events is no reference.
    let hub: Hub<Event> = Hub::new(HubConfig {
        queue_capacity: THROUGHPUT_EVENTS as usize,
        ..Default::default()
    })
    .unwrap();
    let mut sub = hub
        .subscribe(SubscribeOptions::default(), |_| true)
        .unwrap();
    // Counts losses too: a reader that falls a queue behind the publisher
    // would otherwise wait for events that are gone.
    let reader = tokio::spawn(async move {
        let (mut n, mut lost) = (0u64, 0u64);
        while n + lost < THROUGHPUT_EVENTS {
            match sub.recv().await.unwrap() {
                SubscriptionItem::Event(_) => n += 1,
                SubscriptionItem::Lost { count, .. } => lost += count,
                SubscriptionItem::Established { .. } => {}
            }
        }
        lost
    });
    let start = Instant::now();
    for i in 1..=THROUGHPUT_EVENTS {
        hub.publish(event("E", "{}".into()));
        if i.is_multiple_of(4096) {
            tokio::task::yield_now().await;
        }
    }
    let lost = reader.await.unwrap();
    (
        (THROUGHPUT_EVENTS - lost) as f64 / start.elapsed().as_secs_f64(),
        lost,
    )
}

/// How a fan-out publisher paces `rate` events/s: `per_tick` events every
/// `tick`, a tick of 1 ms (tokio's timer resolution) or longer. A publisher
/// of 10k/s sends 10 events a millisecond, as QEMU guests' events would
/// arrive (one at a time, not in bursts of hundreds).
fn pace(rate: u64) -> (u64, Duration) {
    let per_tick = (rate / 1000).max(1);
    (per_tick, Duration::from_secs(1) / (rate / per_tick) as u32)
}

struct FanOut {
    delivered_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    lost: u64,
    /// CPU of the bus, in cores, while the phase ran.
    bus_cores: f64,
    /// CPU of the bus, in cores, for 1 s with the subscriptions open and
    /// nothing published.
    bus_idle_cores: f64,
    /// CPU of this bench process (publisher and 1,000 clients), in cores.
    bench_cores: f64,
    /// Events per DATA chunk, over the chunks that carried an event: how
    /// much the bus batched per stream.
    per_chunk: f64,
}

/// The fan-out reference: the same subscribers and publish schedule on the
/// hub called in-process (one tokio task per matching subscriber, filters
/// indexed as the bus does), no gRPC. Returns p50 and p99 in us.
async fn hub_fanout(rate: u64) -> (u64, u64) {
    let hub: Hub<Event> = Hub::with_size_and_key_fn(
        HubConfig {
            queue_capacity: 65536,
            // As the bus's CONFIG: the subscribers all count as one peer.
            monitor_caps: Caps {
                total: 100_000,
                per_principal: 100_000,
                reserved: 0,
            },
            ..Default::default()
        },
        |_| 0,
        |e: &Event| match e {
            Event::MonitorEvent(m) => Some(m.event.as_str()),
            Event::DomainEvent(_) => None,
        },
    )
    .unwrap();
    let total = rate * FANOUT_SECONDS;
    let (mut readers, mut idle) = (Vec::new(), Vec::new());
    for i in 0..FANOUT_SUBSCRIBERS {
        let name = if i % 2 == 0 { "MATCH" } else { "NEVER" };
        let options = SubscribeOptions {
            key: Some(name.into()),
            key_decides: true,
            ..Default::default()
        };
        let mut sub = hub
            .subscribe(
                options,
                move |e: &Event| matches!(e, Event::MonitorEvent(m) if m.event == name),
            )
            .unwrap();
        if i % 2 == 1 {
            idle.push(sub);
            continue;
        }
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total as usize);
            loop {
                if let SubscriptionItem::Event(env) = sub.recv().await.unwrap()
                    && let Event::MonitorEvent(m) = &env.event
                {
                    if m.details_json == "\"END\"" {
                        break;
                    }
                    let sent: u64 = m.details_json.parse().unwrap();
                    lat.push((now_ns() - sent) / 1000);
                }
            }
            lat
        }));
    }
    let (per_tick, tick) = pace(rate);
    let mut interval = tokio::time::interval(tick);
    let mut sent = 0;
    while sent < total {
        interval.tick().await;
        for _ in 0..per_tick {
            hub.publish(event("MATCH", now_ns().to_string()));
            sent += 1;
        }
    }
    hub.publish(event("MATCH", "\"END\"".into()));
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await.unwrap());
    }
    drop(idle);
    all.sort_unstable();
    (percentile(&all, 0.50), percentile(&all, 0.99))
}

/// 1,000 subscribers (half on "MATCH", half on "NEVER"), one publisher at
/// `rate` events/s; latency = deliver time - the send time carried in the
/// event. Also the CPU time the bus and this bench process used meanwhile.
async fn grpc_fanout(url: &str, bus_pid: u32, rate: u64) -> FanOut {
    let total = rate * FANOUT_SECONDS;
    let mut readers = Vec::new();
    let mut clients = Vec::new();
    let addr = url.trim_start_matches("http://");
    for i in 0..FANOUT_SUBSCRIBERS {
        if i % STREAMS_PER_CONNECTION == 0 {
            clients.push(lean::connect(addr).await);
        }
        let client = clients.last().unwrap();
        let matching = i % 2 == 0;
        let mut s = lean::subscribe(client, if matching { "MATCH" } else { "NEVER" }).await;
        if matching {
            readers.push(tokio::spawn(async move {
                let (mut lat, mut lost) = (Vec::with_capacity(total as usize), 0u64);
                let (mut end, mut chunks) = (false, 0u64);
                while !end {
                    // The messages of one chunk arrived together: one
                    // clock reading serves them all.
                    let mut now = 0;
                    let open = s
                        .next_chunk(|d| match d {
                            Delivery::End => end = true,
                            Delivery::Sent(sent) => {
                                if now == 0 {
                                    now = now_ns();
                                }
                                lat.push(now.saturating_sub(sent) / 1000);
                            }
                            Delivery::Lost(n) => lost += n,
                            Delivery::Established | Delivery::Other => {}
                        })
                        .await;
                    if !open {
                        panic!("subscription ended before END: {}", s.end_status().await);
                    }
                    if now != 0 {
                        chunks += 1;
                    }
                }
                (lat, lost, chunks)
            }));
        } else {
            // Keep the stream open and idle.
            tokio::spawn(async move { while s.next_chunk(|_| {}).await {} });
        }
    }
    let mut publisher = EventIngestClient::connect(url.to_owned()).await.unwrap();
    let mut streamer = publisher.clone();
    // The bus's CPU with every subscription open and nothing published.
    let idle_start = cpu_ns(bus_pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bus_idle_cores = (cpu_ns(bus_pid) - idle_start) as f64 / 1e9;
    let cpu_start = (cpu_ns(bus_pid), cpu_ns(std::process::id()));
    let start = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let send = tokio::spawn(async move {
        streamer
            .publish(internal(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .unwrap()
    });
    let (per_tick, tick) = pace(rate);
    let mut interval = tokio::time::interval(tick);
    let mut sent = 0;
    while sent < total {
        interval.tick().await;
        for _ in 0..per_tick {
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
    let (mut all, mut lost, mut chunks) = (Vec::new(), 0, 0);
    for r in readers {
        let (l, x, c) = finish(&mut publisher, "MATCH", r).await;
        all.extend(l);
        lost += x;
        chunks += c;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bus_cpu = (cpu_ns(bus_pid) - cpu_start.0) as f64 / 1e9;
    let bench_cpu = (cpu_ns(std::process::id()) - cpu_start.1) as f64 / 1e9;
    all.sort_unstable();
    FanOut {
        delivered_per_s: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        lost,
        bus_cores: bus_cpu / elapsed,
        bus_idle_cores,
        bench_cores: bench_cpu / elapsed,
        per_chunk: all.len() as f64 / chunks.max(1) as f64,
    }
}

/// RSS of the bus before and with IDLE_SUBSCRIPTIONS open, and after they
/// are dropped.
async fn idle_rss(svc: &Service) -> (u64, u64, u64, Duration) {
    let before = rss_kib(svc.pid());
    let mut streams = Vec::new();
    let mut client = None;
    for i in 0..IDLE_SUBSCRIPTIONS {
        if i % STREAMS_PER_CONNECTION == 0 {
            client = Some(EventBusClient::new(internal_channel(svc.url()).await));
        }
        streams.push(subscribe(client.as_mut().unwrap(), "IDLE").await);
    }
    let with = rss_kib(svc.pid());
    drop(streams);
    drop(client);
    // The bus hands freed memory back to the system on its next trim
    // pass (every 2 s once the subscription count fell): wait for RSS to
    // come back within 8 MiB of the start, at most 10 s.
    let dropped = Instant::now();
    let mut after = rss_kib(svc.pid());
    while after > before + 8 * 1024 && dropped.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_kib(svc.pid());
    }
    (before, with, after, dropped.elapsed())
}

/// Bound on one QMP reply or event.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP connection to a bare QEMU, past the greeting and capabilities.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &std::path::Path, qemu: &mut ChildGuard) -> Qmp {
        let start = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(sock) {
                break s;
            }
            assert!(start.elapsed() < QMP_TIMEOUT, "bare QEMU never listened");
            assert!(qemu.try_wait().is_none(), "bare QEMU exited");
            std::thread::sleep(Duration::from_millis(5));
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        assert!(qmp.line().contains("\"QMP\""));
        qmp.send("qmp_capabilities");
        while !qmp.line().contains("\"return\"") {}
        qmp
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "bare QEMU closed its QMP socket");
        line
    }

    fn send(&mut self, command: &str) {
        writeln!(self.writer, "{{\"execute\": \"{command}\"}}").unwrap();
    }

    /// Sends `command` and times until `event` arrives (its reply may come
    /// before or after; both are read before the next command).
    fn time_to_event(&mut self, command: &str, event: &str) -> Duration {
        let start = Instant::now();
        self.send(command);
        let (mut took, mut replied) = (None, false);
        let pattern = format!("\"event\": \"{event}\"");
        while took.is_none() || !replied {
            let line = self.line();
            if line.contains(&pattern) {
                took = Some(start.elapsed());
            } else if line.contains("\"return\"") {
                replied = true;
            }
        }
        took.unwrap()
    }
}

/// The QMP latency phase's result: medians of command -> event.
struct QmpLatency {
    bus: Duration,
    bare: Duration,
}

/// A QEMU guest (TCG, no OS) run by a supervisor that publishes to a bus,
/// and one subscriber of its STOP/RESUME events: time from MonitorCommand
/// stop/cont to the event at the subscriber. Beside it, interleaved so
/// both see the same load, the same stop/cont sent by hand to a bare QEMU
/// of the same shape, timed from the write to the event on its QMP socket.
async fn qmp_latency() -> QmpLatency {
    let qemu_bin = tool_path("qemu-system-x86_64");
    let dir = tempfile::tempdir().unwrap();
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let extra = ["--node-name", "bench", "--eventbus", &bus.url()];
    let sup = start_supervisor(
        &dir.path().join("state"),
        &dir.path().join("run"),
        None,
        &extra,
    )
    .await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    define_yaml(
        &mut client,
        "name: lat\nmemory_mib: 128\naccel: tcg\n".into(),
    )
    .await
    .unwrap();
    let mut events = EventBusClient::new(internal_channel(bus.url()).await);
    let mut sub = events
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            domain: "lat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        sub.message().await.unwrap().unwrap().kind,
        Some(Kind::Established(_))
    ));
    let started = client
        .start_domain(StartDomainRequest {
            domain: "lat".into(),
            paused: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let uuid = started.spec.unwrap().uuid;
    struct Guard(u32, String);
    impl Drop for Guard {
        fn drop(&mut self) {
            kill_domain_qemu(self.0, &self.1);
        }
    }
    let _guest = Guard(started.pid, uuid);
    // The start's own RESUME first.
    wait_event(&mut sub, "RESUME").await;

    let sock = dir.path().join("bare.qmp");
    let mut bare_qemu = ChildGuard::spawn(
        Command::new(qemu_bin)
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .args(["-machine", "q35", "-accel", "tcg", "-m", "128"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut qmp = Qmp::connect(&sock, &mut bare_qemu);

    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..QMP_RUNS {
        for (command, event) in [("stop", "STOP"), ("cont", "RESUME")] {
            bare.push(qmp.time_to_event(command, event));
            let start = Instant::now();
            client
                .monitor_command(MonitorCommandRequest {
                    domain: "lat".into(),
                    command_json: format!("{{\"execute\": \"{command}\"}}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            wait_event(&mut sub, event).await;
            ours.push(start.elapsed());
        }
    }
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "lat".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
    drop(qmp);
    drop(bare_qemu);
    QmpLatency {
        bus: Spread::of(ours).median,
        bare: Spread::of(bare).median,
    }
}

/// Reads the subscription until a monitor event named `name`.
async fn wait_event(
    sub: &mut tonic::Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>,
    name: &str,
) {
    loop {
        let msg = tokio::time::timeout(QMP_TIMEOUT, sub.message())
            .await
            .expect("monitor event in time")
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(e)) = msg.kind
            && e.event == name
        {
            return;
        }
    }
}

/// The 1-minute load average: how busy the machine was (other work shares
/// its cores with the bench).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next().map(str::to_owned))
        .unwrap_or_default()
}

/// Phases named on the command line (`cargo bench --bench eventbus --
/// fan-out`): only those run. None named: all of them. A name selects
/// itself and the runs under it: `fan-out` every fan-out run,
/// `fan-out:100` the two at 100 events/s, `fan-out:100:1thread` one.
fn wanted(phase: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    named.is_empty()
        || named
            .iter()
            .any(|n| phase == n || phase.starts_with(&format!("{n}:")))
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let load_before = load_average();
    println!(
        "\nevent bus (qvirt-eventbus over loopback gRPC vs the hub called in-process; load average {load_before} before the run, on {} cores)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    if wanted("throughput") {
        let mut svc = Service::start_with_config("qvirt-eventbus", CONFIG, &[]);
        svc.wait_serving("qvirt.v1.EventBus").await;
        let (grpc, grpc_lost) = bounded("throughput", grpc_throughput(&svc.url())).await;
        drop(svc);
        let (direct, direct_lost) = bounded("direct hub", hub_throughput()).await;
        println!(
            "  throughput, 1 publisher -> 1 subscriber: {grpc:.0} events/s delivered, {grpc_lost} of {THROUGHPUT_EVENTS} lost to a full queue (direct hub: {direct:.0}/s, {direct_lost} lost, ratio {:.2}; target >= 200000/s)",
            grpc / direct
        );
    }
    // The default runtime (a worker per core), then at lower rates also
    // the bus on one thread (`worker_threads: 1`), each on a fresh bus
    // so a run does not start behind another's backlog.
    let mut runs = vec![
        ("", "", FANOUT_RATE),
        (", worker_threads: 1", "worker_threads: 1\n", FANOUT_RATE),
    ];
    for rate in FANOUT_LOW_RATES {
        runs.push(("", "", rate));
        runs.push((", worker_threads: 1", "worker_threads: 1\n", rate));
    }
    let mut speed_told = false;
    for (label, extra, rate) in runs {
        let threads = if extra.is_empty() { "" } else { ":1thread" };
        if !wanted(&format!("fan-out:{rate}{threads}")) {
            continue;
        }
        if !speed_told {
            // The fan-out target was set on a machine like the
            // reference one: say how this one compares, before the runs.
            let speed = tokio::task::spawn_blocking(MachineSpeed::measure)
                .await
                .unwrap();
            println!("  {}", speed.line());
            speed_told = true;
        }
        let config = format!("{CONFIG}{extra}");
        let mut svc = Service::start_with_config("qvirt-eventbus", &config, &[]);
        svc.wait_serving("qvirt.v1.EventBus").await;
        let f = bounded("fan-out", grpc_fanout(&svc.url(), svc.pid(), rate)).await;
        drop(svc);
        let (hub_p50, hub_p99) = hub_fanout(rate).await;
        println!(
            "  fan-out{label}, {FANOUT_SUBSCRIBERS} subscribers (half match) at {rate}/s (offered {} deliveries/s): delivered {:.0}/s, publish->deliver p50 {} us, p99 {} us (target p99 < 5000 us), lost {}; CPU: bus {:.2} cores ({:.2} idle before), bench clients {:.2} cores; {:.1} events per DATA chunk; in-process hub reference p50 {hub_p50} us, p99 {hub_p99} us",
            rate * FANOUT_SUBSCRIBERS as u64 / 2,
            f.delivered_per_s,
            f.p50_us,
            f.p99_us,
            f.lost,
            f.bus_cores,
            f.bus_idle_cores,
            f.bench_cores,
            f.per_chunk
        );
    }
    if wanted("idle-rss") {
        // A fresh bus with default queues, so the figure is about
        // subscriptions.
        let mut idle = Service::start_with_config(
            "qvirt-eventbus",
            "max_monitor_subscriptions: 100000\nmax_monitor_subscriptions_per_principal: 100000\n",
            &[],
        );
        idle.wait_serving("qvirt.v1.EventBus").await;
        let (before, with, after, took) = bounded("idle RSS", idle_rss(&idle)).await;
        drop(idle);
        println!(
            "  RSS: {:.1} MiB idle, {:.1} MiB with {IDLE_SUBSCRIPTIONS} idle subscriptions (target < 64 MiB), {:.1} MiB {:.1} s after dropping them",
            before as f64 / 1024.0,
            with as f64 / 1024.0,
            after as f64 / 1024.0,
            took.as_secs_f64()
        );
    }
    if wanted("qmp-latency") {
        let qmp = bounded("QMP latency", qmp_latency()).await;
        println!(
            "  QMP event latency, median of {QMP_RUNS} stop/cont each: MonitorCommand via supervisor -> QEMU -> bus -> gRPC subscriber {} us; bare QMP write -> event read {} us; added {} us (target < 1000 us)",
            qmp.bus.as_micros(),
            qmp.bare.as_micros(),
            qmp.bus.as_micros() as i128 - qmp.bare.as_micros() as i128
        );
    }
    println!("  load average after the run: {}", load_average());
}
