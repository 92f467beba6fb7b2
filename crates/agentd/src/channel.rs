//! One agent channel per guest: a task that owns the connection to the
//! guest agent's unix socket and runs that guest's commands one at a time,
//! from a bounded queue ([`AgentChannel`]); and the registry of channels
//! by socket path ([`Channels`]).
//!
//! Connection life cycle, per command:
//! 1. An idle connection with unread input is out of sync; one at EOF is
//!    dropped. No connection: connect (refused or missing: UNAVAILABLE).
//! 2. Not known to be in sync (new connection, or after a timeout or any
//!    error): the handshake of [`Conn::sync`], bounded by `sync_timeout`
//!    (no answer: the agent is not responding, UNAVAILABLE; cut short by
//!    the command's own shorter timeout: DEADLINE_EXCEEDED).
//! 3. The command is written with a fresh `id` and replies are read until
//!    the one with that id, all within the command's timeout (expired:
//!    DEADLINE_EXCEEDED, and the next command resynchronises first).
//!
//! Commands with no success response (guest-shutdown, guest-suspend-*):
//! qemu-ga answers them only on error, and runs one request at a time in
//! order. So the command is followed at once by a `guest-ping` marker with
//! its own id: an error reply for the command means failure; the marker's
//! reply (whatever it says), EOF (the guest went down) or the timeout
//! expiring with neither means the agent accepted it ([`Outcome::Accepted`];
//! after a timeout or EOF the channel resynchronises before its next use).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::socket::{AgentReader, AgentSocket, AgentWriter};
use crate::wire::{self, Conn, Reply, WireError};

/// Commands that send no reply on success (qemu-ga's `success-response:
/// false`).
pub const NO_SUCCESS_RESPONSE: [&str; 4] = [
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// How a channel behaves.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// Bound on the resynchronisation handshake.
    pub sync_timeout: Duration,
    /// Largest reply line accepted.
    pub max_reply_bytes: usize,
    /// Commands that may wait in the queue.
    pub queue_depth: usize,
    /// Close an idle connection after this long; `None`: never.
    pub idle_close: Option<Duration>,
}

/// Why a command did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The agent socket could not be connected.
    #[error("cannot connect to the guest agent socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// The resynchronisation handshake got no answer in time.
    #[error("the guest agent is not responding (no answer to guest-sync-delimited within {0:?})")]
    NotResponding(Duration),
    /// The connection failed or the agent's output is unusable.
    #[error("guest agent channel failed")]
    Wire(#[source] WireError),
    /// The command got no reply within its timeout.
    #[error("guest agent command {command} timed out after {after:?}")]
    Timeout {
        /// The command name.
        command: String,
        /// Its timeout.
        after: Duration,
    },
    /// Too many commands are waiting for this guest.
    #[error("too many commands queued for this guest agent (queue depth {depth})")]
    QueueFull {
        /// The queue's capacity.
        depth: usize,
    },
    /// The service is shutting down.
    #[error("the agent service is shutting down")]
    Closed,
    /// The channel retired after being idle while this command was on
    /// its way; [`Channels::call`] retries it on a fresh channel.
    #[error("the guest agent channel was retired while idle")]
    Retired,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The agent's reply.
    Reply(Reply),
    /// A command without a success response: no error came back.
    Accepted,
}

struct Job {
    command: String,
    request: Map<String, Value>,
    /// When the command must have its reply, counted from the caller's
    /// start (time spent queued behind other commands counts).
    deadline: Instant,
    /// The timeout the caller asked for, for the error message.
    timeout: Duration,
    /// Set when the task takes the job up.
    started: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Outcome, ChannelError>>,
}

/// A handle on one guest's channel task. Cloning it shares the channel.
#[derive(Debug, Clone)]
pub struct AgentChannel {
    tx: mpsc::Sender<Job>,
    depth: usize,
    /// Commands sent and not yet answered (queued or running).
    inflight: Arc<AtomicUsize>,
    /// Tells this channel's registry entry from a later one for the same
    /// socket.
    serial: u64,
}

impl AgentChannel {
    /// Starts the channel task for the agent socket at `path`. It runs
    /// until `shutdown` fires or every handle is dropped; it connects
    /// lazily, on the first command.
    pub fn spawn(path: PathBuf, settings: ChannelSettings, shutdown: CancellationToken) -> Self {
        Self::spawn_in(path, settings, shutdown, Weak::new())
    }

