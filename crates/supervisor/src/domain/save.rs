//! SaveDomain and RestoreDomain, as libvirt's `virsh save` and `virsh
//! restore` do them.
//!
//! Save: pause the vCPUs (reason SAVE), open a new file under
//! `STATE_DIR/save/`, pass it to QEMU over the monitor (`getfd`, the
//! descriptor as SCM_RIGHTS: QEMU's user needs no access to the file),
//! `migrate` to `fd:NAME` with the bandwidth cap lifted, poll
//! `query-migrate` until it completes (bounded by `save_timeout_secs`),
//! fsync and rename the file into place with the definition QEMU ran with
//! beside it, then `quit` QEMU: the watcher records SHUTOFF (SAVED), emits
//! STOPPED (SAVED) and runs the stopped and release hooks, which the call
//! waits for. A save that fails is cancelled and the guest resumed if it
//! was running (reason SAVE_CANCELED).
//!
//! Restore: the domain's definition must still fit the image (libvirt's
//! ABI check, [`check_abi`]: a definition changed since the save may
//! change anything else, e.g. a disk's path); the `restore begin -` hook
//! filters it (blank output keeps it; otherwise the output, read in the
//! hooks' stdin format, is checked as any definition and against the
//! image, and becomes the domain's definition); then the start path runs
//! with the image opened by the supervisor and inherited by QEMU, started
//! with `-incoming defer` and fed with `migrate-incoming fd:N`. A restore
//! refused before QEMU is spawned runs no stopped or release hook, as
//! libvirt. The image is kept, as `virsh restore` keeps its file.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use qvirt_proto::v1::{
    Domain, DomainEventResumedDetail, DomainEventSuspendedDetail, DomainSpec, DomainState,
    DomainStateReason,
};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::store::Saved;
use super::{Announce, DomainError, Entry, Manager, Need, spec, state_name};
use crate::launch::{self, QemuProcess};
use crate::qmp::QmpClient;
use crate::seams::{HookError, HookOp, Lifecycle};

/// The name the image's descriptor gets in QEMU (`getfd`).
const SAVE_FD_NAME: &str = "qvirt-save";

/// How often a save or a restore asks QEMU how far it is.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// The migration bandwidth of a save, bytes/s: QEMU's default (32 MiB/s)
/// is for live migration over a network; a paused guest goes to its file
/// as fast as the disk takes it, as libvirt's save does.
const SAVE_BANDWIDTH: u64 = 1 << 40;

/// How long a save waits for QEMU to exit after `quit` before killing it.
const QUIT_WAIT: Duration = Duration::from_secs(15);

