//! `make bench`: what the supervisor adds to starting QEMU, beside the
//! reference measured in the same run: the same QEMU command spawned by
//! hand, up to its QMP greeting. Also a define + start + destroy cycle of
//! 20 guests, and the supervisor's RSS with 0 and 20 running guests.
//! Numbers are for this machine at this moment: read the ratios.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{ChildGuard, Service, rss_kib, tool_path};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, StartDomainRequest, UndefineDomainRequest,
    define_domain_request,
};
use tonic::transport::Channel;

const RUNS: usize = 15;
const GUESTS: usize = 20;
/// Bound on one bare QEMU's greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(30);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Spawns QEMU as the supervisor would for a TCG guest with no OS, with a
/// QMP socket QEMU opens itself, and reads the greeting: the reference.
fn bare_spawn_to_greeting(dir: &std::path::Path, i: usize) -> Duration {
    let sock = dir.join(format!("bare-{i}.sock"));
    let start = Instant::now();
    let mut qemu = ChildGuard::spawn(
        Command::new(tool_path("qemu-system-x86_64"))
            .args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
            .args(["-machine", "q35", "-accel", "tcg", "-m", "128"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
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
        std::thread::sleep(Duration::from_millis(1));
    };
    stream.set_read_timeout(Some(GREETING_TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let took = start.elapsed();
    assert!(line.contains("\"QMP\""), "{line}");
    drop(qemu);
    took
}

async fn define(client: &mut SupervisorClient<Channel>, name: &str) {
    let yaml = format!("name: {name}\nmemory_mib: 128\naccel: tcg\n");
    client
        .define_domain(DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(yaml)),
            allow_update: false,
        })
        .await
        .unwrap();
}

async fn start(client: &mut SupervisorClient<Channel>, name: &str) -> Duration {
    let t = Instant::now();
    client
        .start_domain(StartDomainRequest {
            domain: name.into(),
            paused: false,
        })
        .await
        .unwrap();
    t.elapsed()
}

async fn destroy(client: &mut SupervisorClient<Channel>, name: &str) {
    client
        .destroy_domain(DestroyDomainRequest {
            domain: name.into(),
            graceful: false,
        })
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let mut sup = Service::start(
        "qvirt-supervisor",
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--start-timeout-secs",
            "60",
        ],
    );
    sup.wait_serving("qvirt.v1.Supervisor").await;
    let mut client = SupervisorClient::connect(sup.url()).await.unwrap();

    // Start RPC to a running guest (no OS here: the vCPUs run firmware),
    // interleaved with the bare reference so both see the same load.
    define(&mut client, "bench").await;
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        ours.push(start(&mut client, "bench").await);
        destroy(&mut client, "bench").await;
        let d = dir.path().to_owned();
        bare.push(
            tokio::task::spawn_blocking(move || bare_spawn_to_greeting(&d, i))
                .await
                .unwrap(),
        );
    }
    let (ours, bare) = (median(ours), median(bare));

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
            })
            .await
            .unwrap();
    }
    let cycle = cycle.elapsed();

    println!("\nsupervisor (qvirt-supervisor over gRPC vs the same QEMU spawned by hand)");
    println!(
        "  Start RPC to running, median of {RUNS}: {:.1} ms (bare spawn + greeting {:.1} ms, ratio {:.2}; target <= 1.2, under 10 ms added)",
        ours.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        ours.as_secs_f64() / bare.as_secs_f64()
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
