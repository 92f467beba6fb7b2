//! One task per running QEMU: it reads the monitor's events in order,
//! hands each to the event sink, follows STOP / RESUME / SHUTDOWN /
//! GUEST_PANICKED into the domain's state, and notices the end of QEMU.
//!
//! QEMU's end is its process's end, never its monitor's: the child's exit
//! for a QEMU we spawned, its recorded identity (pid + start time +
//! cmdline) gone for one adopted after a restart. A monitor that closes
//! while QEMU still runs is "lost": the domain keeps its state, its calls
//! answer UNAVAILABLE (`DomainError::MonitorLost`), Destroy still stops it
//! (by pid), Start still refuses it, and the watcher reconnects to QEMU's
//! monitor socket (QEMU keeps listening and greets the next client) with a
//! growing delay until it succeeds or QEMU ends; once back, `query-status`
//! refreshes the state.
//!
//! When QEMU is gone the domain goes SHUTOFF with reason SAVED (a save
//! had QEMU write its state and quit), DESTROYED (a
//! destroy was under way), SHUTDOWN (QEMU reported SHUTDOWN first: guest
//! power-off or a host-side quit), or CRASHED (anything else, e.g. kill -9).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use qvirt_proto::v1::{
    DomainEventCrashedDetail, DomainEventResumedDetail, DomainEventShutdownDetail,
    DomainEventStoppedDetail, DomainEventSuspendedDetail, DomainState, DomainStateReason,
};
use tracing::{Instrument as _, debug, info, warn};

use super::{Announce, Entry, Manager, RunFlags};
use crate::launch::{self, ExitWatch, ProcessIdentity, STARTUP_EXIT_WAIT};
use crate::qmp::{EventReceiver, QmpClient, QmpEvent};
use crate::seams::Lifecycle;

/// How often a running QEMU's log size is checked.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(30);

/// How long QEMU may take to exit after its monitor closed before the
/// monitor counts as lost.
const MONITOR_CLOSE_EXIT_WAIT: Duration = Duration::from_secs(5);

/// The first and the longest delay between reconnects to a lost monitor.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(250);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

/// How the watcher tells that a QEMU has ended.
#[derive(Debug, Clone)]
pub(super) enum Life {
    /// Spawned by this supervisor: its exit status (and, should the task
    /// reaping it fail, its identity).
    Child(ExitWatch, ProcessIdentity),
    /// Adopted after a restart: only its identity.
    Adopted(ProcessIdentity),
}

impl Life {
    /// Resolves when the child exits; never for an adopted QEMU (not our
    /// child: no exit to wait for, its end is checked after its monitor
    /// closed), nor when the task reaping the child failed.
    async fn exited(&mut self) {
        if let Life::Child(exit, _) = self
            && exit.wait().await.is_some()
        {
            return;
        }
        std::future::pending().await
    }

    /// Resolves when the process is gone.
    async fn gone(&mut self) {
        match self {
            Life::Child(exit, identity) => {
                if exit.wait().await.is_none() {
                    // The reaping task ended without a status: fall back
                    // to the identity (a zombie reads as gone).
                    launch::wait_gone(identity).await;
                }
            }
            Life::Adopted(identity) => launch::wait_gone(identity).await,
        }
    }
}

/// How following a monitor's events ended.
enum Followed {
    /// The child exited (its monitor's last events were read).
    Exited,
    /// The monitor closed; the process may or may not be alive.
    MonitorClosed,
}

