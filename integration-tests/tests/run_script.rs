//! `make run`'s script (scripts/run.sh) as a new user meets it: run from
//! a tree that holds the script and a bin dir only (no target/debug to
//! fall back on), on its own ports. It comes up, prints the gateway, the
//! two dev tokens and a tour whose qvirtctl commands work as printed; on
//! Ctrl-C it names the guest that keeps running and how to end it,
//! destroys the demo, stops the supervisor before the hook executor (no
//! "hook executor unavailable"), and its log files carry no colour codes.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qvirt_integration_tests::stack::test_guest;
use qvirt_integration_tests::{
    ChildGuard, QemuGuard, bin_path, free_port, run_command, runs_domain, text, tool_path,
    workspace_root,
};

/// Start-up with the demo guest (TCG) on 2 shared cores.
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// One command of the tour.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// A port P with P..P+4 free (the gateway and the four backends).
fn free_port_run() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base < 65_000 && (1..5).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no run of five free ports");
}

/// Runs one line of the printed tour in bash, in the tree, after the
/// tour's `export` line.
fn tour(tree: &Path, export: &str, line: &str) -> Output {
    let script = format!("cd '{}' && {export} && {line}", tree.display());
    run_command(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .env_remove("QVIRT_URL")
            .env_remove("QVIRT_TOKEN")
            .env_remove("QVIRT_TOKEN_FILE"),
        STEP_TIMEOUT,
    )
}

