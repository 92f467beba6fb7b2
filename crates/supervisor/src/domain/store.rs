//! Where domains live on disk.
//!
//! - `STATE_DIR/domains/NAME.yaml`: the definition, a YAML `DomainSpec`
//!   (the same format `qvirtctl define` reads), with every default filled,
//!   after a comment line recording when it was first defined.
//! - `STATE_DIR/logs/NAME.log`: QEMU's stdout and stderr.
//! - `STATE_DIR/serial/NAME/`: the domain's own dir for its serial log.
//! - `STATE_DIR/save/` (mode 0700): `NAME.save`, the guest's state as
//!   SaveDomain had QEMU write it (QEMU's migration stream), and
//!   `NAME.yaml`, the definition it was saved with (a `DomainSpec`, after
//!   a comment line recording when), written after the image: a record
//!   without its image is never seen.
//! - `RUN_DIR/NAME/` (mode 0700, made by the domain's first start: a
//!   domain that never ran has none): `status.yaml` (state, reason, pid,
//!   process identity, socket paths, times, files given to QEMU's user),
//!   `monitor.sock`, `agent.sock`.
//! - `STATE_DIR/trash/` and `RUN_DIR/`[`RUN_TRASH_NAME`] (mode 0700): what
//!   an undefine moved away, deleted after it has answered (and at start).
//!
//! Every file is written atomically: a temp file in the same dir, then
//! rename over the old one, so a crash of the supervisor leaves the old or
//! the new content, never a mix (the next start removes the temp file). Definitions (the state dir) are also made
//! durable: fsync the file before the rename and the dir after it, so a
//! power loss cannot lose a defined domain. Status files (the run dir) skip
//! both fsyncs: they describe live QEMU processes, which a power loss or
//! reboot ends anyway (the run dir is meant to be a tmpfs like /run, where
//! fsync does nothing), while a killed supervisor loses nothing that the
//! page cache holds. That saves two disk flushes on every state change,
//! about half of the start path's own time on a disk-backed run dir.
//! Removals (undefine) rename into the trash without fsyncing the dir, as
//! libvirt unlinks without one:
//! a power loss right after an undefine can bring back the definition
//! (a shut-off domain to undefine again), never lose one; the unlink
//! reaches the disk with the file system's next journal commit, or with
//! the next define's dir fsync, whichever comes first. The
//! functions here block (file I/O): the service calls them through
//! `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use qvirt_proto::v1::DomainSpec;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::launch::{MONITOR_SOCKET_NAME, ProcessIdentity};

/// The run dir's trash: longer than any domain name may be, so no
/// domain's run dir can be named so.
pub const RUN_TRASH_NAME: &str =
    ".undefined-domains-run-dirs-the-supervisor-removes-in-the-background";
const _: () = assert!(RUN_TRASH_NAME.len() > super::spec::MAX_NAME_BYTES);

/// File name of the status file inside a domain's run dir.
pub const STATUS_FILE_NAME: &str = "status.yaml";
/// File name of the agent socket inside a domain's run dir.
pub const AGENT_SOCKET_NAME: &str = "agent.sock";

/// A QEMU log larger than this at start is rotated to `NAME.log.1` (one
/// old file kept), so logs stay bounded at about twice this size.
pub const QEMU_LOG_ROTATE_BYTES: u64 = 1024 * 1024;

/// The leading comment of a definition file that records when the
/// domain was first defined (ms since the epoch).
const CREATE_TIME_PREFIX: &str = "# qvirt create_time_ms: ";

/// The same comment as written before the field was named `create_time`
/// (still read).
const OLD_CREATE_TIME_PREFIX: &str = "# qvirt defined_at_ms: ";

/// The comment of a definition file written by a DefineDomain call with
/// a request id: its fingerprint (32 hex digits) and the id. It lets a
/// retry after a crash that came between the definition and the id's own
/// record (`STATE_DIR/requests/`) be answered, not refused.
const REQUEST_PREFIX: &str = "# qvirt define_request: ";