impl Manager {
    /// Start the watcher of one QEMU run.
    pub(super) fn spawn_watcher(
        &self,
        entry: Arc<Entry>,
        qmp: Arc<QmpClient>,
        events: EventReceiver,
        life: Life,
        flags: Arc<RunFlags>,
    ) {
        let manager = self.clone();
        let stop = self.inner.stop.clone();
        // Everything the watcher logs names its guest.
        let span = {
            let data = entry.data();
            tracing::info_span!("guest", domain = %data.spec.name, uuid = %data.spec.uuid)
        };
        self.inner.tasks.spawn(
            async move {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    () = manager.watch(&entry, qmp, events, life, &flags) => {}
                    () = manager.bound_log(&entry) => {}
                }
            }
            .instrument(span),
        );
    }

    /// Keep the running QEMU's log bounded (see `Store::trim_log`);
    /// runs until the watcher ends.
    async fn bound_log(&self, entry: &Entry) -> ! {
        let name = entry.name();
        let mut tick = tokio::time::interval(LOG_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = self.inner.store.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || store.trim_log(&n)).await {
                Ok(Ok(true)) => info!(domain = %name, "QEMU log trimmed (old part in .log.1)"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    warn!(domain = %name, error = %qvirt_common::error_chain(&error), "trimming the QEMU log failed");
                }
                Err(error) => warn!(domain = %name, %error, "QEMU log check task failed"),
            }
        }
    }

    async fn watch(
        &self,
        entry: &Arc<Entry>,
        mut qmp: Arc<QmpClient>,
        mut events: EventReceiver,
        mut life: Life,
        flags: &RunFlags,
    ) {
        loop {
            match self
                .follow(entry, &qmp, &mut events, &mut life, flags)
                .await
            {
                Followed::Exited => break,
                Followed::MonitorClosed => {}
            }
            // QEMU closes its monitor when it exits: give it time to.
            if tokio::time::timeout(MONITOR_CLOSE_EXIT_WAIT, life.gone())
                .await
                .is_ok()
            {
                break;
            }
            match self.reattach(entry, &qmp, &mut life, flags).await {
                Some((client, receiver)) => (qmp, events) = (client, receiver),
                None => break,
            }
        }
        self.on_exit(entry, flags).await;
    }

    /// Handle the monitor's events until it closes or the child exits.
    async fn follow(
        &self,
        entry: &Arc<Entry>,
        qmp: &QmpClient,
        events: &mut EventReceiver,
        life: &mut Life,
        flags: &RunFlags,
    ) -> Followed {
        loop {
            let event = tokio::select! {
                // Events first: a SHUTDOWN read just before the exit
                // decides the reason.
                biased;
                event = events.recv() => event,
                () = life.exited() => break,
            };
            let Some(event) = event else {
                return Followed::MonitorClosed;
            };
            self.on_event(entry, qmp, flags, &event).await;
        }
        // The child exited: what QEMU wrote before it died is still in
        // the socket; read it up to the monitor's EOF (bounded).
        let drain = async {
            while let Some(event) = events.recv().await {
                self.on_event(entry, qmp, flags, &event).await;
            }
        };
        if tokio::time::timeout(STARTUP_EXIT_WAIT, drain)
            .await
            .is_err()
        {
            warn!(domain = %entry.name(), "QEMU exited but its monitor stayed open");
        }
        Followed::Exited
    }

    /// The monitor closed but QEMU runs: mark the monitor lost and
    /// reconnect (the old session closed first: QEMU serves one client at
    /// a time) until it works, or `None` once QEMU is gone.
    async fn reattach(
        &self,
        entry: &Arc<Entry>,
        lost: &QmpClient,
        life: &mut Life,
        flags: &RunFlags,
    ) -> Option<(Arc<QmpClient>, EventReceiver)> {
        lost.close();
        flags.monitor_lost.store(true, Ordering::SeqCst);
        let (name, pid, socket) = {
            let data = entry.data();
            (
                data.spec.name.clone(),
                data.status.pid,
                std::path::PathBuf::from(&data.status.monitor_socket),
            )
        };
        warn!(domain = %name, pid, "QEMU monitor lost while QEMU runs; domain kept as it is, reconnecting");
        let timeout = Duration::from_secs(self.config().start_timeout_secs);
        let mut delay = RECONNECT_FIRST_DELAY;
        let conn = loop {
            let attempt = async {
                tokio::time::sleep(delay).await;
                launch::connect_existing(&socket, timeout).await
            };
            tokio::select! {
                biased;
                () = life.gone() => {
                    info!(domain = %name, pid, "QEMU ended while its monitor was lost");
                    return None;
                }
                result = attempt => match result {
                    Ok(conn) => break conn,
                    Err(error) => {
                        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                        warn!(domain = %name, pid, error = %qvirt_common::error_chain(&error),
                            retry_in = ?delay, "reconnecting to the QEMU monitor failed");
                    }
                },
            }
        };
        let qmp = Arc::new(conn.client);
        if let Some(run) = entry.data().run.as_mut() {
            run.qmp = Arc::clone(&qmp);
        }
        flags.monitor_lost.store(false, Ordering::SeqCst);
        info!(domain = %name, pid, "QEMU monitor re-attached");
        match self.sync_state(entry, &qmp).await {
            Ok(DomainState::Shutdown) => {
                // Powered off while unwatched: QEMU waits under
                // -no-shutdown for the `quit` nobody sent.
                flags.shutdown_seen.store(true, Ordering::SeqCst);
                if let Err(error) = self.qmp(entry, &qmp, "quit").await {
                    info!(domain = %name, %error, "quit of a powered-off QEMU");
                }
            }
            Ok(_) => {}
            Err(error) => warn!(domain = %name, %error, "query-status after reconnect failed"),
        }
        self.changed(entry);
        Some((qmp, conn.events))
    }

    async fn on_event(&self, entry: &Entry, qmp: &QmpClient, flags: &RunFlags, event: &QmpEvent) {
        // Published first, before any state change it causes.
        let domain = self.domain_ref(&entry.data().spec);
        self.inner.events.monitor_event(&domain, event);
        let state = entry.data().status.state;
        let running = DomainState::Running as i32;
        let paused = DomainState::Paused as i32;
        match event.name.as_str() {
            "STOP" if state == running => {
                let reason = if flags.saving.load(Ordering::SeqCst) {
                    DomainStateReason::PausedSave
                } else if flags.shutdown_requested.load(Ordering::SeqCst) {
                    DomainStateReason::PausedShuttingDown
                } else {
                    DomainStateReason::PausedUnknown
                };
                self.transition_and_emit(
                    entry,
                    (DomainState::Paused, reason),
                    Lifecycle::Suspended(DomainEventSuspendedDetail::Paused),
                    Announce::IfChanged,
                )
                .await;
            }
            "RESUME" if state == paused => {
                self.transition_and_emit(
                    entry,
                    (DomainState::Running, DomainStateReason::RunningUnpaused),
                    Lifecycle::Resumed(DomainEventResumedDetail::Unpaused),
                    Announce::IfChanged,
                )
                .await;
            }
            "GUEST_PANICKED" => {
                self.transition_and_emit(
                    entry,
                    (DomainState::Crashed, DomainStateReason::CrashedPanicked),
                    Lifecycle::Crashed(DomainEventCrashedDetail::Panicked),
                    Announce::IfChanged,
                )
                .await;
            }
            "SHUTDOWN" => {
                flags.shutdown_seen.store(true, Ordering::SeqCst);
                if flags.destroying.load(Ordering::SeqCst) || flags.saving.load(Ordering::SeqCst) {
                    // Our own SIGTERM (reason host-signal) or a save's
                    // `quit`: the exit that follows is reported as
                    // DESTROYED or SAVED, nothing else.
                    return;
                }
                // Who initiated it; unknown when QEMU does not say.
                let initiator = serde_json::from_str::<serde_json::Value>(&event.data)
                    .ok()
                    .and_then(|d| d.get("guest").and_then(serde_json::Value::as_bool));
                let guest = initiator == Some(true);
                if guest && flags.reboot_pending.swap(false, Ordering::SeqCst) {
                    // ACPI reboot: the guest powered off; reset and go on.
                    flags.shutdown_seen.store(false, Ordering::SeqCst);
                    info!(domain = %domain.name, "guest powered off for a reboot; resetting");
                    for command in ["system_reset", "cont"] {
                        if let Err(error) = self.qmp(entry, qmp, command).await {
                            warn!(domain = %domain.name, %error, command, "reboot step failed");
                        }
                    }
                    return;
                }
                let reason = if flags.shutdown_requested.load(Ordering::SeqCst) {
                    DomainStateReason::ShutdownUser
                } else {
                    DomainStateReason::ShutdownUnknown
                };
                let detail = match initiator {
                    Some(true) => DomainEventShutdownDetail::Guest,
                    Some(false) => DomainEventShutdownDetail::Host,
                    None => DomainEventShutdownDetail::Finished,
                };
                self.transition_and_emit(
                    entry,
                    (DomainState::Shutdown, reason),
                    Lifecycle::Shutdown(detail),
                    Announce::IfChanged,
                )
                .await;
                if guest {
                    // -no-shutdown keeps QEMU up after a guest power-off.
                    debug!(domain = %domain.name, "guest powered off; quitting QEMU");
                    if let Err(error) = self.qmp(entry, qmp, "quit").await {
                        debug!(domain = %domain.name, %error, "quit after guest power-off");
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_exit(&self, entry: &Entry, flags: &RunFlags) {
        let reason = if flags.saving.load(Ordering::SeqCst) {
            DomainStateReason::ShutoffSaved
        } else if flags.destroying.load(Ordering::SeqCst) {
            DomainStateReason::ShutoffDestroyed
        } else if flags.shutdown_seen.load(Ordering::SeqCst) {
            DomainStateReason::ShutoffShutdown
        } else {
            DomainStateReason::ShutoffCrashed
        };
        // The files QEMU was given go back to their owners first.
        self.take_back_files(entry).await;
        // Persist first, then publish in memory: whoever waits for the run
        // to end (destroy, undefine) then finds the files settled.
        let (spec, mut status) = {
            let data = entry.data();
            (data.spec.clone(), data.status.clone())
        };
        status.pid = 0;
        status.identity = None;
        status.monitor_socket.clear();
        status.agent_socket.clear();
        status.start_time_ms = None;
        status.state = DomainState::Shutoff as i32;
        status.reason = reason as i32;
        status.state_change_time_ms = Some(super::millis(std::time::SystemTime::now()));
        info!(domain = %spec.name, reason = ?reason, "QEMU exited");
        // Taken before anyone can see the domain shut off.
        let _stop_hooks = entry.stop_hooks.lock().await;
        self.save_status(spec.name.clone(), status.clone()).await;
        let detail = match reason {
            DomainStateReason::ShutoffDestroyed => DomainEventStoppedDetail::Destroyed,
            DomainStateReason::ShutoffShutdown => DomainEventStoppedDetail::Shutdown,
            DomainStateReason::ShutoffSaved => DomainEventStoppedDetail::Saved,
            _ => DomainEventStoppedDetail::Crashed,
        };
        {
            let mut data = entry.data();
            data.run = None;
            data.status = status;
            // Under the lock that publishes SHUTOFF, as every transition.
            self.emit(&spec, Lifecycle::Stopped(detail));
        }
        self.changed(entry);
        self.run_stop_hooks(&spec, reason).await;
    }
}
