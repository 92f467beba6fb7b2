//! The domain model: definitions, runtime state, and the operations the
//! gRPC service exposes.
//!
//! - [`spec`]: checking a spec and filling defaults.
//! - [`confine`]: paths under configured roots, QEMU's user, and the
//!   files given to it while it runs.
//! - [`argv`]: QEMU's command line for a spec.
//! - [`store`]: definitions and status files on disk, written atomically.
//! - [`Manager`] (this file, with the start/stop paths in `lifecycle` and
//!   the per-guest watcher in `watcher`): the in-memory table of domains.
//!
//! Concurrency: each domain has an async mutex (`op`) that serialises the
//! calls on it (held across awaits, it is a tokio mutex); its data sit
//! behind a plain mutex that is only held for short, await-free sections.
//! Define and undefine also take one manager-wide async mutex, so name and
//! UUID uniqueness is checked and claimed in one step. Calls on different
//! domains run in parallel.

pub mod argv;
pub mod confine;
mod error;
mod lifecycle;
mod save;
pub mod spec;
pub mod store;
mod watcher;

use watcher::Life;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qvirt_proto::v1::{
    Domain, DomainEventDefinedDetail, DomainEventResumedDetail, DomainEventSuspendedDetail,
    DomainEventUndefinedDetail, DomainSpec, DomainState, DomainStateReason,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{DomainError, Need};

use crate::config::Config;
use crate::launch::{Credentials, ProcessIdentity, QemuProcess};
use crate::qmp::QmpClient;
use crate::seams::{DomainRef, EventSink, GuestPower, Hooks, Lifecycle};
use spec::is_canonical_uuid;
use store::{Status, Store};

/// How a running QEMU is held.
#[derive(Debug)]
enum Proc {
    /// Spawned by this supervisor: its exit is watched directly.
    Owned(Arc<QemuProcess>),
    /// Found running after a restart: known by its identity, its exit is
    /// seen as the monitor's EOF.
    Adopted(ProcessIdentity),
}

/// Flags the RPCs set for the watcher of one QEMU run.
#[derive(Debug, Default)]
struct RunFlags {
    /// DestroyDomain (or undefine with destroy) is stopping it.
    destroying: AtomicBool,
    /// ShutdownDomain asked the guest to power off.
    shutdown_requested: AtomicBool,
    /// RebootDomain (ACPI) asked for a power-off to turn into a reset.
    reboot_pending: AtomicBool,
    /// QEMU reported SHUTDOWN (guest power-off or host quit).
    shutdown_seen: AtomicBool,
    /// The monitor closed while QEMU runs; the watcher is reconnecting.
    monitor_lost: AtomicBool,
    /// SaveDomain is writing the guest's state: QEMU's pause and exit are
    /// the save's (reasons SAVE, SAVED).
    saving: AtomicBool,
}

/// One running QEMU.
#[derive(Debug)]
struct Run {
    qmp: Arc<QmpClient>,
    proc: Proc,
    flags: Arc<RunFlags>,
    /// The definition QEMU was started with (a define while it runs
    /// changes the domain's, not this one); after a supervisor restart,
    /// the domain's definition at that time.
    spec: DomainSpec,
}

/// A domain's mutable data.
#[derive(Debug)]
struct Data {
    spec: DomainSpec,
    status: Status,
    create_time: SystemTime,
    update_time: SystemTime,
    run: Option<Run>,
    /// The image the last SaveDomain wrote, if any.
    saved: Option<store::Saved>,
}

/// One domain in the table.
#[derive(Debug)]
struct Entry {
    /// Serialises the calls on this domain.
    op: tokio::sync::Mutex<()>,
    /// Held by the watcher from a QEMU's exit until its stopped and release
    /// hooks are done; a start waits for it, so the next prepare hook never
    /// overtakes the previous run's release hook.
    stop_hooks: Arc<tokio::sync::Mutex<()>>,
    data: Mutex<Data>,
    /// Bumped on every state change, for callers that wait for one.
    changed: watch::Sender<u64>,
    /// Set by Undefine under `op`: a call that found the entry before it
    /// was removed and got `op` after answers NOT_FOUND.
    removed: AtomicBool,
}

impl Entry {
    fn new(data: Data) -> Arc<Self> {
        Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            stop_hooks: Arc::new(tokio::sync::Mutex::new(())),
            data: Mutex::new(data),
            changed: watch::channel(0).0,
            removed: AtomicBool::new(false),
        })
    }

    /// Take the op lock; NOT_FOUND when Undefine removed the domain while
    /// the caller waited for it.
    async fn lock_op(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, DomainError> {
        let guard = self.op.lock().await;
        if self.removed.load(Ordering::SeqCst) {
            return Err(DomainError::NotFound(self.name()));
        }
        Ok(guard)
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn name(&self) -> String {
        self.data().spec.name.clone()
    }

    /// Wait (at most `timeout`) until `done` holds for the data.
    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Data) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if done(&self.data()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && done(&self.data())
    }
}

