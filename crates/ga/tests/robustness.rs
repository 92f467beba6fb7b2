//! qvirt-ga alone, where it must not do what an earlier version did: hold
//! every reply of one read in memory, ignore SIGTERM while a client does
//! not read. Every wait has a deadline; every agent is killed by pid on
//! drop.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

/// Opens /dev/zero in the agent and returns the handle.
fn open_zero(reader: &mut BufReader<UnixStream>) -> u64 {
    reader
        .get_mut()
        .write_all(br#"{"execute":"guest-file-open","arguments":{"path":"/dev/zero","mode":"r"}}"#)
        .expect("write");
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    line.strip_prefix(r#"{"return": "#)
        .and_then(|l| l.strip_suffix("}\n"))
        .and_then(|h| h.parse().ok())
        .unwrap_or_else(|| panic!("guest-file-open: {line:?}"))
}

/// The agent's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM")
}

/// Many large guest-file-reads in one write (so in one read of the agent)
/// are all answered, each reply whole and right, and the agent writes them
/// as it goes: its peak RSS stays far below the sum of the replies (it was
/// above it when all replies of a read were built before any was written).
#[test]
fn test_pipelined_large_reads_are_written_as_they_go() {
    const READS: usize = 50;
    const COUNT: usize = 2 << 20;
    let agent = start(Which::Qvirt, &[], &[], |_| {});
    let stream = UnixStream::connect(&agent.sock).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let handle = open_zero(&mut reader);
    let mut batch = Vec::new();
    for _ in 0..READS {
        batch.extend_from_slice(
            format!(
                r#"{{"execute":"guest-file-read","arguments":{{"handle":{handle},"count":{COUNT}}}}}"#
            )
            .as_bytes(),
        );
    }
    assert!(
        batch.len() <= 4096,
        "the batch must fit one read of the agent"
    );
    reader.get_mut().write_all(&batch).expect("write");
    let want = format!(
        r#"{{"return": {{"count": {COUNT}, "buf-b64": "{}", "eof": false}}}}"#,
        "A".repeat(COUNT / 3 * 4 + 4)
    )
    .replace("AAAA\"", "AAA=\"");
    let want = format!("{want}\n").into_bytes();
    let deadline = Instant::now() + DEADLINE;
    for i in 0..READS {
        // Compared piece by piece, so the test holds one reply at most.
        let mut at = 0;
        while at < want.len() {
            assert!(Instant::now() < deadline, "reply {i}: too slow");
            let got = reader.fill_buf().expect("read");
            assert!(!got.is_empty(), "reply {i}: agent closed at byte {at}");
            let n = got.len().min(want.len() - at);
            assert!(
                got[..n] == want[at..at + n],
                "reply {i} differs at byte {at}: {:?}",
                String::from_utf8_lossy(&got[..n.min(200)])
            );
            reader.consume(n);
            at += n;
        }
    }
    let peak = peak_rss_kib(agent.child.id());
    let sum = (READS * want.len() / 1024) as u64;
    eprintln!("agent peak RSS {peak} KiB; replies {sum} KiB in all");
    assert!(
        peak < sum / 4,
        "peak RSS {peak} KiB for {sum} KiB of replies: replies were held back"
    );
}

/// A client that stops reading while a large reply is written, then
/// SIGTERM: the agent leaves (status 0) instead of blocking in its write.
#[test]
fn test_sigterm_while_a_client_does_not_read() {
    let mut agent = start(Which::Qvirt, &[], &[], |_| {});
    let stream = UnixStream::connect(&agent.sock).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let handle = open_zero(&mut reader);
    // 8 MiB, about 11 MiB of reply: far more than the socket buffers.
    reader
        .get_mut()
        .write_all(
            format!(
                r#"{{"execute":"guest-file-read","arguments":{{"handle":{handle},"count":8388608}}}}"#
            )
            .as_bytes(),
        )
        .expect("write");
    // The start of the reply: the agent is writing. Then no more reading.
    let mut head = [0u8; 4096];
    reader.read_exact(&mut head).expect("read");
    assert!(head.starts_with(br#"{"return": {"count": 8388608, "buf-b64": "AAAA"#));
    sigterm(&agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = agent.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "SIGTERM ignored while a write waits on the client"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    drop(reader);
}