/// The DefineDomain call a definition file was written by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMark {
    /// Its request id (printable ASCII, at most 128 bytes).
    pub id: String,
    /// Its fingerprint (`request_ids::digest` of the request).
    pub fingerprint: u128,
}

/// The request comment of a definition file, if present.
fn request_of(text: &str) -> Option<RequestMark> {
    let rest = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(REQUEST_PREFIX))?;
    let (fingerprint, id) = rest.split_once(' ')?;
    Some(RequestMark {
        id: id.to_owned(),
        fingerprint: u128::from_str_radix(fingerprint, 16).ok()?,
    })
}

/// The `create_time` comment of a definition file, if present.
fn create_time_of(text: &str) -> Option<SystemTime> {
    let line = text.lines().next()?;
    let ms: u64 = line
        .strip_prefix(CREATE_TIME_PREFIX)
        .or_else(|| line.strip_prefix(OLD_CREATE_TIME_PREFIX))?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Errors of the store, named after the step.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating a directory failed.
    #[error("creating {path}")]
    CreateDir {
        /// The dir.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing a file atomically failed.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Removing a file failed.
    #[error("removing {path}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Listing the definitions failed.
    #[error("reading {path}")]
    ReadDir {
        /// The dir.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Serializing a record failed.
    #[error("encoding {what} as YAML")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// The error.
        #[source]
        source: serde_yaml::Error,
    },
}

/// A failure of the filesystem under a dir that the operator can fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirProblem {
    /// No space (or quota) left.
    Full,
    /// Mounted read-only.
    ReadOnly,
}

impl std::fmt::Display for DirProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirProblem::Full => "full",
            DirProblem::ReadOnly => "read-only",
        })
    }
}

impl StoreError {
    /// The file or dir of the failed step, and its I/O error.
    fn io(&self) -> Option<(&Path, &io::Error)> {
        match self {
            StoreError::CreateDir { path, source }
            | StoreError::Write { path, source }
            | StoreError::Remove { path, source }
            | StoreError::ReadDir { path, source } => Some((path, source)),
            StoreError::Encode { .. } => None,
        }
    }

    /// The file or dir of the failed step.
    pub fn path(&self) -> Option<&Path> {
        self.io().map(|(path, _)| path)
    }

    /// Whether the step failed because the filesystem is full or
    /// read-only (rather than for a reason only the log can tell).
    pub fn dir_problem(&self) -> Option<DirProblem> {
        let (_, error) = self.io()?;
        match error.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Some(DirProblem::Full),
            io::ErrorKind::ReadOnlyFilesystem => Some(DirProblem::ReadOnly),
            _ => None,
        }
    }
}

/// A domain's runtime status, as kept in `RUN_DIR/NAME/status.yaml`.
/// `state` and `reason` are `DomainState` / `DomainStateReason` numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Status {
    /// `DomainState` number.
    pub state: i32,
    /// `DomainStateReason` number.
    pub reason: i32,
    /// QEMU's pid while it runs, else 0.
    pub pid: u32,
    /// QEMU's identity (start time, cmdline) while it runs.
    pub identity: Option<ProcessIdentity>,
    /// The monitor socket while QEMU runs.
    pub monitor_socket: String,
    /// The agent socket while QEMU runs with an agent.
    pub agent_socket: String,
    /// When QEMU was started, ms since the epoch.
    #[serde(alias = "started_at_ms")]
    pub start_time_ms: Option<u64>,
    /// When state or reason last changed, ms since the epoch.
    #[serde(alias = "state_changed_at_ms")]
    pub state_change_time_ms: Option<u64>,
    /// Files given to QEMU's user, with their original owner and mode
    /// (recorded before the change, restored at stop).
    pub granted: Vec<super::confine::Grant>,
}

/// A definition read back at start.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The stored spec.
    pub spec: DomainSpec,
    /// The runtime status, if a status file exists.
    pub status: Option<Status>,
    /// When the definition file was created.
    pub create_time: SystemTime,
    /// When it was last written.
    pub update_time: SystemTime,
    /// Its saved image, if any.
    pub saved: Option<Saved>,
    /// The DefineDomain call with a request id that wrote it, if any.
    pub request: Option<RequestMark>,
}

