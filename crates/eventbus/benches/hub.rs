//! Hub benchmarks: one publisher to one subscriber (same thread, and across
//! threads), fan-out to 1,000 filtered subscribers (half matching), filter
//! matching; under `cargo bench`, also the RSS of 10,000 idle subscriptions
//! and a publish-to-deliver latency report for 1,000 subscriber tasks at 10k
//! events/s.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use qvirt_eventbus::filter::{EventNameFilter, FilterFlags};
use qvirt_eventbus::hub::{Caps, Hub, HubConfig, SubscribeOptions, Subscription, SubscriptionItem};

/// A small event: what a monitor event's routing needs.
#[derive(Debug, Clone)]
struct Ev {
    name: &'static str,
    published: Instant,
}

fn ev(name: &'static str) -> Ev {
    Ev {
        name,
        published: Instant::now(),
    }
}

const SUBSCRIBERS: usize = 1000;
const BATCH: usize = 64;

fn config(queue_capacity: usize) -> HubConfig {
    HubConfig {
        queue_capacity,
        monitor_caps: Caps {
            total: 100_000,
            per_principal: 100_000,
            reserved: 0,
        },
        ..Default::default()
    }
}

fn new_hub(queue_capacity: usize) -> Hub<Ev> {
    Hub::new(config(queue_capacity)).expect("valid bench config")
}

fn live() -> SubscribeOptions {
    SubscribeOptions {
        principal: "bench".into(),
        ..Default::default()
    }
}

fn filtered(hub: &Hub<Ev>, pattern: &str, flags: FilterFlags) -> Subscription<Ev> {
    let filter = EventNameFilter::new(pattern, flags).expect("valid filter");
    hub.subscribe(live(), move |e: &Ev| filter.matches(e.name))
        .expect("under cap")
}

/// 1,000 subscribers, half of which match `STOP` (literal, literal nocase,
/// regex); the other half filter on names never published.
fn fan_out_subscribers(hub: &Hub<Ev>) -> Vec<Subscription<Ev>> {
    let lit = FilterFlags::default();
    let nocase = FilterFlags {
        nocase: true,
        ..lit
    };
    let re = FilterFlags { regex: true, ..lit };
    (0..SUBSCRIBERS)
        .map(|i| match (i % 2 == 0, (i / 2) % 3) {
            (true, 0) => filtered(hub, "STOP", lit),
            (true, 1) => filtered(hub, "stop", nocase),
            (true, _) => filtered(hub, "^ST(OP|ARTED)$", re),
            (false, 0) => filtered(hub, "RESUME", lit),
            (false, 1) => filtered(hub, "resume", nocase),
            (false, _) => filtered(hub, "^(RESUME|SHUTDOWN)", re),
        })
        .collect()
}

fn drain(sub: &mut Subscription<Ev>) -> usize {
    let mut n = 0;
    while let Ok(Some(item)) = sub.try_recv() {
        n += usize::from(matches!(item, SubscriptionItem::Event(_)));
    }
    n
}

fn bench_one_to_one(c: &mut Criterion) {
    let mut group = c.benchmark_group("one_to_one");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("same_thread_publish_then_drain", |b| {
        let hub = new_hub(BATCH);
        let mut sub = hub.subscribe(live(), |_: &Ev| true).expect("subscribe");
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(hub.publish(ev("STOP")));
            }
            black_box(drain(&mut sub));
        });
    });
    group.finish();

    let mut group = c.benchmark_group("one_to_one");
    group.throughput(Throughput::Elements(1));
    group.bench_function("across_threads", |b| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        b.iter_custom(|iters| {
            let hub = new_hub(1 << 16);
            let mut sub = hub.subscribe(live(), |_: &Ev| true).expect("subscribe");
            let consumer = rt.spawn(async move {
                // Count events and losses alike: the publisher never waits.
                let mut seen = 0u64;
                while seen < iters {
                    match sub.recv().await {
                        Ok(SubscriptionItem::Event(_)) => seen += 1,
                        Ok(SubscriptionItem::Lost { count, .. }) => seen += count,
                        Ok(SubscriptionItem::Established { .. }) => {}
                        Err(_) => break,
                    }
                }
            });
            let start = Instant::now();
            for _ in 0..iters {
                hub.publish(ev("STOP"));
            }
            rt.block_on(consumer).expect("consumer");
            start.elapsed()
        });
    });
    group.finish();
}

fn bench_fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out_1000_half_matching");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("publish_only", |b| {
        let hub = new_hub(1 << 20);
        let mut subs = fan_out_subscribers(&hub);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for _ in 0..BATCH {
                    black_box(hub.publish(ev("STOP")));
                }
                total += start.elapsed();
                // Keep queues short, outside the measurement.
                for sub in &mut subs {
                    drain(sub);
                }
            }
            total
        });
    });
    group.bench_function("publish_and_drain", |b| {
        let hub = new_hub(BATCH);
        let mut subs = fan_out_subscribers(&hub);
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(hub.publish(ev("STOP")));
            }
            let delivered: usize = subs.iter_mut().map(drain).sum();
            assert_eq!(delivered, SUBSCRIBERS / 2 * BATCH);
        });
    });
    group.finish();
}

