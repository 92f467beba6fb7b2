//! qvirt-ga beside the real qemu-ga 7.2, in one run, same client, same
//! socket type (unix-listen): guest-ping round trip (median, p99), pipelined
//! guest-ping throughput, agent CPU time per request, idle RSS. Prints each
//! figure for both, the ratio qvirt-ga/qemu-ga, and whether the
//! targets hold. Latency samples alternate between the agents in rounds so
//! that machine noise hits both.
//!
//! Run with `cargo bench -p qvirt-ga --bench vs_qemu_ga`. The qvirt-ga
//! binary is `$QVIRT_BIN_DIR/qvirt-ga` when that is set (build it with
//! `cargo build --release -p qvirt-ga --bins`), else the one cargo built
//! for this bench. qemu-ga comes from PATH or /usr/sbin (`make deps`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qvirt_integration_tests::measure::{cpu_ns, percentile};
use qvirt_integration_tests::reference::{
    MachineSpeed, PING, PING_REPLY, connect_synced, pipelined_pings, spawn_agent,
};
use qvirt_integration_tests::{ChildGuard, rss_kib};

/// Round trips thrown away per agent before measuring.
const WARMUP: usize = 2_000;
/// Measured round trips per agent: ROUNDS rounds of PER_ROUND each.
const ROUNDS: usize = 40;
const PER_ROUND: usize = 250;
/// Pipelined runs per agent (alternating), and requests per run.
const PIPE_RUNS: usize = 5;
const PIPE_REQUESTS: usize = 100_000;
/// Requests per write in the pipelined burst.
const PIPE_BATCH: usize = 1_000;

fn qemu_ga() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/sbin".into());
    dirs.into_iter()
        .map(|d| d.join("qemu-ga"))
        .find(|p| p.is_file())
        .expect("qemu-ga (the reference agent) is not installed: run `make deps`")
}