/// The tour line starting with `qvirtctl WORDS` (its comment cut off).
fn tour_line<'a>(out: &'a str, start: &str) -> &'a str {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no tour line {start:?} in:\n{out}"));
    line.split("   #").next().unwrap().trim_end()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_run_script_from_a_bin_dir_tours_and_stops_in_order() {
    use std::os::unix::fs::symlink;
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    std::fs::copy(
        workspace_root().join("scripts/run.sh"),
        root.join("scripts/run.sh"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join(".tools/bin")).unwrap();
    symlink(tool_path("grpcurl"), root.join(".tools/bin/grpcurl")).unwrap();
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for b in [
        "qvirt-eventbus",
        "qvirt-hookexec",
        "qvirt-supervisor",
        "qvirt-agentd",
        "qvirt-gateway",
        "qvirtctl",
    ] {
        symlink(bin_path(b), bin.join(b)).unwrap();
    }
    let base = free_port_run();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/run.sh"))
        .env("QVIRT_BIN_DIR", &bin)
        .env("QVIRT_PORT_BASE", base.to_string())
        .env("QVIRT_METRICS_PORT", free_port().to_string())
        .env_remove("QVIRT_RUN_DIR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(root.join("stdout")).unwrap())
        .stderr(std::fs::File::create(root.join("stderr")).unwrap());
    let demo = match test_guest() {
        Ok(image) => {
            let dir = image.vmlinux.parent().unwrap().to_owned();
            cmd.env("QVIRT_DEMO_IMAGE", dir);
            true
        }
        Err(why) => {
            eprintln!("no demo guest in this run (its packages cannot be fetched: {why})");
            cmd.env("QVIRT_DEMO", "0");
            false
        }
    };
    let mut script = ChildGuard::spawn(&mut cmd);
    let read = |name: &str| std::fs::read_to_string(root.join(name)).unwrap_or_default();
    let deadline = Instant::now() + UP_TIMEOUT;
    while !read("stdout").contains("Press Ctrl-C to stop.") {
        assert!(
            script.try_wait().is_none() && Instant::now() < deadline,
            "run.sh did not come up:\nstdout:\n{}\nstderr:\n{}",
            read("stdout"),
            read("stderr")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = read("stdout");
    assert!(!root.join("target").exists(), "nothing to fall back on");
    assert!(
        out.contains(&format!(
            "  gateway     127.0.0.1:{base}   the public endpoint"
        )),
        "{out}"
    );
    let rw = std::fs::read_to_string(root.join(".run/token-rw")).unwrap();
    let ro = std::fs::read_to_string(root.join(".run/token-ro")).unwrap();
    assert!(out.contains(&format!("  RW={}", rw.trim())), "{out}");
    assert!(out.contains(&format!("  RO={}", ro.trim())), "{out}");
    let (ctl_at, grpcurl_at) = (
        out.find("With qvirtctl").unwrap(),
        out.find("With grpcurl").unwrap(),
    );
    assert!(
        ctl_at < grpcurl_at,
        "qvirtctl first, grpcurl second:\n{out}"
    );

    // The tour's commands, as printed.
    let export = tour_line(&out, "export PATH=");
    let list = tour(root, export, tour_line(&out, "qvirtctl list --all"));
    assert!(list.status.success(), "{}", text(&list.stderr));
    let refused = tour(
        root,
        export,
        tour_line(
            &out,
            "QVIRT_TOKEN_FILE=.run/token-ro qvirtctl qemu-monitor-event",
        ),
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("(PERMISSION_DENIED, PERMISSION_DENIED_ROLE)"),
        "{}",
        text(&refused.stderr)
    );
    let mut demo_qemu = None;
    if demo {
        assert!(out.contains("its agent (qvirt-ga) answered "), "{out}");
        assert!(
            text(&list.stdout).contains(" demo   running "),
            "{}",
            text(&list.stdout)
        );
        for (start, want) in [
            ("qvirtctl dominfo demo", "State:          running"),
            (
                "qvirtctl qemu-monitor-command demo --pretty",
                "\"status\": \"running\"",
            ),
            ("qvirtctl guest-exec demo -- uname -a", "Linux "),
            (
                "qvirtctl guestinfo demo --os --hostname",
                "os.machine          : x86_64",
            ),
        ] {
            let got = tour(root, export, tour_line(&out, start));
            assert!(
                got.status.success() && text(&got.stdout).contains(want),
                "{start}: {}\n{}",
                text(&got.stdout),
                text(&got.stderr)
            );
        }
        let info = tour(root, export, "qvirtctl --json dominfo demo");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        demo_qemu = Some((
            v["pid"].as_u64().unwrap() as u32,
            v["spec"]["uuid"].as_str().unwrap().to_owned(),
        ));
    }

    // A guest of the user's own: it keeps running after Ctrl-C.
    let define = tour(
        root,
        export,
        "printf 'name: other\\naccel: tcg\\nmemory_mib: 64\\n' | qvirtctl define - && qvirtctl start other && qvirtctl --json dominfo other",
    );
    assert!(define.status.success(), "{}", text(&define.stderr));
    let stdout = text(&define.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    let pid = v["pid"].as_u64().unwrap() as u32;
    let uuid = v["spec"]["uuid"].as_str().unwrap().to_owned();
    let _other = QemuGuard(pid, uuid.clone());

    script.signal(libc::SIGINT);
    let status = script
        .wait_timeout(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("run.sh did not stop on SIGINT:\n{}", read("stdout")));
    assert!(status.success(), "{status}: {}", read("stderr"));
    let out = read("stdout");
    assert!(out.contains(&format!("  other (QEMU pid {pid})")), "{out}");
    assert!(out.contains(&format!("  kill {pid}    # other")), "{out}");
    assert!(!out.contains("  demo (QEMU pid"), "{out}");
    assert!(runs_domain(pid, &uuid), "the user's guest keeps running");
    if let Some((demo_pid, demo_uuid)) = demo_qemu {
        assert!(
            !runs_domain(demo_pid, &demo_uuid),
            "the demo goes with run.sh"
        );
    }

    // Logs: plain text, and no hook call refused for a missing executor.
    for name in [
        "qvirt-eventbus",
        "qvirt-hookexec",
        "qvirt-supervisor",
        "qvirt-agentd",
        "qvirt-gateway",
    ] {
        let log = read(&format!(".run/{name}.log"));
        assert!(!log.is_empty(), "{name} logged nothing");
        assert!(!log.contains('\x1b'), "colour codes in {name}.log:\n{log}");
    }
    let sup = read(".run/qvirt-supervisor.log");
    assert!(!sup.contains("hook executor unavailable"), "{sup}");
    assert!(
        sup.contains("stopped"),
        "the supervisor stopped cleanly: {sup}"
    );
}
