//! `make bench`: qvirt through its gateway beside libvirt 9 through its
//! API, the system qvirt's users would otherwise pick, in the same run on
//! the same QEMU, in interleaved rounds (libvirt, qvirt, qvirt without the
//! gateway; the order turns each round):
//!
//! - a guest's life: define, start paused, destroy, undefine (TCG, 128
//!   MiB, 1 vCPU, machine `pc`, no disk or NIC, on both);
//! - suspend issued → the `STOP` monitor event received: by a
//!   `SubscribeMonitorEvents` subscriber of the gateway (suspend issued
//!   through the gateway too) vs a `qemuMonitorEventRegister` callback,
//!   and each split at QEMU's own timestamp of the event (wall clock, as
//!   both clients' are): the way there (the call, and QEMU stopping the
//!   vCPUs) and the way back (the event's delivery);
//! - guest-ping to the agent of a booted guest (the project's test guest,
//!   its agent the static qvirt-ga): `GuestAgent/Ping` through the gateway
//!   and agentd vs `qemuAgentCommand`.
//!
//! libvirt's side is `benches/libvirt/helper.py` (python3-libvirt), a
//! client of the harness's private libvirtd (`libvirtd::Libvirtd`: its own
//! mount namespace with its own config, run, state and log dirs over the
//! system's, so nothing outside its temp dir changes, under a child
//! subreaper that reaps the QEMUs it daemonizes at once, as systemd would;
//! here PID 1 reaps about once a second, and libvirt's destroy waits for
//! that); each libvirt time is taken in Python around the API call alone.
//! Needs `bash
//! scripts/bench-deps.sh` (`make bench` runs it). Phases by name:
//! `cargo bench -p qvirt-integration-tests --bench libvirt -- lifecycle`
//! (also `event`, `ping`); none named: all.
#![allow(clippy::unwrap_used, missing_docs)]
// Requests are built with `..Default::default()` even where every field
// is named today.
#![allow(clippy::needless_update)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qvirt_integration_tests::guest::{GUEST_CMDLINE, Images, guest_image, guest_images_in};
use qvirt_integration_tests::libvirtd::{Libvirtd, QEMU, guest_xml};
use qvirt_integration_tests::measure::{percentile, steal_percent, steal_ticks};
use qvirt_integration_tests::stack::{
    BearerChannel, GatewayStack, StackOptions, backend_channel, bearer_channel,
};
use qvirt_integration_tests::{QemuGuard, run_command, static_ga};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, PingRequest, ResumeDomainRequest,
    StartDomainRequest, SubscribeMonitorEventsRequest, SuspendDomainRequest, UndefineDomainRequest,
    define_domain_request,
};
use serde_json::{Value, json};

/// Interleaved rounds of the guest's life cycle.
const LIFECYCLE_ROUNDS: usize = 7;
/// Interleaved rounds of suspend → STOP, and samples per side per round.
const EVENT_ROUNDS: usize = 7;
const EVENTS_PER_ROUND: usize = 10;
/// Interleaved rounds of guest-pings, and pings per side per round.
const PING_ROUNDS: usize = 7;
const PINGS_PER_ROUND: usize = 50;
/// One helper command (a start is the slowest, well under this).
const HELPER_TIMEOUT: Duration = Duration::from_secs(120);
/// A booted guest's agent answers within this.
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

fn helper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/libvirt/helper.py")
}

/// Debian's python3, where python3-libvirt is installed.
fn system_python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    let mut check = Command::new(&python);
    check.args(["-c", "import libvirt, libvirt_qemu"]);
    let ok = python.is_file()
        && run_command(&mut check, Duration::from_secs(30))
            .status
            .success();
    assert!(
        ok,
        "/usr/bin/python3 cannot import libvirt: run `bash scripts/bench-deps.sh` (`make bench` does)"
    );
    python
}