fn qvirt_ga() -> PathBuf {
    match std::env::var_os("QVIRT_BIN_DIR") {
        Some(dir) => {
            let p = Path::new(&dir).join("qvirt-ga");
            assert!(
                p.is_file(),
                "{} missing: cargo build --release -p qvirt-ga --bins",
                p.display()
            );
            p
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
    }
}

/// A running agent, stopped by pid on drop (also on panic).
struct Agent {
    child: ChildGuard,
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start(bin: &Path) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, sock) = spawn_agent(bin, dir.path());
        Agent {
            child,
            _dir: dir,
            sock,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connection, synchronised as a host would.
    fn connect(&self) -> Client {
        Client {
            s: connect_synced(&self.sock),
            buf: vec![0; 1 << 16],
            start: 0,
            end: 0,
        }
    }
}

/// The one client both agents get: a unix stream with its own read buffer.
struct Client {
    s: UnixStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Client {
    fn fill(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.s.read(&mut self.buf[self.end..]).expect("read");
        assert!(n > 0, "agent closed the connection");
        self.end += n;
    }

    /// One guest-ping round trip.
    fn ping(&mut self) -> Duration {
        let t = Instant::now();
        self.s.write_all(PING).unwrap();
        loop {
            let avail = &self.buf[self.start..self.end];
            if avail.len() >= PING_REPLY.len() {
                assert_eq!(&avail[..PING_REPLY.len()], PING_REPLY);
                self.start += PING_REPLY.len();
                return t.elapsed();
            }
            self.fill();
        }
    }

    /// `n` pipelined pings in writes of PIPE_BATCH; the wall time from the
    /// first write to the last reply.
    fn pipelined(&mut self, n: usize) -> Duration {
        assert_eq!(self.start, self.end, "unread bytes before a pipelined run");
        pipelined_pings(&mut self.s, n, PIPE_BATCH)
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    what: &'static str,
    unit: &'static str,
    qemu: f64,
    qvirt: f64,
    target: &'static str,
    met: bool,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let qemu = Agent::start(&qemu_ga());
    let qvirt = Agent::start(&qvirt_ga());
    let agents = [&qemu, &qvirt];

    let mut clients: Vec<Client> = agents.iter().map(|a| a.connect()).collect();
    // Start-up RSS: after the agent is up and has served its first request.
    let rss_start: Vec<u64> = agents.iter().map(|a| rss_kib(a.pid())).collect();

    // Round trips: warm-up, then rounds alternating between the agents.
    for c in clients.iter_mut() {
        for _ in 0..WARMUP {
            c.ping();
        }
    }
    let mut samples = [
        Vec::with_capacity(ROUNDS * PER_ROUND),
        Vec::with_capacity(ROUNDS * PER_ROUND),
    ];
    for round in 0..ROUNDS {
        // Alternate which agent goes first, too.
        for k in 0..2 {
            let i = (round + k) % 2;
            for _ in 0..PER_ROUND {
                let d = clients[i].ping();
                samples[i].push(d);
            }
        }
    }
    for s in samples.iter_mut() {
        s.sort();
    }
    let median = [percentile(&samples[0], 0.5), percentile(&samples[1], 0.5)];
    let p99 = [percentile(&samples[0], 0.99), percentile(&samples[1], 0.99)];

    // Pipelined throughput and CPU per request.
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu = [0u64; 2];
    for round in 0..PIPE_RUNS {
        for k in 0..2 {
            let i = (round + k) % 2;
            let before = cpu_ns(agents[i].pid());
            let wall = clients[i].pipelined(PIPE_REQUESTS);
            cpu[i] += cpu_ns(agents[i].pid()) - before;
            rates[i].push(PIPE_REQUESTS as f64 / wall.as_secs_f64());
        }
    }
    let rate = [median_f(&mut rates[0]), median_f(&mut rates[1])];
    let cpu_us = [0, 1].map(|i| cpu[i] as f64 / 1e3 / (PIPE_RUNS * PIPE_REQUESTS) as f64);

    // Idle RSS after the load (the client still connected, nothing in flight).
    let rss_after: Vec<u64> = agents.iter().map(|a| rss_kib(a.pid())).collect();
    drop(clients);

    println!(
        "qvirt-ga vs qemu-ga, unix-listen, one client: {} round trips each ({ROUNDS} alternating rounds, {WARMUP} warm-up), pipelined {PIPE_RUNS} x {PIPE_REQUESTS} pings ({PIPE_BATCH} per write)",
        ROUNDS * PER_ROUND
    );
    let rows = [
        Row {
            what: "guest-ping median",
            unit: "µs",
            qemu: us(median[0]),
            qvirt: us(median[1]),
            target: "<= 1",
            met: median[1] <= median[0],
        },
        Row {
            what: "guest-ping p99",
            unit: "µs",
            qemu: us(p99[0]),
            qvirt: us(p99[1]),
            target: "<= 1",
            met: p99[1] <= p99[0],
        },
        Row {
            what: "pipelined guest-ping",
            unit: "req/s",
            qemu: rate[0],
            qvirt: rate[1],
            target: ">= 1.5",
            met: rate[1] >= 1.5 * rate[0],
        },
        Row {
            what: "CPU per request",
            unit: "µs",
            qemu: cpu_us[0],
            qvirt: cpu_us[1],
            target: "<= 1",
            met: cpu_us[1] <= cpu_us[0],
        },
        Row {
            what: "RSS after start-up",
            unit: "KiB",
            qemu: rss_start[0] as f64,
            qvirt: rss_start[1] as f64,
            target: "<= 1",
            met: rss_start[1] <= rss_start[0],
        },
        Row {
            what: "RSS idle after the load",
            unit: "KiB",
            qemu: rss_after[0] as f64,
            qvirt: rss_after[1] as f64,
            target: "<= 1",
            met: rss_after[1] <= rss_after[0],
        },
    ];
    println!(
        "{:<26} {:>14} {:>14} {:>8}  {:<7} target",
        "", "qemu-ga", "qvirt-ga", "ratio", "unit"
    );
    for r in &rows {
        println!(
            "{:<26} {:>14.1} {:>14.1} {:>8.3}  {:<7} ratio {} : {}",
            r.what,
            r.qemu,
            r.qvirt,
            r.qvirt / r.qemu,
            r.unit,
            r.target,
            if r.met { "met" } else { "NOT met" }
        );
    }
    let met = rows.iter().filter(|r| r.met).count();
    println!("targets met: {met}/{}", rows.len());
    // The same measurement as the reference machine's (qga.md §6 used 20k
    // requests a run; 100k gave the same 6.8-7.0 µs there).
    println!(
        "{}",
        MachineSpeed {
            cpu_per_ping_us: cpu_us[0]
        }
        .line()
    );
    drop(qemu);
    drop(qvirt);
}