/// Whether `target` (the definition to restore with) keeps what the image
/// `source` was saved with depends on: identity, memory, vCPUs, machine,
/// devices and MACs. The first difference in libvirt's words
/// (`virDomainDefCheckABIStability`, without its "unsupported
/// configuration: " prefix). Anything else (paths, boot, metadata) may
/// change.
pub fn check_abi(source: &DomainSpec, target: &DomainSpec) -> Result<(), String> {
    let differ = |what: &str, t: &dyn std::fmt::Display, s: &dyn std::fmt::Display| {
        Err(format!("Target {what} {t} does not match source {s}"))
    };
    if target.name != source.name {
        return Err(format!(
            "Target domain name '{}' does not match source '{}'",
            target.name, source.name
        ));
    }
    if target.uuid != source.uuid {
        return differ("domain uuid", &target.uuid, &source.uuid);
    }
    if target.vcpus != source.vcpus {
        return differ("domain vCPU max", &target.vcpus, &source.vcpus);
    }
    if target.memory_mib != source.memory_mib {
        let kib = |mib: u64| mib.saturating_mul(1024);
        return differ(
            "domain max memory",
            &kib(target.memory_mib),
            &kib(source.memory_mib),
        );
    }
    if target.machine != source.machine {
        return differ("domain machine type", &target.machine, &source.machine);
    }
    if target.disks.len() != source.disks.len() {
        return differ(
            "domain disk count",
            &target.disks.len(),
            &source.disks.len(),
        );
    }
    for (t, s) in target.disks.iter().zip(&source.disks) {
        if t.serial != s.serial {
            return differ("disk serial", &t.serial, &s.serial);
        }
        if t.read_only != s.read_only {
            return differ("disk read-only", &t.read_only, &s.read_only);
        }
    }
    if target.networks.len() != source.networks.len() {
        return differ(
            "domain net card count",
            &target.networks.len(),
            &source.networks.len(),
        );
    }
    for (t, s) in target.networks.iter().zip(&source.networks) {
        if t.mac != s.mac {
            return differ("network card mac", &t.mac, &s.mac);
        }
    }
    let serials = |spec: &DomainSpec| usize::from(!spec.serial_log.is_empty());
    if serials(target) != serials(source) {
        return differ(
            "domain serial port count",
            &serials(target),
            &serials(source),
        );
    }
    let channels = |spec: &DomainSpec| usize::from(spec.agent);
    if channels(target) != channels(source) {
        return differ("domain channel count", &channels(target), &channels(source));
    }
    if target.extra_args != source.extra_args {
        // qvirt's own: extra arguments may add devices.
        return Err(format!(
            "Target domain extra arguments {:?} do not match source {:?}",
            target.extra_args, source.extra_args
        ));
    }
    Ok(())
}

