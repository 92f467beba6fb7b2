//! Confining a guest to its own files, as libvirt's DAC driver does.
//!
//! - [`confine_paths`]: every path a definition names must lie under a
//!   configured root once symlinks and `..` are resolved: kernel, initrd
//!   and disks under `image_roots`; `serial_log` in the domain's own serial
//!   dir (`STATE_DIR/serial/NAME/`) or under `serial_log_roots`. Checked at
//!   define and again at start (the config may have changed, a symlink may
//!   have been swapped); QEMU gets the resolved paths.
//! - [`qemu_credentials`]: the user and groups QEMU runs as.
//! - [`grant`] / [`restore`]: dynamic ownership. At start each read-write
//!   disk is given to QEMU's user (owner and, if needed, owner read/write
//!   bits); the original owner, group and mode, with the file's device and
//!   inode, are recorded in the domain's status file *before* the change,
//!   so a supervisor that dies between start and stop restores them on its
//!   next start. At stop (or a failed start) they are put back, but only on
//!   the same file (device and inode) still owned by QEMU's user: an owner
//!   changed meanwhile by someone else is left alone. Read-only files
//!   (kernel, initrd, read-only disks) are not changed: they must be
//!   readable by QEMU's user. The monitor and agent sockets, the QEMU log
//!   and the serial log are opened by the supervisor and passed as fds, so
//!   QEMU needs no access to the run, log or serial dirs.
//! - `guest_files` prepares what QEMU inherits (agent listener, serial
//!   log, tap devices) and plans the grants; `Manager::give_files` and
//!   `Manager::take_back_files` apply and undo them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use qvirt_proto::v1::DomainSpec;
use qvirt_proto::v1::network_spec::Backend;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::spec::SpecError;
use super::store::{self, DomainPaths};
use super::{DomainError, Entry, Manager, blocking};
use crate::config::Config;
use crate::launch::{self, Credentials};

/// Where a domain's files may be.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Dirs for kernel, initrd and disks.
    pub images: Vec<PathBuf>,
    /// The domain's own serial dir.
    pub serial_dir: PathBuf,
    /// Other dirs a serial log may be in.
    pub serial: Vec<PathBuf>,
}

impl Roots {
    /// The roots `config` allows for a domain whose serial dir is
    /// `serial_dir`.
    pub fn new(config: &Config, serial_dir: PathBuf) -> Self {
        Roots {
            images: config.image_roots(),
            serial_dir,
            serial: config.serial_log_roots.clone(),
        }
    }
}

/// `path` with symlinks and `..` resolved as far as it exists: the longest
/// existing prefix canonicalized, the rest appended (a `..` in that rest
/// is refused, since it cannot be resolved). Blocking.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut resolved) => {
                for part in rest.iter().rev() {
                    resolved.push(part);
                }
                return Ok(resolved);
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let last = existing.components().next_back();
                match last {
                    Some(Component::Normal(name)) => rest.push(name.to_owned()),
                    Some(Component::CurDir) => {}
                    Some(Component::ParentDir) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "\"..\" after a missing directory",
                        ));
                    }
                    _ => return Err(error),
                }
                if !existing.pop() {
                    return Err(error);
                }
            }
            Err(error) => return Err(error),
        }
    }
}

fn describe(dirs: &[PathBuf]) -> String {
    let names: Vec<String> = dirs
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    format!("[{}]", names.join(", "))
}

/// `path` resolved, if it lies strictly under one of `roots` (resolved
/// too); else a [`SpecError`] for `field` naming the roots as `what`.
fn under(field: &str, path: &str, roots: &[PathBuf], what: &str) -> Result<PathBuf, SpecError> {
    let bad = |reason: String| SpecError {
        field: field.to_owned(),
        reason,
    };
    // One answer for every path that is not under a root, whatever the
    // reason (missing, unreadable, a symlink elsewhere): the supervisor
    // resolves as root, and its errors must not tell a client what exists
    // on the host or where its links point.
    let outside = || bad(format!("{path:?} is outside {what} {}", describe(roots)));
    let resolved = resolve(Path::new(path)).map_err(|_| outside())?;
    for root in roots {
        let Ok(root) = resolve(root) else { continue };
        if resolved != root && resolved.starts_with(&root) {
            return Ok(resolved);
        }
    }
    Err(outside())
}

