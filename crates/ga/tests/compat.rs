//! Byte-for-byte comparison of qvirt-ga with the real qemu-ga 7.2.
//!
//! Every scenario starts both agents in unix-listen mode, each with its own
//! temporary state directory (also its working directory), sends the same
//! bytes to both and compares what comes back. Each exchange ends with a
//! marker (`\xff` + a ping with id `__end__`), read until its response, so
//! no test sleeps for a fixed time. Where answers naturally differ (time,
//! pids, traffic counters) the comparison is on a normalised form and the
//! scenario says so.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn test_sync_delimited_handshake() {
    let agents = both(&[], &[], |_| {});
    let out = same(
        &agents,
        &[b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":872489562}}"],
    );
    assert!(out.ends_with(b"\xff{\"return\": 872489562}\n"));
    same(&agents, &[b"{'execute':'guest-sync-delimited','arguments':{'id':7},'id':'req-7'}{'execute':'guest-sync','arguments':{'id':8}}"]);
    // Invalid arguments: no 0xFF.
    same(
        &agents,
        &[b"{'execute':'guest-sync-delimited','arguments':{'id':'x'}}"],
    );
}

#[test]
fn test_ping_ids_of_every_type() {
    let agents = both(&[], &[], |_| {});
    for id in [
        "\"abc\"",
        "'single'",
        "1",
        "-1",
        "0",
        "-0",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "0.1",
        "1e3",
        "-2.5E-7",
        "1e400",
        "null",
        "true",
        "false",
        "[]",
        "{}",
        "[1,[2,{\"a\":null}]]",
        "{\"z\":1,\"a\":2,\"id\":3}",
        "\"\\u00e9\\ud83d\\ude00\\u0000\\u001f\"",
        "\"\u{e9}\u{20ac}\"",
        "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"",
    ] {
        let msg = format!("{{\"execute\":\"guest-ping\",\"id\":{id}}}");
        same(&agents, &[msg.as_bytes()]);
    }
}

#[test]
fn test_pipelined_and_split_writes() {
    let agents = both(&[], &[], |_| {});
    let batch: &[u8] = b"{'execute':'guest-ping','id':1}{'execute':'nope','id':2}\n{'execute':'guest-ping','id':3} {'execute':'guest-sync','arguments':{'id':4}}";
    same(&agents, &[batch]);
    // Byte at a time.
    let bytes: Vec<&[u8]> = batch.chunks(1).collect();
    same(&agents, &bytes);
    // Arbitrary splits.
    same(&agents, &[&batch[..7], &batch[7..40], &batch[40..]]);
}

#[test]
fn test_0xff_mid_message_and_reconnect_keeps_parser_state() {
    let agents = both(&[], &[], |_| {});
    same(
        &agents,
        &[b"{\"execute\":\"guest-pi\xffng\"}{'execute':'guest-ping'}"],
    );
    same(&agents, &[b"\xff\xff{'execute':'guest-ping'}"]);
    same(&agents, &[b"43\xff"]);
    // Client A leaves half a request; client B completes it.
    for agent in [&agents.0, &agents.1] {
        let mut a = UnixStream::connect(&agent.sock).expect("connect");
        a.write_all(b"{\"execute\":\"guest-ping\",").expect("write");
        drop(a);
    }
    let out = same(&agents, &[b"\"id\":\"completed-by-B\"}"]);
    assert_eq!(out, b"{\"return\": {}, \"id\": \"completed-by-B\"}\n");
}

#[test]
fn test_invalid_json_kinds() {
    let agents = both(&[], &[], |_| {});
    for bad in [
        &b"{\"execute\":\"guest-ping\",\"id\":TRUE}"[..],
        b"{'a' 1}",
        b"{1:2}",
        b"{'a':1,'a':2}",
        b"{'a':nul}",
        b"[01]",
        b"[\"\\ud800\"]",
        b"[\"\\u12\"]",
        b"[\"\\uFFFF\"]",
        b"[\"\\x\"]",
        b"[1}",
        b"}",
        b"]",
        b"{\"a\":1}}",
        b"\x00",
        b"[\"a\nb\"]",
        b"[\"\xc3\x28\"]",
        b"[\"\xc0\x80\"]",
        b"%",
        b"[1,]",
        b"{,}",
        b"[1.e5]",
        b"[-]",
    ] {
        same(&agents, &[bad]);
    }
}

#[test]
fn test_limits() {
    let agents = both(&[], &[], |_| {});
    let ok = format!(
        "{{'execute':'guest-ping','id':{}{}}}",
        "[".repeat(1023),
        "]".repeat(1023)
    );
    same(&agents, &[ok.as_bytes()]);
    let deep = format!(
        "{{'execute':'guest-ping','id':{}{}}}",
        "[".repeat(1024),
        "]".repeat(1024)
    );
    same(&agents, &[deep.as_bytes()]);
    let big = format!("{{'execute':'guest-ping','id':'{}'}}", "x".repeat(1 << 20));
    same(&agents, &[big.as_bytes()]);
}

#[test]
fn test_envelope_errors_unknown_command_and_invalid_args() {
    let agents = both(&[], &[], |_| {});
    for msg in [
        &b"[]"[..],
        b"\"str\" ",
        b"{'id':5}",
        b"{'execute':1,'id':'a'}",
        b"{'execute':'guest-ping','arguments':[]}",
        b"{'exec-oob':'guest-ping'}",
        b"{'execute':'guest-ping','control':1,'id':[1]}",
        b"{'execute':'guest-invalid-cmd','id':99}",
        b"{'execute':'guest-get-hostname'}",
        b"{'execute':'guest-ping','arguments':{'foo':42}}",
        b"{'execute':'guest-ping','arguments':{'a':1,'b':2,'c':3}}",
        b"{'execute':'guest-ping','arguments':{'k1':1,'k2':2,'k3':3,'k4':4,'k5':5,'k6':6,'k7':7,'k8':8,'k9':9}}",
        b"{'execute':'guest-sync'}",
        b"{'execute':'guest-sync','arguments':{'id':9223372036854775808}}",
        b"{'execute':'guest-sync','arguments':{'id':1.0}}",
        b"{'execute':'guest-file-read','arguments':{'count':1,'x':2}}",
        b"{'execute':'guest-file-seek','arguments':{'handle':1,'offset':0,'whence':'middle'}}",
        b"{'execute':'guest-file-seek','arguments':{'handle':1,'offset':0,'whence':true}}",
        b"{'execute':'guest-file-seek','arguments':{'handle':1,'offset':0,'whence':1.5}}",
        b"{'execute':'guest-exec','arguments':{'path':'x','arg':[1]}}",
        b"{'execute':'guest-exec','arguments':{'path':'x','arg':'y'}}",
        b"{'execute':'guest-exec','arguments':{'path':'x','capture-output':1}}",
        b"{'execute':'guest-get-devices','id':1}",
        b"{'execute':'guest-shutdown','arguments':{'mode':'sideways'}}",
    ] {
        same(&agents, &[msg]);
    }
}

#[test]
fn test_blocked_rpcs() {
    let agents = both(
        &[
            "-b",
            "guest-ping,guest-get-time",
            "--block-rpcs=guest-nonexistent",
        ],
        &[],
        |_| {},
    );
    same(&agents, &[b"{'execute':'guest-ping','id':1}{'execute':'guest-get-time'}{'execute':'guest-sync','arguments':{'id':1}}"]);
    same(&agents, &[b"{'execute':'guest-info'}"]);
}

