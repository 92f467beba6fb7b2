//! How fast this machine is beside the reference machine the project's
//! performance targets were set on.
//!
//! On that 2-vCPU machine, real qemu-ga 7.2 took 7.0 µs of CPU per
//! guest-ping (pipelined from one connection, 1,000 requests per write;
//! 146k requests/s). The agentd target (at most 150 µs added to a Ping)
//! and the bus's fan-out latency target were set on machines like it. The VMs
//! this project runs on are 2-vCPU too, but their speed depends on the host
//! and the hour: the same qemu-ga, measured the same way, has cost 3 times
//! as much CPU here on some days.
//!
//! [`MachineSpeed::measure`] repeats that measurement with the real qemu-ga
//! so that a bench can print, beside an absolute figure, how this machine
//! compares to the reference one. The factor is a CPU-bound figure (the
//! agent is kept busy, nothing sleeps): it scales work, not the cost of
//! waking a sleeping thread, which on a VM can differ more.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::cpu_ns;
use crate::{ChildGuard, tool_path};

/// qemu-ga's CPU time per pipelined guest-ping on the reference machine
/// (qga.md §6: 20k requests, 1,000 per write, 7.0 µs).
pub const REFERENCE_CPU_PER_PING_US: f64 = 7.0;

/// The request and its reply, as qemu-ga writes it.
pub const PING: &[u8] = b"{\"execute\":\"guest-ping\"}";
/// qemu-ga's reply to [`PING`].
pub const PING_REPLY: &[u8] = b"{\"return\": {}}\n";

/// Every wait here ends by then.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests per pipelined run and per write, as in qga.md §6.
const REQUESTS: usize = 20_000;
const BATCH: usize = 1_000;
/// Runs measured (after one warm-up run); their median is kept.
const RUNS: usize = 5;

/// A real qemu-ga serving unix-listen on `dir/sock`: [`spawn_agent`].
pub fn spawn_qemu_ga(dir: &Path) -> (ChildGuard, PathBuf) {
    spawn_agent(&tool_path("qemu-ga"), dir)
}

/// Agent `bin` (qemu-ga or one with its command line) serving unix-listen
/// on `dir/sock`, its state and pidfile in `dir`, stopped by pid when the
/// guard drops; returns once the socket accepts.
pub fn spawn_agent(bin: &Path, dir: &Path) -> (ChildGuard, PathBuf) {
    let sock = dir.join("sock");
    let child = ChildGuard::spawn(
        Command::new(bin)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(dir)
            .arg("-f")
            .arg(dir.join("agent.pid"))
            .current_dir(dir)
            .env_remove("QGA_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened on {}",
            bin.display(),
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, sock)
}

/// A connection to the agent at `sock`, synchronised as a host does (0xFF
/// and guest-sync-delimited, input discarded up to the delimited reply),
/// with read and write timeouts.
pub fn connect_synced(sock: &Path) -> UnixStream {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}")
        .unwrap();
    let want: &[u8] = b"\xff{\"return\": 4242}\n";
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the reply may be taken from the socket.
    while !seen.ends_with(want) {
        let n = s.read(&mut byte).expect("read the sync reply");
        assert!(n > 0, "the agent closed the connection during the sync");
        seen.push(byte[0]);
    }
    s
}

/// Writes `n` guest-pings on `stream` in writes of `batch` from a second
/// thread while this one reads the replies; returns the wall time from the
/// first write to the last reply. The stream must have nothing unread.
/// Panics on a reply that is not [`PING_REPLY`]'s size.
pub fn pipelined_pings(stream: &mut UnixStream, n: usize, batch: usize) -> Duration {
    let mut writer = stream.try_clone().unwrap();
    let burst: Vec<u8> = PING.repeat(batch);
    let t = Instant::now();
    let w = std::thread::spawn(move || {
        let mut left = n;
        while left > 0 {
            let k = left.min(batch);
            writer.write_all(&burst[..k * PING.len()]).unwrap();
            left -= k;
        }
    });
    let mut buf = vec![0u8; 1 << 16];
    let (mut got, mut bytes) = (0, 0);
    while got < n {
        let k = stream.read(&mut buf).expect("read replies");
        assert!(k > 0, "the agent closed the connection");
        got += buf[..k].iter().filter(|&&b| b == b'\n').count();
        bytes += k;
    }
    let elapsed = t.elapsed();
    w.join().unwrap();
    assert_eq!(got, n, "more replies than requests");
    assert_eq!(bytes, n * PING_REPLY.len(), "replies of an unexpected size");
    elapsed
}

/// qemu-ga's cost per pipelined guest-ping on this machine, beside the
/// reference machine's.
#[derive(Debug, Clone, Copy)]
pub struct MachineSpeed {
    /// qemu-ga's CPU time per request here, µs (median of the runs).
    pub cpu_per_ping_us: f64,
}

impl MachineSpeed {
    /// Runs qemu-ga (a fresh one, in a temp dir) through qga.md §6's
    /// pipelined measurement: one warm-up run, then [`RUNS`] runs of 20k
    /// requests in writes of 1,000.
    pub fn measure() -> MachineSpeed {
        let dir = tempfile::tempdir().unwrap();
        let (agent, sock) = spawn_qemu_ga(dir.path());
        let mut s = connect_synced(&sock);
        pipelined_pings(&mut s, REQUESTS, BATCH);
        let mut per_ping: Vec<f64> = (0..RUNS)
            .map(|_| {
                let before = cpu_ns(agent.id());
                pipelined_pings(&mut s, REQUESTS, BATCH);
                (cpu_ns(agent.id()) - before) as f64 / 1e3 / REQUESTS as f64
            })
            .collect();
        per_ping.sort_by(f64::total_cmp);
        MachineSpeed {
            cpu_per_ping_us: per_ping[RUNS / 2],
        }
    }

    /// How many times slower this machine is than the reference one (1.0:
    /// as fast; below 1: faster).
    pub fn factor(&self) -> f64 {
        self.cpu_per_ping_us / REFERENCE_CPU_PER_PING_US
    }

    /// One bench line saying so.
    pub fn line(&self) -> String {
        let f = self.factor();
        let (times, word) = if f >= 1.0 {
            (f, "slower")
        } else {
            (1.0 / f, "faster")
        };
        format!(
            "machine speed: qemu-ga uses {:.1} µs of CPU per pipelined guest-ping here, {REFERENCE_CPU_PER_PING_US:.1} µs on the reference machine: this one is {times:.1}x {word}",
            self.cpu_per_ping_us,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pipelined_pings_leave_the_connection_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let (_agent, sock) = spawn_qemu_ga(dir.path());
        let mut s = connect_synced(&sock);
        // A last batch shorter than the others, too.
        pipelined_pings(&mut s, 2_500, 1_000);
        s.write_all(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":7}}")
            .unwrap();
        let want = b"{\"return\": 7}\n";
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&got));
    }

    #[test]
    fn test_speed_line_says_slower_or_faster() {
        let slow = MachineSpeed {
            cpu_per_ping_us: 21.0,
        };
        assert!((slow.factor() - 3.0).abs() < 1e-9);
        assert!(
            slow.line().ends_with("this one is 3.0x slower"),
            "{}",
            slow.line()
        );
        let fast = MachineSpeed {
            cpu_per_ping_us: 3.5,
        };
        assert!(
            fast.line().ends_with("this one is 2.0x faster"),
            "{}",
            fast.line()
        );
    }
}