/// The etag of a domain record: a digest of the stored definition, the
/// state and its reason, QEMU's pid, and the times the definition and the
/// state last changed, so it changes with every definition or state
/// change.
fn etag(data: &Data) -> String {
    let spec = prost::Message::encode_to_vec(&data.spec);
    let s = &data.status;
    let numbers = [
        i64::from(s.state),
        i64::from(s.reason),
        i64::from(s.pid),
        i64::try_from(millis(data.update_time)).unwrap_or(i64::MAX),
        s.state_change_time_ms
            .map_or(-1, |ms| i64::try_from(ms).unwrap_or(i64::MAX)),
    ];
    let numbers: Vec<u8> = numbers.iter().flat_map(|n| n.to_le_bytes()).collect();
    let digest = crate::request_ids::digest(&[&spec, &numbers]);
    // 64 bits: plenty to tell versions of one domain apart.
    format!("{:016x}", (digest >> 64) as u64 ^ digest as u64)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Lowercase state name for messages, as virsh prints it.
pub fn state_name(state: i32) -> &'static str {
    match DomainState::try_from(state) {
        Ok(DomainState::Running) => "running",
        Ok(DomainState::Blocked) => "blocked",
        Ok(DomainState::Paused) => "paused",
        Ok(DomainState::Shutdown) => "in shutdown",
        Ok(DomainState::Shutoff) => "shut off",
        Ok(DomainState::Crashed) => "crashed",
        Ok(DomainState::Pmsuspended) => "pmsuspended",
        _ => "in no state",
    }
}

/// Check a caller's raw QMP command and drop its `id` (ours goes on the
/// wire, the reply carries none).
pub fn raw_request(command_json: &str) -> Result<qvirt_common::qapi::Command, DomainError> {
    qvirt_common::qapi::parse_command(command_json)
        .map_err(|e| DomainError::invalid("command_json", e.to_string()))
}

/// Longest unix socket path: `sun_path` is 108 bytes with the NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Most bytes the domain records of a ListDomains answer may take: below
/// the 4 MiB a gRPC client accepts by default, with room for the rest of
/// the message. A definition that would pass it is refused.
pub const LIST_BUDGET_BYTES: usize = 3 * 1024 * 1024;

/// Bytes a domain record takes beyond its spec, host and log path: state,
/// reason, pid, two socket paths, four timestamps, tags and lengths.
const RECORD_OVERHEAD_BYTES: usize = 2 * MAX_SOCKET_PATH_BYTES + 256;

/// How many guests `Manager::open` re-attaches at once.
const RECONNECT_PARALLEL: usize = 8;

/// What [`Manager::on_change`] calls with a changed domain's UUID.
pub type ChangeHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Shared state behind [`Manager`].
struct Inner {
    config: Config,
    host: String,
    /// `max_memory_mib`, resolved at open and at each reload.
    max_memory_mib: AtomicU64,
    /// `max_vcpus`, resolved at open and at each reload.
    max_vcpus: AtomicU32,
    store: Store,
    events: Arc<dyn EventSink>,
    hooks: Arc<dyn Hooks>,
    /// The agent service, for agent-mode shutdown and reboot.
    agent: Option<Arc<dyn GuestPower>>,
    /// Who QEMU runs as; `None`: the supervisor's own user.
    qemu: Option<Credentials>,
    domains: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Serialises define and undefine.
    define_lock: tokio::sync::Mutex<()>,
    /// Watcher tasks.
    tasks: TaskTracker,
    /// Stops the watchers (supervisor shutdown: QEMUs keep running).
    stop: CancellationToken,
    /// Told the UUID of every domain whose record changed (the fleet
    /// registry's mirror); unset outside a fleet.
    changes: std::sync::OnceLock<ChangeHook>,
    /// The DefineDomain calls with request ids that wrote the loaded
    /// definitions, with the domains' names and when they were written
    /// ([`Manager::take_request_marks`]).
    marks: Mutex<Vec<(store::RequestMark, String, SystemTime)>>,
}

/// The table of domains and their operations. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

/// Run blocking store I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, DomainError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(DomainError::from),
        Err(e) => Err(DomainError::Internal(format!("store task failed: {e}"))),
    }
}