#[test]
fn test_frozen_marker() {
    // Its thaw runs FITHAW on every mount: keep it apart from a real freeze.
    // A refused freeze is shown with freeze-list on a path that does not
    // exist, never a bare freeze: if the agent were not frozen after all,
    // a bare freeze would freeze every filesystem of the host.
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // `-l` (relative: each agent's own directory) is deferred to the thaw.
    let agents = both(&["-l", "ga.log", "-v"], &[], |d| {
        std::fs::write(d.join("qga.state.isfrozen"), b"").expect("marker");
    });
    same(&agents, &[b"{'execute':'guest-fsfreeze-status'}{'execute':'guest-get-time','id':1}{'execute':'guest-exec','arguments':{'path':'true'}}{'execute':'guest-file-open','arguments':{'path':'foo'}}{'execute':'guest-fsfreeze-freeze-list','arguments':{'mountpoints':['/nonexistent-qvirt-test']}}{'execute':'guest-get-devices'}{'execute':'guest-get-osinfo'}"]);
    same(
        &agents,
        &[b"{'execute':'guest-info'}{'execute':'guest-ping'}"],
    );
    // Frozen: no state file and no log file were written.
    for a in [&agents.0, &agents.1] {
        assert!(!a.dir.path().join("qga.state").exists());
        assert!(!a.dir.path().join("ga.log").exists());
    }
    // One write (end marker included): both agents read it in one go, so
    // their logs have the same "read data" lines.
    let thaw: &[u8] = b"{'execute':'guest-fsfreeze-thaw'}{'execute':'guest-fsfreeze-status'}{'execute':'guest-sync','arguments':{'id':3}}{'execute':'guest-get-devices'}{'execute':'guest-get-osinfo','arguments':{'x':1}}";
    let a = exchange_one_write(&agents.0, thaw);
    let b = exchange_one_write(&agents.1, thaw);
    assert_eq!(String::from_utf8_lossy(&b), String::from_utf8_lossy(&a));
    let mut logs = Vec::new();
    for a in [&agents.0, &agents.1] {
        assert!(!a.dir.path().join("qga.state.isfrozen").exists());
        // Opened at the thaw; up to the last response (the EOF after it
        // may not be logged yet).
        let log = std::fs::read(a.dir.path().join("ga.log")).expect("log after the thaw");
        let text = unstamp(&String::from_utf8_lossy(&log));
        let end = text
            .rfind("debug: sending data")
            .expect("no response logged");
        let end = end + text[end..].find('\n').expect("line end") + 1;
        logs.push(text[..end].to_owned());
    }
    assert_eq!(logs[1], logs[0], "log: qvirt-ga (left), qemu-ga (right)");
    assert!(logs[0].starts_with("warning: logging re-enabled due to filesystem unfreeze\n"));
}

/// The pid of the process at the other end of a unix socket.
fn peer_pid(s: &UnixStream) -> libc::pid_t {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_PEERCRED");
    cred.pid
}

/// A daemon started with the frozen marker writes (and locks) its pidfile
/// only at the thaw, as qemu-ga defers it. The daemon is found through
/// the socket's peer credentials, so it is killed even without a pidfile.
#[test]
fn test_daemon_started_frozen_writes_pidfile_at_thaw() {
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut outs = Vec::new();
    for which in [Which::Qemu, Which::Qvirt] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("qga.state.isfrozen"), b"").expect("marker");
        let sock = dir.path().join("sock");
        let pidfile = dir.path().join("ga.pid");
        start_daemon(which, dir.path(), &sock, &pidfile);
        let deadline = Instant::now() + DEADLINE;
        let mut s = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(Instant::now() < deadline, "daemon socket never came up");
            std::thread::sleep(Duration::from_millis(5));
        };
        let _guard = PidGuard(peer_pid(&s));
        assert!(!pidfile.exists(), "pidfile written while frozen");
        s.write_all(b"{'execute':'guest-fsfreeze-status'}{'execute':'guest-fsfreeze-thaw'}{'execute':'guest-fsfreeze-status'}")
            .expect("write");
        s.write_all(END).expect("end");
        outs.push(read_until_end(&mut s));
        assert_eq!(
            std::fs::read_to_string(&pidfile).expect("pidfile after the thaw"),
            format!("{}\n", peer_pid(&s))
        );
    }
    assert_eq!(outs[1], outs[0]);
    assert_eq!(
        outs[0],
        b"{\"return\": \"frozen\"}\n{\"return\": 0}\n{\"return\": \"thawed\"}\n"
    );
}

#[test]
fn test_file_ops_round_trip() {
    let agents = both(&[], &[], |_| {});
    // "Hello World!\n" plus its NUL, as test-qga.
    same(
        &agents,
        &[b"{'execute':'guest-file-open','arguments':{'path':'foo','mode':'w+'}}"],
    );
    same(&agents, &[b"{'execute':'guest-file-write','arguments':{'handle':1000,'buf-b64':'SGVsbG8gV29ybGQhCgA='}}{'execute':'guest-file-read','arguments':{'handle':1000}}{'execute':'guest-file-seek','arguments':{'handle':1000,'offset':0,'whence':'set'}}{'execute':'guest-file-read','arguments':{'handle':1000}}{'execute':'guest-file-flush','arguments':{'handle':1000}}{'execute':'guest-file-close','arguments':{'handle':1000}}"]);
    same(&agents, &[b"{'execute':'guest-file-open','arguments':{'path':'foo'}}{'execute':'guest-file-read','arguments':{'handle':1001,'count':5}}{'execute':'guest-file-read','arguments':{'handle':1001,'count':9}}{'execute':'guest-file-read','arguments':{'handle':1001}}{'execute':'guest-file-seek','arguments':{'handle':1001,'offset':6,'whence':0}}{'execute':'guest-file-read','arguments':{'handle':1001}}{'execute':'guest-file-seek','arguments':{'handle':1001,'offset':-2,'whence':'end'}}{'execute':'guest-file-seek','arguments':{'handle':1001,'offset':-100,'whence':'cur'}}{'execute':'guest-file-seek','arguments':{'handle':1001,'offset':0,'whence':7}}"]);
    // Error paths.
    same(&agents, &[b"{'execute':'guest-file-write','arguments':{'handle':1001,'buf-b64':'QUJD'}}{'execute':'guest-file-read','arguments':{'handle':1001,'count':-1}}{'execute':'guest-file-write','arguments':{'handle':1001,'buf-b64':'Q!!'}}{'execute':'guest-file-read','arguments':{'handle':4242}}{'execute':'guest-file-close','arguments':{'handle':1001}}{'execute':'guest-file-close','arguments':{'handle':1001}}"]);
    same(&agents, &[b"{'execute':'guest-file-open','arguments':{'path':'bar','mode':'z'}}{'execute':'guest-file-open','arguments':{'path':'/nonexistent/x'}}{'execute':'guest-file-open','arguments':{'path':'.'}}{'execute':'guest-file-read','arguments':{'handle':1002}}{'execute':'guest-file-open','arguments':{'path':'baz','mode':'a'}}{'execute':'guest-file-write','arguments':{'handle':1003,'buf-b64':'QUJ'}}{'execute':'guest-file-write','arguments':{'handle':1003,'buf-b64':'QUJD','count':4}}"]);
    for a in [&agents.0, &agents.1] {
        let data = std::fs::read(a.dir.path().join("foo")).expect("foo");
        assert_eq!(data, b"Hello World!\n\0");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.dir.path().join("foo"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
        let state = std::fs::read_to_string(a.dir.path().join("qga.state")).expect("state");
        assert_eq!(state, "[global]\nfd_counter=1004\n");
    }
}

/// Runs guest-exec on one agent and polls guest-exec-status until it
/// reports exited; returns (exec response with the pid masked, final
/// status response). Pids differ between agents, so they are masked.
fn exec_and_wait(agent: &Agent, exec: &str) -> (String, Vec<u8>) {
    let out = exchange(agent, &[exec.as_bytes()]);
    let text = String::from_utf8_lossy(&out).into_owned();
    let Some(rest) = text.strip_prefix("{\"return\": {\"pid\": ") else {
        return (text, Vec::new());
    };
    let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let masked = text.replacen(&pid, "PID", 1);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let req = format!("{{'execute':'guest-exec-status','arguments':{{'pid':{pid}}}}}");
        let st = exchange(agent, &[req.as_bytes()]);
        if st.windows(14).any(|w| w == b"\"exited\": true") {
            // Once reported exited the pid is forgotten.
            let again = exchange(agent, &[req.as_bytes()]);
            let mut all = st;
            all.extend_from_slice(&again);
            return (masked, all);
        }
        assert!(Instant::now() < deadline, "process never exited");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_exec() {
    let agents = both(&[], &[], |d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(d.join("noexec"), "echo no\n").expect("write");
        std::fs::set_permissions(d.join("noexec"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        // No shebang: GLib falls back to /bin/sh.
        std::fs::write(d.join("script"), "echo \"script $1\"\n").expect("write");
        std::fs::set_permissions(d.join("script"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    });
    for exec in [
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/echo","arg":["-n","\" test_str \""],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"sh","arg":["-c","echo out; echo err >&2; exit 3"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"sh","arg":["-c","kill -9 $$"]}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/cat","input-data":"aGVsbG8=","capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/usr/bin/env","env":["A=1","B=two"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/invalid-cmd42"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"./noexec"}}"#,
        // Capture caps: exactly 16 MiB is kept whole, more is truncated.
        r#"{"execute":"guest-exec","arguments":{"path":"sh","arg":["-c","head -c 16777216 /dev/zero"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"sh","arg":["-c","head -c 17000000 /dev/zero >&2"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"./script","arg":["a b"],"capture-output":true}}"#,
        // A NUL inside the path, an argument, an environment entry: QEMU
        // keeps it as the bytes C0 80 (so such a path is not found).
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/echo\u0000junk","arg":["a\u0000b","c"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/echo","arg":["a\u0000b","c"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/usr/bin/env","env":["A=1\u0000B=2","C\u0000=3"],"capture-output":true}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/invalid-cmd42\u0000x"}}"#,
        r#"{"execute":"guest-exec","arguments":{"path":"\u0000/bin/echo"}}"#,
    ] {
        let a = exec_and_wait(&agents.0, exec);
        let b = exec_and_wait(&agents.1, exec);
        assert_eq!(b.0, a.0, "exec answer for {exec}");
        assert_eq!(
            String::from_utf8_lossy(&b.1),
            String::from_utf8_lossy(&a.1),
            "status for {exec}"
        );
    }
    same(
        &agents,
        &[b"{'execute':'guest-exec-status','arguments':{'pid':0}}"],
    );
}

#[test]
fn test_osinfo_with_qga_os_release() {
    let release = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(
        release.path(),
        "ID=qemu-ga-test\nNAME=QEMU-GA\nPRETTY_NAME=\"QEMU Guest Agent test\"\nVERSION=\"Test 1\"\nVERSION_ID=1\nVARIANT=\"Unit test \\\"'$\\`\\\\ and \\\\\\\\ etc.\"\nVARIANT_ID=\"unit-test\"\n",
    )
    .expect("write");
    let path = release.path().to_string_lossy().into_owned();
    let agents = both(&[], &[("QGA_OS_RELEASE", &path)], |_| {});
    let out = same(&agents, &[b"{'execute':'guest-get-osinfo'}"]);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("\"variant\": \"Unit test \\\"'$`\\\\ and \\\\\\\\ etc.\""),
        "{text}"
    );
}