/// Check that every path `spec` names lies under `roots` and return the
/// spec with those paths resolved (for QEMU's command line). Blocking
/// (file-system look-ups).
pub fn confine_paths(spec: &DomainSpec, roots: &Roots) -> Result<DomainSpec, SpecError> {
    let mut out = spec.clone();
    let images = "the image roots (image_roots)";
    let text = |p: PathBuf| p.to_string_lossy().into_owned();
    if !spec.kernel.is_empty() {
        out.kernel = text(under("kernel", &spec.kernel, &roots.images, images)?);
    }
    if !spec.initrd.is_empty() {
        out.initrd = text(under("initrd", &spec.initrd, &roots.images, images)?);
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("disks[{i}].path");
        out.disks[i].path = text(under(&field, &disk.path, &roots.images, images)?);
    }
    if !spec.serial_log.is_empty() {
        let mut dirs = vec![roots.serial_dir.clone()];
        dirs.extend(roots.serial.iter().cloned());
        out.serial_log = text(under(
            "serial_log",
            &spec.serial_log,
            &dirs,
            "the domain's serial dir and serial_log_roots",
        )?);
    }
    Ok(out)
}

/// A refusal of a spec's extra arguments: `-sandbox` would override the
/// supervisor's sandbox (QEMU merges repeated `-sandbox` options).
pub fn check_extra_args(spec: &DomainSpec) -> Result<(), SpecError> {
    for (i, arg) in spec.extra_args.iter().enumerate() {
        if matches!(arg.as_str(), "-sandbox" | "--sandbox") {
            return Err(SpecError {
                field: format!("extra_args[{i}]"),
                reason: "-sandbox is set by the supervisor (qemu_sandbox)".into(),
            });
        }
    }
    Ok(())
}

/// Opens the resolved `path` beneath whichever of `roots` holds it
/// ([`launch::open_beneath`]): a directory on the way that was swapped for
/// a symlink since the path was checked makes the open fail instead of
/// reaching a file outside the roots. Blocking.
fn open_under(
    path: &Path,
    roots: &[PathBuf],
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    for root in roots {
        let Ok(root) = resolve(root) else { continue };
        let Ok(relative) = path.strip_prefix(&root) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&root)?;
        return launch::open_beneath(&dir, relative, flags, mode).map(File::from);
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "not under the configured roots",
    ))
}

/// Open (creating it, mode 0640) the serial log at the resolved `path`,
/// beneath one of `roots`, for QEMU to inherit: write-only, append, never
/// truncated, never through a symlink, a regular file only. Blocking.
pub fn open_serial_log(path: &Path, roots: &[PathBuf]) -> io::Result<File> {
    let file = open_under(
        path,
        roots,
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NONBLOCK,
        0o640,
    )?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Why QEMU's user could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// No such user.
    #[error("qemu_user {0:?} does not exist (`make deps` creates qvirt-qemu; or set qemu_user)")]
    NoUser(String),
    /// No such group.
    #[error("qemu_group {0:?} does not exist")]
    NoGroup(String),
    /// The look-up failed.
    #[error("looking up {0:?}")]
    Lookup(String, #[source] io::Error),
}

/// Who QEMU runs as: `qemu_user` (and `qemu_group`, else the user's
/// primary group; supplementary groups are the user's) when the supervisor
/// runs as root, else `None` (the supervisor's own user, logged).
/// Blocking (NSS look-ups).
pub fn qemu_credentials(config: &Config) -> Result<Option<Credentials>, CredentialsError> {
    if launch::effective_uid() != 0 {
        info!(
            uid = launch::effective_uid(),
            "the supervisor is not root: QEMU runs as the supervisor's own user"
        );
        return Ok(None);
    }
    let user = &config.qemu_user;
    let mut credentials = launch::lookup_user(user)
        .map_err(|e| CredentialsError::Lookup(user.clone(), e))?
        .ok_or_else(|| CredentialsError::NoUser(user.clone()))?;
    if !config.qemu_group.is_empty() {
        let group = &config.qemu_group;
        credentials.gid = launch::lookup_group(group)
            .map_err(|e| CredentialsError::Lookup(group.clone(), e))?
            .ok_or_else(|| CredentialsError::NoGroup(group.clone()))?;
    }
    if credentials.uid == 0 {
        warn!(user = %user, "QEMU runs as root (qemu_user): guests are not confined by user");
    } else {
        info!(user = %user, uid = credentials.uid, gid = credentials.gid, "QEMU runs as an unprivileged user");
    }
    Ok(Some(credentials))
}

/// A file given to QEMU's user, with what to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The resolved path.
    pub path: PathBuf,
    /// Its device, to recognise the same file at restore.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// The original owner.
    pub uid: u32,
    /// The original group.
    pub gid: u32,
    /// The original permission bits.
    pub mode: u32,
    /// The user it was given to.
    pub to_uid: u32,
}