/// A saved image of a domain (SaveDomain) and the definition it was
/// saved with.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// `STATE_DIR/save/NAME.save`.
    pub image: PathBuf,
    /// The definition QEMU ran with when it was saved.
    pub spec: DomainSpec,
}

/// The leading comment of a saved image's record: when it was saved (ms
/// since the epoch).
const SAVED_TIME_PREFIX: &str = "# qvirt saved_time_ms: ";

/// One domain's paths.
#[derive(Debug, Clone)]
pub struct DomainPaths {
    /// `RUN_DIR/NAME`.
    pub run_dir: PathBuf,
    /// `RUN_DIR/NAME/monitor.sock`.
    pub monitor_socket: PathBuf,
    /// `RUN_DIR/NAME/agent.sock`.
    pub agent_socket: PathBuf,
    /// `STATE_DIR/logs/NAME.log`.
    pub qemu_log: PathBuf,
    /// `STATE_DIR/serial/NAME`: the domain's own dir for its serial log.
    pub serial_dir: PathBuf,
}

/// The on-disk layout under the state and run dirs.
#[derive(Debug, Clone)]
pub struct Store {
    state_dir: PathBuf,
    run_dir: PathBuf,
}

pub(crate) fn create_dir(path: &Path, mode: u32) -> Result<(), StoreError> {
    let err = |source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

/// Write `data` to `path` atomically and durably: temp file in the same
/// dir, fsync, rename, fsync the dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    write_replace(path, data, true)
}

/// Write `data` to `path` atomically: temp file in the same dir, rename;
/// with `durable`, fsync the file before the rename and the dir after
/// (without, it survives a crash of this process, not a power loss).
pub fn write_replace(path: &Path, data: &[u8], durable: bool) -> Result<(), StoreError> {
    let err = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| err(io::Error::other("no parent dir")))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(data)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Renames `from` to `to` unless `from` does not exist; where `to` is