    /// [`AgentChannel::spawn`] for an entry of `registry`: when idle for
    /// two `idle_close` periods (one to close the connection, one more
    /// with none), the task removes its entry and ends.
    fn spawn_in(
        path: PathBuf,
        settings: ChannelSettings,
        shutdown: CancellationToken,
        registry: Weak<Registry>,
    ) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let depth = settings.queue_depth.max(1);
        let (tx, rx) = mpsc::channel(depth);
        let inflight = Arc::new(AtomicUsize::new(0));
        let actor = Actor {
            path,
            settings,
            conn: None,
            in_sync: false,
            inflight: inflight.clone(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            id_prefix: format!("qa{:x}", wire::random_id()),
            next_id: 0,
            registry,
            serial,
        };
        let span = tracing::debug_span!("agent_channel", socket = %actor.path.display());
        tokio::spawn(tracing::Instrument::instrument(
            actor.run(rx, shutdown),
            span,
        ));
        AgentChannel {
            tx,
            depth,
            inflight,
            serial,
        }
    }

    /// Sends one command (an object with `execute` and optional
    /// `arguments`; any `id` is replaced) and waits for its outcome, for
    /// at most `timeout` from now, queueing included.
    ///
    /// Abandoning the future frees the channel at once: a queued command
    /// is skipped, a running one stops waiting for its reply and the
    /// channel resynchronises before its next command (qemu-ga itself
    /// cannot be interrupted: a command it already read still runs).
    pub async fn call(
        &self,
        request: Map<String, Value>,
        timeout: Duration,
    ) -> Result<Outcome, ChannelError> {
        self.call_until(request, Instant::now() + timeout, timeout)
            .await
    }

    /// [`AgentChannel::call`] with a deadline fixed by the caller (e.g.
    /// at the start of an RPC, so that the domain lookup counts too);
    /// `timeout` is what the caller asked for, for the error message.
    pub async fn call_until(
        &self,
        request: Map<String, Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Outcome, ChannelError> {
        let command = request
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let (reply, rx) = oneshot::channel();
        let started = Arc::new(AtomicBool::new(false));
        let job = Job {
            command,
            request,
            deadline,
            timeout,
            started: started.clone(),
            reply,
        };
        let command = job.command.clone();
        // Nothing ahead of this command: the task takes it up at once and
        // owns its deadline, so no timer of our own (each new timer costs
        // the runtime a wake-up of its driver).
        let alone = self.inflight.fetch_add(1, Ordering::AcqRel) == 0;
        if let Err(e) = self.tx.try_send(job) {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => ChannelError::QueueFull { depth: self.depth },
                mpsc::error::TrySendError::Closed(_) => ChannelError::Closed,
            });
        }
        if alone {
            return rx.await.unwrap_or(Err(ChannelError::Closed));
        }
        tokio::pin!(rx);
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(r) => r.unwrap_or(Err(ChannelError::Closed)),
            // Still queued behind other commands when its time is up: give
            // up (the task skips a job whose caller is gone). Once running,
            // the task owns the deadline: a command without a success
            // response counts as accepted when it expires.
            Err(_) if !started.load(Ordering::Acquire) => Err(ChannelError::Timeout {
                command,
                after: timeout,
            }),
            Err(_) => rx.await.unwrap_or(Err(ChannelError::Closed)),
        }
    }

    /// Sends `execute` with `arguments` (`None`: no arguments member).
    pub async fn execute(
        &self,
        execute: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Outcome, ChannelError> {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(execute.to_owned()));
        if let Some(args) = arguments {
            request.insert("arguments".into(), args);
        }
        self.call(request, timeout).await
    }
}

type Registry = Mutex<HashMap<PathBuf, AgentChannel>>;

/// The channels of all guests, keyed by agent socket path (so a domain
/// reached by name and by UUID shares one connection). A channel idle for
/// two `idle_close` periods leaves the registry and its task ends, so
/// guests that come and go do not accumulate tasks.
#[derive(Debug)]
pub struct Channels {
    settings: ChannelSettings,
    shutdown: CancellationToken,
    map: Arc<Registry>,
}

