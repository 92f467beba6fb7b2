//! qvirtctl as a libvirt user meets it: the real binary against a real
//! stack (gateway, supervisor, bus, agentd) and real QEMU under TCG, with
//! virsh's command names, flags and output; and a real guest (the tiny
//! test guest with the static qvirt-ga) for the guest-agent commands.
//! One test keeps docs/LIBVIRT.md's virsh → qvirtctl table equal to the
//! command line itself.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qvirt_integration_tests::guest::GUEST_CMDLINE;
use qvirt_integration_tests::stack::{GatewayStack, install_guest, test_guest};
use qvirt_integration_tests::{
    ChildGuard, QemuGuard, bin_path, run_command, text, workspace_root, write_internal_token,
};

/// One qvirtctl call (starting a TCG guest included).
const CTL_TIMEOUT: Duration = Duration::from_secs(120);
/// Booting the test guest under TCG on 2 shared cores, to its agent.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// A background event printer's output to show up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `qvirtctl --connect URL [--token-file T] ARGS`, with no QVIRT_*
/// variables from the test's environment.
fn qvirtctl(url: &str, token: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("qvirtctl"));
    cmd.env_remove("QVIRT_URL")
        .env_remove("QVIRT_TOKEN")
        .env_remove("QVIRT_TOKEN_FILE")
        .env_remove("QVIRT_INTERNAL_TOKEN_FILE")
        .arg("--connect")
        .arg(url);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    cmd.args(args);
    cmd
}

fn ctl(url: &str, token: Option<&Path>, args: &[&str]) -> Output {
    run_command(&mut qvirtctl(url, token, args), CTL_TIMEOUT)
}

/// Its stdout; the call must have succeeded.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "qvirtctl failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The one error line; the call must have failed with exit status 1 and
/// a line ending in `(suffix)`.
fn error_line(out: Output, suffix: &str) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(
        stderr.trim_end().ends_with(&format!("({suffix})")),
        "{stderr:?}"
    );
    stderr
}

/// A qvirtctl left running (an event printer), stdout to a file.
struct Background {
    _child: ChildGuard,
    out: PathBuf,
}