/// Host facts: same machine, so host name, timezone, users and interfaces
/// agree byte for byte, except traffic counters (digits masked) and the
/// time (only its shape is compared).
#[test]
fn test_host_facts() {
    let agents = both(&[], &[], |_| {});
    same(&agents, &[b"{'execute':'guest-get-host-name'}{'execute':'guest-get-timezone'}{'execute':'guest-get-users'}{'execute':'guest-fsfreeze-status'}{'execute':'guest-get-vcpus'}{'execute':'guest-get-memory-blocks'}"]);
    let mask = |v: Vec<u8>| -> Vec<u8> {
        v.into_iter()
            .map(|b| if b.is_ascii_digit() { b'0' } else { b })
            .collect()
    };
    let req: &[&[u8]] = &[
        b"{'execute':'guest-network-get-interfaces'}{'execute':'guest-get-time'}",
        b"{'execute':'guest-get-cpustats'}{'execute':'guest-get-memory-block-info'}",
        b"{'execute':'guest-get-diskstats'}",
    ];
    let a = mask(exchange(&agents.0, req));
    let b = mask(exchange(&agents.1, req));
    assert_eq!(String::from_utf8_lossy(&b), String::from_utf8_lossy(&a));
}

#[test]
fn test_large_messages_at_and_past_the_limits() {
    let agents = both(&[], &[], |_| {});
    // A 64 MiB string: the size error, then the rest lexed as new input
    // (a huge keyword whose error text QEMU cuts at 1023 bytes).
    let mut huge = b"{'execute':'guest-ping','id':'".to_vec();
    huge.resize(huge.len() + (64 << 20), b'x');
    huge.extend_from_slice(b"'}");
    same(&agents, &[&huge]);
    // One byte under the limit is echoed.
    let mut fits = b"{'execute':'guest-ping','id':'".to_vec();
    fits.resize((64 << 20) - 64, b'y');
    fits.extend_from_slice(b"'}");
    let a = exchange(&agents.0, &[&fits]);
    let b = exchange(&agents.1, &[&fits]);
    assert!(a == b && a.starts_with(b"{\"return\": {}, \"id\": \"yyy"));
    // 2,097,152 tokens is the most a message may have.
    let tokens = |n: usize| {
        let mut s = b"{'execute':'guest-ping','id':[".to_vec();
        let items = (n - 11).div_ceil(2);
        for i in 0..items {
            s.extend_from_slice(if i == 0 { b"1" } else { b",1" });
        }
        s.extend_from_slice(b"]}");
        s
    };
    let a = exchange(&agents.0, &[&tokens(2 << 20)]);
    let b = exchange(&agents.1, &[&tokens(2 << 20)]);
    assert!(
        a == b && a.starts_with(b"{\"return\": {}"),
        "{}",
        String::from_utf8_lossy(&a[..a.len().min(200)])
    );
    same(&agents, &[&tokens((2 << 20) + 2)]);
    // 8 MiB of whitespace before a request is not counted.
    let mut spaced = vec![b' '; 8 << 20];
    spaced.extend_from_slice(b"{'execute':'guest-ping','id':'spaced'}");
    same(&agents, &[&spaced]);
}

#[test]
fn test_half_close_gets_response_then_eof() {
    let agents = both(&[], &[], |_| {});
    let run = |agent: &Agent| {
        let mut s = UnixStream::connect(&agent.sock).expect("connect");
        s.write_all(b"{'execute':'guest-ping','id':'half'}")
            .expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read to EOF");
        out
    };
    let a = run(&agents.0);
    assert_eq!(run(&agents.1), a);
    assert_eq!(a, b"{\"return\": {}, \"id\": \"half\"}\n");
}

#[test]
fn test_second_client_waits_for_the_first() {
    let agents = both(&[], &[], |_| {});
    let run = |agent: &Agent| {
        let mut first = UnixStream::connect(&agent.sock).expect("connect A");
        first
            .write_all(b"{'execute':'guest-ping','id':'A'}")
            .expect("write A");
        let mut a = Vec::new();
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        while !a.ends_with(b"\n") {
            let n = first.read(&mut buf).expect("read A");
            assert!(n > 0);
            a.extend_from_slice(&buf[..n]);
        }
        // B connects while A is being served: it sits in the backlog.
        let mut second = UnixStream::connect(&agent.sock).expect("connect B");
        second
            .write_all(b"{'execute':'guest-ping','id':'B'}")
            .expect("write B");
        drop(first);
        second.write_all(END).expect("end");
        (a, read_until_end(&mut second))
    };
    let a = run(&agents.0);
    assert_eq!(run(&agents.1), a);
    assert_eq!(a.1, b"{\"return\": {}, \"id\": \"B\"}\n");
}

#[test]
fn test_sigterm_exits_zero_unless_frozen() {
    let (mut q, mut v) = both(&[], &[], |_| {});
    for a in [&mut q, &mut v] {
        sigterm(a);
        let st = wait_exit(a).expect("agent did not exit on SIGTERM");
        assert_eq!(st.code(), Some(0));
    }
    let frozen = both(&[], &[], |d| {
        std::fs::write(d.join("qga.state.isfrozen"), b"").expect("marker");
    });
    for a in [&frozen.0, &frozen.1] {
        sigterm(a);
    }
    // Still serving after SIGTERM, and still running (killed with SIGKILL
    // on drop).
    same(&frozen, &[b"{'execute':'guest-fsfreeze-status'}"]);
    same(&frozen, &[b"{'execute':'guest-ping'}"]);
    let (mut fq, mut fv) = frozen;
    for a in [&mut fq, &mut fv] {
        assert!(
            a.child.try_wait().expect("try_wait").is_none(),
            "a frozen agent exited on SIGTERM"
        );
    }
}

