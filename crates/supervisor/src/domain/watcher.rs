//! One task per running QEMU: it reads the monitor's events in order,
//! hands each to the event sink, follows STOP / RESUME / SHUTDOWN /
//! GUEST_PANICKED into the domain's state, and notices the end of QEMU
//! (child exit, or the monitor's EOF for a QEMU adopted after a restart).
//!
//! When QEMU is gone the domain goes SHUTOFF with reason DESTROYED (a
//! destroy was under way), SHUTDOWN (QEMU reported SHUTDOWN first: guest
//! power-off or a host-side quit), or CRASHED (anything else, e.g. kill -9).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use qvirt_proto::v1::{DomainEventShutdownDetail, DomainEventType, DomainState, DomainStateReason};
use tracing::{debug, info, warn};

use super::{Entry, Manager, RunFlags};
use crate::launch::{ExitWatch, STARTUP_EXIT_WAIT};
use crate::qmp::{EventReceiver, QmpClient, QmpEvent};

/// How often a running QEMU's log size is checked.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(30);

/// How long an adopted QEMU may linger after its monitor closed.
const ADOPTED_EXIT_WAIT: Duration = Duration::from_secs(5);

impl Manager {
    /// Start the watcher of one QEMU run.
    pub(super) fn spawn_watcher(
        &self,
        entry: Arc<Entry>,
        qmp: Arc<QmpClient>,
        events: Option<EventReceiver>,
        exit: Option<ExitWatch>,
        flags: Arc<RunFlags>,
    ) {
        let manager = self.clone();
        let stop = self.inner.stop.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = manager.watch(&entry, &qmp, events, exit, &flags) => {}
                () = manager.bound_log(&entry) => {}
            }
        });
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
        qmp: &QmpClient,
        events: Option<EventReceiver>,
        exit: Option<ExitWatch>,
        flags: &RunFlags,
    ) {
        let mut exit_for_loop = exit.clone();
        if let Some(mut events) = events {
            loop {
                let event = tokio::select! {
                    // Events first: a SHUTDOWN read just before the exit
                    // decides the reason.
                    biased;
                    event = events.recv() => event,
                    _ = async {
                        match exit_for_loop.as_mut() {
                            Some(exit) => exit.wait().await,
                            None => std::future::pending().await,
                        }
                    } => None,
                };
                let Some(event) = event else { break };
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
        } else {
            qmp.closed().await;
        }
        match exit {
            Some(mut exit) => {
                if tokio::time::timeout(STARTUP_EXIT_WAIT, exit.wait())
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    warn!(domain = %entry.name(), "QEMU monitor closed but no exit status seen");
                }
            }
            None => self.wait_adopted_gone(entry).await,
        }
        self.on_exit(entry, flags).await;
    }

    /// An adopted QEMU is not our child: after its monitor closed, wait
    /// (bounded) for the pid to be gone.
    async fn wait_adopted_gone(&self, entry: &Entry) {
        let identity = entry.data().status.identity.clone();
        let Some(identity) = identity else { return };
        let deadline = tokio::time::Instant::now() + ADOPTED_EXIT_WAIT;
        while identity.verify().await.is_ok() {
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    pid = identity.pid,
                    "adopted QEMU still alive after its monitor closed"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn on_event(&self, entry: &Entry, qmp: &QmpClient, flags: &RunFlags, event: &QmpEvent) {
        let spec = entry.data().spec.clone();
        self.inner
            .events
            .monitor_event(&self.domain_ref(&spec), event);
        let state = entry.data().status.state;
        let running = DomainState::Running as i32;
        let paused = DomainState::Paused as i32;
        match event.name.as_str() {
            "STOP" if state == running => {
                let reason = if flags.shutdown_requested.load(Ordering::SeqCst) {
                    DomainStateReason::PausedShuttingDown
                } else {
                    DomainStateReason::PausedUnknown
                };
                if self.transition(entry, DomainState::Paused, reason).await {
                    self.emit(&spec, DomainEventType::Suspended, 1);
                }
            }
            "RESUME" if state == paused => {
                let changed = self
                    .transition(
                        entry,
                        DomainState::Running,
                        DomainStateReason::RunningUnpaused,
                    )
                    .await;
                if changed {
                    self.emit(&spec, DomainEventType::Resumed, 1);
                }
            }
            "GUEST_PANICKED" => {
                let changed = self
                    .transition(
                        entry,
                        DomainState::Crashed,
                        DomainStateReason::CrashedPanicked,
                    )
                    .await;
                if changed {
                    self.emit(&spec, DomainEventType::Crashed, 1);
                }
            }
            "SHUTDOWN" => {
                flags.shutdown_seen.store(true, Ordering::SeqCst);
                if flags.destroying.load(Ordering::SeqCst) {
                    // Our own SIGTERM (reason host-signal): the exit that
                    // follows is reported as DESTROYED, nothing else.
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
                    info!(domain = %spec.name, "guest powered off for a reboot; resetting");
                    for command in ["system_reset", "cont"] {
                        if let Err(error) = self.qmp(entry, qmp, command).await {
                            warn!(domain = %spec.name, %error, command, "reboot step failed");
                        }
                    }
                    return;
                }
                let reason = if flags.shutdown_requested.load(Ordering::SeqCst) {
                    DomainStateReason::ShutdownUser
                } else {
                    DomainStateReason::ShutdownUnknown
                };
                if self.transition(entry, DomainState::Shutdown, reason).await {
                    let detail = match initiator {
                        Some(true) => DomainEventShutdownDetail::Guest,
                        Some(false) => DomainEventShutdownDetail::Host,
                        None => DomainEventShutdownDetail::Finished,
                    };
                    self.emit(&spec, DomainEventType::Shutdown, detail as i32);
                }
                if guest {
                    // -no-shutdown keeps QEMU up after a guest power-off.
                    debug!(domain = %spec.name, "guest powered off; quitting QEMU");
                    if let Err(error) = self.qmp(entry, qmp, "quit").await {
                        debug!(domain = %spec.name, %error, "quit after guest power-off");
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_exit(&self, entry: &Entry, flags: &RunFlags) {
        let reason = if flags.destroying.load(Ordering::SeqCst) {
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
        status.started_at_ms = None;
        status.state = DomainState::Shutoff as i32;
        status.reason = reason as i32;
        status.state_changed_at_ms = Some(super::millis(std::time::SystemTime::now()));
        info!(domain = %spec.name, reason = ?reason, "QEMU exited");
        // Taken before anyone can see the domain shut off.
        let _stop_hooks = entry.stop_hooks.lock().await;
        self.save_status(spec.name.clone(), status.clone()).await;
        {
            let mut data = entry.data();
            data.run = None;
            data.status = status;
        }
        entry.notify();
        let detail = match reason {
            DomainStateReason::ShutoffDestroyed => 2,
            DomainStateReason::ShutoffShutdown => 1,
            _ => 3,
        };
        self.emit(&spec, DomainEventType::Stopped, detail);
        self.run_stop_hooks(&spec).await;
    }
}
