//! `make bench`: qvirtctl against virsh as a person meets them: each
//! command timed as a whole process (spawn, wait for its exit, wall
//! time), in the same run on the same QEMU, in interleaved rounds (virsh,
//! qvirtctl through the gateway over TCP with a bearer token, qvirtctl on
//! the gateway's read-write unix socket; the order turns each round):
//!
//! - `list --all`, `dominfo`, `qemu-monitor-command` (QMP `query-status`)
//!   on a running guest, [`QUICK_CALLS`] of each per side per round;
//! - `start` and `destroy` of that guest (TCG, 128 MiB, 1 vCPU, machine
//!   `pc`, no disk or NIC, on both), once per side per round;
//! - the floor: `virsh --version` and `qvirtctl version`, which connect
//!   to nothing (process start, dynamic linking, argument parsing).
//!
//! virsh talks to the harness's private libvirtd (`libvirtd::Libvirtd`:
//! libvirt 9 in its own mount namespace, under a child subreaper that reaps
//! the QEMUs it daemonizes at once, as systemd would) over its unix socket;
//! qvirtctl to a `GatewayStack` built from the release binaries
//! (`QVIRT_BIN_DIR`, as `scripts/bench.sh` sets it). Goal: qvirtctl at
//! most 0.5x virsh's wall time for each command.
#![allow(clippy::unwrap_used, missing_docs)]

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qvirt_integration_tests::libvirtd::{Libvirtd, QEMU};
use qvirt_integration_tests::measure::{percentile, steal_percent, steal_ticks};
use qvirt_integration_tests::stack::{GatewayStack, StackOptions};
use qvirt_integration_tests::{QemuGuard, bin_path, run_command, text};

/// Interleaved rounds.
const ROUNDS: usize = 9;
/// Calls of each quick command per side per round (the round's figure is
/// their median).
const QUICK_CALLS: usize = 5;
/// One command (a start is the slowest, well under this).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The goal: qvirtctl's wall time at most this times virsh's.
const GOAL: f64 = 0.5;

/// Who answers a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Virsh = 0,
    Tcp = 1,
    Unix = 2,
}
const SIDES: [Side; 3] = [Side::Virsh, Side::Tcp, Side::Unix];

/// The commands, in the order a round runs them.
const OPS: [&str; 6] = [
    "version",
    "start",
    "list --all",
    "dominfo",
    "qemu-monitor-command",
    "destroy",
];
const QUERY: &str = r#"{"execute":"query-status"}"#;

/// How to run each side's commands.
struct Clients {
    virsh_uri: String,
    tcp_url: String,
    token: OsString,
    unix_url: String,
    qvirtctl: std::path::PathBuf,
}

impl Clients {
    fn command(&self, side: Side, args: &[&str]) -> Command {
        match side {
            Side::Virsh => {
                let mut cmd = Command::new("/usr/bin/virsh");
                // `virsh --version` connects to nothing, as `qvirtctl
                // version` does.
                if args != ["--version"] {
                    cmd.args(["-q", "-c", &self.virsh_uri]);
                }
                cmd.args(args);
                cmd
            }
            Side::Tcp | Side::Unix => {
                let mut cmd = Command::new(&self.qvirtctl);
                cmd.env_remove("QVIRT_URL")
                    .env_remove("QVIRT_TOKEN")
                    .env_remove("QVIRT_TOKEN_FILE");
                if side == Side::Tcp {
                    cmd.arg("--connect")
                        .arg(&self.tcp_url)
                        .arg("--token-file")
                        .arg(&self.token);
                } else {
                    cmd.arg("--connect").arg(&self.unix_url);
                }
                cmd.args(args);
                cmd
            }
        }
    }

    /// Runs one command as a whole process; its wall time and output. It
    /// must succeed.
    fn timed(&self, side: Side, args: &[&str]) -> (Duration, Output) {
        let mut cmd = self.command(side, args);
        let t = Instant::now();
        let out = run_command(&mut cmd, COMMAND_TIMEOUT);
        let d = t.elapsed();
        assert!(
            out.status.success(),
            "{side:?} {args:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        (d, out)
    }

    /// The arguments of operation `op` on domain `name` for `side`.
    fn args<'a>(side: Side, op: &str, name: &'a str) -> Vec<&'a str> {
        match (op, side) {
            ("version", Side::Virsh) => vec!["--version"],
            ("version", _) => vec!["version"],
            ("list --all", _) => vec!["list", "--all"],
            ("qemu-monitor-command", _) => vec!["qemu-monitor-command", name, QUERY],
            ("start", _) => vec!["start", name],
            ("dominfo", _) => vec!["dominfo", name],
            ("destroy", _) => vec!["destroy", name],
            _ => unreachable!("{op}"),
        }
    }
}

/// virsh's domain, destroyed and undefined on drop.
struct VirshDomain<'a> {
    lv: &'a Libvirtd,
    name: String,
}

impl Drop for VirshDomain<'_> {
    fn drop(&mut self) {
        let _ = self.lv.virsh(&["destroy", &self.name]);
        let _ = self.lv.virsh(&["undefine", &self.name]);
    }
}

/// The empty guest both sides run: TCG, 128 MiB, 1 vCPU, machine pc, no
/// disk, NIC, balloon or USB.
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
fn mmm(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.2} / {:.2} / {:.2}",
        v[0],
        percentile(&v, 0.5),
        v[v.len() - 1]
    )
}