impl Channels {
    /// An empty registry; channels stop when `shutdown` fires.
    pub fn new(settings: ChannelSettings, shutdown: CancellationToken) -> Self {
        Channels {
            settings,
            shutdown,
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The channel for the socket at `path`, started on first use.
    pub fn get(&self, path: &Path) -> AgentChannel {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(path).filter(|ch| !ch.tx.is_closed()) {
            return ch.clone();
        }
        let ch = AgentChannel::spawn_in(
            path.to_owned(),
            self.settings.clone(),
            self.shutdown.child_token(),
            Arc::downgrade(&self.map),
        );
        map.insert(path.to_owned(), ch.clone());
        ch
    }

    /// How many channels are registered.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no channel is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`AgentChannel::call_until`] on the channel of `path`, once more
    /// on a new channel if the first one retired under the command.
    pub async fn call(
        &self,
        path: &Path,
        request: Map<String, Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Outcome, ChannelError> {
        let first = self
            .get(path)
            .call_until(request.clone(), deadline, timeout)
            .await;
        match first {
            Err(ChannelError::Retired) => {
                self.get(path).call_until(request, deadline, timeout).await
            }
            // The channel retired between `get` and sending.
            Err(ChannelError::Closed) if !self.shutdown.is_cancelled() => {
                self.get(path).call_until(request, deadline, timeout).await
            }
            other => other,
        }
    }
}

type UnixConn = Conn<AgentReader, AgentWriter>;

struct Actor {
    path: PathBuf,
    settings: ChannelSettings,
    conn: Option<UnixConn>,
    in_sync: bool,
    id_prefix: String,
    next_id: u64,
    registry: Weak<Registry>,
    serial: u64,
    /// Shared with the handles: see [`AgentChannel::inflight`].
    inflight: Arc<AtomicUsize>,
    /// One timer for every sync and command deadline, moved with `reset`
    /// rather than made anew: a timer that moves later costs the runtime
    /// nothing, a new one wakes its driver.
    timer: Pin<Box<Sleep>>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        // Built once, not per command: both register with shared state.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let idle_close = self.settings.idle_close;
        let idle = tokio::time::sleep_until(far_future(idle_close.unwrap_or(Duration::MAX)));
        tokio::pin!(idle);
        let mut ending = ChannelError::Closed;
        loop {
            tokio::select! {
                () = &mut cancelled => break,
                job = rx.recv() => match job {
                    Some(job) => self.handle(job).await,
                    None => break,
                },
                () = &mut idle, if idle_close.is_some() => {
                    if self.conn.is_some() {
                        tracing::debug!(socket = %self.path.display(), "closing idle agent connection");
                        self.disconnect();
                    } else if self.retire(&rx) {
                        tracing::debug!(socket = %self.path.display(), "retiring idle agent channel");
                        ending = ChannelError::Retired;
                        break;
                    }
                }
            }
            idle.as_mut()
                .reset(far_future(idle_close.unwrap_or(Duration::MAX)));
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            let e = match ending {
                ChannelError::Retired => ChannelError::Retired,
                _ => ChannelError::Closed,
            };
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            let _ = job.reply.send(Err(e));
        }
    }

    /// Removes this channel from its registry if nothing waits for it;
    /// false for a channel outside any registry or with queued commands.
    fn retire(&self, rx: &mpsc::Receiver<Job>) -> bool {
        let Some(registry) = self.registry.upgrade() else {
            return false;
        };
        let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
        if !rx.is_empty() {
            return false;
        }
        if map
            .get(&self.path)
            .is_some_and(|ch| ch.serial == self.serial)
        {
            map.remove(&self.path);
        }
        true
    }

    async fn handle(&mut self, mut job: Job) {
        job.started.store(true, Ordering::Release);
        if job.reply.is_closed() {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let started = Instant::now();
        let Job {
            command,
            request,
            deadline,
            timeout,
            reply,
            ..
        } = &mut job;
        let result = tokio::select! {
            r = self.execute(command, request, *deadline, *timeout) => Some(r),
            () = reply.closed() => None,
        };
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        let Some(result) = result else {
            // The caller went away (its RPC was cancelled or hit its own
            // deadline): stop waiting. A reply may still come, or half a
            // request may have gone out: resynchronise before the next
            // command (0xFF resets the agent's parser, the delimiter skips
            // the stale reply).
            self.in_sync = false;
            tracing::debug!(command = %job.command, elapsed = ?started.elapsed(), "caller gone, command abandoned");
            return;
        };
        match &result {
            Ok(_) => {
                tracing::debug!(command = %job.command, elapsed = ?started.elapsed(), "agent command done")
            }
            Err(e) => tracing::debug!(command = %job.command, error = %e, "agent command failed"),
        }
        let _ = job.reply.send(result);
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.in_sync = false;
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.id_prefix, self.next_id)
    }

    async fn connected(&mut self, deadline: Instant) -> Result<&mut UnixConn, ChannelError> {
        if let Some(conn) = &mut self.conn {
            match conn.poll_idle() {
                Some(false) => self.disconnect(),
                Some(true) => self.in_sync = false,
                None => {}
            }
        }
        if self.conn.is_none() {
            self.in_sync = false;
            let connect = tokio::time::timeout_at(deadline, AgentSocket::connect(&self.path));
            let stream = match connect.await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    return Err(ChannelError::Connect {
                        path: self.path.clone(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(ChannelError::Connect {
                        path: self.path.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "connect timed out",
                        ),
                    });
                }
            };
            let (r, w) = stream.split();
            self.conn = Some(Conn::new(r, w, self.settings.max_reply_bytes));
        }
        match &mut self.conn {
            Some(conn) => Ok(conn),
            None => Err(ChannelError::Closed),
        }
    }

    async fn execute(
        &mut self,
        command: &str,
        request: &Map<String, Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Outcome, ChannelError> {
        let sync_budget = self
            .settings
            .sync_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let id = self.fresh_id();
        let marker = self.fresh_id();
        match self.connected(deadline).await {
            Ok(_) => {}
            // Connecting used up the command's time.
            Err(ChannelError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(ChannelError::Timeout {
                    command: command.to_owned(),
                    after: timeout,
                });
            }
            Err(e) => return Err(e),
        }
        if !self.in_sync {
            let Some(conn) = self.conn.as_mut() else {
                return Err(ChannelError::Closed);
            };
            self.timer.as_mut().reset(Instant::now() + sync_budget);
            let synced = tokio::select! {
                biased;
                r = conn.sync() => Ok(r),
                () = self.timer.as_mut() => Err(()),
            };
            match synced {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.disconnect();
                    return Err(ChannelError::Wire(e));
                }
                Err(_) => {
                    self.disconnect();
                    // Cut short by the command's own timeout: that timeout
                    // expired; given the full sync budget: no agent answers.
                    if sync_budget < self.settings.sync_timeout {
                        return Err(ChannelError::Timeout {
                            command: command.to_owned(),
                            after: timeout,
                        });
                    }
                    return Err(ChannelError::NotResponding(sync_budget));
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(ChannelError::Closed);
        };
        self.in_sync = true;
        let no_reply = NO_SUCCESS_RESPONSE.contains(&command);
        let mut bytes = wire::encode_request(request.clone(), &id);
        if no_reply {
            let mut ping = Map::new();
            ping.insert("execute".into(), Value::String("guest-ping".into()));
            bytes.extend(wire::encode_request(ping, &marker));
        }
        // An error without an id answers the command (see
        // `Conn::read_reply`); the channel is resynchronised before the
        // next one, which drops anything else the agent said about it.
        let mut id_less = false;
        let exchange = async {
            conn.write(&bytes).await?;
            if no_reply {
                let (which, reply) = conn.read_reply(&[id.as_str(), marker.as_str()]).await?;
                match which {
                    Some(1) => return Ok(Outcome::Accepted),
                    Some(_) => {
                        // The command answered (an error); its marker's
                        // reply follows: consume it so the channel stays in
                        // step.
                        conn.read_reply(&[marker.as_str()]).await?;
                    }
                    None => id_less = true,
                }
                Ok(Outcome::Reply(reply))
            } else {
                let (which, reply) = conn.read_reply(&[id.as_str()]).await?;
                id_less = which.is_none();
                Ok(Outcome::Reply(reply))
            }
        };
        self.timer.as_mut().reset(deadline);
        let result = tokio::select! {
            biased;
            r = exchange => Ok(r),
            () = self.timer.as_mut() => Err(()),
        };
        if id_less {
            self.in_sync = false;
        }
        match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(WireError::Eof)) if no_reply => {
                self.disconnect();
                Ok(Outcome::Accepted)
            }
            Ok(Err(e)) => {
                match e {
                    // The whole line was read: the connection is fine.
                    WireError::BadReply { .. } | WireError::TooManyValues { .. } => {
                        self.in_sync = false
                    }
                    _ => self.disconnect(),
                }
                Err(ChannelError::Wire(e))
            }
            Err(_) => {
                self.in_sync = false;
                if no_reply {
                    Ok(Outcome::Accepted)
                } else {
                    Err(ChannelError::Timeout {
                        command: command.to_owned(),
                        after: timeout,
                    })
                }
            }
        }
    }
}

/// `now + d`, capped where `Instant` arithmetic stays valid (`Duration::MAX`
/// means never).
fn far_future(d: Duration) -> Instant {
    const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    Instant::now() + d.min(NEVER)
}

#[cfg(test)]
#[path = "channel_tests.rs"]
pub(crate) mod tests;