/// `file`'s metadata if it is a regular file or block device.
fn owned_kind(file: File) -> io::Result<(File, std::fs::Metadata)> {
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ));
    }
    Ok((file, meta))
}

/// Open `path` for an ownership change: no symlink followed, no blocking
/// on a device, regular files and block devices only.
fn open_owned(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    owned_kind(file)
}

/// What giving `path` (resolved, beneath one of `roots`) to `owner` would
/// record, and the open file to do it with; `None` when there is nothing
/// to do (the file is missing, QEMU reports that, or already owned by
/// `owner`). A regular file with more than one link is refused: its other
/// name may be outside the roots. Blocking.
pub fn plan_grant(
    path: &Path,
    roots: &[PathBuf],
    owner: &Credentials,
) -> io::Result<Option<(File, Grant)>> {
    let opened = open_under(path, roots, libc::O_RDONLY | libc::O_NONBLOCK, 0).and_then(owned_kind);
    let (file, meta) = match opened {
        Ok(opened) => opened,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if meta.is_file() && meta.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file with more than one hard link is not lent to QEMU's user",
        ));
    }
    if meta.uid() == owner.uid && meta.mode() & 0o600 == 0o600 {
        return Ok(None);
    }
    let grant = Grant {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        to_uid: owner.uid,
    };
    Ok(Some((file, grant)))
}

/// Give the planned file to `owner` (owner and group, owner read/write).
/// Blocking.
pub fn grant(file: &File, grant: &Grant, owner: &Credentials) -> io::Result<()> {
    std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid))?;
    if grant.mode & 0o600 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(grant.mode | 0o600))?;
    }
    Ok(())
}