#[test]
fn test_cli_dump_conf_and_rpc_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("test-qga-config");
    // tests/data/test-qga-config of QEMU.
    std::fs::write(
        &conf,
        "[general]\ndaemon=false\nmethod=virtio-serial\npath=/path/to/org.qemu.guest_agent.0\npidfile=/var/foo/qemu-ga.pid\nstatedir=/var/state\nverbose=true\nblock-rpcs=guest-ping;guest-get-time\n",
    )
    .expect("conf");
    // Config booleans: only true/false/1/0 (surrounding blanks allowed);
    // `yes`, `TRUE`, `True` are fatal (exit 1, nothing printed).
    let bools: Vec<std::path::PathBuf> = [
        "verbose=yes",
        "daemon=TRUE",
        "retry-path=True",
        "verbose=1\ndaemon=0",
        "daemon= true",
        "verbose=true ",
    ]
    .iter()
    .enumerate()
    .map(|(i, kv)| {
        let p = dir.path().join(format!("bool-{i}.conf"));
        std::fs::write(&p, format!("[general]\n{kv}\n")).expect("conf");
        p
    })
    .collect();
    let list_conf = dir.path().join("list.conf");
    std::fs::write(&list_conf, "[general]\nblock-rpcs=a,b,c\n").expect("conf");
    let mut cases: Vec<(&[&str], Option<&Path>)> = bools
        .iter()
        .map(|p| (&["-D"][..], Some(p.as_path())))
        .collect();
    cases.extend_from_slice(&[
        // Non-option arguments are ignored, wherever they are; after `--`
        // everything is one.
        (&["-D", "extra"][..], None),
        (&["extra", "-D", "more", "-b", "guest-ping"], None),
        (&["-D", "--", "-V"], None),
        (&["-D", "-"], None),
        // A long option without argument given one is an error.
        (&["--help=3"], None),
        (&["-D", "--version=1"], None),
        (&["-D", "--dump-conf=x"], None),
        // qemu-ga keeps each list's items in reverse order.
        (&["-D", "-b", "a,b", "-b", "c,d"], None),
        (&["-D", "-b", "x,y"], Some(list_conf.as_path())),
        (&["-x"], None),
        (&["--bogus"], None),
        (&["-D", "-m"], None),
        (&["--method"], None),
    ]);
    let fixed: &[(&[&str], Option<&Path>)] = &[
        (&["-D"], None),
        (&["-D"], Some(&conf)),
        (
            &[
                "-m",
                "unix-listen",
                "-p",
                "/tmp/x",
                "-D",
                "-b",
                "guest-ping",
                "-b",
                "guest-info",
                "-F",
                "-l",
                "/tmp/l",
                "-v",
            ],
            None,
        ),
        (
            &[
                "--method=isa-serial",
                "-D",
                "-F/my/hook",
                "--statedir",
                "/st",
                "-f/p.pid",
                "-d",
                "-r",
            ],
            None,
        ),
        (&["-m", "unix-listen", "-D"], Some(&conf)),
        (&["-b", "help"], None),
        (&["--block-rpcs=?"], None),
    ];
    cases.extend_from_slice(fixed);
    // Usage errors name the program as invoked.
    let unname = |(code, out): (Option<i32>, Vec<u8>), bin: &Path| {
        let text = String::from_utf8_lossy(&out).replace(&*bin.to_string_lossy(), "BIN");
        (code, text.into_bytes())
    };
    let qvirt_bin = Path::new(env!("CARGO_BIN_EXE_qvirt-ga"));
    for (args, conf) in &cases {
        let q = unname(cli_output(Which::Qemu, args, *conf), &qemu_ga());
        let v = unname(cli_output(Which::Qvirt, args, *conf), qvirt_bin);
        assert_eq!(
            (v.0, String::from_utf8_lossy(&v.1)),
            (q.0, String::from_utf8_lossy(&q.1)),
            "{args:?}"
        );
    }
    // -V names the qemu-ga release; qvirt-ga adds its own version.
    let q = cli_output(Which::Qemu, &["-V"], None);
    let v = cli_output(Which::Qvirt, &["-V"], None);
    assert!(
        v.1.starts_with(q.1.trim_ascii_end()),
        "{:?}",
        String::from_utf8_lossy(&v.1)
    );
    // unix-listen without a path: exit 1 for both.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let st = dir2.path().to_string_lossy().into_owned();
    assert_eq!(
        cli_output(Which::Qemu, &["-m", "unix-listen", "-t", &st], None).0,
        Some(1)
    );
    assert_eq!(
        cli_output(Which::Qvirt, &["-m", "unix-listen", "-t", &st], None).0,
        Some(1)
    );
}

#[test]
fn test_serial_channels_on_a_pty() {
    for method in ["isa-serial", "virtio-serial"] {
        let mut outs = Vec::new();
        for which in [Which::Qemu, Which::Qvirt] {
            let (_agent, mut pty) = start_on_pty(which, method);
            pty.master
                .write_all(b"{'execute':'guest-ping','id':1}{'execute':'nope'}\xff{'execute':'guest-sync-delimited','arguments':{'id':5}}")
                .expect("write");
            pty.master.write_all(END).expect("end");
            let out = pty_read(&mut pty, DEADLINE, |o| o.ends_with(END_LINE));
            assert!(
                out.ends_with(END_LINE),
                "{method}: {:?}",
                String::from_utf8_lossy(&out)
            );
            outs.push(out);
        }
        assert_eq!(
            String::from_utf8_lossy(&outs[1]),
            String::from_utf8_lossy(&outs[0]),
            "{method}"
        );
        assert_eq!(outs[0], outs[1]);
    }
}

/// A real freeze of a scratch loop-mounted ext4 filesystem, one agent at a
/// time (two agents cannot both freeze it), with an fsfreeze hook. Skipped,
/// with the reason printed, where the test cannot make such a filesystem.
#[test]
fn test_real_freeze_of_a_scratch_filesystem() {
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fs = match LoopFs::new() {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("test_real_freeze_of_a_scratch_filesystem skipped: {reason}");
            return;
        }
    };
    let mnt = fs.mnt.to_string_lossy().into_owned();
    let hook_log = fs.dir.path().join("hook.log");
    let hook = fs.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", hook_log.display()),
    )
    .expect("hook");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let hook_arg = format!("-F{}", hook.display());
    let freeze = format!(
        "{{'execute':'guest-fsfreeze-freeze-list','arguments':{{'mountpoints':['{mnt}']}}}}\
         {{'execute':'guest-fsfreeze-status'}}{{'execute':'guest-get-time'}}\
         {{'execute':'guest-ping'}}{{'execute':'guest-get-osinfo'}}\
         {{'execute':'guest-fsfreeze-freeze-list','arguments':{{'mountpoints':['/nonexistent-qvirt-test']}}}}"
    );
    // After the thaw a blocked command keeps the frozen reason the freeze
    // gave it (qemu-ga re-enables only what is not blocked); a blocked
    // command of the freeze allow-list keeps its reason-less error.
    let thaw = "{'execute':'guest-fsfreeze-thaw'}{'execute':'guest-fsfreeze-status'}\
                {'execute':'guest-get-time'}{'execute':'guest-ping'}{'execute':'guest-get-devices'}\
                {'execute':'guest-get-osinfo','arguments':{'x':1}}{'execute':'guest-info'}";
    let mut outs = Vec::new();
    let mut logs = Vec::new();
    for which in [Which::Qemu, Which::Qvirt] {
        let _ = std::fs::remove_file(&hook_log);
        // The -v log (outside the frozen filesystem) is compared too: what
        // the freeze and thaw log, and that nothing is logged while frozen.
        let log = fs.dir.path().join(match which {
            Which::Qemu => "qemu.log",
            Which::Qvirt => "qvirt.log",
        });
        let log_s = log.to_string_lossy().into_owned();
        let agent = start(
            which,
            &[
                &hook_arg,
                "-b",
                "guest-get-time,guest-ping",
                "-v",
                "-l",
                &log_s,
            ],
            &[],
            |_| {},
        );
        // One write each (end marker included), so that both agents read
        // each in one go and log the same "read data" lines.
        let frozen = exchange_one_write(&agent, freeze.as_bytes());
        // Writes to the frozen filesystem would block: check the state
        // through the agent only, then thaw.
        let thawed = exchange_one_write(&agent, thaw.as_bytes());
        let hooks = std::fs::read_to_string(&hook_log).unwrap_or_default();
        assert!(!agent.dir.path().join("qga.state.isfrozen").exists());
        outs.push((frozen, thawed, hooks));
        // Up to the last response: the EOF that follows may not be
        // logged yet.
        let text = unstamp(&String::from_utf8_lossy(&std::fs::read(&log).expect("log")));
        let end = text
            .rfind("debug: sending data")
            .expect("no response logged");
        let end = end + text[end..].find('\n').expect("line end") + 1;
        logs.push(text[..end].to_owned());
    }
    assert_eq!(logs[1], logs[0], "-v log: qvirt-ga (left), qemu-ga (right)");
    assert!(logs[0].contains("warning: disabling logging due to filesystem freeze\nwarning: logging re-enabled due to filesystem unfreeze\n"));
    let show = |o: &(Vec<u8>, Vec<u8>, String)| {
        format!(
            "{}{}{}",
            String::from_utf8_lossy(&o.0),
            String::from_utf8_lossy(&o.1),
            o.2
        )
    };
    eprintln!("{}", show(&outs[0]));
    assert_eq!(show(&outs[1]), show(&outs[0]));
    assert!(
        outs[0]
            .0
            .starts_with(b"{\"return\": 1}\n{\"return\": \"frozen\"}\n"),
        "{}",
        show(&outs[0])
    );
    let thawed = String::from_utf8_lossy(&outs[0].1);
    assert!(
        thawed.starts_with("{\"return\": 1}\n{\"return\": \"thawed\"}\n{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-get-time has been disabled: the agent is in frozen state\"}}\n{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-ping has been disabled\"}}\n"),
        "{thawed}"
    );
    assert_eq!(outs[0].2, "freeze\nthaw\n");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the ")" of the command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

