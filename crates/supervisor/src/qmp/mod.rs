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
//! A line longer than [`MAX_LINE_BYTES`] is skipped, never held whole: the
//! first [`MAX_LINE_BYTES`] are read (as any line) and dropped, the rest is
//! discarded up to its newline as it arrives. It is the reply of the oldest
//! command on the wire, which fails with [`QmpError::ReplyTooLarge`]: QEMU
//! answers in-band commands one after the other, "the client therefore
//! receives command responses in issue order" (QMP spec, out-of-band
//! execution, which this client never enables), and its events are small.
//! The writer task records the ids in the order it writes them for this.
//! The connection stays open for the next command.
//!
//! End of file or `ECONNRESET` from QEMU (it gives either when it exits) ends
//! the connection: every waiting command fails with
//! [`QmpError::MonitorClosed`], the event channel ends (`recv()` gives
//! `None`), [`QmpClient::closed`] resolves and the socket is closed (QEMU
//! then accepts the next client on its monitor socket).
//!
//! Not here: starting QEMU ([`crate::launch`]), deciding what events mean.

mod wire;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
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

/// The longest line accepted from QEMU, newline included
/// (`query-qmp-schema` is the largest reply of QEMU's own, a few hundred
/// KiB); a longer line is skipped and its command fails with
/// [`QmpError::ReplyTooLarge`].
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The line buffer's capacity kept between lines: a large reply's buffer
/// is given back rather than held for the connection's life.
const KEPT_LINE_CAPACITY: usize = 64 * 1024;

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
    /// QEMU's reply was longer than `limit` bytes: it was discarded
    /// unread; the connection stays usable.
    #[error("QMP reply longer than {limit} bytes ({} MiB), the monitor's limit; reply discarded", limit / (1024 * 1024))]
    ReplyTooLarge {
        /// The limit ([`MAX_LINE_BYTES`]).
        limit: usize,
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

/// A request line for the writer task: its id, its bytes, and a file
/// descriptor to pass with it (SCM_RIGHTS), for `getfd`.
type Outgoing = (u64, Vec<u8>, Option<OwnedFd>);

/// What a waiting command gets: QEMU's reply object, or why there is none.
type Waiter = oneshot::Sender<Result<Map<String, Value>, QmpError>>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// The ids of the commands written and not yet answered, oldest first
    /// (cancelled commands included: QEMU still answers them). Bounded by
    /// what QEMU has read: it stops reading while its queue is full.
    on_wire: VecDeque<u64>,
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
    writer: mpsc::Sender<Outgoing>,
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
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A complete line, newline included.
    Line,
    /// A line longer than the limit, discarded up to and including its
    /// newline; `bytes` in all.
    TooLong {
        /// The line's length, newline included.
        bytes: u64,
    },
    /// End of file, possibly after a partial line (discarded).
    Eof,
}

/// Read one `\n`-terminated line of at most `limit` bytes (newline
/// included) into `buf`. A longer line is not kept: its first `limit` bytes
/// are dropped and the rest is discarded as it arrives, up to its newline.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<LineRead> {
    buf.clear();
    buf.shrink_to(KEPT_LINE_CAPACITY);
    let n = (&mut *reader)
        .take(u64::try_from(limit).unwrap_or(u64::MAX))
        .read_until(b'\n', buf)
        .await?;
    if buf.last() == Some(&b'\n') {
        return Ok(LineRead::Line);
    }
    if n < limit {
        if n > 0 {
            debug!(partial = %wire::quote(buf), "QMP monitor closed in the middle of a line");
        }
        return Ok(LineRead::Eof);
    }
    buf.clear();
    buf.shrink_to(KEPT_LINE_CAPACITY);
    let mut bytes = u64::try_from(n).unwrap_or(u64::MAX);
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            debug!(
                bytes,
                "QMP monitor closed in the middle of an over-long line"
            );
            return Ok(LineRead::Eof);
        }
        let (used, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(end) => (end + 1, true),
            None => (chunk.len(), false),
        };
        reader.consume(used);
        bytes = bytes.saturating_add(u64::try_from(used).unwrap_or(u64::MAX));
        if done {
            return Ok(LineRead::TooLong { bytes });
        }
    }
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
        let read = read_line(&mut reader, &mut line, MAX_LINE_BYTES);
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => return Err(QmpError::GreetingTimeout { after: timeout }),
            Ok(Err(error)) if is_disconnect(&error) => return Err(QmpError::MonitorClosed),
            Ok(Err(source)) => return Err(QmpError::ReadGreeting { source }),
            Ok(Ok(LineRead::Eof)) => return Err(QmpError::MonitorClosed),
            Ok(Ok(LineRead::TooLong { bytes })) => {
                return Err(QmpError::BadGreeting {
                    reason: format!("{bytes} bytes long, over the {MAX_LINE_BYTES}-byte limit"),
                    line: "(not kept)".to_owned(),
                });
            }
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
        let write_task = tokio::spawn(write_loop(
            writer,
            write_rx,
            Arc::clone(&shared),
            closed_rx.clone(),
        ));
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
        let body = self.round_trip(id, line, None).await?;
        wire::into_result(command, body)
    }

    /// Pass `fd` to QEMU under `name` (QMP `getfd`, the descriptor sent
    /// with the command's bytes as SCM_RIGHTS, as libvirt does), for a
    /// later command that names it (e.g. `migrate` to `fd:NAME`). QEMU
    /// keeps its own copy; ours is closed once sent.
    pub async fn send_fd(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let arguments = serde_json::json!({ "fdname": name });
        let line = wire::request_line("getfd", Some(arguments), id);
        let body = self.round_trip(id, line, Some(fd)).await?;
        wire::into_result("getfd", body).map(drop)
    }

    /// Run a caller's checked command (`qvirt_common::qapi`, as `virsh
    /// qemu-monitor-command` takes it) and return QEMU's whole reply as
    /// JSON text: `{"return": ...}` or `{"error": ...}` (a QMP error is a
    /// reply here, not an `Err`), without an `id`. Numbers keep QEMU's
    /// text.
    pub async fn execute_raw(
        &self,
        command: qvirt_common::qapi::Command,
    ) -> Result<String, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        debug!(command = %command.name, id, "raw QMP command");
        let body = self
            .round_trip(id, wire::raw_line(command.request, id), None)
            .await?;
        Ok(wire::raw_reply(body))
    }

    async fn round_trip(
        &self,
        id: u64,
        line: Vec<u8>,
        fd: Option<OwnedFd>,
    ) -> Result<Map<String, Value>, QmpError> {
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
            .send((id, line, fd))
            .await
            .map_err(|_| QmpError::MonitorClosed)?;
        rx.await.map_err(|_| QmpError::MonitorClosed)?
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
        match read_line(&mut reader, &mut line, MAX_LINE_BYTES).await {
            Ok(LineRead::Line) => {}
            Ok(LineRead::TooLong { bytes }) => {
                fail_oldest_too_large(&shared, bytes);
                continue;
            }
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
                let waiter = {
                    let mut pending = shared.pending();
                    if let Some(at) = pending.on_wire.iter().position(|w| *w == id) {
                        pending.on_wire.remove(at);
                    }
                    pending.waiters.remove(&id)
                };
                match waiter {
                    // A send error means the command was cancelled meanwhile.
                    Some(waiter) => drop(waiter.send(Ok(body))),
                    None => debug!(id, "QMP reply for no waiting command dropped"),
                }
            }
            Ok(wire::Incoming::Reply { id: None, .. }) => {
                // QEMU answers without the id only a request it could not
                // parse: in issue order, that is the oldest one.
                shared.pending().on_wire.pop_front();
                warn!(line = %wire::quote(&line), "QMP reply without our id dropped");
            }
            Err(reason) => {
                warn!(reason, line = %wire::quote(&line), "unparseable QMP line skipped");
            }
        }
    }
    shared.close();
}

