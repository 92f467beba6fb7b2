//! Which hook scripts exist: `HOOKS_DIR/DRIVER` and `HOOKS_DIR/DRIVER.d/*`,
//! as libvirt's `virHookInitialize` and `virHookCall` find them.
//!
//! A hook is what `stat()` (symlinks followed) reports as a regular file
//! with at least one execute bit. The main script runs first, then the
//! `.d` entries in byte order of their names; `.d` is not recursed into and
//! dot-files count. Everything else present (non-executable files,
//! directories, dangling symlinks) is skipped and listed for diagnosis.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use qvirt_proto::v1::HookDriver;

/// A hook driver: the name of its main script and `.d` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    /// `daemon`: the service's own start, shutdown and reload.
    Daemon,
    /// `qemu`: QEMU domains.
    Qemu,
    /// `network`: virtual networks.
    Network,
    /// `lxc`: LXC containers.
    Lxc,
    /// `libxl`: Xen domains.
    Libxl,
}

impl Driver {
    /// Every driver, in `HookDriver` order.
    pub const ALL: [Driver; 5] = [
        Driver::Daemon,
        Driver::Qemu,
        Driver::Network,
        Driver::Lxc,
        Driver::Libxl,
    ];

    /// The script name (`qemu` for `HOOKS_DIR/qemu` and `HOOKS_DIR/qemu.d/`).
    pub fn name(self) -> &'static str {
        match self {
            Driver::Daemon => "daemon",
            Driver::Qemu => "qemu",
            Driver::Network => "network",
            Driver::Lxc => "lxc",
            Driver::Libxl => "libxl",
        }
    }

    /// The protobuf value.
    pub fn proto(self) -> HookDriver {
        match self {
            Driver::Daemon => HookDriver::Daemon,
            Driver::Qemu => HookDriver::Qemu,
            Driver::Network => HookDriver::Network,
            Driver::Lxc => HookDriver::Lxc,
            Driver::Libxl => HookDriver::Libxl,
        }
    }

    /// The driver of a protobuf value; `None` for UNSPECIFIED.
    pub fn from_proto(d: HookDriver) -> Option<Driver> {
        match d {
            HookDriver::Unspecified => None,
            HookDriver::Daemon => Some(Driver::Daemon),
            HookDriver::Qemu => Some(Driver::Qemu),
            HookDriver::Network => Some(Driver::Network),
            HookDriver::Lxc => Some(Driver::Lxc),
            HookDriver::Libxl => Some(Driver::Libxl),
        }
    }
}

/// The hooks of one driver found by one scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverHooks {
    /// The driver.
    pub driver: Driver,
    /// Executable scripts in run order: main first, then `.d/` by name.
    pub scripts: Vec<PathBuf>,
    /// Entries present but not run (not executable, not a regular file,
    /// dangling symlink, a `DRIVER.d` that cannot be opened).
    pub skipped: Vec<PathBuf>,
    /// A `DRIVER.d` that exists but cannot be opened (a regular file, no
    /// permission): libvirt's error text, `cannot open directory 'PATH':
    /// REASON`. libvirt's hook call then fails after the main script.
    pub dir_error: Option<String>,
}

impl DriverHooks {
    /// Whether there is at least one script to run.
    pub fn active(&self) -> bool {
        !self.scripts.is_empty()
    }
}

/// The result of one discovery over every driver.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// When it ran.
    pub at: SystemTime,
    /// Whether the hooks directory was there.
    pub dir_exists: bool,
    /// One entry per driver, in [`Driver::ALL`] order.
    pub drivers: Vec<DriverHooks>,
}

impl Discovery {
    /// Scans `hooks_dir` for every driver. Blocking (a few `stat` calls):
    /// call it from `spawn_blocking` in async code.
    pub fn scan(hooks_dir: &Path) -> Discovery {
        Discovery {
            at: SystemTime::now(),
            dir_exists: hooks_dir.is_dir(),
            drivers: Driver::ALL
                .iter()
                .map(|&d| scan_driver(hooks_dir, d))
                .collect(),
        }
    }

    /// What was found for `driver`.
    pub fn driver(&self, driver: Driver) -> Option<&DriverHooks> {
        self.drivers.iter().find(|d| d.driver == driver)
    }
}

/// What one directory entry is, for hook purposes.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// A regular file (after following symlinks) with an execute bit.
    Hook,
    /// Present but not a hook.
    Skipped,
    /// Not there at all.
    Absent,
}

fn classify(path: &Path) -> Entry {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Entry::Hook,
        Ok(_) => Entry::Skipped,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symlink is present, if useless.
            if std::fs::symlink_metadata(path).is_ok() {
                Entry::Skipped
            } else {
                Entry::Absent
            }
        }
        Err(_) => Entry::Skipped,
    }
}