/// When the host side of a virtio-serial port goes away the agent must
/// idle, not spin, and keep running (the host may come back). The pty's
/// master is closed (close-on-exec, so no agent holds a copy): the port
/// then reads EOF and polls POLLHUP at once, as a virtio port with no host
/// (a busy loop there was checked to use ~100 ticks/s). Whether qemu-ga has
/// exited and the CPU it used are printed, not asserted (it keeps running
/// here); the assertions are on qvirt-ga, still running and idle. This needs
/// a measurement window (1 s of wall time), so it is the one place a test
/// waits for a fixed time. The write side (EAGAIN with POLLHUP) is covered
/// by the channel module's unit test: a pty cannot produce it.
#[test]
fn test_virtio_serial_without_host_does_not_spin() {
    let (mut qemu, qpty) = start_on_pty(Which::Qemu, "virtio-serial");
    let (mut agent, pty) = start_on_pty(Which::Qvirt, "virtio-serial");
    drop(qpty);
    drop(pty);
    let before = (cpu_ticks(qemu.child.id()), cpu_ticks(agent.child.id()));
    std::thread::sleep(Duration::from_secs(1));
    let used = (
        cpu_ticks(qemu.child.id()) - before.0,
        cpu_ticks(agent.child.id()) - before.1,
    );
    eprintln!(
        "qemu-ga: exit status {:?}, {} ticks in 1 s; qvirt-ga: {} ticks",
        qemu.child.try_wait().expect("try_wait"),
        used.0,
        used.1
    );
    assert!(
        agent.child.try_wait().expect("try_wait").is_none(),
        "qvirt-ga exited when the host side closed"
    );
    assert!(
        used.1 < 20,
        "qvirt-ga used {} ticks of CPU in 1 s with no host",
        used.1
    );
}

/// Tries to bind a vsock port the way the agents do; `Err` carries errno.
fn vsock_bind(port: u32) -> Result<(), i32> {
    // SAFETY: plain socket calls on a descriptor closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(*libc::__errno_location());
        }
        let mut sa: libc::sockaddr_vm = std::mem::zeroed();
        sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        sa.svm_cid = libc::VMADDR_CID_ANY;
        sa.svm_port = port;
        let rc = libc::bind(
            fd,
            (&sa as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        );
        let err = *libc::__errno_location();
        libc::close(fd);
        if rc < 0 { Err(err) } else { Ok(()) }
    }
}

