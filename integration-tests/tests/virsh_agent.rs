//! libvirt as a client of qvirt-ga: libvirt 9's virsh, unchanged, against
//! the project's test guest booted under a private libvirtd
//! (`libvirtd::Libvirtd`) twice at once, once with the static qvirt-ga
//! inside and once with Debian's qemu-ga 7.2 (its libraries copied in),
//! both on the virtio-serial agent channel `org.qemu.guest_agent.0`. The
//! same virsh commands run against both, in the same order; their exit
//! status, stdout and stderr must be equal, normalised only where a value
//! differs per boot (the guest's clock, the domain's name).
//!
//! The guest is busybox with a root user (/etc/passwd, /etc/shadow,
//! /root): ssh keys are read, added and removed in /root/.ssh for real
//! (and an unknown user takes the lookup-failure path). Passwords are set
//! through the guest's `chpasswd` (a script doing what shadow's does for
//! one line: Debian's busybox has no such applet) and read back from
//! /etc/shadow with guest-file-read; an unknown user makes it fail, and
//! both agents must then give the same error. vCPU 1 is taken
//! offline and back through /sys/devices/system/cpu/cpu1/online (the guest
//! has 2 vCPUs). `domfsinfo` lists nothing and `domfsfreeze` freezes
//! nothing: the guest runs from its initramfs, with no block device. The
//! last command, `shutdown --mode agent`, must power both guests off.
//!
//! Needs libvirt (`make deps`): a libvirtd that cannot start here fails the
//! test. Where Debian's packages for the guest cannot be fetched (the
//! build script exits 77), the test prints that it skipped and why.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use qvirt_integration_tests::guest::{guest_image, guest_image_named, guest_images_in, serial};
use qvirt_integration_tests::libvirtd::{Libvirtd, guest_xml};
use qvirt_integration_tests::{static_ga, text, tool_path};

/// Two TCG guests booting at once on 2 shared cores.
const AGENT_TIMEOUT: Duration = Duration::from_secs(240);
/// A SHA-512 crypt of "Qvirt-test-2" (`mkpasswd -m sha512 -S qvirtsalt`).
const CRYPTED: &str = "$6$qvirtsalt$nwCVoEC6m1/AHzwa.39TqHuFGtxdErb1aNxrN8hmHKiA8IKe3vcqllWeB/51JzlmKzxQz1kVcez222IWTY41b.";
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq1xvQ5mCdP7rT9ZzUjv0t8c9Z5y4r3xAAAAAAAAAAA qvirt@test";

/// What a user sees of one virsh command: exit status, stdout, stderr,
/// with the domain's name replaced by `DOM`.
fn seen(lv: &Libvirtd, dom: &str, args: &[&str]) -> String {
    let args: Vec<&str> = args
        .iter()
        .map(|a| if *a == "DOM" { dom } else { a })
        .collect();
    let out = lv.virsh(&args);
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
    .replace(dom, "DOM")
}

/// The guest's file `path`, read through libvirt with qemu-agent-command
/// (guest-file-open, -read, -close).
fn guest_file(lv: &Libvirtd, dom: &str, path: &str) -> String {
    use base64::Engine;
    let agent = |cmd: serde_json::Value| -> serde_json::Value {
        let out = lv.virsh_ok(&["qemu-agent-command", dom, &cmd.to_string()]);
        let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
        reply["return"].clone()
    };
    let handle = agent(serde_json::json!({"execute": "guest-file-open",
        "arguments": {"path": path}}));
    let read = agent(serde_json::json!({"execute": "guest-file-read",
        "arguments": {"handle": handle, "count": 65536}}));
    agent(serde_json::json!({"execute": "guest-file-close",
        "arguments": {"handle": handle}}));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(read["buf-b64"].as_str().unwrap())
        .unwrap();
    text(&bytes)
}