/// Fail the oldest command on the wire: QEMU's reply to it was `bytes`
/// long, over [`MAX_LINE_BYTES`], and was skipped (see the module docs).
fn fail_oldest_too_large(shared: &Shared, bytes: u64) {
    let (id, waiter) = {
        let mut pending = shared.pending();
        let id = pending.on_wire.pop_front();
        let waiter = id.and_then(|id| pending.waiters.remove(&id));
        (id, waiter)
    };
    warn!(
        bytes,
        limit = MAX_LINE_BYTES,
        id,
        "QMP reply over the line limit skipped; its command fails"
    );
    if let Some(waiter) = waiter {
        // A send error means the command was cancelled meanwhile.
        drop(waiter.send(Err(QmpError::ReplyTooLarge {
            limit: MAX_LINE_BYTES,
        })));
    }
}

/// The writer task: write request lines in order, noting each id as on the
/// wire first, until the client is gone, the connection closed, or a write
/// fails. Ending drops the write half, so the socket closes with the reader.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut lines: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let (id, line, fd) = tokio::select! {
            next = lines.recv() => match next {
                Some(next) => next,
                None => return,
            },
            _ = closed.wait_for(|closed| *closed) => return,
        };
        shared.pending().on_wire.push_back(id);
        let written = match fd {
            Some(fd) => write_with_fd(&writer, &line, fd).await,
            None => Ok(0),
        };
        let written = match written {
            Ok(n) => writer.write_all(&line[n..]).await,
            Err(error) => Err(error),
        };
        if let Err(error) = written {
            debug!(%error, "QMP monitor write failed");
            shared.close();
            return;
        }
    }
}

/// Send the first bytes of `line` with `fd` attached (SCM_RIGHTS) in one
/// `sendmsg`; returns how many bytes went (the caller writes the rest).
async fn write_with_fd(writer: &OwnedWriteHalf, line: &[u8], fd: OwnedFd) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    let stream: &UnixStream = writer.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("no room for the descriptor"));
            }
            sendmsg(
                stream,
                &[io::IoSlice::new(line)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// What a QEMU monitor's bytes become, for the fuzzer (`fuzz/`): `bytes`
/// read through a `chunk`-byte buffer with lines of at most `limit` bytes,
/// the first line parsed as a greeting and the others as replies or
/// events, as the connection's reader does. Returns how many lines were
/// kept and how many were over the limit.
#[doc(hidden)]
pub fn fuzz_monitor_stream(bytes: &[u8], chunk: usize, limit: usize) -> (usize, usize) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
        return (0, 0);
    };
    runtime.block_on(async {
        let mut reader = BufReader::with_capacity(chunk.max(1), bytes);
        let mut line = Vec::new();
        let (mut kept, mut too_long) = (0, 0);
        loop {
            match read_line(&mut reader, &mut line, limit.max(1)).await {
                Ok(LineRead::Line) => {
                    assert!(
                        line.len() <= limit.max(1),
                        "a kept line is within the limit"
                    );
                    if kept == 0 {
                        let _ = wire::parse_greeting(&line);
                    } else {
                        let _ = wire::parse_incoming(&line);
                    }
                    let _ = wire::quote(&line);
                    kept += 1;
                }
                Ok(LineRead::TooLong { bytes }) => {
                    assert!(
                        bytes > limit.max(1) as u64,
                        "a skipped line is over the limit"
                    );
                    too_long += 1;
                }
                Ok(LineRead::Eof) | Err(_) => return (kept, too_long),
            }
        }
    })
}

#[cfg(test)]
mod tests;
