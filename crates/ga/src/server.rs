//! The agent's main loop: read up to 4096 bytes, feed the parser, answer
//! each message in order, one client at a time; the replies to one read go
//! out in one write, or earlier once 1 MiB of them is pending. One thread,
//! blocking, no busy waiting. SIGTERM/SIGINT end it with status 0 unless
//! frozen.

use std::io;

use qvirt_qga::StreamParser;

use crate::agent::Agent;
use crate::channel::{Conn, Listener, READ_SIZE};
use crate::{log, signals};

/// Whether a stop signal arrived (and the agent may stop: not frozen).
fn should_stop(agent: &Agent) -> bool {
    if !signals::stop_requested() {
        return false;
    }
    if agent.frozen {
        // qemu-ga ignores SIGTERM/SIGINT while frozen.
        signals::clear();
        return false;
    }
    log::debug(&format!(
        "received signal num {}, quitting",
        signals::last_signal()
    ));
    true
}

/// Pending replies are written once they reach this size, without waiting
/// for the rest of the read to be handled.
const FLUSH_AT: usize = 1 << 20;

/// Writes the pending replies in `out` (unless an earlier write of this
/// read failed: then they are dropped) and empties it; the first failure
/// is kept in `failed`.
fn flush(conn: &mut impl Conn, agent: &Agent, out: &mut Vec<u8>, failed: &mut Option<io::Error>) {
    if out.is_empty() {
        return;
    }
    if failed.is_none()
        && let Err(e) = conn.write_all_bytes(out, &mut || !should_stop(agent))
    {
        *failed = Some(e);
    }
    out.clear();
    // Keep a small buffer for the common case, not the largest reply.
    if out.capacity() > FLUSH_AT {
        *out = Vec::new();
    }
}

/// The agent plus its parser: everything that outlives a connection.
pub struct Server {
    /// The agent.
    pub agent: Agent,
    parser: StreamParser,
    out: Vec<u8>,
}

impl Server {
    /// A server around `agent` with a fresh parser.
    pub fn new(agent: Agent) -> Self {
        Server {
            agent,
            parser: StreamParser::new(),
            out: Vec::new(),
        }
    }

    /// Serves one peer until it goes away (`Ok(true)`), a stop signal
    /// arrives (`Ok(false)`) or reading or writing fails (`Err`: for a
    /// device that ends the agent, as in qemu-ga; a socket client is just
    /// dropped).
    pub fn serve_conn(&mut self, conn: &mut impl Conn) -> io::Result<bool> {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            if should_stop(&self.agent) {
                return Ok(false);
            }
            let n = match conn.read_some(&mut buf) {
                Ok(0) => {
                    log::debug("received EOF");
                    return Ok(true);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if log::debug_enabled() {
                log::debug_bytes(&format!("read data, count: {n}, data: "), &buf[..n]);
            }
            // Replies are gathered and written once per read (one write for
            // ~170 pipelined pings), but written as soon as they pass
            // FLUSH_AT, so that many large replies from one read (pipelined
            // 48 MiB guest-file-reads) are never all held at once. Every
            // message of the read is still handled after a write failed (as
            // qemu-ga); the replies after the failure are dropped.
            let mut failed = None;
            let Server { agent, parser, out } = self;
            parser.feed(&buf[..n], &mut |m| {
                agent.handle(m, out);
                if out.len() >= FLUSH_AT {
                    flush(conn, agent, out, &mut failed);
                }
            });
            flush(conn, &self.agent, &mut self.out, &mut failed);
            match failed {
                // A stop request while waiting to write (not frozen).
                Some(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
                Some(e) => return Err(e),
                None => {}
            }
        }
    }

    /// unix-listen / vsock-listen: accept one client at a time, forever.
    pub fn serve_listener(&mut self, listener: &Listener) -> io::Result<()> {
        loop {
            if should_stop(&self.agent) {
                return Ok(());
            }
            // Poll first so a stop signal is seen while idle.
            match crate::channel::wait_readable(listener) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            let mut stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // A client that errors out (reset, broken pipe) is just gone.
            if let Ok(false) = self.serve_conn(&mut stream) {
                return Ok(());
            }
        }
    }
}
