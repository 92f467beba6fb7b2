//! An async QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! [`QmpClient::handshake`] reads QEMU's greeting (with a timeout) and sends
//! `qmp_capabilities`; after that [`QmpClient::execute`] and
//! [`QmpClient::execute_raw`] run commands, many at once. Each request gets a
//! numeric id; QEMU echoes it in the reply.
//!
//! One reader task owns the read half of the socket. It sends each reply to
//! the oneshot of the request with the same id, and each event, in the order
//! read, to a bounded channel ([`EVENT_QUEUE_CAPACITY`]). It never waits on
//! that channel: when the consumer falls behind, events are dropped and
//! counted ([`QmpClient::events_lost`]) so that replies (and the commands the
//! consumer may be waiting for) are never stuck behind events. One writer task
//! owns the write half. Events may arrive before the reply of the command that
//! caused them (QEMU sends `RESUME` before the reply to `cont`).
//!
//! End of file or `ECONNRESET` from QEMU (it gives either when it exits) ends
//! the connection: every waiting command fails with
//! [`QmpError::MonitorClosed`], the event channel ends (`recv()` gives
//! `None`) and [`QmpClient::closed`] resolves.
//!
//! Not here: starting QEMU ([`crate::launch`]), deciding what events mean.

mod wire;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

pub use wire::{Greeting, QemuVersion, QmpEvent};

/// Capacity of the event channel handed to the caller.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;

/// Capacity of the queue of request lines waiting for the writer task.
pub const WRITE_QUEUE_CAPACITY: usize = 64;

/// The longest line accepted from QEMU (`query-qmp-schema` is the largest
/// reply, a few hundred KiB); a longer line ends the connection.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The receiving end of a connection's events; `None` from `recv()` means the
/// monitor closed.
pub type EventReceiver = mpsc::Receiver<QmpEvent>;

/// Errors of the QMP client, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the monitor socket failed.
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// QEMU sent no greeting in time.
    #[error("no QMP greeting within {after:?}")]
    GreetingTimeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// Reading the greeting failed (other than the monitor closing).
    #[error("reading the QMP greeting")]
    ReadGreeting {
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The greeting was not a QMP greeting.
    #[error("malformed QMP greeting ({reason}): {line}")]
    BadGreeting {
        /// What was wrong.
        reason: String,
        /// The line received (cut).
        line: String,
    },
    /// `qmp_capabilities` got no reply in time.
    #[error("no reply to qmp_capabilities within {after:?}")]
    CapabilitiesTimeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// `qmp_capabilities` failed.
    #[error("QMP capabilities negotiation failed")]
    Capabilities {
        /// Why it failed.
        #[source]
        source: Box<QmpError>,
    },
    /// A raw request was not a QMP command object.
    #[error("invalid QMP request: {reason}")]
    BadRequest {
        /// What was wrong.
        reason: String,
    },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply had neither `return` nor `error`.
    #[error("malformed QMP reply to {command}: {reason}")]
    BadReply {
        /// The command name.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// The monitor connection is closed (QEMU exited, reset the connection,
    /// or the client was closed).
    #[error("QMP monitor closed")]
    MonitorClosed,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpConnection {
    /// The client for commands.
    pub client: QmpClient,
    /// QEMU's greeting.
    pub greeting: Greeting,
    /// Events, in the order QEMU sent them.
    pub events: EventReceiver,
    /// When the greeting line was read.
    pub greeted_at: Instant,
}

type Waiter = oneshot::Sender<Map<String, Value>>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    closed: bool,
}

/// State shared by the client and its two tasks.
struct Shared {
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    events_lost: crate::loss::LossCounter,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark the connection closed and fail every waiter (their oneshot
    /// senders are dropped).
    fn close(&self) {
        let waiters = {
            let mut pending = self.pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiters)
        };
        drop(waiters);
        self.closed_tx.send_replace(true);
    }
}

/// Removes a command's waiter when its future ends, replied or cancelled.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending().waiters.remove(&self.id);
    }
}

/// A QMP client; see the module docs. Dropping it (or [`QmpClient::close`])
/// closes the connection.
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    closed_rx: watch::Receiver<bool>,
    tasks: [AbortHandle; 2],
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Whether an I/O error means the peer went away.
fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// What one line read gave.
enum LineRead {
    /// A complete line, newline included.
    Line,
    /// End of file, possibly after a partial line (discarded).
    Eof,
}

/// Read one `\n`-terminated line into `buf`, at most `MAX_LINE_BYTES`.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<LineRead> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX);
    let n = (&mut *reader).take(limit).read_until(b'\n', buf).await?;
    if buf.last() == Some(&b'\n') {
        return Ok(LineRead::Line);
    }
    if n >= MAX_LINE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("QMP line longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    if n > 0 {
        debug!(partial = %wire::quote(buf), "QMP monitor closed in the middle of a line");
    }
    Ok(LineRead::Eof)
}