/// A guard that kills `name`'s QEMU by pid if it outlives the bench (its
/// pid and uuid found outside the timing).
fn qemu_guard(c: &Clients, side: Side, name: &str, lv_dir: &Path) -> QemuGuard {
    if side == Side::Virsh {
        let pid = std::fs::read_to_string(lv_dir.join(format!("run/qemu/{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        let uuid = text(&c.timed(side, &["domuuid", name]).1.stdout);
        return QemuGuard(pid, uuid.trim().to_owned());
    }
    let info = c.timed(side, &["--json", "dominfo", name]).1;
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    QemuGuard(
        v["pid"].as_u64().unwrap_or(0) as u32,
        v["spec"]["uuid"].as_str().unwrap_or_default().to_owned(),
    )
}

/// One round on one side: each op's wall time in seconds.
fn round(
    c: &Clients,
    side: Side,
    name: &str,
    qemu: &mut Vec<QemuGuard>,
    lv_dir: &Path,
) -> [f64; 6] {
    let mut this = [0.0; 6];
    for (i, op) in OPS.iter().enumerate() {
        let args = Clients::args(side, op, name);
        let calls = match *op {
            "start" | "destroy" => 1,
            _ => QUICK_CALLS,
        };
        let mut samples = Vec::new();
        for _ in 0..calls {
            let (d, _) = c.timed(side, &args);
            samples.push(d.as_secs_f64());
            if *op == "start" {
                qemu.push(qemu_guard(c, side, name, lv_dir));
            }
        }
        this[i] = median(samples);
    }
    this
}

#[tokio::main]
async fn main() {
    let work = tempfile::tempdir().unwrap();
    let stack = GatewayStack::start_with(&StackOptions {
        gateway_limits_yaml: "  calls_per_second: 100000\n".into(),
        supervisor_args: vec!["--image-root".into(), work.path().display().to_string()],
        ..Default::default()
    })
    .await;
    let lv = Libvirtd::start();
    let clients = Clients {
        virsh_uri: lv.uri(),
        tcp_url: stack.gw.url(),
        token: stack.rw_token.clone().into_os_string(),
        unix_url: format!("unix:{}", stack.rw_sock.display()),
        qvirtctl: bin_path("qvirtctl"),
    };

    // Each side's guest, defined once; qvirt's one domain serves both of
    // its sides.
    let (lv_name, qv_name) = ("cli-lv", "cli-qv");
    let xml = work.path().join("cli-lv.xml");
    std::fs::write(&xml, small_xml(lv_name)).unwrap();
    lv.virsh_ok(&[Path::new("define"), &xml]);
    let _lv_domain = VirshDomain {
        lv: &lv,
        name: lv_name.into(),
    };
    let yaml = work.path().join("cli-qv.yaml");
    std::fs::write(&yaml, small_yaml(qv_name)).unwrap();
    clients.timed(Side::Tcp, &["define", yaml.to_str().unwrap()]);
    let version = text(&clients.timed(Side::Virsh, &["--version"]).1.stdout);

    let steal = steal_ticks();
    // [round][op][side] in seconds; one warm-up round first (page cache,
    // libvirt's capabilities).
    let mut rounds: Vec<[[f64; 3]; 6]> = Vec::new();
    let mut guards = Vec::new();
    for r in 0..=ROUNDS {
        let mut this = [[0.0; 3]; 6];
        for side in order(r) {
            let name = if side == Side::Virsh {
                lv_name
            } else {
                qv_name
            };
            let times = round(&clients, side, name, &mut guards, lv.dir());
            for (op, t) in times.iter().enumerate() {
                this[op][side as usize] = *t;
            }
            guards.clear();
        }
        if r > 0 {
            rounds.push(this);
        }
    }

    println!(
        "\nqvirtctl (release, through qvirt-gateway: TCP with a bearer token, or its read-write unix socket) vs virsh {} (private libvirtd, unix socket), each command a whole process; {ROUNDS} interleaved rounds, quick commands {QUICK_CALLS}x per side per round; medians in ms, ratios min / median / max over rounds",
        version.trim()
    );
    println!(
        "  {:<22} {:>8} {:>8} {:>8}  {:<18}  {:<18}  goal (tcp/virsh)",
        "", "virsh", "tcp", "unix", "tcp/virsh", "unix/virsh"
    );
    for (op, what) in OPS.iter().enumerate() {
        let col = |s: Side| -> Vec<f64> { rounds.iter().map(|r| r[op][s as usize]).collect() };
        let ratio = |s: Side| -> Vec<f64> {
            rounds
                .iter()
                .map(|r| r[op][s as usize] / r[op][Side::Virsh as usize])
                .collect()
        };
        let met = if median(ratio(Side::Tcp)) <= GOAL {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "  {what:<22} {:>8.2} {:>8.2} {:>8.2}  {:<18}  {:<18}  <= {GOAL}: {met}",
            median(col(Side::Virsh)) * 1e3,
            median(col(Side::Tcp)) * 1e3,
            median(col(Side::Unix)) * 1e3,
            mmm(ratio(Side::Tcp)),
            mmm(ratio(Side::Unix)),
        );
    }
    println!(
        "  (`version` connects to nothing on either side: the process floor)\n  CPU stolen by the hypervisor meanwhile: {:.1}%; load average at the end: {}",
        steal_percent(steal, steal_ticks()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    clients.timed(Side::Tcp, &["undefine", qv_name]);
    drop(stack);
}