impl Manager {
    /// Open the store (creating the dirs), load every definition, and
    /// re-attach to the QEMUs that survived a supervisor restart. `agent`
    /// is the agent service (absent: agent-mode calls are refused).
    pub async fn open(
        config: Config,
        events: Arc<dyn EventSink>,
        hooks: Arc<dyn Hooks>,
        agent: Option<Arc<dyn GuestPower>>,
    ) -> Result<Manager, DomainError> {
        let store = Store::new(&config.state_dir, &config.run_dir);
        let (host, loaded) = {
            let store = store.clone();
            let config = config.clone();
            blocking(move || {
                store.init()?;
                if config.image_roots.is_empty() {
                    // Traversable: QEMU's user opens images by path.
                    store::create_dir(&config.image_roots()[0], 0o755)?;
                }
                Ok((config.node_name(), store.load_all()?))
            })
            .await?
        };
        let qemu = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || confine::qemu_credentials(&config))
                .await
                .map_err(|e| DomainError::Internal(format!("user look-up task failed: {e}")))??
        };
        let manager = Manager {
            inner: Arc::new(Inner {
                max_memory_mib: AtomicU64::new(config.max_memory_mib()),
                max_vcpus: AtomicU32::new(config.max_vcpus()),
                config,
                host,
                store,
                events,
                hooks,
                agent,
                qemu,
                domains: Mutex::new(BTreeMap::new()),
                define_lock: tokio::sync::Mutex::new(()),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                changes: std::sync::OnceLock::new(),
                marks: Mutex::new(Vec::new()),
            }),
        };
        let mut entries = Vec::new();
        for item in loaded {
            let name = item.spec.name.clone();
            if let Some(mark) = item.request.clone() {
                manager
                    .inner
                    .marks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((mark, name.clone(), item.update_time));
            }
            // Kept (it may run), but said: it was stored under older rules.
            if let Err(error) = spec::normalize(item.spec.clone(), manager.config().default_accel) {
                tracing::warn!(domain = %name, %error, "stored definition breaks a current rule; kept as it is (redefine it to change it)");
            }
            let mut status = item.status.unwrap_or_else(|| Status {
                // Defined and never started since: shut off since its
                // definition.
                state_change_time_ms: Some(millis(item.create_time)),
                ..Status::default()
            });
            if status.state == 0 {
                status.state = DomainState::Shutoff as i32;
                status.reason = DomainStateReason::ShutoffUnknown as i32;
            }
            let entry = Entry::new(Data {
                spec: item.spec,
                status,
                create_time: item.create_time,
                update_time: item.update_time,
                run: None,
                saved: item.saved,
            });
            manager.domains().insert(name, Arc::clone(&entry));
            entries.push(entry);
        }
        // Re-attach several guests at once: one unreachable monitor (or a
        // slow reconnect hook) must not hold up every other guest.
        let mut reconnects = tokio::task::JoinSet::new();
        for entry in entries {
            while reconnects.len() >= RECONNECT_PARALLEL {
                Self::joined(reconnects.join_next().await);
            }
            let manager = manager.clone();
            reconnects.spawn(async move { manager.recover(&entry).await });
        }
        while let Some(done) = reconnects.join_next().await {
            Self::joined(Some(done));
        }
        Ok(manager)
    }

    /// The DefineDomain calls with request ids that wrote the loaded
    /// definitions: (call, domain name, when written). Taken once, at
    /// start, to answer their retries.
    pub fn take_request_marks(&self) -> Vec<(store::RequestMark, String, SystemTime)> {
        std::mem::take(
            &mut *self
                .inner
                .marks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Log a reconnect task that panicked.
    fn joined(done: Option<Result<(), tokio::task::JoinError>>) {
        if let Some(Err(error)) = done {
            tracing::error!(%error, "re-attaching a domain failed");
        }
    }

    /// Stop the watcher tasks and wait for them (QEMUs keep running; the
    /// next supervisor re-attaches).
    pub async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn domains(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.inner
            .domains
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Applies a reloaded config's `max_memory_mib` and `max_vcpus` to the
    /// definitions that come from now on (defined domains stay as they
    /// are, as at a restart).
    pub fn set_host_limits(&self, config: &Config) {
        let memory = config.max_memory_mib();
        let vcpus = config.max_vcpus();
        self.inner.max_memory_mib.store(memory, Ordering::Relaxed);
        self.inner.max_vcpus.store(vcpus, Ordering::Relaxed);
    }

    /// Calls `changed` with the UUID of every domain whose record (what
    /// [`Manager::get`] returns) may have changed: defined, undefined,
    /// every state change. It is called under the domain's lock and must
    /// not block. Only the first call takes effect.
    pub fn on_change(&self, changed: ChangeHook) {
        let _ = self.inner.changes.set(changed);
    }

    /// Tells the change hook about domain `uuid`.
    fn mark(&self, uuid: &str) {
        if let Some(changed) = self.inner.changes.get() {
            changed(uuid);
        }
    }

    /// Wakes the waiters on `entry` and tells the change hook.
    fn changed(&self, entry: &Entry) {
        entry.notify();
        let uuid = entry.data().spec.uuid.clone();
        self.mark(&uuid);
    }

    /// This supervisor's node name (`host` of its domains).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The state dir.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.config().state_dir
    }

    /// Find a domain by UUID (when `key` has UUID form) or name. New
    /// names cannot have UUID form; a stored one from before that rule
    /// never shadows another domain's UUID: a key that is both is refused.
    fn find(&self, key: &str) -> Result<Arc<Entry>, DomainError> {
        let domains = self.domains();
        let named = domains.get(key);
        if is_canonical_uuid(key) {
            let uuid = key.to_ascii_lowercase();
            if let Some(e) = domains.values().find(|e| e.data().spec.uuid == uuid) {
                if let Some(named) = named.filter(|n| !Arc::ptr_eq(n, e)) {
                    return Err(DomainError::Ambiguous {
                        key: key.to_owned(),
                        named_uuid: named.data().spec.uuid.clone(),
                        other: e.name(),
                    });
                }
                return Ok(Arc::clone(e));
            }
        }
        named
            .cloned()
            .ok_or_else(|| DomainError::NotFound(key.to_owned()))
    }

    /// Run store I/O off the async threads; a full or read-only state or
    /// run dir becomes [`DomainError::Storage`] (the caller can act on it),
    /// anything else stays an internal error.
    async fn store_io<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, store::StoreError> + Send + 'static,
    ) -> Result<T, DomainError> {
        let store = self.inner.store.clone();
        let error = match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(e) => return Err(DomainError::Internal(format!("store task failed: {e}"))),
        };
        let config = self.config();
        let dirs = [
            ("state dir", &config.state_dir),
            ("run dir", &config.run_dir),
        ];
        let found = error.dir_problem().and_then(|problem| {
            let path = error.path()?;
            let (which, dir) = dirs.into_iter().find(|(_, dir)| path.starts_with(dir))?;
            Some((which, dir.clone(), problem))
        });
        match found {
            Some((which, dir, problem)) => {
                tracing::warn!(error = %qvirt_common::error_chain(&error), "{which} {problem}");
                Err(DomainError::Storage {
                    which,
                    problem,
                    dir,
                })
            }
            None => Err(DomainError::Store(error)),
        }
    }

    /// The most bytes `spec`'s record takes in a ListDomains answer.
    fn record_bound(&self, spec: &DomainSpec) -> usize {
        let log = self.inner.store.paths(&spec.name).qemu_log;
        prost::Message::encoded_len(spec)
            + self.inner.host.len()
            + log.as_os_str().len()
            + RECORD_OVERHEAD_BYTES
    }

    /// Refuse `spec` if, with it (replacing a domain of the same name),
    /// the records would pass [`LIST_BUDGET_BYTES`]. Called under the
    /// define lock.
    fn check_list_budget(&self, spec: &DomainSpec) -> Result<(), DomainError> {
        let others: Vec<Arc<Entry>> = self
            .domains()
            .iter()
            .filter(|(name, _)| **name != spec.name)
            .map(|(_, e)| Arc::clone(e))
            .collect();
        let total = others
            .iter()
            .map(|e| self.record_bound(&e.data().spec))
            .sum::<usize>()
            + self.record_bound(spec);
        if total > LIST_BUDGET_BYTES {
            return Err(DomainError::ListFull {
                total,
                budget: LIST_BUDGET_BYTES,
            });
        }
        Ok(())
    }

    fn domain_ref(&self, spec: &DomainSpec) -> DomainRef {
        DomainRef {
            name: spec.name.clone(),
            uuid: spec.uuid.clone(),
            host: self.inner.host.clone(),
        }
    }

    fn emit(&self, spec: &DomainSpec, event: Lifecycle) {
        self.inner.events.lifecycle(&self.domain_ref(spec), event);
        self.mark(&spec.uuid);
    }

    /// The API record of a domain.
    fn record(&self, data: &Data) -> Domain {
        let s = &data.status;
        Domain {
            spec: Some(data.spec.clone()),
            state: s.state,
            reason: s.reason,
            host: self.inner.host.clone(),
            pid: s.pid,
            monitor_socket: s.monitor_socket.clone(),
            agent_socket: s.agent_socket.clone(),
            qemu_log: self
                .inner
                .store
                .paths(&data.spec.name)
                .qemu_log
                .display()
                .to_string(),
            create_time: Some(data.create_time.into()),
            update_time: Some(data.update_time.into()),
            start_time: s.start_time_ms.map(|ms| from_millis(ms).into()),
            state_change_time: s.state_change_time_ms.map(|ms| from_millis(ms).into()),
            etag: etag(data),
            saved_image: data
                .saved
                .as_ref()
                .map(|saved| saved.image.display().to_string())
                .unwrap_or_default(),
            // Only a fleet gateway sets it.
            host_unreachable: false,
        }
    }

    fn snapshot(&self, entry: &Entry) -> Domain {
        self.record(&entry.data())
    }

    /// Set state and reason in memory; returns the status to persist and
    /// whether the state changed.
    fn set_state(
        entry: &Entry,
        state: DomainState,
        reason: DomainStateReason,
    ) -> (String, Status, bool) {
        let mut data = entry.data();
        let changed = Self::change_state(&mut data, state, reason);
        (data.spec.name.clone(), data.status.clone(), changed)
    }

    /// Sets state and reason in `data`; whether the state changed.
    fn change_state(data: &mut Data, state: DomainState, reason: DomainStateReason) -> bool {
        let changed = data.status.state != state as i32;
        if changed || data.status.reason != reason as i32 {
            data.status.state = state as i32;
            data.status.reason = reason as i32;
            data.status.state_change_time_ms = Some(millis(SystemTime::now()));
        }
        changed
    }

    /// Persist a status; a failure is logged (the in-memory state is
    /// authoritative while the supervisor runs).
    async fn save_status(&self, name: String, status: Status) {
        let store = self.inner.store.clone();
        let n = name.clone();
        if let Err(error) = blocking(move || store.save_status(&n, &status)).await {
            tracing::error!(domain = %name, error = %qvirt_common::error_chain(&error), "cannot save domain status");
        }
    }

    /// Change state, persist, notify waiters.
    async fn transition(
        &self,
        entry: &Entry,
        state: DomainState,
        reason: DomainStateReason,
    ) -> bool {
        let (name, status, changed) = Self::set_state(entry, state, reason);
        self.save_status(name, status).await;
        self.changed(entry);
        changed
    }

    /// As [`Manager::transition`], and the lifecycle `event` is emitted (when the state changed, or always with
    /// [`Announce::Always`]) under the same lock as the state change: two
    /// transitions of one domain (an RPC's and the watcher's) publish
    /// their events in the order their states changed.
    async fn transition_and_emit(
        &self,
        entry: &Entry,
        (state, reason): (DomainState, DomainStateReason),
        event: Lifecycle,
        announce: Announce,
    ) -> bool {
        let (name, status, changed) = {
            let mut data = entry.data();
            let changed = Self::change_state(&mut data, state, reason);
            if changed || announce == Announce::Always {
                self.emit(&data.spec, event);
            }
            (data.spec.name.clone(), data.status.clone(), changed)
        };
        self.save_status(name, status).await;
        self.changed(entry);
        changed
    }

    /// `spec` within this host's `max_memory_mib` and `max_vcpus` (both
    /// reloaded on SIGHUP).
    pub(super) fn check_host_limits(&self, spec: &DomainSpec) -> Result<(), spec::SpecError> {
        spec::check_host_limits(
            spec,
            self.inner.max_memory_mib.load(Ordering::Relaxed),
            self.inner.max_vcpus.load(Ordering::Relaxed),
        )
    }

    /// Refuse a name whose monitor (or agent) socket path would not fit a
    /// unix socket address (`sun_path`, 108 bytes with its NUL): the start
    /// would fail binding it.
    fn check_socket_paths(&self, name: &str) -> Result<(), DomainError> {
        let paths = self.inner.store.paths(name);
        for path in [&paths.monitor_socket, &paths.agent_socket] {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH_BYTES {
                return Err(DomainError::Spec(spec::SpecError {
                    field: "name".into(),
                    reason: format!(
                        "its socket path {} is {len} bytes, more than the {MAX_SOCKET_PATH_BYTES} a unix socket allows (shorten the name or run_dir)",
                        path.display()
                    ),
                }));
            }
        }
        Ok(())
    }

    /// Check that the paths `spec` names lie under the configured roots
    /// and that its extra arguments leave the sandbox alone; returns the
    /// spec with its paths resolved.
    async fn confine(&self, spec: &DomainSpec) -> Result<DomainSpec, DomainError> {
        confine::check_extra_args(spec)?;
        let roots =
            confine::Roots::new(self.config(), self.inner.store.paths(&spec.name).serial_dir);
        let spec = spec.clone();
        match tokio::task::spawn_blocking(move || confine::confine_paths(&spec, &roots)).await {
            Ok(result) => result.map_err(DomainError::from),
            Err(e) => Err(DomainError::Internal(format!(
                "path check task failed: {e}"
            ))),
        }
    }

    /// Define (or, with `allow_update`, redefine) a domain.
    pub async fn define(
        &self,
        spec: DomainSpec,
        allow_update: bool,
    ) -> Result<Domain, DomainError> {
        self.define_with(
            spec,
            DefineOptions {
                allow_update,
                ..DefineOptions::default()
            },
        )
        .await
    }

    /// Define (or redefine) a domain with `options`.
    pub async fn define_with(
        &self,
        spec: DomainSpec,
        options: DefineOptions,
    ) -> Result<Domain, DomainError> {
        let uuid_given = !spec.uuid.is_empty();
        let allow_update = options.allow_update || !options.etag.is_empty();
        let mut spec = spec::normalize(spec, self.config().default_accel)?;
        self.check_host_limits(&spec)?;
        self.check_socket_paths(&spec.name)?;
        self.confine(&spec).await?;
        let _define = self.inner.define_lock.lock().await;
        self.check_list_budget(&spec)?;
        let existing = self.domains().get(&spec.name).cloned();
        if !options.etag.is_empty() && existing.is_none() {
            return Err(DomainError::EtagMismatch {
                domain: spec.name,
                given: options.etag,
                current: String::new(),
            });
        }
        let clash = self
            .domains()
            .values()
            .find(|e| {
                let d = e.data();
                d.spec.uuid == spec.uuid && d.spec.name != spec.name
            })
            .map(|_| spec.uuid.clone());
        if let Some(uuid) = clash {
            return Err(DomainError::AlreadyExists {
                field: "uuid",
                value: uuid,
            });
        }
        if let Some(entry) = existing {
            if !allow_update {
                return Err(DomainError::AlreadyExists {
                    field: "name",
                    value: spec.name,
                });
            }
            let _op = entry.lock_op().await?;
            if !options.etag.is_empty() {
                let current = etag(&entry.data());
                if current != options.etag {
                    return Err(DomainError::EtagMismatch {
                        domain: spec.name,
                        given: options.etag,
                        current,
                    });
                }
            }
            let old_uuid = entry.data().spec.uuid.clone();
            if !uuid_given {
                spec.uuid = old_uuid;
            } else if spec.uuid != old_uuid {
                return Err(DomainError::AlreadyExists {
                    field: "name",
                    value: spec.name,
                });
            }
            let yaml = spec::stored_yaml(&spec)?;
            if options.validate_only {
                let data = entry.data();
                let would = Data {
                    spec,
                    status: data.status.clone(),
                    create_time: data.create_time,
                    update_time: SystemTime::now(),
                    run: None,
                    saved: data.saved.clone(),
                };
                return Ok(self.record(&would));
            }
            let name = spec.name.clone();
            let create_time = entry.data().create_time;
            let request = options.request.clone();
            self.store_io(move |store| {
                store.save_spec_yaml(&name, &yaml, create_time, request.as_ref())
            })
            .await?;
            let domain = {
                let mut data = entry.data();
                data.spec = spec.clone();
                data.update_time = SystemTime::now();
                self.record(&data)
            };
            self.emit(&spec, Lifecycle::Defined(DomainEventDefinedDetail::Updated));
            self.changed(&entry);
            return Ok(domain);
        }
        let yaml = spec::stored_yaml(&spec)?;
        let now = SystemTime::now();
        let status = Status {
            state: DomainState::Shutoff as i32,
            reason: DomainStateReason::ShutoffUnknown as i32,
            state_change_time_ms: Some(millis(now)),
            ..Status::default()
        };
        if options.validate_only {
            return Ok(self.record(&Data {
                spec,
                status,
                create_time: now,
                update_time: now,
                run: None,
                saved: None,
            }));
        }
        let request = options.request;
        // The definition alone: a domain that never ran has no run dir
        // and no status file (start makes them), and loads as shut off.
        let name = spec.name.clone();
        self.store_io(move |store| store.save_spec_yaml(&name, &yaml, now, request.as_ref()))
            .await?;
        let entry = Entry::new(Data {
            spec: spec.clone(),
            status,
            create_time: now,
            update_time: now,
            run: None,
            saved: None,
        });
        let domain = self.snapshot(&entry);
        self.domains().insert(spec.name.clone(), entry);
        self.emit(&spec, Lifecycle::Defined(DomainEventDefinedDetail::Added));
        Ok(domain)
    }

    /// Remove a definition; a running domain is refused unless `destroy`.
    /// `promise` (the call's record, when it has a request id) is written
    /// just before the files are removed.
    pub async fn undefine(
        &self,
        key: &str,
        destroy: bool,
        promise: Option<crate::request_ids::Promise>,
    ) -> Result<(), DomainError> {
        let _define = self.inner.define_lock.lock().await;
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let running = {
            let data = entry.data();
            data.run.is_some() || data.status.pid != 0
        };
        if running {
            if !destroy {
                let state = entry.data().status.state;
                return Err(DomainError::WrongState {
                    domain: entry.name(),
                    state: state_name(state),
                    need: Need::ShutOffOrDestroy,
                    what: "undefine a running domain needs `destroy`",
                });
            }
            self.destroy_locked(&entry, false).await?;
        }
        // The record of files lent to QEMU's user lives in the status file
        // that removal deletes: give them back first, and keep the domain
        // (and its record) while any cannot be.
        self.take_back_files(&entry).await;
        let (left, status) = {
            let data = entry.data();
            let left: Vec<String> = data
                .status
                .granted
                .iter()
                .map(|g| g.path.display().to_string())
                .collect();
            (left, data.status.clone())
        };
        if !left.is_empty() {
            self.save_status(entry.name(), status).await;
            return Err(DomainError::Confine {
                domain: entry.name(),
                what: format!(
                    "QEMU's user still owns {} (giving it back failed, see the supervisor's log); put the file back and undefine again",
                    left.join(", ")
                ),
                source: std::io::Error::other("ownership not given back"),
            });
        }
        let spec = entry.data().spec.clone();
        let (name, uuid) = (spec.name.clone(), spec.uuid.clone());
        self.store_io(move |store| {
            // Without it a retry after a crash can answer NOT_FOUND; not a
            // reason to refuse the undefine (a full disk is when one is
            // needed most).
            if let Some(Err(error)) = promise.map(|p| p.write(&uuid)) {
                tracing::warn!(error = %qvirt_common::error_chain(&error), domain = %name, "cannot record the undefine's request id before the removal");
            }
            store.remove(&name)
        })
        .await?;
        // What was moved to the trash is deleted once this has answered.
        let store = self.inner.store.clone();
        drop(tokio::task::spawn_blocking(move || store.empty_trash()));
        entry.removed.store(true, Ordering::SeqCst);
        self.domains().remove(&spec.name);
        self.emit(
            &spec,
            Lifecycle::Undefined(DomainEventUndefinedDetail::Removed),
        );
        Ok(())
    }

    /// The UUIDs of every defined domain.
    pub fn uuids(&self) -> std::collections::HashSet<String> {
        self.domains()
            .values()
            .map(|e| e.data().spec.uuid.clone())
            .collect()
    }

    /// Every domain, sorted by name, optionally only in `states`.
    pub fn list(&self, states: &[i32]) -> Vec<Domain> {
        self.list_page(states, "", None, usize::MAX).0
    }

    /// One page of the domains sorted by name: those after `after` (a
    /// name), whose name starts with `prefix` and whose state is one of
    /// `states` (empty: any), at most `size` of them and at most
    /// [`LIST_BUDGET_BYTES`] of records (at least one). Returns whether
    /// more follow.
    pub fn list_page(
        &self,
        states: &[i32],
        prefix: &str,
        after: Option<&str>,
        size: usize,
    ) -> (Vec<Domain>, bool) {
        use std::ops::Bound;
        let entries: Vec<Arc<Entry>> = {
            let domains = self.domains();
            // Names with the prefix are contiguous and sort from it on.
            let start = match after {
                Some(name) if name >= prefix => Bound::Excluded(name),
                _ => Bound::Included(prefix),
            };
            domains
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(name, _)| name.starts_with(prefix))
                .map(|(_, e)| Arc::clone(e))
                .collect()
        };
        let mut page = Vec::new();
        let mut bytes = 0;
        for entry in entries {
            let domain = self.snapshot(&entry);
            if !states.is_empty() && !states.contains(&domain.state) {
                continue;
            }
            let len = prost::Message::encoded_len(&domain);
            if page.len() >= size || (!page.is_empty() && bytes + len > LIST_BUDGET_BYTES) {
                return (page, true);
            }
            bytes += len;
            page.push(domain);
        }
        (page, false)
    }

    /// One domain.
    pub fn get(&self, key: &str) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        Ok(self.snapshot(&entry))
    }

    /// The monitor of a domain that runs, FAILED_PRECONDITION when it does
    /// not, UNAVAILABLE while its monitor is lost.
    fn running_qmp(entry: &Entry, what: &'static str) -> Result<Arc<QmpClient>, DomainError> {
        let data = entry.data();
        match &data.run {
            Some(run) if run.flags.monitor_lost.load(Ordering::SeqCst) => {
                Err(DomainError::MonitorLost {
                    domain: data.spec.name.clone(),
                    pid: data.status.pid,
                })
            }
            Some(run) => Ok(Arc::clone(&run.qmp)),
            None if data.status.pid != 0 => Err(DomainError::Detached(data.spec.name.clone())),
            None => Err(DomainError::WrongState {
                domain: data.spec.name.clone(),
                state: state_name(data.status.state),
                need: Need::Running,
                what,
            }),
        }
    }

    /// Run one QMP command with the configured timeout.
    async fn qmp(
        &self,
        entry: &Entry,
        qmp: &QmpClient,
        command: &str,
    ) -> Result<serde_json::Value, DomainError> {
        let timeout = Duration::from_secs(self.config().command_timeout_secs);
        match tokio::time::timeout(timeout, qmp.execute(command, None)).await {
            Ok(result) => result.map_err(|e| DomainError::qmp(&entry.name(), e)),
            Err(_) => Err(DomainError::Timeout(format!(
                "QMP {command} on domain {:?}: no reply within {timeout:?}",
                entry.name()
            ))),
        }
    }

    /// Pause the vCPUs (`stop`).
    pub async fn suspend(&self, key: &str) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "suspend needs a running domain")?;
        let state = entry.data().status.state;
        if state == DomainState::Paused as i32 {
            return Ok(self.snapshot(&entry));
        }
        if state != DomainState::Running as i32 {
            return Err(DomainError::WrongState {
                domain: entry.name(),
                state: state_name(state),
                need: Need::Running,
                what: "suspend needs a running domain",
            });
        }
        self.qmp(&entry, &qmp, "stop").await?;
        self.transition_and_emit(
            &entry,
            (DomainState::Paused, DomainStateReason::PausedUser),
            Lifecycle::Suspended(DomainEventSuspendedDetail::Paused),
            Announce::IfChanged,
        )
        .await;
        Ok(self.snapshot(&entry))
    }

    /// Resume the vCPUs (`cont`).
    pub async fn resume(&self, key: &str) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "resume needs a paused domain")?;
        let state = entry.data().status.state;
        if state != DomainState::Paused as i32 {
            return Err(DomainError::WrongState {
                domain: entry.name(),
                state: state_name(state),
                need: Need::Paused,
                what: "resume needs a paused domain",
            });
        }
        self.qmp(&entry, &qmp, "cont").await?;
        self.transition_and_emit(
            &entry,
            (DomainState::Running, DomainStateReason::RunningUnpaused),
            Lifecycle::Resumed(DomainEventResumedDetail::Unpaused),
            Announce::IfChanged,
        )
        .await;
        Ok(self.snapshot(&entry))
    }

    /// Hard reset (`system_reset`).
    pub async fn reset(&self, key: &str) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "reset needs a running domain")?;
        self.qmp(&entry, &qmp, "system_reset").await?;
        Ok(self.snapshot(&entry))
    }

    /// One raw QMP command; QEMU's reply as JSON text (without `id`).
    pub async fn monitor_command(
        &self,
        key: &str,
        command_json: &str,
    ) -> Result<String, DomainError> {
        let request = raw_request(command_json)?;
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "monitor commands need a running domain")?;
        let timeout = Duration::from_secs(self.config().command_timeout_secs);
        match tokio::time::timeout(timeout, qmp.execute_raw(request)).await {
            Ok(result) => result.map_err(|e| DomainError::qmp(&entry.name(), e)),
            Err(_) => Err(DomainError::Timeout(format!(
                "monitor command on domain {:?}: no reply within {timeout:?}",
                entry.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

/// What a define may do besides storing a new domain.
#[derive(Debug, Clone, Default)]
pub struct DefineOptions {
    /// Replace the definition of an existing domain of the same name.
    pub allow_update: bool,
    /// Non-empty: the domain must exist with this etag (and is replaced).
    pub etag: String,
    /// Check everything, write nothing, publish nothing.
    pub validate_only: bool,
    /// The call's request id and fingerprint, kept in the definition file
    /// (see [`store::RequestMark`]).
    pub request: Option<store::RequestMark>,
}

/// When [`Manager::transition_and_emit`] emits its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announce {
    /// Only when the state changed (a second STOP of a paused guest says
    /// nothing).
    IfChanged,
    /// Whatever the state was (a failed start is STOPPED FAILED).
    Always,
}