/// Put back what [`grant`] changed, if the file is still the same one and
/// still owned by the user it was given to. Blocking.
pub fn restore(grant: &Grant) -> io::Result<()> {
    let (file, meta) = match open_owned(&grant.path) {
        Ok(opened) => opened,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if (meta.dev(), meta.ino()) != (grant.dev, grant.ino) {
        warn!(path = %grant.path.display(), "file replaced since QEMU was given it; ownership left alone");
        return Ok(());
    }
    if meta.uid() != grant.to_uid {
        warn!(path = %grant.path.display(), uid = meta.uid(), "owner changed since QEMU was given it; left alone");
        return Ok(());
    }
    std::os::unix::fs::fchown(&file, Some(grant.uid), Some(grant.gid))?;
    file.set_permissions(std::fs::Permissions::from_mode(grant.mode))
}

/// Restore every grant, logging failures; returns the ones that failed
/// (to keep on record).
pub fn restore_all(grants: &[Grant]) -> Vec<Grant> {
    let mut failed = Vec::new();
    for g in grants {
        if let Err(error) = restore(g) {
            warn!(path = %g.path.display(), %error, "restoring the owner of a guest file failed");
            failed.push(g.clone());
        }
    }
    failed
}

impl Manager {
    /// Give QEMU's user the `planned` files: record their owners in the
    /// status file first (so a restarted supervisor still knows them),
    /// then change them. On a failure the records stay; the caller's
    /// abort (`take_back_files`) puts back what was changed.
    pub(super) async fn give_files(
        &self,
        entry: &Entry,
        name: &str,
        planned: Vec<(File, Grant)>,
    ) -> Result<(), DomainError> {
        let Some(owner) = self.inner.qemu.clone() else {
            return Ok(());
        };
        if planned.is_empty() {
            return Ok(());
        }
        let status = {
            let mut data = entry.data();
            data.status
                .granted
                .extend(planned.iter().map(|(_, g)| g.clone()));
            data.status.clone()
        };
        let store = self.inner.store.clone();
        let n = name.to_owned();
        blocking(move || store.save_status(&n, &status)).await?;
        let domain = name.to_owned();
        tokio::task::spawn_blocking(move || {
            for (file, planned) in &planned {
                grant(file, planned, &owner).map_err(|source| DomainError::Confine {
                    domain: domain.clone(),
                    what: format!("giving {} to QEMU's user", planned.path.display()),
                    source,
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| DomainError::Internal(format!("ownership task failed: {e}")))?
    }

    /// Put back the owners of the files given to QEMU's user (in memory
    /// and, by the caller's next status save, on disk). Failures are
    /// logged and the failed records kept.
    pub(super) async fn take_back_files(&self, entry: &Entry) {
        let granted = std::mem::take(&mut entry.data().status.granted);
        if granted.is_empty() {
            return;
        }
        let kept = match tokio::task::spawn_blocking(move || restore_all(&granted)).await {
            Ok(kept) => kept,
            Err(error) => {
                error!(domain = %entry.name(), %error, "ownership restore task failed");
                return;
            }
        };
        entry.data().status.granted.extend(kept);
    }
}

/// What QEMU gets besides its command line, prepared before the spawn.
pub(super) struct GuestFiles {
    /// The agent listener.
    pub agent: Option<OwnedFd>,
    /// The serial log, opened for append.
    pub serial: Option<File>,
    /// Read-write disks to give to QEMU's user.
    pub planned: Vec<(File, Grant)>,
    /// The tap devices, one per `tap` NIC in order.
    pub taps: Vec<OwnedFd>,
}

/// Bind the agent socket, open the serial log (creating the domain's
/// serial dir when the log is in it) and the tap devices, and plan the
/// ownership of the read-write disks of `spec` (paths already resolved)
/// for `owner`. Blocking.
pub(super) fn guest_files(
    spec: &qvirt_proto::v1::DomainSpec,
    paths: &DomainPaths,
    roots: &Roots,
    owner: Option<&Credentials>,
) -> Result<GuestFiles, DomainError> {
    let failed = |what: String| {
        let domain = spec.name.clone();
        move |source| DomainError::Confine {
            domain,
            what,
            source,
        }
    };
    // A domain's first start makes its run dir (define does not).
    store::create_dir(&paths.run_dir, 0o700)?;
    let agent = if spec.agent {
        Some(
            launch::bind_listener(&paths.agent_socket).map_err(failed(format!(
                "binding the agent socket {}",
                paths.agent_socket.display()
            )))?,
        )
    } else {
        None
    };
    let serial = if spec.serial_log.is_empty() {
        None
    } else {
        let path = std::path::Path::new(&spec.serial_log);
        let own_dir = resolve(&paths.serial_dir).ok();
        if own_dir.is_some() && path.parent() == own_dir.as_deref() {
            store::create_dir(&paths.serial_dir, 0o750)?;
        }
        let mut dirs = vec![roots.serial_dir.clone()];
        dirs.extend(roots.serial.iter().cloned());
        let opened = open_serial_log(path, &dirs).and_then(|file| {
            // Above 2, or the child's stdio would replace it (a supervisor
            // started with stdio closed); try_clone dups to at least 3.
            if file.as_raw_fd() > 2 {
                Ok(file)
            } else {
                file.try_clone()
            }
        });
        Some(opened.map_err(failed(format!("opening the serial log {}", path.display())))?)
    };
    let mut taps = Vec::new();
    for net in &spec.networks {
        if let Some(Backend::Tap(tap)) = &net.backend {
            taps.push(
                launch::open_tap(&tap.ifname)
                    .map_err(failed(format!("opening the tap device {}", tap.ifname)))?,
            );
        }
    }
    let mut planned = Vec::new();
    if let Some(owner) = owner {
        for disk in spec.disks.iter().filter(|d| !d.read_only) {
            let path = std::path::Path::new(&disk.path);
            if let Some(plan) = plan_grant(path, &roots.images, owner)
                .map_err(failed(format!("opening the disk {}", path.display())))?
            {
                planned.push(plan);
            }
        }
    }
    Ok(GuestFiles {
        agent,
        serial,
        planned,
        taps,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn roots(dir: &Path) -> Roots {
        Roots {
            images: vec![dir.join("images")],
            serial_dir: dir.join("serial/vm"),
            serial: vec![],
        }
    }

    #[test]
    fn test_resolve_follows_symlinks_and_dotdot_of_existing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("images")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("images/etc")).unwrap();
        assert_eq!(
            resolve(&base.join("images/etc/passwd")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            resolve(&base.join("images/../x/y.img")).unwrap(),
            base.join("x/y.img")
        );
        assert!(resolve(&base.join("missing/../y.img")).is_err());
    }

    #[test]
    fn test_paths_outside_the_roots_are_refused_naming_field_and_roots() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("images")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("images/etc")).unwrap();
        let r = roots(&base);
        let img = base.join("images/a.img").display().to_string();
        let cases = [
            (
                format!("disks: [{{path: {img}}}, {{path: /etc/shadow}}]"),
                "disks[1].path",
            ),
            (
                format!("disks: [{{path: {}/images/etc/shadow}}]", base.display()),
                "disks[0].path",
            ),
            (
                format!("disks: [{{path: {}/images/../b.img}}]", base.display()),
                "disks[0].path",
            ),
            (
                format!("disks: [{{path: {}/images}}]", base.display()),
                "disks[0].path",
            ),
            ("kernel: /boot/vmlinuz".to_owned(), "kernel"),
            (format!("kernel: {img}\ninitrd: /boot/initrd.img"), "initrd"),
            ("serial_log: /etc/motd".to_owned(), "serial_log"),
            (
                format!("serial_log: {}/serial/other/x.log", base.display()),
                "serial_log",
            ),
        ];
        for (yaml, field) in cases {
            let spec = DomainSpec::from_yaml(&format!("name: vm\n{yaml}")).unwrap();
            let err = confine_paths(&spec, &r).expect_err(&yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
            assert!(err.reason.contains("outside"), "{err}");
            let root = if field == "serial_log" {
                "serial/vm"
            } else {
                "images"
            };
            assert!(err.reason.contains(root), "{err}");
        }
        std::fs::create_dir(base.join("images/sub")).unwrap();
        let spec = DomainSpec::from_yaml(&format!(
            "name: vm\nkernel: {img}\ndisks: [{{path: {}/images/sub/../new.img}}]\nserial_log: {}/serial/vm/console.log",
            base.display(),
            base.display()
        ))
        .unwrap();
        let ok = confine_paths(&spec, &r).unwrap();
        assert_eq!(
            ok.disks[0].path,
            base.join("images/new.img").display().to_string()
        );
    }

    #[test]
    fn test_sandbox_in_extra_args_is_refused() {
        let spec =
            DomainSpec::from_yaml("name: vm\nextra_args: [\"-m\", \"64\", \"-sandbox\", \"off\"]")
                .unwrap();
        assert_eq!(check_extra_args(&spec).unwrap_err().field, "extra_args[2]");
    }

    #[test]
    fn test_serial_log_is_appended_never_truncated_nor_followed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "kept\n").unwrap();
        {
            use std::io::Write;
            let mut f = open_serial_log(&log, &[dir.path().to_owned()]).unwrap();
            f.write_all(b"more\n").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "kept\nmore\n");
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&log, &link).unwrap();
        assert!(open_serial_log(&link, &[dir.path().to_owned()]).is_err());
        // Outside the roots given: refused, nothing created.
        let other = tempfile::tempdir().unwrap();
        let outside = other.path().join("new.log");
        assert!(open_serial_log(&outside, &[dir.path().to_owned()]).is_err());
        assert!(!outside.exists());
    }

    /// A directory inside a root swapped for a symlink to elsewhere after
    /// the path was checked (a race a user who can write under a root
    /// could try): the serial log is not created there and the disk there
    /// is not lent to QEMU's user; a hard-linked disk is refused too.
    #[test]
    fn test_opens_refuse_a_directory_swapped_for_a_symlink_and_hard_links() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("victim.img");
        std::fs::write(&target, b"secret").unwrap();
        // The checked path was ROOT/sub/victim.img; sub is now a symlink.
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("sub")).unwrap();
        let roots = [root.path().canonicalize().unwrap()];
        let checked = roots[0].join("sub/victim.img");
        let owner = Credentials {
            uid: 4242,
            gid: 4343,
            groups: vec![],
        };
        let err = plan_grant(&checked, &roots, &owner).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        let err = open_serial_log(&roots[0].join("sub/new.log"), &roots).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert!(!elsewhere.path().join("new.log").exists());
        // A second name for a file (here inside the root; it could be
        // outside) makes it unfit to lend.
        let disk = roots[0].join("d.img");
        std::fs::write(&disk, b"x").unwrap();
        std::fs::hard_link(&disk, roots[0].join("d2.img")).unwrap();
        let err = plan_grant(&disk, &roots, &owner).unwrap_err();
        assert!(err.to_string().contains("hard link"), "{err}");
    }

    #[test]
    fn test_grant_and_restore_round_trip_and_respect_later_changes() {
        if launch::effective_uid() != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, b"x").unwrap();
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o400)).unwrap();
        let owner = Credentials {
            uid: 4242,
            gid: 4343,
            groups: vec![],
        };
        let roots = [dir.path().canonicalize().unwrap()];
        let (file, g) = plan_grant(&disk, &roots, &owner).unwrap().unwrap();
        grant(&file, &g, &owner).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (4242, 4343, 0o600)
        );
        assert!(plan_grant(&disk, &roots, &owner).unwrap().is_none());
        restore(&g).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, 0, 0o400));
        // Owner changed by someone else meanwhile: left alone.
        grant(&file, &g, &owner).unwrap();
        std::os::unix::fs::chown(&disk, Some(777), None).unwrap();
        restore(&g).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 777);
        // A missing file is nothing to do.
        assert!(
            plan_grant(&roots[0].join("none"), &roots, &owner)
                .unwrap()
                .is_none()
        );
    }
}