impl QmpClient {
    /// Read the greeting on a fresh connection, start the reader and writer
    /// tasks, and negotiate capabilities; `timeout` bounds the whole
    /// handshake. Must be called inside a tokio runtime.
    pub async fn handshake(
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<QmpConnection, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let mut line = Vec::new();
        match tokio::time::timeout_at(deadline, read_line(&mut reader, &mut line)).await {
            Err(_) => return Err(QmpError::GreetingTimeout { after: timeout }),
            Ok(Err(error)) if is_disconnect(&error) => return Err(QmpError::MonitorClosed),
            Ok(Err(source)) => return Err(QmpError::ReadGreeting { source }),
            Ok(Ok(LineRead::Eof)) => return Err(QmpError::MonitorClosed),
            Ok(Ok(LineRead::Line)) => {}
        }
        let greeted_at = Instant::now();
        let greeting = wire::parse_greeting(&line)?;
        debug!(greeting = %wire::quote(&line), "QMP greeting");
        let (client, events) = Self::start(reader, write_half);
        match tokio::time::timeout_at(deadline, client.execute("qmp_capabilities", None)).await {
            Err(_) => return Err(QmpError::CapabilitiesTimeout { after: timeout }),
            Ok(Err(error)) => {
                return Err(QmpError::Capabilities {
                    source: Box::new(error),
                });
            }
            Ok(Ok(_)) => {}
        }
        Ok(QmpConnection {
            client,
            greeting,
            events,
            greeted_at,
        })
    }

    fn start(reader: BufReader<OwnedReadHalf>, writer: OwnedWriteHalf) -> (Self, EventReceiver) {
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            events_lost: crate::loss::LossCounter::default(),
            closed_tx,
        });
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let read_task = tokio::spawn(read_loop(reader, Arc::clone(&shared), event_tx));
        let write_task = tokio::spawn(write_loop(writer, write_rx, Arc::clone(&shared)));
        let client = QmpClient {
            shared,
            writer: write_tx,
            closed_rx,
            tasks: [read_task.abort_handle(), write_task.abort_handle()],
        };
        (client, event_rx)
    }

    /// Run `command` with optional `arguments` (a JSON object) and return
    /// QEMU's `return` value. A QMP error reply gives [`QmpError::Command`].
    /// Cancel-safe: dropping the future forgets the command (a late reply is
    /// discarded). The caller bounds the wait with its own timeout.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let line = wire::request_line(command, arguments, id);
        let body = self.round_trip(id, line).await?;
        wire::into_result(command, body)
    }

    /// Run a caller's raw JSON request (e.g. `{"execute":"query-status"}`,
    /// as `virsh qemu-monitor-command` takes it) and return QEMU's whole
    /// reply as JSON text: `{"return": ...}` or `{"error": ...}` (a QMP
    /// error is a reply here, not an `Err`). Numbers keep QEMU's text. The
    /// request's own `id`, if any, is replaced by ours on the wire and put
    /// back in the reply; without one the reply has no `id`.
    pub async fn execute_raw(&self, request: &str) -> Result<String, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let raw = wire::raw_request(request, id)?;
        debug!(command = %raw.command, id, "raw QMP command");
        let body = self.round_trip(id, raw.line).await?;
        Ok(wire::raw_reply(body, raw.caller_id))
    }

    async fn round_trip(&self, id: u64, line: Vec<u8>) -> Result<Map<String, Value>, QmpError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending();
            if pending.closed {
                return Err(QmpError::MonitorClosed);
            }
            pending.waiters.insert(id, tx);
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        self.writer
            .send(line)
            .await
            .map_err(|_| QmpError::MonitorClosed)?;
        rx.await.map_err(|_| QmpError::MonitorClosed)
    }

    /// How many events were dropped because the event channel was full.
    pub fn events_lost(&self) -> u64 {
        self.shared.events_lost.total()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.closed_rx.borrow()
    }

    /// Resolves once the connection has closed (QEMU went away or
    /// [`QmpClient::close`] was called).
    pub async fn closed(&self) {
        let mut rx = self.closed_rx.clone();
        // An error means the sender is gone, which only happens with the
        // client itself; either way the connection is over.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Close the connection: waiting commands fail with
    /// [`QmpError::MonitorClosed`], the event channel ends, and the socket
    /// is closed as soon as the runtime drops the tasks (QEMU then accepts
    /// the next client on its monitor socket).
    pub fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.close();
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader task: route replies and events until EOF or an error.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: mpsc::Sender<QmpEvent>,
) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line).await {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) => {
                debug!("QMP monitor EOF");
                break;
            }
            Err(error) if is_disconnect(&error) => {
                debug!(%error, "QMP monitor disconnected");
                break;
            }
            Err(error) => {
                warn!(%error, "QMP monitor read failed; closing the connection");
                break;
            }
        }
        match wire::parse_incoming(&line) {
            Ok(wire::Incoming::Event(event)) => {
                debug!(event = %event.name, "QMP event");
                match events.try_send(event) {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        if let Some(lost) = shared.events_lost.add(1) {
                            warn!(event = %event.name, lost, "QMP event queue full; events dropped (running total)");
                        }
                    }
                }
            }
            Ok(wire::Incoming::Reply { id: Some(id), body }) => {
                let waiter = shared.pending().waiters.remove(&id);
                match waiter {
                    // A send error means the command was cancelled meanwhile.
                    Some(waiter) => drop(waiter.send(body)),
                    None => debug!(id, "QMP reply for no waiting command dropped"),
                }
            }
            Ok(wire::Incoming::Reply { id: None, .. }) => {
                warn!(line = %wire::quote(&line), "QMP reply without our id dropped");
            }
            Err(reason) => {
                warn!(reason, line = %wire::quote(&line), "unparseable QMP line skipped");
            }
        }
    }
    shared.close();
}

/// The writer task: write request lines in order until the client is gone
/// or a write fails.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut lines: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        if let Err(error) = writer.write_all(&line).await {
            debug!(%error, "QMP monitor write failed");
            shared.close();
            return;
        }
    }
}

#[cfg(test)]
mod tests;