/// vsock-listen binds `<cid>:<port>`; a second agent on a taken port
/// exits with status 1, as qemu-ga does. Skipped, with the reason
/// printed, where the kernel has no vsock.
#[test]
fn test_vsock_listen_binds_and_conflicts() {
    let port = 40_000 + std::process::id() % 10_000;
    if let Err(errno) = vsock_bind(port) {
        eprintln!(
            "test_vsock_listen_binds_and_conflicts skipped: vsock bind fails (errno {errno})"
        );
        return;
    }
    let addr = format!("{}:{port}", libc::VMADDR_CID_ANY);
    for which in [Which::Qemu, Which::Qvirt] {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = match which {
            Which::Qemu => qemu_ga(),
            Which::Qvirt => std::path::PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
        };
        let spawn = || {
            std::process::Command::new(&bin)
                .args(["-m", "vsock-listen", "-p", &addr, "-t"])
                .arg(dir.path())
                .env_remove("QGA_CONF")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        };
        let mut first = Agent {
            child: spawn(),
            sock: dir.path().join("unused"),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while vsock_bind(port) != Err(libc::EADDRINUSE) {
            assert!(
                first.child.try_wait().expect("wait").is_none(),
                "agent exited"
            );
            assert!(
                Instant::now() < deadline,
                "agent never bound the vsock port"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut second = Agent {
            child: spawn(),
            sock: dir.path().join("unused"),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let st = wait_exit(&mut second).expect("second agent kept running");
        assert_eq!(st.code(), Some(1));
        drop(first);
    }
}

/// Kills a daemonized agent (not our child) by the pid it wrote.
struct PidGuard(libc::pid_t);

impl Drop for PidGuard {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// `-d`: the parent exits 0, the daemon writes its pidfile and serves.
#[test]
fn test_daemonize_writes_pidfile_and_serves() {
    let mut outs = Vec::new();
    for which in [Which::Qemu, Which::Qvirt] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("sock");
        let pidfile = dir.path().join("ga.pid");
        start_daemon(which, dir.path(), &sock, &pidfile);
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pidfile");
            std::thread::sleep(Duration::from_millis(5));
        };
        let _guard = PidGuard(pid);
        let mut s = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(Instant::now() < deadline, "daemon socket never came up");
            std::thread::sleep(Duration::from_millis(5));
        };
        s.write_all(b"{'execute':'guest-ping','id':'daemon'}")
            .expect("write");
        s.write_all(END).expect("end");
        outs.push(read_until_end(&mut s));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], b"{\"return\": {}, \"id\": \"daemon\"}\n");
}

/// The `return` value of each response line in `out`.
fn returns(out: &[u8]) -> Vec<qvirt_qga::Value> {
    let mut parser = qvirt_qga::StreamParser::new();
    parser
        .feed_collect(out)
        .into_iter()
        .map(|m| {
            let v = m.expect("agent wrote invalid JSON");
            v.as_object()
                .and_then(|o| o.get("return"))
                .cloned()
                .unwrap_or_else(|| panic!("not a success: {}", String::from_utf8_lossy(out)))
        })
        .collect()
}

fn member_u64(d: &qvirt_qga::Dict, key: &str) -> Option<u64> {
    match d.get(key)? {
        qvirt_qga::Value::Int(i) => Some(*i as u64),
        qvirt_qga::Value::UInt(u) => Some(*u),
        _ => None,
    }
}

/// A mount point with its used-bytes and total-bytes.
type FsSizes = (String, Option<u64>, Option<u64>);

/// guest-get-fsinfo of both agents, each filesystem's used-bytes and
/// total-bytes taken out (they move while anything writes to the host's
/// filesystems, e.g. a build) and returned beside the rest, which must be
/// byte-identical.
fn fsinfo_split(out: &[u8]) -> (Vec<u8>, Vec<FsSizes>) {
    let mut ret = returns(out);
    assert_eq!(ret.len(), 1, "{}", String::from_utf8_lossy(out));
    let qvirt_qga::Value::Array(list) = &mut ret[0] else {
        panic!("not a list: {}", String::from_utf8_lossy(out));
    };
    let mut sizes = Vec::new();
    for fs in list.iter_mut() {
        let qvirt_qga::Value::Object(d) = fs else {
            panic!("not an object")
        };
        let mnt = d
            .get("mountpoint")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        sizes.push((
            mnt,
            member_u64(d, "used-bytes"),
            member_u64(d, "total-bytes"),
        ));
        d.take_value("used-bytes");
        d.take_value("total-bytes");
    }
    (qvirt_qga::writer::to_json(&ret[0]), sizes)
}

/// guest-get-fsinfo and guest-get-disks against the same /proc and /sys,
/// with a scratch loop-mounted ext4 filesystem added where the test can
/// make one (a virtual block device: no disk address). Everything but the
/// sizes is compared byte for byte; the sizes of the quiet scratch
/// filesystem exactly, those of the host's filesystems within 1% (other
/// processes write to them between the two calls). The mount list can
/// change under the test (other tests mount scratch filesystems), so a
/// differing pair is read again a few times before failing.
#[test]
fn test_fsinfo_and_disks() {
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fs = LoopFs::new()
        .map_err(|reason| eprintln!("test_fsinfo_and_disks: no scratch filesystem ({reason})"))
        .ok();
    // A mount point with a space (octal-escaped in mountinfo).
    let spaced = LoopFs::with("mnt with space", "loop,ro")
        .map_err(|reason| eprintln!("test_fsinfo_and_disks: no second filesystem ({reason})"))
        .ok();
    let agents = both(&[], &[], |_| {});
    let fsinfo: &[&[u8]] = &[b"{'execute':'guest-get-fsinfo'}"];
    let mut attempt = 0;
    let (a, b) = loop {
        let a = fsinfo_split(&exchange(&agents.0, fsinfo));
        let b = fsinfo_split(&exchange(&agents.1, fsinfo));
        attempt += 1;
        if a.0 == b.0 || attempt == 5 {
            break (a, b);
        }
    };
    assert_eq!(
        String::from_utf8_lossy(&b.0),
        String::from_utf8_lossy(&a.0),
        "fsinfo without sizes: qvirt-ga (left) differs from qemu-ga (right)"
    );
    eprintln!("fsinfo (sizes left out): {}", String::from_utf8_lossy(&a.0));
    let scratch = fs.as_ref().map(|f| f.mnt.to_string_lossy().into_owned());
    for ((mnt, qu, qt), (_, vu, vt)) in a.1.iter().zip(&b.1) {
        assert_eq!(qu.is_some(), vu.is_some(), "{mnt}: used-bytes present");
        assert_eq!(qt.is_some(), vt.is_some(), "{mnt}: total-bytes present");
        let (Some(qu), Some(vu), Some(qt), Some(vt)) = (qu, vu, qt, vt) else {
            continue;
        };
        if Some(mnt) == scratch.as_ref()
            || spaced
                .as_ref()
                .is_some_and(|f| f.mnt.to_string_lossy() == mnt.as_str())
        {
            assert_eq!((vu, vt), (qu, qt), "{mnt}: sizes of the quiet scratch fs");
        } else {
            let tol = qt / 100;
            assert!(qu.abs_diff(*vu) <= tol, "{mnt}: used {vu} vs {qu}");
            assert!(qt.abs_diff(*vt) <= tol, "{mnt}: total {vt} vs {qt}");
        }
    }
    for f in [&fs, &spaced].into_iter().flatten() {
        let needle = format!("\"mountpoint\": \"{}\"", f.mnt.display());
        assert!(
            String::from_utf8_lossy(&a.0).contains(&needle),
            "{needle} is not listed"
        );
    }
    let out = same(&agents, &[b"{'execute':'guest-get-disks'}"]);
    eprintln!("disks: {}", String::from_utf8_lossy(&out));
    // Arguments are checked as for any command without arguments.
    same(
        &agents,
        &[b"{'execute':'guest-get-fsinfo','arguments':{'x':1}}{'execute':'guest-get-disks','arguments':{'x':1}}"],
    );
    drop(spaced);
    drop(fs);
}

/// guest-fstrim: FITRIM on every mounted block-device filesystem (the
/// host's too: FITRIM only discards free blocks), with a scratch
/// loop-mounted ext4 filesystem where the test can make one. The byte
/// counts trimmed depend on what an earlier trim left (the second trim of
/// an unchanged ext4 group trims nothing), so their digits are masked;
/// paths, minimum and errors are compared as they are.
#[test]
fn test_fstrim() {
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fs = LoopFs::new()
        .map_err(|reason| eprintln!("test_fstrim: no scratch filesystem ({reason})"))
        .ok();
    // Read-only without journal replay: ext4 refuses FITRIM with EROFS,
    // the per-path "failed to trim" error.
    let norecovery = LoopFs::with("ro mnt", "loop,ro,noload")
        .map_err(|reason| eprintln!("test_fstrim: no read-only filesystem ({reason})"))
        .ok();
    let agents = both(&[], &[], |_| {});
    let mask = |v: Vec<u8>| -> String {
        let text = String::from_utf8_lossy(&v).into_owned();
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("\"trimmed\": ") {
            let (head, tail) = rest.split_at(i + 11);
            out.push_str(head);
            out.push('N');
            rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(rest);
        out
    };
    for req in [
        &b"{'execute':'guest-fstrim'}"[..],
        b"{'execute':'guest-fstrim','arguments':{'minimum':65536}}",
    ] {
        let mut attempt = 0;
        let (a, b) = loop {
            let a = mask(exchange(&agents.0, &[req]));
            let b = mask(exchange(&agents.1, &[req]));
            attempt += 1;
            if a == b || attempt == 5 {
                break (a, b);
            }
        };
        assert_eq!(b, a, "qvirt-ga (left) differs from qemu-ga (right)");
        eprintln!("{a}");
        if let Some(fs) = &fs {
            let needle = format!("\"path\": \"{}\", \"trimmed\": N", fs.mnt.display());
            assert!(a.contains(&needle), "scratch fs not trimmed: {a}");
        }
        if let Some(ro) = &norecovery {
            let needle = format!(
                "\"path\": \"{}\", \"error\": \"failed to trim: Read-only file system\"",
                ro.mnt.display()
            );
            assert!(a.contains(&needle), "no EROFS error: {a}");
        }
    }
    same(
        &agents,
        &[b"{'execute':'guest-fstrim','arguments':{'minimum':'x'}}{'execute':'guest-fstrim','arguments':{'minimum':1,'y':2}}"],
    );
    drop(norecovery);
    drop(fs);
}

/// `-a` (not in qemu-ga 7.2, which rejects it: checked on qvirt-ga alone):
/// only the listed commands run, the others answer with the "not allowed"
/// reason; `-b` on top of `-a` blocks without a reason; guest-info flags.
/// `-c FILE` reads FILE as qemu-ga reads `$QGA_CONF` (compared with qemu-ga
/// given the same file that way) and wins over `$QGA_CONF`; a missing
/// `-c` file is fatal (exit 1, nothing printed).
#[test]
fn test_allow_rpcs_and_config_option() {
    let agent = start(
        Which::Qvirt,
        &[
            "-a",
            "guest-ping,guest-info,guest-get-time",
            "--allow-rpcs=guest-sync",
            "-b",
            "guest-get-time",
        ],
        &[],
        |_| {},
    );
    let out = exchange(
        &agent,
        &[b"{'execute':'guest-ping'}{'execute':'guest-sync','arguments':{'id':2}}{'execute':'guest-get-time'}{'execute':'guest-get-osinfo'}{'execute':'guest-get-devices'}"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "{\"return\": {}}\n{\"return\": 2}\n\
         {\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-get-time has been disabled\"}}\n\
         {\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-get-osinfo has been disabled: the command is not allowed\"}}\n\
         {\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-get-devices has been disabled\"}}\n"
    );
    let info = exchange(&agent, &[b"{'execute':'guest-info'}"]);
    let ret = returns(&info);
    let cmds = ret[0]
        .as_object()
        .and_then(|o| o.get("supported_commands"))
        .cloned()
        .expect("supported_commands");
    let qvirt_qga::Value::Array(cmds) = cmds else {
        panic!("not a list")
    };
    let mut enabled: Vec<String> = cmds
        .iter()
        .filter_map(|c| c.as_object())
        .filter(|c| matches!(c.get("enabled"), Some(qvirt_qga::Value::Bool(true))))
        .filter_map(|c| c.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect();
    enabled.sort();
    assert_eq!(enabled, ["guest-info", "guest-ping", "guest-sync"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("ga.conf");
    std::fs::write(
        &conf,
        "[general]\nmethod=isa-serial\npidfile=/run/x.pid\nverbose=1\nblock-rpcs=guest-ping\n",
    )
    .expect("conf");
    let other = dir.path().join("other.conf");
    std::fs::write(&other, "[general]\nmethod=unix-listen\n").expect("conf");
    let conf_s = conf.to_string_lossy().into_owned();
    let q = cli_output(Which::Qemu, &["-D"], Some(&conf));
    // $QGA_CONF names the other file: -c wins.
    let v = cli_output(Which::Qvirt, &["-c", &conf_s, "-D"], Some(&other));
    assert_eq!(
        (v.0, String::from_utf8_lossy(&v.1)),
        (q.0, String::from_utf8_lossy(&q.1))
    );
    assert!(String::from_utf8_lossy(&v.1).contains("method=isa-serial\n"));
    let missing = dir.path().join("missing.conf");
    let v = cli_output(
        Which::Qvirt,
        &["--config", &missing.to_string_lossy(), "-D"],
        None,
    );
    assert_eq!(v, (Some(1), Vec::new()));
}

/// Strips the `<secs>.<usecs>: ` stamp of each log line.
fn unstamp(log: &str) -> String {
    log.lines()
        .map(|l| {
            let (stamp, rest) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("no stamp: {l:?}"));
            let (secs, usecs) = stamp.split_once('.').expect("stamp");
            assert!(
                secs.bytes().all(|b| b.is_ascii_digit())
                    && usecs.len() == 6
                    && usecs.bytes().all(|b| b.is_ascii_digit()),
                "bad stamp {l:?}"
            );
            format!("{rest}\n")
        })
        .collect()
}

/// `-l FILE -v`: the log lines (stamp stripped) are qemu-ga's, for a
/// session with blocked commands, good and bad requests, 0xFF and a
/// delimited sync, EOF and SIGTERM. Without `-v` a normal session logs
/// nothing; a channel that cannot be opened logs qemu-ga's critical lines
/// and exits 1.
#[test]
fn test_log_file_and_verbose() {
    let session: &[u8] = b"{'execute':'guest-ping'}{'execute':'guest-sync','arguments':{'id':1}}{'execute':'nope'}%[]\xff{'execute':'guest-sync-delimited','arguments':{'id':3}}{'execute':'guest-get-time','id':4}";
    let mut logs = Vec::new();
    for which in [Which::Qemu, Which::Qvirt] {
        for verbose in [true, false] {
            let logdir = tempfile::tempdir().expect("tempdir");
            let log = logdir.path().join("ga.log");
            let log_s = log.to_string_lossy().into_owned();
            let mut args = vec!["-l", &log_s, "-b", "guest-get-time,guest-nope"];
            if verbose {
                args.push("-v");
            }
            let mut agent = start(which, &args, &[], |_| {});
            // One write, so each agent reads it in one go.
            let mut all = session.to_vec();
            all.extend_from_slice(END);
            let mut s = UnixStream::connect(&agent.sock).expect("connect");
            s.write_all(&all).expect("write");
            read_until_end(&mut s);
            drop(s);
            // The next client is served once the EOF is handled; SIGTERM
            // arrives while it is still connected.
            let mut next = UnixStream::connect(&agent.sock).expect("connect");
            let mut ping = b"{'execute':'guest-ping','id':'next'}".to_vec();
            ping.extend_from_slice(END);
            next.write_all(&ping).expect("write");
            read_until_end(&mut next);
            sigterm(&agent);
            assert_eq!(wait_exit(&mut agent).and_then(|s| s.code()), Some(0));
            drop(next);
            let text = std::fs::read(&log).expect("log");
            logs.push(unstamp(&String::from_utf8_lossy(&text)));
        }
        // A channel that cannot be opened: a device, a unix socket in a
        // missing directory, an unknown method.
        let logdir = tempfile::tempdir().expect("tempdir");
        let log = logdir.path().join("ga.log");
        let st = logdir.path().to_string_lossy().into_owned();
        let log_s = log.to_string_lossy().into_owned();
        for channel in [
            ["-m", "virtio-serial", "-p", "/nonexistent-port"],
            ["-m", "unix-listen", "-p", "/nonexistent-dir/sock"],
            ["-m", "bogus", "-p", "/nonexistent-port"],
        ] {
            let mut args = channel.to_vec();
            args.extend(["-t", &st, "-l", &log_s]);
            let (code, _) = cli_output(which, &args, None);
            assert_eq!(code, Some(1), "{args:?}");
        }
        logs.push(unstamp(&std::fs::read_to_string(&log).expect("log")));
        // A log file that cannot be opened: the critical lines on stderr,
        // no channel, exit 0 (sic).
        let sock = logdir.path().join("sock");
        let out = std::process::Command::new(match which {
            Which::Qemu => qemu_ga(),
            Which::Qvirt => std::path::PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
        })
        .args([
            "-m",
            "unix-listen",
            "-p",
            &sock.to_string_lossy(),
            "-t",
            &st,
        ])
        .args(["-l", "/nonexistent-dir/ga.log"])
        .env_remove("QGA_CONF")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
        assert_eq!(out.status.code(), Some(0));
        assert!(!sock.exists());
        let stderr = String::from_utf8_lossy(&out.stderr);
        logs.push(unstamp(
            &stderr
                .lines()
                .filter(|l| !l.contains("Guest agent version"))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        ));
    }
    eprintln!("{}", logs[0]);
    assert_eq!(
        logs[4], logs[0],
        "verbose log: qvirt-ga (left), qemu-ga (right)"
    );
    assert_eq!(logs[5], logs[1], "quiet log");
    assert_eq!(logs[1], "");
    assert_eq!(logs[6], logs[2], "channel failure log");
    assert_eq!(logs[7], logs[3], "log file failure");
    assert_eq!(
        logs[3],
        "critical: unable to open specified log file: No such file or directory\ncritical: error initializing guest agent\n"
    );
    assert!(logs[0].contains("debug: disabling command: guest-get-time\n"));
    assert!(logs[2].contains("critical: failed to create guest agent channel\n"));
    assert!(logs[2].contains(
        "critical: Failed to bind socket to /nonexistent-dir/sock: No such file or directory\n"
    ));
    assert!(logs[2].contains("critical: unsupported channel method/type: bogus\n"));
}

/// `-d -f PIDFILE` twice: the second daemon cannot lock the pidfile; it
/// logs qemu-ga's critical line (on stderr: the pidfile comes before the
/// log file) and exits (its parent has already exited
/// 0), leaving the first daemon and its pidfile alone.
#[test]
fn test_pidfile_is_locked() {
    let mut lines = Vec::new();
    for which in [Which::Qemu, Which::Qvirt] {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("ga.pid");
        let bin = match which {
            Which::Qemu => qemu_ga(),
            Which::Qvirt => std::path::PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
        };
        let daemon = |sock: &str, log: &Path| {
            let stderr = std::fs::File::create(log).expect("stderr file");
            let mut parent = Agent {
                child: std::process::Command::new(&bin)
                    .args(["-d", "-m", "unix-listen", "-p"])
                    .arg(dir.path().join(sock))
                    .arg("-t")
                    .arg(dir.path())
                    .arg("-f")
                    .arg(&pidfile)
                    .env_remove("QGA_CONF")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .expect("spawn"),
                sock: dir.path().join(sock),
                dir: tempfile::tempdir().expect("tempdir"),
            };
            let st = wait_exit(&mut parent).expect("parent did not exit");
            assert_eq!(st.code(), Some(0));
        };
        let log1 = dir.path().join("first.log");
        daemon("s1", &log1);
        let deadline = Instant::now() + DEADLINE;
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pidfile");
            std::thread::sleep(Duration::from_millis(5));
        };
        let _guard = PidGuard(pid);
        while UnixStream::connect(dir.path().join("s1")).is_err() {
            assert!(Instant::now() < deadline, "first daemon never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        let log2 = dir.path().join("second.log");
        daemon("s2", &log2);
        let text = loop {
            let text = std::fs::read_to_string(&log2).unwrap_or_default();
            if text.ends_with('\n') {
                break text;
            }
            assert!(Instant::now() < deadline, "second daemon logged nothing");
            std::thread::sleep(Duration::from_millis(5));
        };
        // The second daemon is gone without opening its channel; the
        // first one and its pidfile are untouched.
        assert!(!dir.path().join("s2").exists());
        assert_eq!(
            std::fs::read_to_string(&pidfile).expect("pidfile"),
            format!("{pid}\n")
        );
        // SAFETY: signal 0 only checks that the first daemon is alive.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0);
        lines.push(unstamp(&text));
    }
    assert_eq!(lines[1], lines[0]);
    assert_eq!(
        lines[0],
        "critical: Cannot lock pid file: Resource temporarily unavailable\n"
    );
}

/// Whether the filesystem at `mnt` is frozen: FIFREEZE fails with EBUSY on
/// a frozen one; on a thawed one it succeeds and is undone at once.
fn is_frozen(mnt: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(mnt).expect("open mount point");
    // SAFETY: FIFREEZE/FITHAW on our own scratch mount point.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), 0xC004_5877, 0) == 0 {
            libc::ioctl(f.as_raw_fd(), 0xC004_5878, 0);
            false
        } else {
            assert_eq!(*libc::__errno_location(), libc::EBUSY, "FIFREEZE probe");
            true
        }
    }
}

/// An agent that leaves while frozen (signals are ignored then; a write
/// failure on its device ends it) thaws first, as qemu-ga's cleanup does:
/// virtio-serial on a pty, a real freeze of a scratch filesystem, then the
/// host floods the agent with requests without reading and hangs up, so the
/// agent's pending write fails. qvirt-ga must exit with status 0 (as
/// qemu-ga, which stops on a channel error), the filesystem thawed and the
/// marker gone. qemu-ga is run the same way first and what it did is
/// printed; where it exited, the statuses must agree. Skipped, with the
/// reason printed, where no loop mount can be made.
#[test]
fn test_exit_while_frozen_thaws() {
    let _lock = FREEZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let fs = match LoopFs::new() {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("test_exit_while_frozen_thaws skipped: {reason}");
            return;
        }
    };
    let mnt = fs.mnt.to_string_lossy().into_owned();
    let mut qemu_code = None;
    for which in [Which::Qemu, Which::Qvirt] {
        let (mut agent, mut pty) = start_on_pty(which, "virtio-serial");
        let freeze = format!(
            "{{'execute':'guest-fsfreeze-freeze-list','arguments':{{'mountpoints':['{mnt}']}},'id':'fz'}}"
        );
        pty.master.write_all(freeze.as_bytes()).expect("write");
        let want: &[u8] = b"{\"return\": 1, \"id\": \"fz\"}\n";
        let got = pty_read(&mut pty, DEADLINE, |o| o.ends_with(want));
        assert!(got.ends_with(want), "{}", String::from_utf8_lossy(&got));
        assert!(is_frozen(&fs.mnt));
        assert!(agent.dir.path().join("qga.state.isfrozen").exists());
        // Flood without reading until neither side moves for 1 s (the
        // agent blocked writing, its input full), then hang up.
        use std::os::fd::AsRawFd;
        let fd = pty.master.as_raw_fd();
        // SAFETY: fcntl on our own pty master.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let sync = format!(
            "{{'execute':'guest-sync','arguments':{{'id':'{}'}}}}",
            "x".repeat(1000)
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < deadline, "the pty never filled up");
            match pty.master.write(sync.as_bytes()) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 1000) } == 0 {
                break;
            }
        }
        drop(pty);
        let status = wait_exit(&mut agent);
        let frozen = is_frozen(&fs.mnt);
        let marker = agent.dir.path().join("qga.state.isfrozen").exists();
        eprintln!("after the hang-up: exit {status:?}, frozen {frozen}, marker {marker}");
        let code = status.and_then(|s| s.code());
        match which {
            Which::Qemu => qemu_code = code,
            Which::Qvirt => {
                assert_eq!(code, Some(0), "qvirt-ga exit");
                // Where qemu-ga left too, it did with the same status.
                if qemu_code.is_some() {
                    assert_eq!(code, qemu_code);
                }
                assert!(!frozen, "qvirt-ga left the filesystem frozen");
                assert!(!marker, "qvirt-ga left the frozen marker");
            }
        }
        drop(agent);
        if is_frozen(&fs.mnt) {
            // qemu-ga killed while frozen: thaw for the next agent.
            let f = std::fs::File::open(&fs.mnt).expect("open");
            // SAFETY: FITHAW on our own scratch mount point.
            unsafe { libc::ioctl(f.as_raw_fd(), 0xC004_5878, 0) };
        }
    }
}

