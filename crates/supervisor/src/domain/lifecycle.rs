//! Starting and stopping QEMU for a domain, and re-attaching after a
//! supervisor restart.
//!
//! Reboot choice: like libvirt's QEMU driver, QEMU runs with
//! `-no-shutdown`. An ACPI reboot marks the run "reboot pending" and presses
//! the power button (`system_powerdown`); when the guest has powered off
//! (QMP SHUTDOWN with `guest: true`) the watcher issues `system_reset` and
//! `cont` instead of `quit`, so QEMU stays up and the guest boots again.
//! A plain guest power-off makes the watcher `quit` QEMU.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use qvirt_proto::v1::{
    Accel, Domain, DomainEventStartedDetail, DomainEventStoppedDetail, DomainEventSuspendedDetail,
    DomainSpec, DomainState, DomainStateReason, ShutdownMode,
};
use tracing::{debug, error, info, warn};

use super::argv::{self, Host};
use super::confine::guest_files;
use super::{
    Announce, DomainError, Entry, Life, Manager, Need, Proc, Run, RunFlags, millis, state_name,
};
use crate::launch::{self, IdentityError, LaunchConfig, signal_process_group};
use crate::seams::{AgentPower, GuestPower, HookError, HookOp, Lifecycle};

/// How long Destroy waits for the watcher to record the exit.
const EXIT_RECORD_WAIT: Duration = Duration::from_secs(15);

