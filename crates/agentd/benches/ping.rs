//! What agentd adds to a guest-ping: the raw unix-socket round trip to a
//! real qemu-ga (unix-listen) beside a gRPC Ping through an in-process
//! agentd to the same agent, measured in the same run. Issue 4's target:
//! at most 150 µs added at the median. Needs qemu-ga on PATH (`make
//! deps`); run with `cargo bench -p qvirt-agentd --bench ping`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qvirt_common::config::ListenAddr;
use qvirt_common::serve::Listener;
use qvirt_proto::v1::PingRequest;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use tokio_util::sync::CancellationToken;

const WARMUP: usize = 200;
const ROUNDS: usize = 2000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let median = percentile(&samples, 0.5);
    println!(
        "{name:<28} n={} median {:>8.1} µs  p99 {:>8.1} µs",
        samples.len(),
        median.as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6
    );
    median
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let mut agent = Command::new("qemu-ga")
        .args(["-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-t")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-ga ({e}): run `make deps`"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-ga did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Raw: one connection, synced, then compact guest-ping round trips.
    let raw = {
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        s.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}")
            .unwrap();
        let mut line = Vec::new();
        while !line.starts_with(b"\xff") {
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
        }
        let mut samples = Vec::with_capacity(ROUNDS);
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            s.write_all(b"{\"execute\":\"guest-ping\"}").unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            if i >= WARMUP {
                samples.push(t.elapsed());
            }
        }
        samples
    };
    // The raw client must go: qemu-ga serves one client at a time.

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let grpc = rt.block_on(async {
        let config = qvirt_agentd::Config {
            agents: [("vm".to_owned(), sock.clone())].into_iter().collect(),
            ..Default::default()
        };
        let listener = Listener::bind(&ListenAddr::loopback(0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(qvirt_agentd::run(config, listener, shutdown.clone()));
        let mut client = GuestAgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut samples = Vec::with_capacity(ROUNDS);
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            client
                .ping(PingRequest {
                    domain: "vm".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            if i >= WARMUP {
                samples.push(t.elapsed());
            }
        }
        // The gRPC transport alone: a domain nobody knows fails at once.
        let mut base = Vec::with_capacity(ROUNDS);
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            let r = client
                .ping(PingRequest {
                    domain: "nobody".into(),
                    ..Default::default()
                })
                .await;
            assert!(r.is_err());
            if i >= WARMUP {
                base.push(t.elapsed());
            }
        }
        shutdown.cancel();
        let _ = server.await;
        (samples, base)
    });
    let (grpc, base) = grpc;
    // The channel task alone (no gRPC), on a fresh connection.
    let chan = rt.block_on(async {
        let ch = qvirt_agentd::channel::AgentChannel::spawn(
            sock.clone(),
            qvirt_agentd::channel::ChannelSettings {
                sync_timeout: Duration::from_secs(5),
                max_reply_bytes: 1 << 20,
                queue_depth: 8,
                idle_close: None,
            },
            CancellationToken::new(),
        );
        let mut samples = Vec::with_capacity(ROUNDS);
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            ch.execute("guest-ping", None, Duration::from_secs(5))
                .await
                .unwrap();
            if i >= WARMUP {
                samples.push(t.elapsed());
            }
        }
        samples
    });
    let direct = rt.block_on(async {
        let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let (r, w) = s.into_split();
        let mut c = qvirt_agentd::wire::Conn::new(r, w, 1 << 20);
        c.sync().await.unwrap();
        let mut samples = Vec::with_capacity(ROUNDS);
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            c.write(b"{\"execute\":\"guest-ping\",\"id\":\"x\"}\n")
                .await
                .unwrap();
            c.read_reply(&["x"]).await.unwrap();
            if i >= WARMUP {
                samples.push(t.elapsed());
            }
        }
        samples
    });
    report("tokio Conn direct", direct);
    let raw = report("raw socket guest-ping", raw);
    report("channel (no gRPC)", chan);
    report("gRPC only (unknown domain)", base);
    let grpc = report("agentd gRPC Ping", grpc);
    let added = grpc.saturating_sub(raw);
    println!(
        "agentd adds {:.1} µs at the median (target ≤ 150 µs): {}",
        added.as_secs_f64() * 1e6,
        if added <= Duration::from_micros(150) {
            "ok"
        } else {
            "OVER"
        }
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
