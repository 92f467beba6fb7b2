//! `make bench`: what the supervisor adds to starting QEMU, beside the
//! references measured in the same run: the supervisor's own QEMU command
//! line (read back from its QEMU log) spawned by hand, timed to its QMP
//! greeting (the reference) and to a running guest through the
//! same QMP steps (`qmp_capabilities`, `cont`). QEMU 7.2 sends the greeting
//! before its startup is over (measured: the first reply comes 13-20 ms
//! after it, later ones in under 1 ms), so only the second reference is
//! like with like. Also a define + start + destroy cycle of 20 guests,
//! and the supervisor's RSS with 0 and 20 running guests. Numbers are for
//! this machine at this moment: read the ratios.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    ChildGuard, InternalChannel, define_yaml, internal_channel, rss_kib, start_supervisor,
    tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{DestroyDomainRequest, StartDomainRequest, UndefineDomainRequest};

const RUNS: usize = 31;
const GUESTS: usize = 20;
/// Bound on one bare QEMU's greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(30);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The QEMU command line the supervisor ran last for a domain, from the
/// header line it writes to the domain's QEMU log
/// (`qvirt: TIME: starting BINARY ARGS...`). The bench's specs have no
/// spaces in any argument, so splitting on spaces is exact here.
fn last_qemu_argv(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("qvirt: ") && l.contains(": starting "))
        .expect("no start header in the QEMU log");
    let (_, command) = line.split_once(": starting ").unwrap();
    command.split(' ').skip(1).map(str::to_owned).collect()
}

/// The supervisor's QEMU arguments with its inherited monitor fd replaced
/// by a socket path QEMU binds itself; everything else (including `-S`)
/// is the same command.
fn bare_argv(argv: &[String], sock: &Path) -> Vec<String> {
    argv.iter()
        .map(|a| {
            if a.starts_with("socket,id=mon,fd=") {
                format!("socket,id=mon,path={},server=on,wait=off", sock.display())
            } else {
                a.clone()
            }
        })
        .collect()
}

fn qmp_line(reader: &mut BufReader<&UnixStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "QEMU closed its monitor");
    line
}

/// Reads lines up to the reply (events are skipped).
fn qmp_reply(reader: &mut BufReader<&UnixStream>) -> String {
    loop {
        let line = qmp_line(reader);
        if !line.contains("\"event\"") {
            return line;
        }
    }
}

/// The references: the supervisor's own QEMU command spawned by hand, with
/// the monitor socket bound by QEMU (polled for, every 100 us), timed to
/// the QMP greeting (the reference) and on to a running guest by
/// the same QMP steps the supervisor takes (`qmp_capabilities`, `cont`).
fn bare_spawn(argv: &[String], dir: &Path, i: usize) -> (Duration, Duration) {
    let sock = dir.join(format!("bare-{i}.sock"));
    let start = Instant::now();
    let mut qemu = ChildGuard::spawn(
        Command::new(tool_path("qemu-system-x86_64"))
            .args(bare_argv(argv, &sock))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            start.elapsed() < GREETING_TIMEOUT,
            "bare QEMU never listened"
        );
        assert!(qemu.try_wait().is_none(), "bare QEMU exited");
        std::thread::sleep(Duration::from_micros(100));
    };
    stream.set_read_timeout(Some(GREETING_TIMEOUT)).unwrap();
    let mut reader = BufReader::new(&stream);
    let greeting = qmp_line(&mut reader);
    let to_greeting = start.elapsed();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    for command in ["qmp_capabilities", "cont"] {
        (&stream)
            .write_all(format!("{{\"execute\": \"{command}\"}}\n").as_bytes())
            .unwrap();
        let reply = qmp_reply(&mut reader);
        assert!(reply.contains("\"return\""), "{command}: {reply}");
    }
    let to_running = start.elapsed();
    drop(qemu);
    let _ = std::fs::remove_file(&sock);
    (to_greeting, to_running)
}