fn bench_filters(c: &mut Criterion) {
    let mut group = c.benchmark_group("filter_match");
    let name = "BLOCK_JOB_COMPLETED";
    let cases = [
        ("all", "", FilterFlags::default()),
        ("literal", "BLOCK_JOB_COMPLETED", FilterFlags::default()),
        (
            "literal_nocase",
            "block_job_completed",
            FilterFlags {
                nocase: true,
                regex: false,
            },
        ),
        (
            "regex",
            "^BLOCK_JOB_(COMPLETED|CANCELLED)$",
            FilterFlags {
                regex: true,
                nocase: false,
            },
        ),
        (
            "regex_nocase",
            "job_(completed|cancelled)",
            FilterFlags {
                regex: true,
                nocase: true,
            },
        ),
    ];
    for (label, pattern, flags) in cases {
        let filter = EventNameFilter::new(pattern, flags).expect("valid filter");
        group.bench_with_input(BenchmarkId::from_parameter(label), name, |b, name| {
            b.iter(|| filter.matches(black_box(name)));
        });
    }
    group.finish();
}

/// 1,000 subscriber tasks (half matching), one publisher thread at 10k
/// events/s for one second: delivered/s, losses, and p50/p99 latency from
/// `publish` to the subscriber task holding the event.
fn latency_report() {
    const RATE: u64 = 10_000;
    const EVENTS: u64 = RATE;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let hub = new_hub(hub_default_queue());
    let subs = fan_out_subscribers(&hub);
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            rt.spawn(async move {
                let mut latencies = Vec::new();
                let mut lost = 0u64;
                loop {
                    match sub.recv().await {
                        Ok(SubscriptionItem::Event(env)) => {
                            latencies.push(env.event.published.elapsed());
                        }
                        Ok(SubscriptionItem::Lost { count, .. }) => lost += count,
                        Ok(SubscriptionItem::Established { .. }) => {}
                        Err(_) => break,
                    }
                }
                (latencies, lost)
            })
        })
        .collect();
    let start = Instant::now();
    for i in 0..EVENTS {
        let due = start + Duration::from_micros(i * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        hub.publish(ev("STOP"));
    }
    let publishing = start.elapsed();
    // Each task gets what its queue holds, then `Closed`, and ends.
    hub.close();
    let mut all = Vec::new();
    let mut lost = 0;
    rt.block_on(async {
        for task in tasks {
            let (latencies, l) = task.await.expect("subscriber task");
            all.extend(latencies);
            lost += l;
        }
    });
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: usize| all.get(all.len().saturating_sub(1) * p / 100).copied();
    println!(
        "fan-out latency: {} subscribers (half matching), {EVENTS} events at {RATE}/s in {publishing:.2?}: \
         {} delivered ({:.0}/s), {lost} lost, publish->deliver p50 {:?} p99 {:?} max {:?}",
        SUBSCRIBERS,
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64(),
        pct(50).unwrap_or_default(),
        pct(99).unwrap_or_default(),
        all.last().copied().unwrap_or_default(),
    );
}

/// Resident set size of this process in bytes, if the platform tells.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// RSS growth for 10,000 idle subscriptions (literal filters, one regex
/// shared by all, a distinct regex each), and what is left once they are
/// dropped (freed memory the allocator keeps counts as left).
fn memory_report() {
    const IDLE: usize = 10_000;
    let hub = new_hub(hub_default_queue());
    let lit = FilterFlags::default();
    let re = FilterFlags {
        regex: true,
        nocase: true,
    };
    type Pattern = fn(usize) -> String;
    let cases: [(&str, Pattern, FilterFlags); 3] = [
        ("literal", |_| "STOP".to_owned(), lit),
        ("identical-regex", |_| "^(STOP|RESUME)$".to_owned(), re),
        ("distinct-regex", |i| format!("^(STOP|RESUME)_{i}$"), re),
    ];
    for (label, pattern, flags) in cases {
        let Some(before) = rss_bytes() else {
            return;
        };
        let subs: Vec<_> = (0..IDLE)
            .map(|i| filtered(&hub, &pattern(i), flags))
            .collect();
        // Matching once allocates each regex's search cache.
        hub.publish(ev("STOP"));
        let with = rss_bytes().unwrap_or(before);
        drop(subs);
        let after = rss_bytes().unwrap_or(before);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "memory: {IDLE} idle {label} subscriptions: +{:.1} MiB RSS ({} bytes each), {:.1} MiB still resident after drop",
            mib(with.saturating_sub(before)),
            with.saturating_sub(before) / IDLE as u64,
            mib(after.saturating_sub(before)),
        );
    }
}

fn hub_default_queue() -> usize {
    HubConfig::default().queue_capacity
}

fn main() {
    if std::env::args().any(|a| a == "--bench") {
        memory_report();
        latency_report();
    }
    let mut c = Criterion::default().configure_from_args();
    bench_one_to_one(&mut c);
    bench_fan_out(&mut c);
    bench_filters(&mut c);
    c.final_summary();
}