impl Manager {
    /// Save a running or paused domain to its image and stop it (see the
    /// module docs).
    pub async fn save(&self, key: &str) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let qmp = Self::running_qmp(&entry, "save needs a running domain")?;
        let (name, state, flags, spec) = {
            let data = entry.data();
            let Some(run) = &data.run else {
                return Err(DomainError::Internal(format!(
                    "domain {:?}: running without a run",
                    data.spec.name
                )));
            };
            (
                data.spec.name.clone(),
                data.status.state,
                Arc::clone(&run.flags),
                run.spec.clone(),
            )
        };
        let running = DomainState::Running as i32;
        if state != running && state != DomainState::Paused as i32 {
            return Err(DomainError::WrongState {
                domain: name,
                state: state_name(state),
                need: Need::Running,
                what: "save needs a running or paused domain",
            });
        }
        let was_running = state == running;
        let began = Instant::now();
        flags.saving.store(true, Ordering::SeqCst);
        let saved = match self.write_image(&entry, &qmp, &spec, was_running).await {
            Ok(saved) => saved,
            Err(error) => {
                flags.saving.store(false, Ordering::SeqCst);
                warn!(domain = %name, %error, "save failed; guest kept");
                if was_running {
                    self.resume_after_failed_save(&entry, &qmp).await;
                }
                return Err(error);
            }
        };
        info!(domain = %name, image = %saved.image.display(), took_ms = began.elapsed().as_millis(), "guest state saved");
        {
            let mut data = entry.data();
            data.saved = Some(saved);
        }
        // Nothing is left for QEMU to do: its exit is recorded as SAVED.
        if let Err(error) = self.qmp(&entry, &qmp, "quit").await {
            debug!(domain = %name, %error, "quit after a save");
        }
        if !entry.wait_until(QUIT_WAIT, |d| d.run.is_none()).await {
            warn!(domain = %name, "QEMU still runs after quit; stopping it");
            self.destroy_locked(&entry, false).await?;
        }
        // As a destroy: return once the stopped and release hooks ran.
        drop(entry.stop_hooks.lock().await);
        Ok(self.snapshot(&entry))
    }

    /// Pause (if running), write the image, commit it with `spec`.
    async fn write_image(
        &self,
        entry: &Entry,
        qmp: &QmpClient,
        spec: &DomainSpec,
        was_running: bool,
    ) -> Result<Saved, DomainError> {
        if was_running {
            self.qmp(entry, qmp, "stop").await?;
            self.transition_and_emit(
                entry,
                (DomainState::Paused, DomainStateReason::PausedSave),
                Lifecycle::Suspended(DomainEventSuspendedDetail::Paused),
                Announce::IfChanged,
            )
            .await;
        }
        let name = spec.name.clone();
        let (file, tmp) = self
            .store_io(move |store| store.create_saved_image(&name))
            .await?;
        let migrated = match file.try_clone() {
            Ok(copy) => self.migrate_to(entry, qmp, OwnedFd::from(copy)).await,
            Err(error) => Err(DomainError::Internal(format!(
                "cannot duplicate the image descriptor: {error}"
            ))),
        };
        let committed = match migrated {
            Ok(()) => {
                let (name, spec, tmp) = (spec.name.clone(), spec.clone(), tmp.clone());
                self.store_io(move |store| store.commit_saved_image(&name, &file, &tmp, &spec))
                    .await
            }
            Err(error) => Err(error),
        };
        if committed.is_err()
            && let Err(error) = tokio::fs::remove_file(&tmp).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %tmp.display(), %error, "cannot remove a partial saved image");
        }
        committed
    }

    /// Have QEMU write its state into `fd` and wait until it has.
    async fn migrate_to(
        &self,
        entry: &Entry,
        qmp: &QmpClient,
        fd: OwnedFd,
    ) -> Result<(), DomainError> {
        let name = entry.name();
        self.qmp_with(
            entry,
            qmp,
            "migrate-set-parameters",
            json!({ "max-bandwidth": SAVE_BANDWIDTH }),
        )
        .await?;
        let timeout = Duration::from_secs(self.config().command_timeout_secs);
        match tokio::time::timeout(timeout, qmp.send_fd(SAVE_FD_NAME, fd)).await {
            Ok(result) => result.map_err(|e| DomainError::qmp(&name, e))?,
            Err(_) => {
                return Err(DomainError::Timeout(format!(
                    "QMP getfd on domain {name:?}: no reply within {timeout:?}"
                )));
            }
        }
        self.qmp_with(
            entry,
            qmp,
            "migrate",
            json!({ "uri": format!("fd:{SAVE_FD_NAME}") }),
        )
        .await?;
        let limit = Duration::from_secs(self.config().save_timeout_secs);
        let deadline = Instant::now() + limit;
        loop {
            let info = self.qmp(entry, qmp, "query-migrate").await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or(status);
                    return Err(DomainError::Transfer {
                        domain: name,
                        what: "save",
                        message: format!("QEMU's migration to the image {status}: {why}"),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                if let Err(error) = self.qmp(entry, qmp, "migrate_cancel").await {
                    warn!(domain = %name, %error, "cancelling a timed-out save");
                }
                return Err(DomainError::Timeout(format!(
                    "save of domain {name:?}: QEMU had not written its state within {limit:?} \
                     (save_timeout_secs); save cancelled"
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Resume a guest whose save failed (reason SAVE_CANCELED).
    async fn resume_after_failed_save(&self, entry: &Entry, qmp: &QmpClient) {
        if let Err(error) = self.qmp(entry, qmp, "cont").await {
            warn!(domain = %entry.name(), %error, "resuming after a failed save failed; guest left paused");
            return;
        }
        self.transition_and_emit(
            entry,
            (DomainState::Running, DomainStateReason::RunningSaveCanceled),
            Lifecycle::Resumed(DomainEventResumedDetail::Unpaused),
            Announce::IfChanged,
        )
        .await;
    }

    /// Run `command` with `arguments` under the command timeout.
    async fn qmp_with(
        &self,
        entry: &Entry,
        qmp: &QmpClient,
        command: &str,
        arguments: Value,
    ) -> Result<Value, DomainError> {
        let timeout = Duration::from_secs(self.config().command_timeout_secs);
        match tokio::time::timeout(timeout, qmp.execute(command, Some(arguments))).await {
            Ok(result) => result.map_err(|e| DomainError::qmp(&entry.name(), e)),
            Err(_) => Err(DomainError::Timeout(format!(
                "QMP {command} on domain {:?}: no reply within {timeout:?}",
                entry.name()
            ))),
        }
    }

    /// Start a SHUTOFF domain from its saved image (see the module docs).
    pub async fn restore(&self, key: &str, paused: bool) -> Result<Domain, DomainError> {
        let entry = self.find(key)?;
        let _op = entry.lock_op().await?;
        let (current, state, saved) = {
            let data = entry.data();
            (data.spec.clone(), data.status.state, data.saved.clone())
        };
        if state != DomainState::Shutoff as i32 {
            return Err(DomainError::WrongState {
                domain: current.name,
                state: state_name(state),
                need: Need::ShutOff,
                what: "restore needs a shut off domain",
            });
        }
        let saved = saved.ok_or_else(|| DomainError::NoSavedImage(current.name.clone()))?;
        check_abi(&saved.spec, &current).map_err(|message| DomainError::Incompatible {
            domain: current.name.clone(),
            message,
        })?;
        // The previous run's stopped/release hooks finish first.
        drop(entry.stop_hooks.lock().await);
        let name = current.name.clone();
        let spec = match self.inner.hooks.filter(&current, HookOp::Restore).await {
            Ok(None) => current,
            Ok(Some(output)) => {
                self.hook_definition(&entry, &saved.spec, &current, output)
                    .await?
            }
            Err(failure) => return Err(DomainError::hook(&name, failure)),
        };
        let path = saved.image.clone();
        let image = tokio::task::spawn_blocking(move || std::fs::File::open(&path))
            .await
            .map_err(|e| DomainError::Internal(format!("image open task failed: {e}")))?
            .map_err(|error| DomainError::Transfer {
                domain: name.clone(),
                what: "restore",
                message: format!("cannot open the image {}: {error}", saved.image.display()),
            })?;
        self.boot(&entry, spec, paused, Some(image)).await
    }

    /// The definition a restore hook printed, checked as a definition and
    /// against the image's `saved` one; stored as the domain's when it
    /// differs from `current`.
    async fn hook_definition(
        &self,
        entry: &Entry,
        saved: &DomainSpec,
        current: &DomainSpec,
        output: DomainSpec,
    ) -> Result<DomainSpec, DomainError> {
        let name = current.name.clone();
        let bad = |message: String| {
            DomainError::hook(
                &name,
                HookError::BadOutput {
                    op: HookOp::Restore,
                    message,
                },
            )
        };
        let spec = spec::normalize(output, self.config().default_accel)
            .map_err(|error| bad(error.to_string()))?;
        check_abi(saved, &spec).map_err(|message| DomainError::Incompatible {
            domain: name.clone(),
            message,
        })?;
        self.check_host_limits(&spec)
            .map_err(|error| bad(error.to_string()))?;
        self.confine(&spec).await?;
        if spec != *current {
            info!(domain = %name, "restore hook changed the definition; stored");
            let stored = spec.clone();
            let create_time = entry.data().create_time;
            self.store_io(move |store| store.save_spec(&stored, create_time))
                .await?;
            let mut data = entry.data();
            data.spec = spec.clone();
            data.update_time = SystemTime::now();
        }
        Ok(spec)
    }

    /// Feed QEMU (started with `-incoming defer`) the image inherited as
    /// its descriptor `fd`, and wait until it has loaded it (it leaves
    /// the `inmigrate` state; a bad image makes QEMU exit).
    pub(super) async fn load_image(
        &self,
        entry: &Entry,
        process: &QemuProcess,
        fd: RawFd,
    ) -> Result<(), DomainError> {
        let qmp = process.qmp();
        let name = entry.name();
        let load = async {
            self.qmp_with(
                entry,
                qmp,
                "migrate-incoming",
                json!({ "uri": format!("fd:{fd}") }),
            )
            .await?;
            loop {
                let status = self.qmp(entry, qmp, "query-status").await?;
                if status.get("status").and_then(Value::as_str) != Some("inmigrate") {
                    return Ok::<(), DomainError>(());
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        };
        let limit = Duration::from_secs(self.config().save_timeout_secs);
        match tokio::time::timeout(limit, load).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                // QEMU exits when it cannot load the image: let it finish
                // saying why.
                let mut exit = process.exit_watch();
                let _ = tokio::time::timeout(launch::STARTUP_EXIT_WAIT, exit.wait()).await;
                let log = launch::log_tail(&self.inner.store.paths(&name).qemu_log).await;
                Err(DomainError::Transfer {
                    domain: name,
                    what: "restore",
                    message: format!("QEMU did not load the image ({error}); its log: {log}"),
                })
            }
            Err(_) => Err(DomainError::Timeout(format!(
                "restore of domain {name:?}: QEMU had not loaded its image within {limit:?} \
                 (save_timeout_secs)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvirt_proto::v1::network_spec::Backend;
    use qvirt_proto::v1::{DiskSpec, NetworkSpec, UserNetwork};

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "tiny".into(),
            uuid: "6c1f0c5e-0d3a-4a53-8a0e-3c1f2b9e4d11".into(),
            memory_mib: 64,
            vcpus: 1,
            machine: "q35".into(),
            disks: vec![DiskSpec {
                path: "/i/a.img".into(),
                ..Default::default()
            }],
            networks: vec![NetworkSpec {
                backend: Some(Backend::User(UserNetwork::default())),
                mac: "52:54:00:00:00:01".into(),
            }],
            agent: true,
            ..Default::default()
        }
    }

    /// A change made to a copy of the source definition.
    type Change<'a> = &'a dyn Fn(&mut DomainSpec);

    /// libvirt's words for what the image depends on; everything else
    /// may change.
    #[test]
    fn test_abi_check_speaks_libvirts_words() {
        let source = spec();
        let check = |change: Change| {
            let mut target = source.clone();
            change(&mut target);
            check_abi(&source, &target)
        };
        let cases: [(Change, &str); 9] = [
            (
                &|t| t.name = "other".into(),
                "Target domain name 'other' does not match source 'tiny'",
            ),
            (
                &|t| t.uuid = "00000000-0000-4000-8000-000000000000".into(),
                "Target domain uuid 00000000-0000-4000-8000-000000000000 does not match source 6c1f0c5e-0d3a-4a53-8a0e-3c1f2b9e4d11",
            ),
            (
                &|t| t.memory_mib = 128,
                "Target domain max memory 131072 does not match source 65536",
            ),
            (
                &|t| t.vcpus = 2,
                "Target domain vCPU max 2 does not match source 1",
            ),
            (
                &|t| t.machine = "pc".into(),
                "Target domain machine type pc does not match source q35",
            ),
            (
                &|t| t.disks.clear(),
                "Target domain disk count 0 does not match source 1",
            ),
            (
                &|t| t.networks[0].mac = "52:54:00:00:00:02".into(),
                "Target network card mac 52:54:00:00:00:02 does not match source 52:54:00:00:00:01",
            ),
            (
                &|t| t.agent = false,
                "Target domain channel count 0 does not match source 1",
            ),
            (
                &|t| t.extra_args = vec!["-device".into(), "virtio-rng-pci".into()],
                "Target domain extra arguments [\"-device\", \"virtio-rng-pci\"] do not match source []",
            ),
        ];
        for (change, want) in cases {
            assert_eq!(check(change), Err(want.to_owned()));
        }
        // Host-side and boot details may change.
        assert_eq!(
            check(&|t| {
                t.disks[0].path = "/j/moved.img".into();
                t.cmdline = "quiet".into();
                t.metadata.insert("owner".into(), "ops".into());
                t.networks[0].backend = Some(Backend::Tap(Default::default()));
            }),
            Ok(())
        );
    }
}