/// Scans the hooks of one driver now: the main script, then `DRIVER.d/`.
pub fn scan_driver(hooks_dir: &Path, driver: Driver) -> DriverHooks {
    let mut found = DriverHooks {
        driver,
        scripts: Vec::new(),
        skipped: Vec::new(),
        dir_error: None,
    };
    let mut add = |path: PathBuf| match classify(&path) {
        Entry::Hook => found.scripts.push(path),
        Entry::Skipped => found.skipped.push(path),
        Entry::Absent => {}
    };
    add(hooks_dir.join(driver.name()));
    let dot_d = hooks_dir.join(format!("{}.d", driver.name()));
    match std::fs::read_dir(&dot_d) {
        Ok(entries) => {
            let mut names: Vec<OsString> = entries
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                add(dot_d.join(name));
            }
        }
        // No DRIVER.d: only the main script (a dangling symlink is no
        // directory either, nothing to list).
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // Present but unreadable (EACCES, ENOTDIR, ...): its scripts cannot
        // run, and libvirt's call fails (`virDirOpenIfExists` ignores only
        // ENOENT).
        Err(e) => {
            tracing::warn!(
                driver = driver.name(),
                path = %dot_d.display(),
                error = %e,
                "cannot read the hook directory: calls of this driver fail"
            );
            found.dir_error = Some(format!(
                "cannot open directory '{}': {}",
                dot_d.display(),
                crate::exec::os_error_text(&e)
            ));
            found.skipped.push(dot_d);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;

    use super::*;

    fn script(path: &Path, mode: u32) {
        fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn test_main_first_then_dot_d_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("qemu.d");
        fs::create_dir(&d).unwrap();
        script(&dir.path().join("qemu"), 0o755);
        for name in ["a-lower", "10-a", "B-upper", "9-b", ".hidden"] {
            script(&d.join(name), 0o700);
        }
        let found = scan_driver(dir.path(), Driver::Qemu);
        let names: Vec<_> = found
            .scripts
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "qemu",
                "qemu.d/.hidden",
                "qemu.d/10-a",
                "qemu.d/9-b",
                "qemu.d/B-upper",
                "qemu.d/a-lower"
            ]
        );
        assert!(found.skipped.is_empty());
    }

    #[test]
    fn test_non_executables_dirs_and_dangling_links_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("qemu.d");
        fs::create_dir(&d).unwrap();
        script(&dir.path().join("qemu"), 0o644);
        script(&d.join("plain"), 0o644);
        script(&d.join("other-x"), 0o601);
        fs::create_dir(d.join("sub")).unwrap();
        script(&d.join("sub/inner"), 0o755);
        std::os::unix::fs::symlink(d.join("other-x"), d.join("link")).unwrap();
        std::os::unix::fs::symlink(d.join("missing"), d.join("dangling")).unwrap();
        let found = scan_driver(dir.path(), Driver::Qemu);
        assert_eq!(found.scripts, [d.join("link"), d.join("other-x")]);
        assert_eq!(
            found.skipped,
            [
                dir.path().join("qemu"),
                d.join("dangling"),
                d.join("plain"),
                d.join("sub")
            ]
        );
        assert!(found.active());
    }

    /// A DRIVER.d that is a file (ENOTDIR) or unreadable (EACCES, when not
    /// root) is listed as skipped, not silently taken as empty.
    #[test]
    fn test_unreadable_dot_d_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        script(&dir.path().join("qemu"), 0o755);
        script(&dir.path().join("qemu.d"), 0o755);
        let found = scan_driver(dir.path(), Driver::Qemu);
        assert_eq!(found.scripts, [dir.path().join("qemu")]);
        assert_eq!(found.skipped, [dir.path().join("qemu.d")]);
        assert_eq!(
            found.dir_error,
            Some(format!(
                "cannot open directory '{}': Not a directory",
                dir.path().join("qemu.d").display()
            ))
        );

        let d = dir.path().join("lxc.d");
        fs::create_dir(&d).unwrap();
        script(&d.join("hook"), 0o755);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o000)).unwrap();
        let found = scan_driver(dir.path(), Driver::Lxc);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid(2) only reads the caller's credentials.
        if unsafe { libc::geteuid() } != 0 {
            assert!(found.scripts.is_empty());
            assert_eq!(found.skipped, [d]);
        }
    }

    #[test]
    fn test_missing_dir_has_no_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let found = Discovery::scan(&dir.path().join("absent"));
        assert_eq!(found.drivers.len(), 5);
        assert!(found.drivers.iter().all(|d| !d.active()));
        assert!(!found.driver(Driver::Network).unwrap().active());
    }
}