/// Starts `which` daemonized (`-d`) in unix-listen mode on `sock`, its
/// statedir `statedir` and pidfile `pidfile`, and waits for the parent to
/// exit 0 (the daemon lives on: the caller stops it by pid).
fn start_daemon(
    which: Which,
    statedir: &std::path::Path,
    sock: &std::path::Path,
    pidfile: &std::path::Path,
) {
    let bin = match which {
        Which::Qemu => qemu_ga(),
        Which::Qvirt => std::path::PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
    };
    let mut parent = Agent {
        child: std::process::Command::new(bin)
            .args(["-d", "-m", "unix-listen", "-p"])
            .arg(sock)
            .arg("-t")
            .arg(statedir)
            .arg("-f")
            .arg(pidfile)
            .env_remove("QGA_CONF")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
        sock: sock.to_owned(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let st = wait_exit(&mut parent).expect("parent did not exit");
    assert_eq!(st.code(), Some(0));
}

/// Arguments that are not UTF-8 (qemu-ga takes any bytes; qvirt-ga used to
/// panic): both agents listen on a socket whose name is not UTF-8 and
/// answer alike; `-D` prints such paths and `-b` names byte for byte the
/// same; an option byte or a method name that is not UTF-8 exits 1 on both
/// with the same stdout, and qvirt-ga's stderr is one line of complaint
/// (no panic).
#[test]
fn test_arguments_that_are_not_utf8() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = OsStr::from_bytes(b"\xe9\xff.sock");
    let agents = (
        start_named(Which::Qemu, name, &[], &[], |_| {}),
        start_named(Which::Qvirt, name, &[], &[], |_| {}),
    );
    assert_eq!(agents.1.sock.file_name(), Some(name));
    let out = same(
        &agents,
        &[b"{'execute':'guest-ping','id':1}{'execute':'guest-sync','arguments':{'id':2}}"],
    );
    assert!(out.ends_with(b"{\"return\": 2}\n"), "{out:?}");
    let b = |s: &[u8]| OsString::from_vec(s.to_vec());
    let run = |which: Which, args: &[OsString]| {
        let out = std::process::Command::new(agent_bin(which))
            .args(args)
            .env("QGA_CONF", OsStr::from_bytes(b"/nonexistent/\xe9.conf"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        (out.status.code(), out.stdout, out.stderr)
    };
    let dump = [
        b(b"-m"),
        b(b"unix-listen"),
        b(b"-p/tmp/\xe9.sock"),
        b(b"--logfile=/l\xe9"),
        b(b"-f"),
        b(b"/f\xe9"),
        b(b"-F/h\xe9"),
        b(b"-t"),
        b(b"/t\xe9"),
        b(b"-b"),
        b(b"gu\xe9,guest-ping"),
        b(b"-D"),
    ];
    let (qemu, qvirt) = (run(Which::Qemu, &dump), run(Which::Qvirt, &dump));
    assert_eq!(qvirt.0, Some(0));
    assert_eq!(qvirt.0, qemu.0);
    assert_eq!(
        String::from_utf8_lossy(&qvirt.1),
        String::from_utf8_lossy(&qemu.1)
    );
    assert_eq!(qvirt.1, qemu.1);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s").into_os_string();
    for args in [
        vec![b(b"-\xe9")],
        vec![b(b"--\xe9")],
        vec![
            b(b"-m"),
            b(b"unix\xe9"),
            b(b"-p"),
            sock,
            b(b"-t"),
            dir.path().into(),
        ],
    ] {
        let (qemu, qvirt) = (run(Which::Qemu, &args), run(Which::Qvirt, &args));
        assert_eq!(qvirt.0, Some(1), "{args:?}");
        assert_eq!(qvirt.0, qemu.0, "{args:?}");
        let qemu_out =
            String::from_utf8_lossy(&qemu.1).replace(qemu_ga().to_str().unwrap_or("?"), "AGENT");
        let qvirt_out =
            String::from_utf8_lossy(&qvirt.1).replace(env!("CARGO_BIN_EXE_qvirt-ga"), "AGENT");
        assert_eq!(qvirt_out, qemu_out, "{args:?}");
        let err = String::from_utf8_lossy(&qvirt.2);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}: no complaint");
    }
}