impl Manager {
    /// Start a SHUTOFF domain, optionally leaving its vCPUs paused.
    pub async fn start(&self, key: &str, paused: bool) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let (spec, state) = {
            let data = entry.data();
            (data.spec.clone(), data.status.state)
        };
        if state != DomainState::Shutoff as i32 {
            return Err(DomainError::WrongState {
                domain: spec.name,
                state: state_name(state),
                need: Need::ShutOff,
                what: "start needs a shut off domain",
            });
        }
        // The previous run's stopped/release hooks finish first.
        drop(entry.stop_hooks.lock().await);
        self.boot(&entry, spec, paused, None).await
    }

    /// Start QEMU for `spec` on the SHUTOFF `entry` (its op lock held):
    /// the prepare, start and started hooks, the launch and the watcher.
    /// With `incoming` (a saved image, opened), QEMU waits for incoming
    /// state (`-incoming defer`) and loads it from that file before the
    /// started hook (a restore: reason and events RESTORED).
    pub(super) async fn boot(
        &self,
        entry: &Arc<Entry>,
        spec: DomainSpec,
        paused: bool,
        incoming: Option<std::fs::File>,
    ) -> Result<Domain, DomainError> {
        let entry = Arc::clone(entry);
        let began = Instant::now();
        if let Err(failure) = self.inner.hooks.run(&spec, HookOp::Prepare).await {
            return Err(self
                .abort_start(&entry, &spec, None, DomainError::hook(&spec.name, failure))
                .await);
        }
        let paths = self.inner.store.paths(&spec.name);
        let auto_uses_kvm = self.config().auto_uses_kvm;
        let accel = spec.accel();
        // The config may have changed since the definition was checked.
        let confined = match self.confine(&spec).await {
            Ok(confined) => confined,
            Err(error) => return Err(self.abort_start(&entry, &spec, None, error).await),
        };
        let store = self.inner.store.clone();
        let owner = self
            .inner
            .qemu
            .clone()
            .filter(|c| c.uid != launch::effective_uid());
        let prepare_paths = paths.clone();
        let prepare_spec = confined.clone();
        let roots = super::confine::Roots::new(self.config(), paths.serial_dir.clone());
        // One blocking hop for the file-system work before the spawn.
        let prepare = tokio::task::spawn_blocking(move || {
            if let Err(error) = store.rotate_log(&prepare_spec.name) {
                let error = qvirt_common::error_chain(&error);
                warn!(domain = %prepare_spec.name, %error, "QEMU log rotation failed");
            }
            let files = guest_files(&prepare_spec, &prepare_paths, &roots, owner.as_ref());
            (files, argv::resolve_accel(accel, auto_uses_kvm))
        });
        let (files, resolved) = match prepare.await {
            Ok((Ok(files), resolved)) => (files, resolved),
            Ok((Err(error), _)) => return Err(self.abort_start(&entry, &spec, None, error).await),
            Err(error) => {
                // Never guess (e.g. TCG) when the probe itself broke.
                error!(domain = %spec.name, %error, "start preparation task failed");
                let error = DomainError::Internal(format!(
                    "domain {:?}: preparing the start failed: {error}",
                    spec.name
                ));
                return Err(self.abort_start(&entry, &spec, None, error).await);
            }
        };
        if accel == Accel::Auto {
            info!(domain = %spec.name, accel = ?resolved, "accel auto resolved");
        }
        if let Err(error) = self.give_files(&entry, &spec.name, files.planned).await {
            return Err(self.abort_start(&entry, &spec, None, error).await);
        }
        let args = argv::build(
            &confined,
            resolved,
            &Host {
                agent_fd: files.agent.as_ref().map(AsRawFd::as_raw_fd),
                serial_fd: files.serial.as_ref().map(AsRawFd::as_raw_fd),
                tap_fds: files.taps.iter().map(AsRawFd::as_raw_fd).collect(),
                sandbox: self.config().qemu_sandbox,
                incoming: incoming.is_some(),
            },
        );
        // QEMU's number of the image: the parent's (inherited as it is).
        let image_fd = incoming.as_ref().map(AsRawFd::as_raw_fd);
        let inherit: Vec<OwnedFd> = files
            .agent
            .into_iter()
            .chain(files.serial.map(OwnedFd::from))
            .chain(files.taps)
            .chain(incoming.map(OwnedFd::from))
            .collect();
        let launch_config = LaunchConfig {
            binary: self.config().qemu_binary.clone(),
            args,
            run_dir: paths.run_dir.clone(),
            log_path: paths.qemu_log.clone(),
            handshake_timeout: Duration::from_secs(self.config().start_timeout_secs),
            credentials: self.inner.qemu.clone(),
            launcher: self.config().launcher_socket.clone(),
        };
        if let Err(failure) = self.inner.hooks.run(&spec, HookOp::Start).await {
            return Err(self
                .abort_start(&entry, &spec, None, DomainError::hook(&spec.name, failure))
                .await);
        }
        let prepared = began.elapsed();
        let mut process = match launch::launch(&launch_config, inherit).await {
            Ok(p) => p,
            Err(source) => {
                warn!(domain = %spec.name, error = %qvirt_common::error_chain(&source), "QEMU failed to start");
                let error = DomainError::Start {
                    domain: spec.name.clone(),
                    source: Box::new(source),
                };
                return Err(self.abort_start(&entry, &spec, None, error).await);
            }
        };
        let launched = began.elapsed();
        // Recorded at once: a supervisor that dies from here on finds this
        // QEMU at its next start and re-attaches to it (or, if it died
        // too, gives its files back), instead of taking its disks back
        // under it and letting a second QEMU start on them.
        let status = {
            let mut data = entry.data();
            let s = &mut data.status;
            s.pid = process.pid();
            s.identity = Some(process.identity().clone());
            s.monitor_socket = process.monitor_path().display().to_string();
            if spec.agent {
                s.agent_socket = paths.agent_socket.display().to_string();
            }
            data.status.clone()
        };
        self.save_status(spec.name.clone(), status).await;
        let Some(events) = process.take_events() else {
            let error = DomainError::Internal(format!(
                "domain {:?}: launched QEMU has no event receiver",
                spec.name
            ));
            return Err(self
                .abort_start(&entry, &spec, Some(Arc::new(process)), error)
                .await);
        };
        let process = Arc::new(process);
        let qmp = Arc::clone(process.qmp());
        let flags = Arc::new(RunFlags::default());
        if let Some(fd) = image_fd
            && let Err(error) = self.load_image(&entry, &process, fd).await
        {
            return Err(self.abort_start(&entry, &spec, Some(process), error).await);
        }
        // libvirt runs `started` after the vCPUs run; we run it before
        // `cont`, so a refusing hook never lets the guest execute.
        if let Err(failure) = self.inner.hooks.run(&spec, HookOp::Started).await {
            let error = DomainError::hook(&spec.name, failure);
            return Err(self.abort_start(&entry, &spec, Some(process), error).await);
        }
        if !paused && let Err(error) = self.qmp(&entry, &qmp, "cont").await {
            return Err(self.abort_start(&entry, &spec, Some(process), error).await);
        }
        let continued = began.elapsed();
        let restored = image_fd.is_some();
        let (state, reason) = match (paused, restored) {
            (true, false) => (DomainState::Paused, DomainStateReason::PausedStartingUp),
            (true, true) => (DomainState::Paused, DomainStateReason::PausedUser),
            (false, false) => (DomainState::Running, DomainStateReason::RunningBooted),
            (false, true) => (DomainState::Running, DomainStateReason::RunningRestored),
        };
        let now = millis(SystemTime::now());
        let status = {
            let mut data = entry.data();
            let s = &mut data.status;
            s.state = state as i32;
            s.reason = reason as i32;
            s.pid = process.pid();
            s.identity = Some(process.identity().clone());
            s.monitor_socket = process.monitor_path().display().to_string();
            s.agent_socket = if spec.agent {
                paths.agent_socket.display().to_string()
            } else {
                String::new()
            };
            s.start_time_ms = Some(now);
            s.state_change_time_ms = Some(now);
            data.run = Some(Run {
                qmp: Arc::clone(&qmp),
                proc: Proc::Owned(Arc::clone(&process)),
                flags: Arc::clone(&flags),
                spec: spec.clone(),
            });
            data.status.clone()
        };
        self.save_status(spec.name.clone(), status).await;
        debug!(
            domain = %spec.name,
            prepare_us = prepared.as_micros(),
            launch_us = (launched - prepared).as_micros(),
            spawn_to_greeting_us = process.spawn_to_greeting().as_micros(),
            started_hook_and_cont_us = (continued - launched).as_micros(),
            save_us = (began.elapsed() - continued).as_micros(),
            "start timings"
        );
        self.changed(&entry);
        let (started, suspended) = if restored {
            (
                DomainEventStartedDetail::Restored,
                DomainEventSuspendedDetail::Restored,
            )
        } else {
            (
                DomainEventStartedDetail::Booted,
                DomainEventSuspendedDetail::Paused,
            )
        };
        self.emit(&spec, Lifecycle::Started(started));
        if paused {
            self.emit(&spec, Lifecycle::Suspended(suspended));
        }
        let life = Life::Child(process.exit_watch(), process.identity().clone());
        self.spawn_watcher(Arc::clone(&entry), qmp, events, life, flags);
        Ok(self.snapshot(&entry))
    }

    /// Undo a start that failed after the prepare hook was called: kill
    /// the QEMU if one was spawned, record SHUTOFF (FAILED), emit STOPPED
    /// (FAILED), and run the
    /// stopped and release hooks as libvirt does (their failures are only
    /// logged). Returns `error` for the caller.
    async fn abort_start(
        &self,
        entry: &Entry,
        spec: &DomainSpec,
        process: Option<Arc<launch::QemuProcess>>,
        error: DomainError,
    ) -> DomainError {
        let killed = match process {
            Some(process) => match process.kill(Duration::ZERO).await {
                Ok(_) => true,
                Err(error) => {
                    warn!(domain = %spec.name, %error, "killing a half-started QEMU failed");
                    false
                }
            },
            None => true,
        };
        if killed {
            let mut data = entry.data();
            let s = &mut data.status;
            s.pid = 0;
            s.identity = None;
            s.monitor_socket.clear();
            s.agent_socket.clear();
        }
        self.take_back_files(entry).await;
        self.transition_and_emit(
            entry,
            (DomainState::Shutoff, DomainStateReason::ShutoffFailed),
            Lifecycle::Stopped(DomainEventStoppedDetail::Failed),
            Announce::Always,
        )
        .await;
        self.run_stop_hooks(spec, DomainStateReason::ShutoffFailed)
            .await;
        error
    }

    /// The stopped and release hooks (`reason`: the shut-off reason, the
    /// release hook's extra argument); failures are logged.
    pub(super) async fn run_stop_hooks(&self, spec: &DomainSpec, reason: DomainStateReason) {
        for op in [HookOp::Stopped, HookOp::Release(reason)] {
            if let Err(failure) = self.inner.hooks.run(spec, op).await {
                warn!(domain = %spec.name, %failure, "hook failed (ignored)");
            }
        }
    }

    /// Stop QEMU at once (SIGTERM, SIGKILL after the grace period, unless
    /// `graceful`).
    pub async fn destroy(&self, key: &str, graceful: bool) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        self.destroy_locked(&entry, graceful).await?;
        Ok(self.snapshot(&entry))
    }

    /// Destroy with the domain's op lock held by the caller.
    pub(super) async fn destroy_locked(
        &self,
        entry: &Arc<Entry>,
        graceful: bool,
    ) -> Result<(), DomainError> {
        let (name, flags, proc) = {
            let data = entry.data();
            let Some(run) = &data.run else {
                if data.status.pid != 0 {
                    return Err(DomainError::Detached(data.spec.name.clone()));
                }
                return Err(DomainError::WrongState {
                    domain: data.spec.name.clone(),
                    state: state_name(data.status.state),
                    need: Need::Running,
                    what: "destroy needs a running domain",
                });
            };
            let proc = match &run.proc {
                Proc::Owned(p) => Proc::Owned(Arc::clone(p)),
                Proc::Adopted(identity) => Proc::Adopted(identity.clone()),
            };
            (data.spec.name.clone(), Arc::clone(&run.flags), proc)
        };
        let grace = Duration::from_secs(self.config().destroy_grace_secs);
        flags.destroying.store(true, Ordering::SeqCst);
        let stopped = match (&proc, graceful) {
            (Proc::Owned(p), false) => p.kill(grace).await.map(drop),
            (Proc::Adopted(identity), false) => launch::terminate_adopted(identity, grace).await,
            (proc, true) => {
                let pid = match proc {
                    Proc::Owned(p) => p.pid(),
                    Proc::Adopted(identity) => identity.pid,
                };
                let verified = match proc {
                    Proc::Adopted(identity) => match identity.verify().await {
                        Ok(()) => true,
                        Err(IdentityError::NotRunning { .. }) => false,
                        Err(source) => {
                            flags.destroying.store(false, Ordering::SeqCst);
                            return Err(DomainError::Stop {
                                domain: name,
                                source: Box::new(launch::LaunchError::Identity { source }),
                            });
                        }
                    },
                    Proc::Owned(p) => p.exit_watch().status().is_none(),
                };
                if verified && let Err(error) = signal_process_group(pid, libc::SIGTERM) {
                    warn!(pid, %error, "SIGTERM to QEMU failed");
                }
                if !entry.wait_until(grace, |d| d.run.is_none()).await {
                    flags.destroying.store(false, Ordering::SeqCst);
                    return Err(DomainError::Timeout(format!(
                        "domain {name:?}: QEMU still running {grace:?} after SIGTERM (graceful destroy)"
                    )));
                }
                Ok(())
            }
        };
        if let Err(source) = stopped {
            flags.destroying.store(false, Ordering::SeqCst);
            return Err(DomainError::Stop {
                domain: name,
                source: Box::new(source),
            });
        }
        if !entry
            .wait_until(EXIT_RECORD_WAIT, |d| d.run.is_none())
            .await
        {
            return Err(DomainError::Internal(format!(
                "domain {name:?}: QEMU stopped but its exit was not recorded"
            )));
        }
        // As libvirt's destroy, return once the stopped and release hooks
        // have run (the exit path holds this lock until they have; each is
        // bounded by the hook call timeout).
        drop(entry.stop_hooks.lock().await);
        Ok(())
    }

    /// Ask the guest to power off; with a timeout, wait for SHUTOFF.
    pub async fn shutdown(
        &self,
        key: &str,
        mode: ShutdownMode,
        timeout: Option<Duration>,
    ) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        {
            let _op = entry.lock_op().await?;
            let qmp = Self::running_qmp(&entry, "shutdown needs a running domain")?;
            let agent = match mode {
                ShutdownMode::Agent => Some(self.agent_of(&entry)?),
                _ => None,
            };
            if let Some(run) = &entry.data().run {
                run.flags.shutdown_requested.store(true, Ordering::SeqCst);
                // A shutdown request wins over an earlier reboot request.
                run.flags.reboot_pending.store(false, Ordering::SeqCst);
            }
            match agent {
                // The guest powers itself off; QEMU reports SHUTDOWN (guest)
                // and the watcher quits it, as after an ACPI power-off.
                Some(agent) => {
                    let name = entry.name();
                    if let Err(source) = agent.power(&name, AgentPower::Powerdown).await {
                        // Nothing was asked of the guest after all.
                        if let Some(run) = &entry.data().run {
                            run.flags.shutdown_requested.store(false, Ordering::SeqCst);
                        }
                        return Err(DomainError::Agent {
                            domain: name,
                            source,
                        });
                    }
                }
                None => {
                    self.qmp(&entry, &qmp, "system_powerdown").await?;
                }
            }
        }
        // The op lock is released: Destroy may come while we wait.
        if let Some(timeout) = timeout.filter(|t| !t.is_zero()) {
            if !entry.wait_until(timeout, |d| d.run.is_none()).await {
                return Err(DomainError::Timeout(format!(
                    "domain {:?} did not shut down within {timeout:?}; it keeps running",
                    entry.name()
                )));
            }
            // A shutdown that waits returns after the stop hooks, as a
            // destroy does.
            drop(entry.stop_hooks.lock().await);
        }
        Ok(self.snapshot(&entry))
    }

    /// Ask the guest to reboot (ACPI power button, then reset; see the
    /// module docs).
    pub async fn reboot(&self, key: &str, mode: ShutdownMode) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "reboot needs a running domain")?;
        let state = entry.data().status.state;
        if state != DomainState::Running as i32 {
            return Err(DomainError::WrongState {
                domain: entry.name(),
                state: state_name(state),
                need: Need::Running,
                what: "reboot needs a running domain",
            });
        }
        if mode == ShutdownMode::Agent {
            // The guest reboots itself (a reset for QEMU): no power-off to
            // turn into a reset, so no reboot-pending mark.
            let agent = self.agent_of(&entry)?;
            let name = entry.name();
            agent
                .power(&name, AgentPower::Reboot)
                .await
                .map_err(|source| DomainError::Agent {
                    domain: name,
                    source,
                })?;
            return Ok(self.snapshot(&entry));
        }
        if let Some(run) = &entry.data().run {
            run.flags.reboot_pending.store(true, Ordering::SeqCst);
        }
        self.qmp(&entry, &qmp, "system_powerdown").await?;
        Ok(self.snapshot(&entry))
    }

    /// The agent service for an agent-mode call on `entry`, or why not.
    fn agent_of(&self, entry: &Entry) -> Result<Arc<dyn GuestPower>, DomainError> {
        let data = entry.data();
        if !data.spec.agent {
            return Err(DomainError::NoAgent(data.spec.name.clone()));
        }
        self.inner.agent.clone().ok_or(DomainError::NoAgentService)
    }

    /// After a restart: re-attach to the QEMU a status file says is
    /// running, or record that it died.
    pub(super) async fn recover(&self, entry: &Arc<Entry>) {
        let (spec, status) = {
            let data = entry.data();
            (data.spec.clone(), data.status.clone())
        };
        let Some(identity) = status.identity.clone().filter(|_| status.pid != 0) else {
            if !status.granted.is_empty() {
                // A start that died between giving QEMU its files and
                // spawning it.
                self.take_back_files(entry).await;
                let status = entry.data().status.clone();
                self.save_status(spec.name.clone(), status).await;
            }
            return;
        };
        let name = spec.name.clone();
        let clear = |entry: &Entry| {
            let mut data = entry.data();
            data.status.pid = 0;
            data.status.identity = None;
            data.status.monitor_socket.clear();
            data.status.agent_socket.clear();
            data.status.start_time_ms = None;
        };
        match identity.verify().await {
            Ok(()) => {}
            Err(error) if error.proves_gone() => {
                info!(domain = %name, %error, "QEMU died while the supervisor was away");
                // Held until its stopped and release hooks are done, so a
                // start's prepare hook never overtakes them.
                let stop_hooks = Arc::clone(&entry.stop_hooks).lock_owned().await;
                clear(entry);
                self.take_back_files(entry).await;
                self.transition_and_emit(
                    entry,
                    (DomainState::Shutoff, DomainStateReason::ShutoffCrashed),
                    Lifecycle::Stopped(DomainEventStoppedDetail::Crashed),
                    Announce::Always,
                )
                .await;
                // As libvirt, the stop path's hooks run for a guest that
                // died unwatched; on a task, so startup is not held up.
                let manager = self.clone();
                self.inner.tasks.spawn(async move {
                    let _stop_hooks = stop_hooks;
                    manager
                        .run_stop_hooks(&spec, DomainStateReason::ShutoffCrashed)
                        .await;
                });
                return;
            }
            Err(error) => {
                // Not a proof of death (e.g. EACCES on /proc): keep the
                // domain as recorded, detached (its calls answer
                // UNAVAILABLE) until a restart can check it.
                error!(domain = %name, pid = identity.pid, error = %qvirt_common::error_chain(&error),
                    "cannot check the recorded QEMU; domain left as recorded, detached");
                return;
            }
        }
        let timeout = Duration::from_secs(self.config().start_timeout_secs);
        let socket = std::path::PathBuf::from(&status.monitor_socket);
        let conn = match launch::connect_existing(&socket, timeout).await {
            Ok(conn) => conn,
            Err(error) => {
                // Never kill it: the likeliest cause is another
                // supervisor on the same dirs holding the monitor. The
                // domain stays recorded as running, detached: its calls
                // answer UNAVAILABLE until a restart re-attaches it.
                error!(domain = %name, pid = identity.pid, error = %qvirt_common::error_chain(&error),
                    "running QEMU's monitor unreachable; domain left detached");
                return;
            }
        };
        let qmp = Arc::new(conn.client);
        let flags = Arc::new(RunFlags::default());
        let life = Life::Adopted(identity.clone());
        entry.data().run = Some(Run {
            qmp: Arc::clone(&qmp),
            proc: Proc::Adopted(identity),
            flags: Arc::clone(&flags),
            spec: spec.clone(),
        });
        // QEMU's own view wins over the recorded state.
        let state = match self.sync_state(entry, &qmp).await {
            Ok(state) => state,
            Err(error) => {
                warn!(domain = %name, %error, "query-status after reconnect failed");
                if status.state != DomainState::Running as i32 {
                    self.transition(
                        entry,
                        DomainState::Running,
                        DomainStateReason::RunningUnknown,
                    )
                    .await;
                }
                DomainState::Running
            }
        };
        info!(domain = %name, pid = status.pid, state = state_name(state as i32), "re-attached to running QEMU");
        match self.inner.hooks.run(&spec, HookOp::Reconnect).await {
            Ok(()) => {}
            Err(failure @ (HookError::Unavailable { .. } | HookError::BadOutput { .. })) => {
                // Not a verdict on this guest: killing running guests
                // because the executor is down (or starts after us) would
                // lose work for nothing. The guest is kept.
                error!(domain = %name, %failure, "reconnect hook not run; guest kept running");
            }
            Err(failure @ HookError::Failed { .. }) => {
                warn!(domain = %name, %failure, "reconnect hook failed; destroying the domain");
                self.spawn_watcher(Arc::clone(entry), qmp, conn.events, life, flags);
                let _op = entry.op.lock().await;
                if let Err(error) = self.destroy_locked(entry, false).await {
                    warn!(domain = %name, %error, "destroying after a failed reconnect hook failed");
                }
                return;
            }
        }
        let powered_off = state == DomainState::Shutdown;
        if powered_off {
            flags.shutdown_seen.store(true, Ordering::SeqCst);
        }
        self.spawn_watcher(
            Arc::clone(entry),
            Arc::clone(&qmp),
            conn.events,
            life,
            flags,
        );
        if powered_off {
            // The guest powered off while nobody watched; with -no-shutdown
            // QEMU waits for the `quit` the previous supervisor never sent.
            info!(domain = %name, "guest powered off meanwhile; quitting QEMU");
            if let Err(error) = self.qmp(entry, &qmp, "quit").await {
                info!(domain = %name, %error, "quit of a powered-off QEMU");
            }
        }
    }

    /// Ask QEMU for its run state (`query-status`) and record it when it
    /// differs from the domain's; returns the state.
    pub(super) async fn sync_state(
        &self,
        entry: &Entry,
        qmp: &crate::qmp::QmpClient,
    ) -> Result<DomainState, DomainError> {
        let reply = self.qmp(entry, qmp, "query-status").await?;
        let (state, reason) = match reply.get("status").and_then(|s| s.as_str()) {
            Some("running") => (DomainState::Running, None),
            Some("prelaunch" | "paused" | "suspended") => (DomainState::Paused, None),
            Some("shutdown") => (DomainState::Shutdown, None),
            Some("guest-panicked") => (
                DomainState::Crashed,
                Some(DomainStateReason::CrashedPanicked),
            ),
            _ => (DomainState::Paused, Some(DomainStateReason::PausedUnknown)),
        };
        if entry.data().status.state != state as i32 {
            let reason = reason.unwrap_or(match state {
                DomainState::Running => DomainStateReason::RunningUnknown,
                DomainState::Shutdown => DomainStateReason::ShutdownUnknown,
                _ => DomainStateReason::PausedUnknown,
            });
            self.transition(entry, state, reason).await;
        }
        Ok(state)
    }
}