async fn define(client: &mut SupervisorClient<InternalChannel>, name: &str) {
    let yaml = format!("name: {name}\nmemory_mib: 128\naccel: tcg\n");
    define_yaml(client, yaml).await.unwrap();
}

async fn start(client: &mut SupervisorClient<InternalChannel>, name: &str) -> Duration {
    let t = Instant::now();
    client
        .start_domain(StartDomainRequest {
            domain: name.into(),
            paused: false,
            ..Default::default()
        })
        .await
        .unwrap();
    t.elapsed()
}

async fn destroy(client: &mut SupervisorClient<InternalChannel>, name: &str) {
    client
        .destroy_domain(DestroyDomainRequest {
            domain: name.into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    // The run dir where it lives in production: /run/qvirt is a tmpfs, as
    // /dev/shm is (status files, sockets); definitions and QEMU logs stay
    // on disk under the state dir. QVIRT_BENCH_RUN_PARENT=DIR puts it
    // elsewhere (e.g. on disk, to see what status writes cost there).
    let run_parent = std::env::var_os("QVIRT_BENCH_RUN_PARENT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/dev/shm"));
    let run_tmp = if run_parent.is_dir() {
        tempfile::tempdir_in(&run_parent).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let (state, run) = (dir.path().join("state"), run_tmp.path().join("run"));
    let sup = start_supervisor(&state, &run, None, &["--start-timeout-secs", "60"]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);

    // Start RPC to a running guest (no OS here: the vCPUs run firmware),
    // interleaved with the bare reference so both see the same load.
    define(&mut client, "bench").await;
    // One start first: it warms the page cache and gives the exact argv.
    start(&mut client, "bench").await;
    destroy(&mut client, "bench").await;
    let argv = last_qemu_argv(&state.join("logs/bench.log"));
    let (mut ours, mut greeting, mut running) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        ours.push(start(&mut client, "bench").await);
        destroy(&mut client, "bench").await;
        let (d, a) = (dir.path().to_owned(), argv.clone());
        let (g, r) = tokio::task::spawn_blocking(move || bare_spawn(&a, &d, i))
            .await
            .unwrap();
        greeting.push(g);
        running.push(r);
    }
    let (ours, greeting, running) = (median(ours), median(greeting), median(running));

    // 20 guests: define + start (all), then destroy + undefine (all).
    let idle_rss = rss_kib(sup.pid());
    let names: Vec<String> = (0..GUESTS).map(|i| format!("g{i}")).collect();
    let cycle = Instant::now();
    for n in &names {
        define(&mut client, n).await;
        start(&mut client, n).await;
    }
    let busy_rss = rss_kib(sup.pid());
    for n in &names {
        destroy(&mut client, n).await;
        client
            .undefine_domain(UndefineDomainRequest {
                domain: n.clone(),
                destroy: false,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let cycle = cycle.elapsed();

    println!("\nsupervisor (qvirt-supervisor over gRPC vs the same QEMU spawned by hand)");
    println!("  state dir {}, run dir {}", state.display(), run.display());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  Start RPC to running, median of {RUNS}: {:.1} ms; the same QEMU argv by hand: {:.1} ms to its QMP greeting (ratio {:.2}), {:.1} ms to running after qmp_capabilities + cont (ratio {:.2}, {:+.1} ms); target <= 1.2, under 10 ms added",
        ms(ours),
        ms(greeting),
        ours.as_secs_f64() / greeting.as_secs_f64(),
        ms(running),
        ours.as_secs_f64() / running.as_secs_f64(),
        ms(ours) - ms(running),
    );
    println!(
        "  {GUESTS} guests define+start then destroy+undefine, one after another: {:.2} s",
        cycle.as_secs_f64()
    );
    println!(
        "  supervisor RSS: {:.1} MiB with 0 guests, {:.1} MiB with {GUESTS} running",
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    );
}