/// `domtime`'s seconds differ per boot: only its shape is compared.
fn without_time(s: &str) -> String {
    s.lines()
        .map(|l| match l.strip_prefix("Time: ") {
            Some(t) if t.trim().parse::<u64>().is_ok() => "Time: SECONDS",
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn virsh_agent_commands_answer_the_same_with_qvirt_ga_and_qemu_ga() {
    let qvirt = match guest_image(&static_ga()) {
        Ok(i) => i,
        Err(why) => {
            println!("virsh_agent skipped: the guest's packages cannot be fetched here: {why}");
            return;
        }
    };
    let qemu = guest_image_named("test-guest-qemu-ga", &tool_path("qemu-ga"))
        .unwrap_or_else(|why| panic!("the qemu-ga guest cannot be built: {why}"));
    let lv = Libvirtd::start();
    let work = tempfile::tempdir().unwrap();
    let boot = |who: &str, image| {
        let images = guest_images_in(work.path(), who, image);
        let name = format!("virsh-{who}-{}", std::process::id());
        let console = work.path().join(format!("{who}.console"));
        let sock = work.path().join(format!("{who}.agent"));
        let xml = guest_xml(&name, &images, 2, &console, Some(&sock));
        (lv.start_domain(&name, &xml), console)
    };
    let (qv, qv_console) = boot("qvirt-ga", &qvirt);
    let (qg, qg_console) = boot("qemu-ga", &qemu);
    for (dom, console) in [(&qv, &qv_console), (&qg, &qg_console)] {
        let waited = std::panic::catch_unwind(|| dom.wait_agent(AGENT_TIMEOUT));
        if let Err(e) = waited {
            println!("{} console:\n{}", dom.name, serial(console));
            std::panic::resume_unwind(e);
        }
    }

    let key_file = work.path().join("key.pub");
    std::fs::write(&key_file, format!("{SSH_KEY}\n")).unwrap();
    let key_file = key_file.display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["qemu-agent-command", "DOM", r#"{"execute":"guest-ping"}"#],
        // No ~root/.ssh yet.
        vec!["get-user-sshkeys", "DOM", "root"],
        vec!["set-user-sshkeys", "DOM", "root", "--file", &key_file],
        vec!["get-user-sshkeys", "DOM", "root"],
        vec![
            "set-user-sshkeys",
            "DOM",
            "root",
            "--file",
            &key_file,
            "--remove",
        ],
        vec!["get-user-sshkeys", "DOM", "root"],
        vec!["get-user-sshkeys", "DOM", "nosuchuser"],
        vec!["set-user-password", "DOM", "root", "Qvirt-test-1"],
        vec!["set-user-password", "DOM", "nosuchuser", "Qvirt-test-1"],
        vec!["set-user-password", "DOM", "root", CRYPTED, "--encrypted"],
        vec!["guestvcpus", "DOM"],
        vec!["guestvcpus", "DOM", "--cpulist", "1", "--disable"],
        vec!["guestvcpus", "DOM"],
        vec!["guestvcpus", "DOM", "--cpulist", "1", "--enable"],
        vec!["setvcpus", "DOM", "1", "--guest"],
        vec!["guestvcpus", "DOM"],
        vec!["setvcpus", "DOM", "2", "--guest"],
        vec!["guestvcpus", "DOM"],
        vec!["guestinfo", "DOM"],
        vec!["domfsinfo", "DOM"],
        vec!["domtime", "DOM"],
        vec!["qemu-agent-command", "DOM", r#"{"execute":"guest-ping"}"#],
        vec!["domtime", "DOM", "--sync"],
        vec!["domtime", "DOM", "--now"],
        vec!["domhostname", "DOM", "--source", "agent"],
        vec!["domifaddr", "DOM", "--source", "agent"],
        vec!["domfsfreeze", "DOM"],
        vec!["domfsthaw", "DOM"],
        vec!["domfstrim", "DOM"],
        vec![
            "guestinfo",
            "DOM",
            "--user",
            "--os",
            "--timezone",
            "--hostname",
        ],
        vec!["guestinfo", "DOM", "--filesystem", "--disk", "--interface"],
    ];
    let mut differ = Vec::new();
    let mut answers = Vec::new();
    for args in &commands {
        let a = without_time(&seen(&lv, &qv.name, args));
        let b = without_time(&seen(&lv, &qg.name, args));
        println!(
            "$ virsh {}\n-- qvirt-ga:\n{a}\n-- qemu-ga:\n{b}\n",
            args.join(" ")
        );
        if a != b {
            differ.push(args.join(" "));
        }
        answers.push(a);
    }
    assert!(
        differ.is_empty(),
        "virsh answers differently with qvirt-ga and qemu-ga for: {differ:#?} (both outputs above)"
    );
    // The paths exercised are the real ones, not two equal refusals.
    let ok = |i: usize, needle: &str| {
        assert!(
            answers[i].starts_with("status Some(0)") && answers[i].contains(needle),
            "virsh {}: {needle:?} expected in\n{}",
            commands[i].join(" "),
            answers[i]
        );
    };
    ok(0, r#"{"return":{}}"#);
    ok(3, SSH_KEY);
    ok(5, "stdout:\n\nstderr:");
    ok(7, "");
    ok(9, "");
    ok(12, "online         : 0\n");
    ok(15, "online         : 0\n");
    ok(17, "online         : 0-1\n");
    ok(18, "os.kernel-release");
    ok(20, "Time: SECONDS");
    assert!(
        answers[6].contains("failed to lookup user 'nosuchuser'"),
        "{}",
        answers[6]
    );
    assert!(
        answers[8].contains("child process has failed to set user password"),
        "{}",
        answers[8]
    );
    // The last password set is the crypted one, on both.
    for dom in [&qv.name, &qg.name] {
        let shadow = guest_file(&lv, dom, "/etc/shadow");
        assert_eq!(
            shadow,
            format!("root:{CRYPTED}:19000:0:99999:7:::\n"),
            "{dom}"
        );
    }
    // Last, the agent's shutdown: success, and both power off. libvirt
    // races here: guest-shutdown has no reply, and libvirt reports
    // success when QEMU's SHUTDOWN event reaches it first, but "End of
    // file from agent socket" when the agent's socket closes first (seen
    // with the reference qemu-ga on a loaded machine). So qemu-ga's
    // answer is one of the two, and qvirt-ga's must be the good one.
    let shutdown = ["shutdown", "DOM", "--mode", "agent"];
    let a = seen(&lv, &qv.name, &shutdown);
    let b = seen(&lv, &qg.name, &shutdown);
    assert_eq!(
        a, "status Some(0)\nstdout:\n\nstderr:\n",
        "virsh shutdown --mode agent"
    );
    assert!(
        b == a || b.contains("error: internal error: End of file from agent socket"),
        "virsh shutdown --mode agent with qemu-ga: {b}"
    );
    for dom in [&qv.name, &qg.name] {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let state = lv.virsh_ok(&["domstate", dom]);
            if state.trim() == "shut off" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{dom} still {state:?} {AGENT_TIMEOUT:?} after shutdown --mode agent"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
