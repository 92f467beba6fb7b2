//! The agent's main loop: read up to 4096 bytes, feed the parser, answer
//! each message in order, one client at a time. Single-threaded, blocking,
//! no busy waiting. SIGTERM/SIGINT end it with status 0 unless frozen.

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
            let Server { agent, parser, out } = self;
            parser.feed(&buf[..n], &mut |m| agent.handle(m, out));
            if !self.out.is_empty() {
                let agent = &self.agent;
                let result = conn.write_all_bytes(&self.out, &mut || !should_stop(agent));
                self.out.clear();
                if self.out.capacity() > 1 << 20 {
                    self.out = Vec::new();
                }
                match result {
                    // A stop request while waiting to write (not frozen).
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
                    other => other?,
                }
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