impl Background {
    fn start(mut cmd: Command, out: PathBuf) -> Background {
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap());
        Background {
            _child: ChildGuard::spawn(&mut cmd),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Runs `poke` until the output holds every needle (or panics after
    /// `timeout`); the output.
    fn wait_for(&self, needles: &[&str], timeout: Duration, mut poke: impl FnMut()) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if needles.iter().all(|n| out.contains(n)) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {needles:?} within {timeout:?} in:\n{out}\nstderr: {}",
                std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default()
            );
            poke();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn test_domains_lifecycle_events_and_errors_as_virsh() {
    let stack = GatewayStack::start().await;
    let url = stack.gw.url();
    let (rw, ro) = (
        Some(stack.rw_token.as_path()),
        Some(stack.ro_token.as_path()),
    );
    let dir = stack.dir.path();

    // define FILE, and define - (stdin).
    let file = dir.join("vm1.yaml");
    std::fs::write(&file, "name: vm1\nmemory_mib: 64\naccel: tcg\n").unwrap();
    let out = ok(ctl(&url, rw, &["define", file.to_str().unwrap()]));
    assert_eq!(
        out,
        format!("Domain 'vm1' defined from {}\n", file.display())
    );
    // At the supervisor itself, past the gateway: only as an internal
    // caller (a host cut off from its gateways), with the internal secret.
    let sup = stack.sup.url();
    let refused = ctl(&sup, rw, &["list", "--all"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("served here to internal callers only"),
        "{}",
        text(&refused.stderr)
    );
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = write_internal_token(secret_dir.path());
    let secret = secret.to_str().unwrap();
    let listed = ok(ctl(
        &sup,
        None,
        &["--internal-token-file", secret, "list", "--all"],
    ));
    assert!(listed.contains("vm1"), "{listed}");
    let mut child = qvirtctl(&url, rw, &["define", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"name: vm2\naccel: tcg\n")
        .unwrap();
    let out = ok(child.wait_with_output().unwrap());
    assert_eq!(out, "Domain 'vm2' defined from stdin\n");

    // list: the active ones by default, --all, --name, --json.
    let out = ok(ctl(&url, ro, &["list"]));
    assert!(out.starts_with(" Name   State   UUID\n---"), "{out}");
    assert!(!out.contains("vm1"), "{out}");
    let out = ok(ctl(&url, ro, &["list", "--all"]));
    let row = out
        .lines()
        .find(|l| l.starts_with(" vm1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("   shut off   "), "{row}");
    assert_eq!(
        ok(ctl(&url, ro, &["list", "--all", "--name"])),
        "vm1\nvm2\n"
    );
    let list = json(&ok(ctl(&url, ro, &["--json", "list", "--all"])));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["state"], "DOMAIN_STATE_SHUTOFF");
    assert_eq!(
        ok(ctl(&url, ro, &["domstate", "vm1", "--reason"])),
        "shut off (unknown)\n"
    );

    // Lifecycle events (read-only is enough), with virsh's timestamps; the
    // subscription is live once a re-define shows up in it.
    let events = Background::start(
        qvirtctl(
            &url,
            ro,
            &["event", "--all", "--domain", "vm1", "--loop", "--timestamp"],
        ),
        dir.join("events.out"),
    );
    events.wait_for(&["Defined Updated"], EVENT_TIMEOUT, || {
        ok(ctl(&url, rw, &["define", file.to_str().unwrap()]));
    });

    // The read-only token is refused changes and raw monitor events;
    // no token at all is refused everything.
    error_line(
        ctl(&url, ro, &["start", "vm1"]),
        "PERMISSION_DENIED, PERMISSION_DENIED_ROLE",
    );
    error_line(
        ctl(&url, ro, &["qemu-monitor-event", "--loop"]),
        "PERMISSION_DENIED, PERMISSION_DENIED_ROLE",
    );
    error_line(
        ctl(&url, None, &["list"]),
        "UNAUTHENTICATED, UNAUTHENTICATED_TOKEN",
    );
    let line = error_line(
        ctl(&url, ro, &["dominfo", "nope"]),
        "NOT_FOUND, DOMAIN_NOT_FOUND",
    );
    assert!(line.contains("nope"), "{line}");

    // Raw QMP events with virsh's regex and no-case flags.
    let monitor = Background::start(
        qvirtctl(
            &url,
            rw,
            &[
                "qemu-monitor-event",
                "--domain",
                "vm1",
                "--event",
                "^(stop|resume)$",
                "--regex",
                "--no-case",
                "--loop",
            ],
        ),
        dir.join("monitor.out"),
    );

    // start, dominfo, QMP.
    assert_eq!(
        ok(ctl(&url, rw, &["start", "vm1"])),
        "Domain 'vm1' started\n"
    );
    let info = json(&ok(ctl(&url, ro, &["--json", "dominfo", "vm1"])));
    let pid = info["pid"].as_u64().unwrap() as u32;
    let _qemu = QemuGuard(pid, info["spec"]["uuid"].as_str().unwrap().to_owned());
    assert_eq!(info["state"], "DOMAIN_STATE_RUNNING");
    assert_eq!(info["spec"]["memory_mib"], "64");
    let out = ok(ctl(&url, ro, &["dominfo", "vm1"]));
    assert!(out.contains("\nState:          running\n"), "{out}");
    assert!(out.contains("\nMax memory:     65536 KiB\n"), "{out}");
    assert!(out.contains(&format!("\nPID:            {pid}\n")), "{out}");
    assert!(ok(ctl(&url, ro, &["list"])).contains(" vm1    running "));

    // Every read prints one JSON document with --json, for scripts (the
    // guest agent's reads are checked in the real guest's test).
    for args in [
        &["list", "--all", "--name"][..],
        &["dominfo", "vm1"],
        &["domstate", "vm1", "--reason"],
        &["event", "--list"],
        &[
            "qemu-monitor-command",
            "vm1",
            r#"{"execute": "query-status"}"#,
        ],
        &["health"],
        &["version"],
    ] {
        let out = ok(ctl(&url, rw, &[&["--json"][..], args].concat()));
        let v = json(&out);
        assert!(v.is_object() || v.is_array(), "{args:?}: {out}");
    }
    // A wait past a second shows a spinner, on a terminal only. The guest
    // (no OS) ignores the power button, so a waited shutdown waits.
    let out = ctl_tty(&url, rw, &["shutdown", "vm1", "--timeout", "2"]);
    let screen = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{screen}");
    assert!(screen.contains("shutting vm1 down"), "{screen}");
    let line = error_line(
        ctl(&url, rw, &["shutdown", "vm1", "--timeout", "2"]),
        "DEADLINE_EXCEEDED, TIMEOUT",
    );
    assert!(!line.contains("shutting vm1 down"), "{line}");
    assert_eq!(
        json(&ok(ctl(&url, ro, &["--json", "domstate", "vm1"]))),
        serde_json::json!({"state": "DOMAIN_STATE_RUNNING", "reason": "DOMAIN_STATE_REASON_RUNNING_BOOTED"})
    );
    let query = r#"{"execute": "query-status"}"#;
    let reply = json(&ok(ctl(&url, rw, &["qemu-monitor-command", "vm1", query])));
    assert_eq!(reply["return"]["status"], "running", "{reply}");
    let pretty = ok(ctl(
        &url,
        rw,
        &["qemu-monitor-command", "vm1", "--pretty", query],
    ));
    assert!(pretty.lines().count() > 3, "{pretty}");
    let value = json(&ok(ctl(
        &url,
        rw,
        &["qemu-monitor-command", "vm1", "--return-value", query],
    )));
    assert_eq!(value["running"], true, "{value}");
    let line = error_line(
        ctl(
            &url,
            rw,
            &[
                "qemu-monitor-command",
                "vm1",
                "--return-value",
                r#"{"execute": "no-such"}"#,
            ],
        ),
        "CommandNotFound",
    );
    assert!(line.starts_with("error: QEMU answered"), "{line}");

    // suspend / resume: virsh's lines and states, and the QMP events
    // (repeated until the subscription has seen both).
    let out = monitor.wait_for(
        &["event STOP at ", "event RESUME at "],
        EVENT_TIMEOUT,
        || {
            assert_eq!(
                ok(ctl(&url, rw, &["suspend", "vm1"])),
                "Domain 'vm1' suspended\n"
            );
            assert_eq!(
                ok(ctl(&url, ro, &["domstate", "vm1", "--reason"])),
                "paused (user)\n"
            );
            assert_eq!(
                ok(ctl(&url, rw, &["resume", "vm1"])),
                "Domain 'vm1' resumed\n"
            );
        },
    );
    assert!(out.contains(" for domain 'vm1': {}"), "{out}");
    assert_eq!(
        ok(ctl(&url, rw, &["reset", "vm1"])),
        "Domain 'vm1' was reset\n"
    );
    // save / restore: libvirt's managed save, the image the supervisor's.
    assert_eq!(ok(ctl(&url, rw, &["save", "vm1"])), "Domain 'vm1' saved\n");
    assert_eq!(
        ok(ctl(&url, ro, &["domstate", "vm1", "--reason"])),
        "shut off (saved)\n"
    );
    assert_eq!(
        ok(ctl(&url, rw, &["restore", "vm1"])),
        "Domain 'vm1' restored\n"
    );
    let info = json(&ok(ctl(&url, ro, &["--json", "dominfo", "vm1"])));
    let _restored = QemuGuard(
        info["pid"].as_u64().unwrap() as u32,
        info["spec"]["uuid"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        ok(ctl(&url, ro, &["domstate", "vm1", "--reason"])),
        "running (restored)\n"
    );
    assert_eq!(
        ok(ctl(&url, rw, &["destroy", "vm1"])),
        "Domain 'vm1' destroyed\n"
    );
    assert_eq!(
        ok(ctl(&url, ro, &["domstate", "vm1", "--reason"])),
        "shut off (destroyed)\n"
    );

    let out = events.wait_for(&["Stopped Destroyed"], EVENT_TIMEOUT, || {});
    for want in [
        "event 'lifecycle' for domain 'vm1': Started Booted",
        "event 'lifecycle' for domain 'vm1': Suspended Paused",
        "event 'lifecycle' for domain 'vm1': Resumed Unpaused",
        "event 'lifecycle' for domain 'vm1': Stopped Saved",
        "event 'lifecycle' for domain 'vm1': Started Restored",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // `--timestamp`: virsh's `YYYY-MM-DD HH:MM:SS.mmm+0000: ` prefix.
    let first = out.lines().next().unwrap();
    assert_eq!(&first[23..31], "+0000: e", "{first}");
    assert_eq!(&first[4..5], "-", "{first}");

    // The read-only unix socket: the socket is the role.
    let ro_sock = format!("unix:{}", stack.ro_sock.display());
    assert!(ok(ctl(&ro_sock, None, &["list", "--all"])).contains(" vm2 "));
    error_line(
        ctl(&ro_sock, None, &["start", "vm2"]),
        "PERMISSION_DENIED, PERMISSION_DENIED_ROLE",
    );
    let rw_sock = format!("unix:{}", stack.rw_sock.display());
    assert_eq!(
        ok(ctl(&rw_sock, None, &["undefine", "vm2"])),
        "Domain 'vm2' has been undefined\n"
    );
    assert_eq!(
        ok(ctl(&url, rw, &["undefine", "vm1"])),
        "Domain 'vm1' has been undefined\n"
    );
    assert_eq!(ok(ctl(&url, ro, &["list", "--all", "--name"])), "");

    // The hook executor is internal: the gateway does not expose it.
    let line = error_line(ctl(&url, rw, &["hooks", "list"]), "UNIMPLEMENTED");
    assert!(line.contains("does not expose the hook executor"), "{line}");

    // A gateway that is not there, and a usage error.
    let line = error_line(ctl("http://127.0.0.1:1", rw, &["list"]), "UNAVAILABLE");
    assert!(
        line.contains("cannot connect to the gateway at http://127.0.0.1:1"),
        "{line}"
    );
    assert_eq!(ctl(&url, rw, &["start"]).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_guest_agent_commands_in_a_real_guest() {
    let image = match test_guest() {
        Ok(image) => image,
        Err(why) => {
            eprintln!("test_guest_agent_commands_in_a_real_guest skipped: {why}");
            return;
        }
    };
    let stack = GatewayStack::start().await;
    let (vmlinux, initramfs) = install_guest(&image, &stack.images);
    let url = stack.gw.url();
    let (rw, ro) = (
        Some(stack.rw_token.as_path()),
        Some(stack.ro_token.as_path()),
    );
    let dir = stack.dir.path();
    let console = stack.state.join("serial/guest/console.log");
    let spec = dir.join("guest.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: guest\nmemory_mib: 128\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {}\n\
             cmdline: {GUEST_CMDLINE}\n\
             agent: true\nserial_log: {}\n",
            vmlinux.display(),
            initramfs.display(),
            console.display()
        ),
    )
    .unwrap();
    ok(ctl(&url, rw, &["define", spec.to_str().unwrap()]));
    ok(ctl(&url, rw, &["start", "guest"]));
    let info = json(&ok(ctl(&url, ro, &["--json", "dominfo", "guest"])));
    let _qemu = QemuGuard(
        info["pid"].as_u64().unwrap() as u32,
        info["spec"]["uuid"].as_str().unwrap().to_owned(),
    );

    // Until the agent answers a raw guest-ping.
    let ping = r#"{"execute": "guest-ping"}"#;
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let reply = loop {
        let out = ctl(
            &url,
            rw,
            &["qemu-agent-command", "guest", "--timeout", "2", ping],
        );
        if out.status.success() {
            break text(&out.stdout);
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered: {}\nconsole:\n{}",
            text(&out.stderr),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(json(&reply), serde_json::json!({"return": {}}));

    // guest-exec: decoded output on our stdout/stderr, the guest's exit
    // status as ours.
    let out = ctl(
        &url,
        rw,
        &[
            "guest-exec",
            "guest",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(
        ok(ctl(&url, rw, &["guest-exec", "guest", "--", "uname", "-m"])),
        "x86_64\n"
    );
    error_line(
        ctl(&url, ro, &["guest-exec", "guest", "--", "true"]),
        "PERMISSION_DENIED, PERMISSION_DENIED_ROLE",
    );

    // A file written into the guest and read back, bytes exact.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let local = dir.join("data.bin");
    std::fs::write(&local, &data).unwrap();
    assert_eq!(
        ok(ctl(
            &url,
            rw,
            &[
                "guest-file-write",
                "guest",
                "/tmp/data",
                local.to_str().unwrap()
            ]
        )),
        "Wrote 100000 bytes to /tmp/data\n"
    );
    let back = dir.join("back.bin");
    ok(ctl(
        &url,
        rw,
        &[
            "guest-file-read",
            "guest",
            "/tmp/data",
            "-o",
            back.to_str().unwrap(),
        ],
    ));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the file read back differs"
    );
    let out = ctl(
        &url,
        rw,
        &[
            "guest-file-read",
            "guest",
            "/tmp/data",
            "--offset",
            "1",
            "--length",
            "3",
        ],
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, [1u8, 2, 3]);
    // --json: the bytes in base64 with the read's size and end; with -o
    // the bytes go to the file and the JSON says where.
    let v = json(&ok(ctl(
        &url,
        rw,
        &[
            "--json",
            "guest-file-read",
            "guest",
            "/tmp/data",
            "--offset",
            "99998",
        ],
    )));
    assert_eq!(
        v,
        serde_json::json!({"data": "ZGU=", "eof": true, "path": "/tmp/data", "offset": 99998, "size": 2})
    );
    let tail = dir.join("tail.bin");
    let v = json(&ok(ctl(
        &url,
        rw,
        &[
            "--json",
            "guest-file-read",
            "guest",
            "/tmp/data",
            "--offset",
            "99998",
            "-o",
            tail.to_str().unwrap(),
        ],
    )));
    assert_eq!(v["size"], 2, "{v}");
    assert_eq!(v["output"], tail.to_str().unwrap(), "{v}");
    assert!(v.get("data").is_none(), "{v}");
    assert_eq!(std::fs::read(&tail).unwrap(), b"de");

    // guestinfo: virsh's `key : value` lines, the guest's kernel.
    let out = ok(ctl(&url, ro, &["guestinfo", "guest", "--os", "--hostname"]));
    let release = image.kernel_package.strip_prefix("linux-image-").unwrap();
    assert!(
        out.contains(&format!("os.kernel-release   : {release}\n")),
        "{out}"
    );
    assert!(out.contains("os.machine          : x86_64\n"), "{out}");
    assert!(out.contains("\nhostname            : "), "{out}");
    let all = ok(ctl(&url, ro, &["guestinfo", "guest"]));
    assert!(all.contains("if.count            : "), "{all}");
    let os = json(&ok(ctl(
        &url,
        ro,
        &["--json", "guestinfo", "guest", "--os"],
    )));
    assert_eq!(os["os.machine"], "x86_64", "{os}");

    // Freeze and thaw: the counts as virsh words them.
    let frozen = ok(ctl(&url, rw, &["domfsfreeze", "guest"]));
    assert!(
        frozen.starts_with("Froze ") && frozen.ends_with(" filesystem(s)\n"),
        "{frozen}"
    );
    let thawed = ok(ctl(&url, rw, &["domfsthaw", "guest"]));
    assert!(
        thawed.starts_with("Thawed ") && thawed.ends_with(" filesystem(s)\n"),
        "{thawed}"
    );

    // virsh's agent administration verbs, against the guest's real files.
    assert_eq!(
        ok(ctl(&url, ro, &["guestvcpus", "guest"])),
        "vcpus          : 0\nonline         : 0\nofflinable     : \n"
    );
    assert_eq!(
        json(&ok(ctl(&url, ro, &["--json", "guestvcpus", "guest"]))),
        serde_json::json!({"vcpus": "0", "online": "0", "offlinable": ""})
    );
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOrMMWvBPFxwUO1zHNgQ2CyAuvStGGi6VjoLy/Lzh7Uq qvirtctl@test";
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("# a comment\n{key}\n\n")).unwrap();
    let file = keys.to_str().unwrap();
    ok(ctl(
        &url,
        rw,
        &["set-user-sshkeys", "guest", "root", "--file", file],
    ));
    assert_eq!(
        ok(ctl(&url, ro, &["get-user-sshkeys", "guest", "root"])),
        format!("{key}\n")
    );
    assert_eq!(
        json(&ok(ctl(
            &url,
            ro,
            &["--json", "get-user-sshkeys", "guest", "root"]
        ))),
        serde_json::json!({"keys": [key]})
    );
    ok(ctl(
        &url,
        rw,
        &[
            "set-user-sshkeys",
            "guest",
            "root",
            "--file",
            file,
            "--remove",
        ],
    ));
    assert_eq!(
        ok(ctl(&url, ro, &["get-user-sshkeys", "guest", "root"])),
        ""
    );
    let line = error_line(
        ctl(&url, ro, &["get-user-sshkeys", "guest", "nobody-here"]),
        "NOT_FOUND, GUEST_USER_NOT_FOUND",
    );
    assert!(line.contains("nobody-here"), "{line}");
    error_line(
        ctl(&url, ro, &["set-user-password", "guest", "root", "x"]),
        "PERMISSION_DENIED, PERMISSION_DENIED_ROLE",
    );
    assert_eq!(
        ok(ctl(
            &url,
            rw,
            &["set-user-password", "guest", "root", "s3cret"]
        )),
        "Password set successfully for root in guest\n"
    );
    assert_eq!(
        ok(ctl(
            &url,
            rw,
            &["--json", "set-user-password", "guest", "root", "s3cret"]
        )),
        "{}\n"
    );
    let shadow = ok(ctl(&url, rw, &["guest-file-read", "guest", "/etc/shadow"]));
    assert!(
        shadow.starts_with("root:") && !shadow.starts_with("root:*:"),
        "{shadow}"
    );

    // Shutdown through the agent, waited for.
    assert_eq!(
        ok(ctl(
            &url,
            rw,
            &["shutdown", "guest", "--mode", "agent", "--timeout", "60"]
        )),
        "Domain 'guest' is shut off\n"
    );
    assert_eq!(
        ok(ctl(&url, ro, &["domstate", "guest", "--reason"])),
        "shut off (shutdown)\n"
    );
}

#[test]
fn test_docs_virsh_table_matches_the_command_line() {
    let docs = std::fs::read_to_string(workspace_root().join("docs/LIBVIRT.md")).unwrap();
    let begin = "<!-- qvirtctl-table:begin -->\n";
    let end = "<!-- qvirtctl-table:end -->";
    let start = docs.find(begin).expect("the table's begin marker") + begin.len();
    let stop = docs.find(end).expect("the table's end marker");
    assert_eq!(
        &docs[start..stop],
        qvirtctl::docs::markdown_table(),
        "docs/LIBVIRT.md's virsh → qvirtctl table differs from qvirtctl's commands; \
         paste qvirtctl::docs::markdown_table() between the markers"
    );
}

#[test]
fn test_help_completion_and_version_need_no_gateway() {
    let bin = bin_path("qvirtctl");
    let run = |args: &[&str]| run_command(Command::new(&bin).args(args), CTL_TIMEOUT);
    let help = ok(run(&["--help"]));
    for want in [
        "QVIRT_URL",
        "QVIRT_TOKEN",
        "unix:PATH",
        "Examples:",
        "qemu-monitor-event",
    ] {
        assert!(help.contains(want), "--help lacks {want}: {help}");
    }
    let bash = ok(run(&["completion", "bash"]));
    assert!(bash.contains("qemu-monitor-command") && bash.contains("--state-running"));
    // bash itself completes with the script: command names, flags, the
    // values of an enum flag.
    for (line, want) in [
        (
            "qvirtctl qemu-mon",
            "qemu-monitor-event\nqemu-monitor-command\n",
        ),
        ("qvirtctl list --state-r", "--state-running\n"),
        ("qvirtctl shutdown demo --mode ", "acpi\nagent\n"),
    ] {
        assert_eq!(bash_complete(&bin, line), want, "{line:?}");
    }
    // fish completes with its script too (candidate, tab, description).
    // zsh is checked for loading only: its script sources into compsys
    // and registers for qvirtctl without a word on stderr (running a
    // completion needs a terminal for zsh's line editor).
    for (line, want) in [
        (
            "qvirtctl qemu-mon",
            "qemu-monitor-command\tSend a QMP command to a domain's monitor\n\
             qemu-monitor-event\tWait for raw QMP events and print them\n",
        ),
        (
            "qvirtctl list --state-r",
            "--state-running\tOnly running domains\n",
        ),
        (
            "qvirtctl shutdown demo --mode ",
            "acpi\tThe ACPI power button\nagent\tThe guest agent (`guest-shutdown`)\n",
        ),
    ] {
        let out = run_command(
            Command::new("fish")
                .args(["--no-config", "-c"])
                .arg("\"$QVIRTCTL\" completion fish | source; complete -C \"$argv[1]\"")
                .args([line])
                .env("QVIRTCTL", &bin),
            CTL_TIMEOUT,
        );
        assert_eq!(ok(out), want, "fish, {line:?}");
    }
    let out = run_command(
        Command::new("zsh")
            .args(["-f", "-c"])
            .arg(
                "autoload -Uz compinit && compinit -u -D && \
                 source <(\"$QVIRTCTL\" completion zsh) && print -r -- $_comps[qvirtctl]",
            )
            .env("QVIRTCTL", &bin),
        CTL_TIMEOUT,
    );
    assert_eq!(text(&out.stderr), "", "zsh's stderr");
    assert_eq!(ok(out), "_qvirtctl\n");
    let version = ok(run(&["version"]));
    assert!(version.starts_with("qvirtctl "), "{version}");
}

/// What bash offers for `line` with qvirtctl's completion script loaded,
/// one candidate a line (as a user pressing TAB at the line's end).
fn bash_complete(bin: &Path, line: &str) -> String {
    const SCRIPT: &str = r#"
source <("$QVIRTCTL" completion bash)
COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_qvirtctl qvirtctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    ok(run_command(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c", SCRIPT, "complete", line])
            .env("QVIRTCTL", bin),
        CTL_TIMEOUT,
    ))
}

/// `qvirtctl ARGS` as a person at a terminal runs it: under a pseudo-
/// terminal (util-linux `script`), stdout and stderr both the terminal;
/// everything it drew, and its exit status.
fn ctl_tty(url: &str, token: Option<&Path>, args: &[&str]) -> Output {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = vec![quote(bin_path("qvirtctl").to_str().unwrap())];
    line.extend(["--connect", url].map(quote));
    if let Some(t) = token {
        line.extend(["--token-file", t.to_str().unwrap()].map(quote));
    }
    line.extend(args.iter().map(|a| quote(a)));
    run_command(
        Command::new("script")
            .args(["-q", "-e", "-f", "-c", &line.join(" "), "/dev/null"])
            .env_remove("QVIRT_URL")
            .env_remove("QVIRT_TOKEN")
            .env_remove("QVIRT_TOKEN_FILE"),
        CTL_TIMEOUT,
    )
}