/// A private libvirtd and a client of it driven by JSON lines.
struct Libvirt {
    client: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
    /// Domains to destroy and undefine when dropped.
    domains: Vec<String>,
    // Dropped last: libvirtd stops once the client is done with it.
    _daemon: Libvirtd,
}

impl Libvirt {
    fn start() -> Libvirt {
        let python = system_python();
        let daemon = Libvirtd::start();
        let mut client = Command::new(&python)
            .arg(helper_script())
            .arg("client")
            .arg(daemon.uri())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = client.stdin.take().unwrap();
        let stdout = client.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Libvirt {
            client,
            stdin,
            replies,
            domains: Vec::new(),
            _daemon: daemon,
        }
    }

    fn try_call(&mut self, request: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{request}").map_err(|e| format!("write to the helper: {e}"))?;
        let line = self
            .replies
            .recv_timeout(HELPER_TIMEOUT)
            .map_err(|e| format!("no reply to {request} within {HELPER_TIMEOUT:?}: {e}"))?;
        let reply: Value = serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"))?;
        if reply["ok"] == true {
            Ok(reply)
        } else {
            Err(format!("libvirt: {request}: {}", reply["error"]))
        }
    }

    fn call(&mut self, request: Value) -> Value {
        self.try_call(request).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Seconds the call took, as the helper timed it.
    fn timed(&mut self, cmd: &str, name: &str) -> Duration {
        let reply = self.call(json!({"cmd": cmd, "name": name}));
        Duration::from_secs_f64(reply["s"].as_f64().unwrap())
    }

    fn define(&mut self, xml: &str, name: &str) -> Duration {
        let reply = self.call(json!({"cmd": "define", "xml": xml}));
        if !self.domains.iter().any(|d| d == name) {
            self.domains.push(name.to_owned());
        }
        Duration::from_secs_f64(reply["s"].as_f64().unwrap())
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // libvirtd leaves its QEMUs running when it stops: destroy first.
        for name in std::mem::take(&mut self.domains) {
            let _ = self.try_call(json!({"cmd": "destroy", "name": name}));
            let _ = self.try_call(json!({"cmd": "undefine", "name": name}));
        }
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// The empty guest both sides define and start: TCG, 128 MiB, 1 vCPU,
/// machine pc, no disk, NIC, balloon or USB.
fn small_xml(name: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><emulator>{QEMU}</emulator><memballoon model='none'/>\
         <controller type='usb' model='none'/></devices></domain>"
    )
}

fn small_yaml(name: &str) -> String {
    format!("name: {name}\nmemory_mib: 128\nvcpus: 1\nmachine: pc\naccel: tcg\n")
}

fn booted_yaml(name: &str, images: &Images) -> String {
    format!(
        "name: {name}\nmemory_mib: 128\nvcpus: 1\nmachine: q35\naccel: tcg\nkernel: {}\n\
         initrd: {}\ncmdline: {GUEST_CMDLINE}\nagent: true\n",
        images.vmlinux.display(),
        images.initramfs.display(),
    )
}

/// qvirt's clients: through the gateway, or direct to each backend.
struct Qvirt {
    sup: SupervisorClient<BearerChannel>,
    bus: EventBusClient<BearerChannel>,
    agent: Option<GuestAgentClient<BearerChannel>>,
}

impl Qvirt {
    async fn connect(stack: &GatewayStack, through_gateway: bool) -> Qvirt {
        let connect = |url: String| async move {
            if through_gateway {
                bearer_channel(&stack.gw.url(), Some(stack.bearer())).await
            } else {
                backend_channel(&url).await
            }
        };
        let agent = Some(GuestAgentClient::new(connect(stack.agentd.url()).await));
        Qvirt {
            sup: SupervisorClient::new(connect(stack.sup.url()).await),
            bus: EventBusClient::new(connect(stack.bus.url()).await),
            agent,
        }
    }

    async fn define(&mut self, yaml: String) -> Duration {
        let t = Instant::now();
        self.sup
            .define_domain(DefineDomainRequest {
                source: Some(define_domain_request::Source::SpecYaml(yaml)),
                ..Default::default()
            })
            .await
            .unwrap();
        t.elapsed()
    }

    async fn start(&mut self, name: &str, paused: bool) -> (Duration, u32, String) {
        let t = Instant::now();
        let d = self
            .sup
            .start_domain(StartDomainRequest {
                domain: name.into(),
                paused,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap();
        let elapsed = t.elapsed();
        let uuid = d.spec.map(|s| s.uuid).unwrap_or_default();
        (elapsed, d.pid, uuid)
    }

    async fn destroy(&mut self, name: &str) -> Duration {
        let t = Instant::now();
        self.sup
            .destroy_domain(DestroyDomainRequest {
                domain: name.into(),
                graceful: false,
                ..Default::default()
            })
            .await
            .unwrap();
        t.elapsed()
    }

    async fn undefine(&mut self, name: &str) -> Duration {
        let t = Instant::now();
        self.sup
            .undefine_domain(UndefineDomainRequest {
                domain: name.into(),
                destroy: false,
                ..Default::default()
            })
            .await
            .unwrap();
        t.elapsed()
    }
}

/// Which side a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Libvirt,
    Gateway,
    Direct,
}

const SIDES: [Side; 3] = [Side::Libvirt, Side::Gateway, Side::Direct];

fn order(r: usize) -> [Side; 3] {
    let mut o = SIDES;
    o.rotate_left(r % 3);
    o
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// `min / median / max` of `v`.
fn mmm(mut v: Vec<f64>, decimals: usize) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.decimals$} / {:.decimals$} / {:.decimals$}",
        v[0],
        percentile(&v, 0.5),
        v[v.len() - 1]
    )
}

/// One table row: medians over rounds of each side (`unit` per sample,
/// `scale` from seconds), and each qvirt side's per-round ratio to libvirt.
fn row(what: &str, rounds: &[[f64; 3]], goal: &str, scale: f64, unit: &str) {
    let col = |s: Side| -> Vec<f64> { rounds.iter().map(|r| r[s as usize]).collect() };
    let ratio = |s: Side| -> Vec<f64> {
        rounds
            .iter()
            .map(|r| r[s as usize] / r[Side::Libvirt as usize])
            .collect()
    };
    println!(
        "  {what:<30} {:>9.2} {:>9.2} {:>9.2} {unit:<3}  {:<18}  {:<18}  {goal}",
        median(col(Side::Libvirt)) * scale,
        median(col(Side::Gateway)) * scale,
        median(col(Side::Direct)) * scale,
        mmm(ratio(Side::Gateway), 2),
        mmm(ratio(Side::Direct), 2),
    );
}

fn header(what: &str) {
    println!(
        "  {what:<30} {:>9} {:>9} {:>9} {:<3}  {:<18}  {:<18}  goal (gateway/libvirt)",
        "libvirt", "gateway", "direct", "", "gateway/libvirt", "direct/libvirt"
    );
}

async fn lifecycle(lv: &mut Libvirt, gw: &mut Qvirt, direct: &mut Qvirt, tag: &str) {
    // [round][op][side] in seconds
    let mut rounds: Vec<[[f64; 3]; 4]> = Vec::new();
    // One cycle of each first: page cache, connections, libvirt's caps.
    for side in SIDES {
        lifecycle_once(lv, gw, direct, side, &format!("warm-{tag}")).await;
    }
    for r in 0..LIFECYCLE_ROUNDS {
        let mut this = [[0.0; 3]; 4];
        for side in order(r) {
            let times = lifecycle_once(lv, gw, direct, side, &format!("life-{tag}")).await;
            for (op, t) in times.iter().enumerate() {
                this[op][side as usize] = t.as_secs_f64();
            }
        }
        rounds.push(this);
    }
    println!(
        "\na guest's life (TCG, 128 MiB, 1 vCPU, pc, no disk), {LIFECYCLE_ROUNDS} interleaved rounds; medians in ms, ratios min / median / max over rounds"
    );
    header("");
    let goals = ["<= 1", "<= 1", "<= 1", "<= 1"];
    for (op, what) in ["define", "start paused", "destroy", "undefine"]
        .iter()
        .enumerate()
    {
        let per: Vec<[f64; 3]> = rounds.iter().map(|r| r[op]).collect();
        row(what, &per, goals[op], 1e3, "ms");
    }
}

/// define, start paused, destroy, undefine on one side.
async fn lifecycle_once(
    lv: &mut Libvirt,
    gw: &mut Qvirt,
    direct: &mut Qvirt,
    side: Side,
    name: &str,
) -> [Duration; 4] {
    let name = format!("{name}-{side:?}").to_lowercase();
    match side {
        Side::Libvirt => {
            let d = lv.define(&small_xml(&name), &name);
            let s = lv.timed("start_paused", &name);
            let x = lv.timed("destroy", &name);
            let u = lv.timed("undefine", &name);
            lv.domains.retain(|n| *n != name);
            [d, s, x, u]
        }
        Side::Gateway | Side::Direct => {
            let q = if side == Side::Gateway { gw } else { direct };
            let d = q.define(small_yaml(&name)).await;
            let (s, pid, uuid) = q.start(&name, true).await;
            let _guard = QemuGuard(pid, uuid);
            let x = q.destroy(&name).await;
            let u = q.undefine(&name).await;
            [d, s, x, u]
        }
    }
}

/// Suspend → STOP on the booted guests, `EVENTS_PER_ROUND` per side per
/// round; the median of each side's samples per round.
async fn events(
    lv: &mut Libvirt,
    gw: &mut Qvirt,
    direct: &mut Qvirt,
    lv_name: &str,
    qv_name: &str,
) {
    let mut subs = Vec::new();
    for q in [&mut *gw, &mut *direct] {
        let mut s = q
            .bus
            .subscribe_monitor_events(SubscribeMonitorEventsRequest {
                domain: qv_name.into(),
                event: "STOP".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(Kind::Established(_))));
        subs.push(s);
    }
    // Per round and side: the whole time, and its two parts split at
    // QEMU's own (wall clock) timestamp of the STOP event.
    let (mut rounds, mut to_qemu, mut from_qemu) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..EVENT_ROUNDS + 1 {
        let (mut this, mut this_to, mut this_from) = ([0.0; 3], [0.0; 3], [0.0; 3]);
        for side in order(r) {
            let mut samples = Vec::new();
            for _ in 0..EVENTS_PER_ROUND {
                let (d, to, from) = match side {
                    Side::Libvirt => {
                        let reply = lv.call(json!({"cmd": "stop_event", "name": lv_name}));
                        lv.call(json!({"cmd": "resume", "name": lv_name}));
                        let f = |k: &str| reply[k].as_f64().unwrap();
                        (f("s"), f("to_qemu"), f("from_qemu"))
                    }
                    Side::Gateway | Side::Direct => {
                        let i = (side == Side::Direct) as usize;
                        let q = if side == Side::Gateway {
                            &mut *gw
                        } else {
                            &mut *direct
                        };
                        let sub = &mut subs[i];
                        let wall = SystemTime::now();
                        let t = Instant::now();
                        let event = async {
                            loop {
                                let m = sub.message().await.unwrap().unwrap();
                                match m.kind {
                                    Some(Kind::Event(e)) if e.event == "STOP" => {
                                        break (t.elapsed(), SystemTime::now(), e);
                                    }
                                    Some(Kind::Lost(l)) => panic!("{} events lost", l.count),
                                    _ => {}
                                }
                            }
                        };
                        let suspend = q.sup.suspend_domain(SuspendDomainRequest {
                            domain: qv_name.into(),
                            ..Default::default()
                        });
                        let (reply, (d, at, e)) = tokio::join!(suspend, event);
                        reply.unwrap();
                        let secs =
                            |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
                        let qemu =
                            e.timestamp_seconds as f64 + e.timestamp_microseconds as f64 / 1e6;
                        // The other side's subscriber has the same event:
                        // taken now, it is not a next sample's.
                        let other = &mut subs[1 - i];
                        tokio::time::timeout(HELPER_TIMEOUT, async {
                            while !matches!(
                                other.message().await.unwrap().unwrap().kind,
                                Some(Kind::Event(_))
                            ) {}
                        })
                        .await
                        .expect("the other subscriber's STOP");
                        q.sup
                            .resume_domain(ResumeDomainRequest {
                                domain: qv_name.into(),
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                        (d.as_secs_f64(), qemu - secs(wall), secs(at) - qemu)
                    }
                };
                samples.push((d, to, from));
            }
            let s = side as usize;
            this[s] = median(samples.iter().map(|x| x.0).collect());
            this_to[s] = median(samples.iter().map(|x| x.1).collect());
            this_from[s] = median(samples.iter().map(|x| x.2).collect());
        }
        // Round 0 warms up.
        if r > 0 {
            rounds.push(this);
            to_qemu.push(this_to);
            from_qemu.push(this_from);
        }
    }
    println!(
        "\nsuspend issued → STOP event at a subscriber (booted guest), {EVENT_ROUNDS} interleaved rounds of {EVENTS_PER_ROUND}; medians in ms"
    );
    println!(
        "  (libvirt: qemuMonitorEventRegister callback; gateway: SuspendDomain and SubscribeMonitorEvents through the gateway; direct: supervisor and bus)"
    );
    header("");
    row("suspend → STOP", &rounds, "<= 0.8", 1e3, "ms");
    row("  issued → QEMU's timestamp", &to_qemu, "", 1e3, "ms");
    row("  QEMU's timestamp → received", &from_qemu, "", 1e3, "ms");
}

async fn pings(lv: &mut Libvirt, gw: &mut Qvirt, direct: &mut Qvirt, lv_name: &str, qv_name: &str) {
    let mut rounds = Vec::new();
    for r in 0..PING_ROUNDS + 1 {
        let mut this = [0.0; 3];
        for side in order(r) {
            let mut samples: Vec<f64> = match side {
                Side::Libvirt => {
                    let reply = lv
                        .call(json!({"cmd": "agent_ping", "name": lv_name, "n": PINGS_PER_ROUND}));
                    reply["samples"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_f64().unwrap())
                        .collect()
                }
                Side::Gateway | Side::Direct => {
                    let q = if side == Side::Gateway {
                        &mut *gw
                    } else {
                        &mut *direct
                    };
                    let agent = q.agent.as_mut().unwrap();
                    let mut v = Vec::new();
                    for _ in 0..PINGS_PER_ROUND {
                        let t = Instant::now();
                        agent
                            .ping(PingRequest {
                                domain: qv_name.into(),
                                timeout: Some(prost_types::Duration {
                                    seconds: 5,
                                    nanos: 0,
                                }),
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                        v.push(t.elapsed().as_secs_f64());
                    }
                    v
                }
            };
            samples.sort_by(f64::total_cmp);
            this[side as usize] = percentile(&samples, 0.5);
        }
        if r > 0 {
            rounds.push(this);
        }
    }
    println!(
        "\nguest-ping to a booted guest's agent (qvirt-ga), {PING_ROUNDS} interleaved rounds of {PINGS_PER_ROUND}; p50 in µs"
    );
    println!(
        "  (libvirt: qemuAgentCommand; gateway: GuestAgent/Ping through the gateway and agentd; direct: agentd)"
    );
    header("");
    row("guest-ping p50", &rounds, "<= 0.6", 1e6, "µs");
}

/// Boots the test guest on both sides; returns their names and a guard
/// for qvirt's QEMU. `Err` says why the guest cannot be built here.
async fn boot_guests(
    lv: &mut Libvirt,
    gw: &mut Qvirt,
    images_lv: &Images,
    images_qv: &Images,
    console: &Path,
) -> (String, String, QemuGuard) {
    let (lv_name, qv_name) = ("booted-lv".to_owned(), "booted-qv".to_owned());
    lv.define(&guest_xml(&lv_name, images_lv, 1, console, None), &lv_name);
    lv.call(json!({"cmd": "start", "name": lv_name}));
    gw.define(booted_yaml(&qv_name, images_qv)).await;
    let (_, pid, uuid) = gw.start(&qv_name, false).await;
    let guard = QemuGuard(pid, uuid);
    lv.call(json!({"cmd": "wait_agent", "name": lv_name, "timeout": AGENT_TIMEOUT.as_secs()}));
    let agent = gw.agent.as_mut().unwrap();
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        let ping = agent
            .ping(PingRequest {
                domain: qv_name.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await;
        match ping {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "qvirt's guest agent never answered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    (lv_name, qv_name, guard)
}

#[tokio::main]
async fn main() {
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |phase: &str| picked.is_empty() || picked.iter().any(|p| p == phase);
    let guest = if run("event") || run("ping") {
        match guest_image(&static_ga()) {
            Ok(g) => Some(g),
            Err(why) => {
                println!("libvirt bench: no booted guest (event and ping phases skipped): {why}");
                None
            }
        }
    } else {
        None
    };
    let work = tempfile::tempdir().unwrap();
    let images = guest.as_ref().map(|image| {
        (
            guest_images_in(work.path(), "lv", image),
            guest_images_in(work.path(), "qv", image),
        )
    });
    let image_root = images
        .as_ref()
        .map(|(_, qv)| qv.root.display().to_string())
        .unwrap_or_else(|| work.path().display().to_string());
    let stack = GatewayStack::start_with(&StackOptions {
        gateway_limits_yaml: "  calls_per_second: 100000\n".into(),
        supervisor_args: vec![
            "--image-root".into(),
            image_root,
            "--start-timeout-secs".into(),
            "120".into(),
        ],
        ..Default::default()
    })
    .await;
    let mut gw = Qvirt::connect(&stack, true).await;
    let mut direct = Qvirt::connect(&stack, false).await;
    let mut lv = Libvirt::start();
    let version = lv.call(json!({"cmd": "version"}));
    let v = |n: u64| format!("{}.{}.{}", n / 1_000_000, n / 1000 % 1000, n % 1000);
    println!(
        "\nqvirt (through qvirt-gateway with a bearer token, and direct to its services) vs libvirt {} (python3-libvirt, private libvirtd), QEMU {}",
        v(version["libvirt"].as_u64().unwrap_or(0)),
        v(version["qemu"].as_u64().unwrap_or(0)),
    );
    let steal = steal_ticks();
    if run("lifecycle") {
        lifecycle(&mut lv, &mut gw, &mut direct, "a").await;
    }
    if let Some((images_lv, images_qv)) = &images {
        let console = work.path().join("lv-console.log");
        let (lv_name, qv_name, _guard) =
            boot_guests(&mut lv, &mut gw, images_lv, images_qv, &console).await;
        if run("event") {
            events(&mut lv, &mut gw, &mut direct, &lv_name, &qv_name).await;
        }
        if run("ping") {
            pings(&mut lv, &mut gw, &mut direct, &lv_name, &qv_name).await;
        }
        gw.destroy(&qv_name).await;
    }
    println!(
        "\n  CPU stolen by the hypervisor meanwhile: {:.1}%",
        steal_percent(steal, steal_ticks())
    );
    drop(lv);
}