/// on another file system (a dir mounted over part of the state dir),
/// deletes `from` in place instead.
fn move_if_exists(from: &Path, to: &Path) -> Result<(), StoreError> {
    let moved = match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices && from.is_dir() => {
            fs::remove_dir_all(from)
        }
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => fs::remove_file(from),
        moved => moved,
    };
    match moved {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Remove {
            path: from.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Remove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

impl Store {
    /// A store over `state_dir` and `run_dir`; [`Store::init`] creates them.
    pub fn new(state_dir: &Path, run_dir: &Path) -> Self {
        Store {
            state_dir: state_dir.to_owned(),
            run_dir: run_dir.to_owned(),
        }
    }

    /// Create the dirs (state subdirs 0755, run dir 0700).
    pub fn init(&self) -> Result<(), StoreError> {
        create_dir(&self.domains_dir(), 0o755)?;
        create_dir(&self.state_dir.join("logs"), 0o750)?;
        create_dir(&self.state_dir.join("serial"), 0o750)?;
        create_dir(&self.run_dir, 0o700)?;
        create_dir(&self.trash_dir(), 0o700)?;
        create_dir(&self.run_trash_dir(), 0o700)?;
        self.sweep_temp_files();
        self.empty_trash();
        Ok(())
    }

    /// Remove the temp files (`*.tmp-*`) a crash left between writing and
    /// renaming: definitions, saved images (which can be as large as the
    /// guest's memory) and status files. Only this supervisor uses the
    /// dirs (it holds their lock), so none is being written now.
    fn sweep_temp_files(&self) {
        let mut dirs = vec![self.domains_dir(), self.save_dir()];
        if let Ok(entries) = fs::read_dir(&self.run_dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_temp = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.contains(".tmp-"))
                    && entry.file_type().is_ok_and(|t| t.is_file());
                if !is_temp {
                    continue;
                }
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed a temp file an earlier crash left")
                    }
                    Err(error) => {
                        warn!(path = %path.display(), %error, "cannot remove a temp file an earlier crash left")
                    }
                }
            }
        }
    }

    /// `STATE_DIR/save`, where saved images live.
    pub fn save_dir(&self) -> PathBuf {
        self.state_dir.join("save")
    }

    /// The image SaveDomain writes for domain `name`.
    pub fn saved_image_path(&self, name: &str) -> PathBuf {
        self.save_dir().join(format!("{name}.save"))
    }

    fn saved_record_path(&self, name: &str) -> PathBuf {
        self.save_dir().join(format!("{name}.yaml"))
    }

    /// Create a new temp file for an image of `name` in the save dir
    /// (made 0700 if needed), mode 0600, and return it with its path.
    pub fn create_saved_image(&self, name: &str) -> Result<(File, PathBuf), StoreError> {
        create_dir(&self.save_dir(), 0o700)?;
        let path = self
            .save_dir()
            .join(format!("{name}.save.tmp-{}", uuid::Uuid::new_v4().simple()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Write {
                path: path.clone(),
                source,
            })?;
        Ok((file, path))
    }

    /// Make the image in `tmp` (written through `file`) domain `name`'s
    /// saved image, with the definition `spec`: fsync it, rename it over
    /// the previous one, then write the record, and fsync the dir.
    pub fn commit_saved_image(
        &self,
        name: &str,
        file: &File,
        tmp: &Path,
        spec: &DomainSpec,
    ) -> Result<Saved, StoreError> {
        let image = self.saved_image_path(name);
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Write { path, source }
        };
        file.sync_all().map_err(write_err(tmp))?;
        fs::rename(tmp, &image).map_err(write_err(&image))?;
        let text = spec.to_yaml().map_err(|source| StoreError::Encode {
            what: "saved definition",
            source,
        })?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let text = format!("{SAVED_TIME_PREFIX}{ms}\n{text}");
        write_atomic(&self.saved_record_path(name), text.as_bytes())?;
        Ok(Saved {
            image,
            spec: spec.clone(),
        })
    }

    /// Domain `name`'s saved image, if both it and its record are there
    /// and the record reads as a definition of that name.
    pub fn load_saved(&self, name: &str) -> Option<Saved> {
        let record = self.saved_record_path(name);
        let image = self.saved_image_path(name);
        let text = match fs::read_to_string(&record) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(error) => {
                warn!(path = %record.display(), %error, "unreadable saved-image record ignored");
                return None;
            }
        };
        if !image.is_file() {
            warn!(path = %image.display(), "saved-image record without its image ignored");
            return None;
        }
        match DomainSpec::from_yaml(&text) {
            Ok(spec) if spec.name == name => Some(Saved { image, spec }),
            Ok(_) => {
                warn!(path = %record.display(), "saved-image record of another domain ignored");
                None
            }
            Err(error) => {
                warn!(path = %record.display(), %error, "invalid saved-image record ignored");
                None
            }
        }
    }

    /// Remove domain `name`'s saved image and its record (record first).
    pub fn remove_saved(&self, name: &str) -> Result<(), StoreError> {
        remove_if_exists(&self.saved_record_path(name))?;
        remove_if_exists(&self.saved_image_path(name))
    }

    fn domains_dir(&self) -> PathBuf {
        self.state_dir.join("domains")
    }

    fn spec_path(&self, name: &str) -> PathBuf {
        self.domains_dir().join(format!("{name}.yaml"))
    }

    /// The paths of domain `name`.
    pub fn paths(&self, name: &str) -> DomainPaths {
        let run_dir = self.run_dir.join(name);
        DomainPaths {
            monitor_socket: run_dir.join(MONITOR_SOCKET_NAME),
            agent_socket: run_dir.join(AGENT_SOCKET_NAME),
            qemu_log: self.state_dir.join("logs").join(format!("{name}.log")),
            serial_dir: self.state_dir.join("serial").join(name),
            run_dir,
        }
    }

    /// Rotate domain `name`'s QEMU log if it has grown past
    /// [`QEMU_LOG_ROTATE_BYTES`] (called before each start).
    pub fn rotate_log(&self, name: &str) -> Result<(), StoreError> {
        let log = self.paths(name).qemu_log;
        match fs::metadata(&log) {
            Ok(meta) if meta.len() > QEMU_LOG_ROTATE_BYTES => {
                let mut old = log.clone().into_os_string();
                old.push(".1");
                fs::rename(&log, &old).map_err(|source| StoreError::Write { path: log, source })
            }
            _ => Ok(()),
        }
    }

    /// Bound a running QEMU's log: past [`QEMU_LOG_ROTATE_BYTES`], copy it
    /// to `NAME.log.1` and truncate it in place (QEMU keeps its descriptor,
    /// opened `O_APPEND`, so it goes on writing at the new end). What QEMU
    /// writes between the copy and the truncation is lost, as with
    /// logrotate's `copytruncate`. Returns whether it trimmed.
    pub fn trim_log(&self, name: &str) -> Result<bool, StoreError> {
        let log = self.paths(name).qemu_log;
        match fs::metadata(&log) {
            Ok(meta) if meta.len() > QEMU_LOG_ROTATE_BYTES => {}
            _ => return Ok(false),
        }
        let mut old = log.clone().into_os_string();
        old.push(".1");
        let old = PathBuf::from(old);
        let mut tmp = old.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        fs::copy(&log, &tmp).map_err(|source| StoreError::Write {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &old).map_err(|source| StoreError::Write {
            path: old.clone(),
            source,
        })?;
        fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .and_then(|f| f.set_len(0))
            .map_err(|source| StoreError::Write { path: log, source })?;
        Ok(true)
    }

    /// Persist a definition; `create_time` goes in a leading comment line
    /// (YAML ignores it), so it survives updates, which replace the file.
    pub fn save_spec(&self, spec: &DomainSpec, create_time: SystemTime) -> Result<(), StoreError> {
        let text = spec.to_yaml().map_err(|source| StoreError::Encode {
            what: "domain spec",
            source,
        })?;
        self.save_spec_yaml(&spec.name, &text, create_time, None)
    }

    /// [`Store::save_spec`] of domain `name` whose spec is already `yaml`
    /// (its [`DomainSpec::to_yaml`]), recording the DefineDomain call
    /// `request` that wrote it.
    pub fn save_spec_yaml(
        &self,
        name: &str,
        yaml: &str,
        create_time: SystemTime,
        request: Option<&RequestMark>,
    ) -> Result<(), StoreError> {
        let ms = create_time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let request = request
            .map(|r| format!("{REQUEST_PREFIX}{:032x} {}\n", r.fingerprint, r.id))
            .unwrap_or_default();
        let text = format!("{CREATE_TIME_PREFIX}{ms}\n{request}{yaml}");
        write_atomic(&self.spec_path(name), text.as_bytes())
    }

    /// Remove a definition, its saved image and the domain's run dir:
    /// each is renamed into a trash dir on its own file system (saved
    /// image record first), which [`Store::empty_trash`] empties later.
    /// A rename only changes directory entries, where an unlink of a
    /// file whose blocks are allocated (the fsynced definition, a saved
    /// image of guest memory) also frees them: on ext4 about 4 times the
    /// rename's time for a definition. The renames are not fsynced (see
    /// the module docs).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let trash = self.trash_dir();
        move_if_exists(
            &self.saved_record_path(name),
            &trash.join(format!("{tag}.saved.yaml")),
        )?;
        move_if_exists(
            &self.saved_image_path(name),
            &trash.join(format!("{tag}.save")),
        )?;
        move_if_exists(&self.spec_path(name), &trash.join(format!("{tag}.yaml")))?;
        move_if_exists(&self.run_dir.join(name), &self.run_trash_dir().join(tag))
    }

    /// Delete what [`Store::remove`] moved to the trash dirs (and what a
    /// crash left there). Failures are logged: what stays is tried again
    /// next time.
    pub fn empty_trash(&self) {
        for dir in [self.trash_dir(), self.run_trash_dir()] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match removed {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        warn!(path = %path.display(), error = %e, "cannot remove an undefined domain's file");
                    }
                    _ => {}
                }
            }
        }
    }

    /// `STATE_DIR/trash`: undefined domains' definitions and saved images
    /// until [`Store::empty_trash`].
    fn trash_dir(&self) -> PathBuf {
        self.state_dir.join("trash")
    }

    /// `RUN_DIR/RUN_TRASH_NAME`: undefined domains' run dirs until
    /// [`Store::empty_trash`].
    fn run_trash_dir(&self) -> PathBuf {
        self.run_dir.join(RUN_TRASH_NAME)
    }

    /// Persist a domain's runtime status (creating its run dir, 0700),
    /// atomically but without fsync (see the module docs).
    pub fn save_status(&self, name: &str, status: &Status) -> Result<(), StoreError> {
        let dir = self.run_dir.join(name);
        create_dir(&dir, 0o700)?;
        let text = serde_yaml::to_string(status).map_err(|source| StoreError::Encode {
            what: "domain status",
            source,
        })?;
        write_replace(&dir.join(STATUS_FILE_NAME), text.as_bytes(), false)
    }

    fn load_status(&self, name: &str) -> Option<Status> {
        let path = self.run_dir.join(name).join(STATUS_FILE_NAME);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(error) => {
                warn!(path = %path.display(), %error, "unreadable status file ignored");
                return None;
            }
        };
        match serde_yaml::from_str(&text) {
            Ok(status) => Some(status),
            Err(error) => {
                warn!(path = %path.display(), %error, "invalid status file ignored");
                None
            }
        }
    }

    /// Read every definition (and its status). A file that cannot be read
    /// or parsed, or whose `name` is not its file name, is logged and
    /// skipped, so one bad file does not stop the supervisor.
    pub fn load_all(&self) -> Result<Vec<Loaded>, StoreError> {
        let dir = self.domains_dir();
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut loaded = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file_name.strip_suffix(".yaml") else {
                continue;
            };
            let limit = qvirt_proto::yaml::MAX_YAML_BYTES as u64;
            if let Ok(meta) = entry.metadata()
                && meta.len() > limit
            {
                warn!(path = %path.display(), bytes = meta.len(), limit, "definition file too large; skipped unread");
                continue;
            }
            let read = fs::read_to_string(&path).map_err(|e| e.to_string());
            let recorded_create_time = read.as_ref().ok().and_then(|t| create_time_of(t));
            let request = read.as_ref().ok().and_then(|t| request_of(t));
            let spec = read.and_then(|t| DomainSpec::from_yaml(&t).map_err(|e| e.to_string()));
            let spec = match spec {
                Ok(spec) if spec.name == stem => spec,
                Ok(spec) => {
                    warn!(path = %path.display(), name = %spec.name, "definition name differs from its file name; skipped");
                    continue;
                }
                Err(error) => {
                    warn!(path = %path.display(), %error, "unreadable definition skipped");
                    continue;
                }
            };
            let meta = entry.metadata().ok();
            let update_time = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .unwrap_or_else(SystemTime::now);
            let create_time = recorded_create_time
                .or_else(|| meta.as_ref().and_then(|m| m.created().ok()))
                .unwrap_or(update_time);
            let status = self.load_status(stem);
            let saved = self.load_saved(stem);
            loaded.push(Loaded {
                spec,
                status,
                create_time,
                update_time,
                saved,
                request,
            });
        }
        loaded.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(name: &str) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            uuid: uuid::Uuid::new_v4().to_string(),
            memory_mib: 128,
            ..Default::default()
        }
    }

    #[test]
    fn test_specs_and_status_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        store.save_spec(&spec("b"), SystemTime::now()).unwrap();
        let a = spec("a x");
        let defined = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        store.save_spec(&a, defined).unwrap();
        let status = Status {
            state: 1,
            reason: 101,
            pid: 42,
            identity: Some(ProcessIdentity {
                pid: 42,
                start_time: 7,
                cmdline: vec!["qemu".into()],
            }),
            monitor_socket: "/run/m.sock".into(),
            ..Default::default()
        };
        store.save_status("a x", &status).unwrap();
        let mode = fs::metadata(dir.path().join("run/a x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].spec, a);
        assert_eq!(loaded[0].create_time, defined);
        assert_eq!(loaded[0].status.as_ref(), Some(&status));
        assert!(loaded[1].status.is_none());

        store.remove("a x").unwrap();
        assert!(!dir.path().join("run/a x").exists());
        assert_eq!(store.load_all().unwrap().len(), 1);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("state/domains"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b.yaml"]);
    }

    #[test]
    fn test_bad_and_misnamed_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        let domains = dir.path().join("state/domains");
        fs::write(domains.join("junk.yaml"), "name: junk\nbogus: 1\n").unwrap();
        fs::write(domains.join("other.yaml"), "name: notother\n").unwrap();
        fs::write(domains.join("ok.yaml.tmp-123"), "name: ok\n").unwrap();
        store.save_spec(&spec("ok"), SystemTime::now()).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].spec.name, "ok");
    }

    #[test]
    fn test_init_removes_the_temp_files_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        store.save_spec(&spec("ok"), SystemTime::now()).unwrap();
        let (_, image) = store.create_saved_image("ok").unwrap();
        let domains = dir.path().join("state/domains");
        fs::write(domains.join("ok.yaml.tmp-123"), "name: ok\n").unwrap();
        fs::create_dir_all(dir.path().join("run/ok")).unwrap();
        let status_tmp = dir.path().join("run/ok/status.yaml.tmp-9");
        fs::write(&status_tmp, "").unwrap();
        let kept = dir.path().join("run/ok/status.yaml");
        fs::write(&kept, "").unwrap();

        store.init().unwrap();
        assert!(!image.exists(), "{}", image.display());
        assert!(!status_tmp.exists());
        assert!(kept.exists());
        let names: Vec<_> = fs::read_dir(&domains)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ok.yaml"]);
    }

    #[test]
    fn test_big_log_is_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        let log = store.paths("v").qemu_log;
        store.rotate_log("v").unwrap();
        fs::write(&log, b"small").unwrap();
        store.rotate_log("v").unwrap();
        assert!(log.exists());
        let big = vec![b'x'; usize::try_from(QEMU_LOG_ROTATE_BYTES).unwrap() + 1];
        fs::write(&log, big).unwrap();
        store.rotate_log("v").unwrap();
        assert!(!log.exists());
        assert!(dir.path().join("state/logs/v.log.1").exists());
    }

    #[test]
    fn test_a_growing_log_is_copied_and_truncated_under_its_writer() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        let log = store.paths("v").qemu_log;
        // The writer QEMU would be: one O_APPEND descriptor for its life.
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writer.write_all(b"small").unwrap();
        assert!(!store.trim_log("v").unwrap());
        let big = vec![b'x'; usize::try_from(QEMU_LOG_ROTATE_BYTES).unwrap()];
        writer.write_all(&big).unwrap();
        assert!(store.trim_log("v").unwrap());
        let old = fs::read(dir.path().join("state/logs/v.log.1")).unwrap();
        assert_eq!(old.len(), big.len() + 5);
        assert!(old.starts_with(b"small"));
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        writer.write_all(b"after").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"after");
        assert!(!store.trim_log("v").unwrap());
    }

    #[test]
    fn test_full_and_read_only_filesystems_are_told_apart() {
        let err = |e: io::ErrorKind| StoreError::Write {
            path: "/s/domains/a.yaml".into(),
            source: io::Error::from(e),
        };
        assert_eq!(
            err(io::ErrorKind::StorageFull).dir_problem(),
            Some(DirProblem::Full)
        );
        assert_eq!(
            err(io::ErrorKind::ReadOnlyFilesystem).dir_problem(),
            Some(DirProblem::ReadOnly)
        );
        assert_eq!(err(io::ErrorKind::PermissionDenied).dir_problem(), None);
        assert_eq!(
            err(io::ErrorKind::StorageFull).path(),
            Some(Path::new("/s/domains/a.yaml"))
        );
    }

    #[test]
    fn test_an_oversized_definition_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        let spec = DomainSpec {
            name: "ok".into(),
            ..DomainSpec::default()
        };
        store.save_spec(&spec, SystemTime::now()).unwrap();
        let big = format!(
            "name: big\n# {}\n",
            "x".repeat(qvirt_proto::yaml::MAX_YAML_BYTES)
        );
        fs::write(dir.path().join("state/domains/big.yaml"), big).unwrap();
        let names: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|l| l.spec.name)
            .collect();
        assert_eq!(names, ["ok"]);
    }

    #[test]
    fn test_files_written_under_the_old_time_names_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        fs::write(
            dir.path().join("state/domains/old.yaml"),
            "# qvirt defined_at_ms: 1700000000123\nname: old\n",
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("run/old")).unwrap();
        fs::write(
            dir.path().join("run/old").join(STATUS_FILE_NAME),
            "state: 1\nstarted_at_ms: 5\nstate_changed_at_ms: 6\n",
        )
        .unwrap();
        let loaded = store.load_all().unwrap();
        let want = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(loaded[0].create_time, want);
        let status = loaded[0].status.as_ref().unwrap();
        assert_eq!(
            (status.start_time_ms, status.state_change_time_ms),
            (Some(5), Some(6))
        );
        // Written back under the new names.
        store.save_spec(&loaded[0].spec, want).unwrap();
        let text = fs::read_to_string(dir.path().join("state/domains/old.yaml")).unwrap();
        assert!(
            text.starts_with("# qvirt create_time_ms: 1700000000123\n"),
            "{text}"
        );
    }

    #[test]
    fn test_remove_moves_everything_to_the_trash_and_empty_trash_deletes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
        store.init().unwrap();
        let spec = DomainSpec {
            name: "gone".into(),
            ..Default::default()
        };
        store.save_spec(&spec, SystemTime::now()).unwrap();
        store.save_status("gone", &Status::default()).unwrap();
        fs::create_dir_all(store.save_dir()).unwrap();
        fs::write(store.saved_image_path("gone"), b"image").unwrap();
        fs::write(store.saved_record_path("gone"), b"name: gone\n").unwrap();
        // Another domain's files stay.
        store
            .save_spec(
                &DomainSpec {
                    name: "kept".into(),
                    ..Default::default()
                },
                SystemTime::now(),
            )
            .unwrap();
        store.remove("gone").unwrap();
        let count = |p: PathBuf| fs::read_dir(p).unwrap().count();
        assert!(!dir.path().join("state/domains/gone.yaml").exists());
        assert!(!dir.path().join("run/gone").exists());
        assert!(!store.saved_image_path("gone").exists());
        assert!(!store.saved_record_path("gone").exists());
        assert_eq!(count(store.trash_dir()), 3, "definition, image, record");
        assert_eq!(count(store.run_trash_dir()), 1);
        let loaded: Vec<String> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|l| l.spec.name)
            .collect();
        assert_eq!(loaded, ["kept"]);
        // Removing what does not exist is no error.
        store.remove("never").unwrap();
        store.empty_trash();
        assert_eq!(count(store.trash_dir()), 0);
        assert_eq!(count(store.run_trash_dir()), 0);
        assert!(dir.path().join("state/domains/kept.yaml").exists());
        // What a crash left in the trash goes at the next start.
        fs::write(store.trash_dir().join("left.yaml"), b"x").unwrap();
        fs::create_dir(store.run_trash_dir().join("left")).unwrap();
        store.init().unwrap();
        assert_eq!(count(store.trash_dir()), 0);
        assert_eq!(count(store.run_trash_dir()), 0);
    }

    #[test]
    fn test_write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
