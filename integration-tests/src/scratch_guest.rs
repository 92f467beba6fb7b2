//! A scratch guest for the guest-agent commands that change the system
//! (CPUs, memory blocks, passwords, SSH keys): an agent started through
//! [`ScratchGuest::wrapper`] runs in a private mount namespace (`unshare
//! -m`, as root) where `/etc` is a copy of the host's plus a user `alice`
//! (uid 4242, gid 4243, home `/home/alice`), `/home` is scratch, and
//! `/sys/devices/system/cpu` and `/sys/devices/system/memory` are small
//! fake trees. The agent sees the real paths, so two agents over two
//! scratch guests answer byte for byte alike; nothing on the host
//! changes (the real `chpasswd` rewrites the copy's `/etc/shadow`).
//!
//! The fake CPUs: `cpu0` (no `online` file: cannot go offline), `cpu1`
//! online, `cpu2` offline. The fake memory
//! blocks: `memory0` online, `memory1` offline and removable, `memory2`
//! without `state`; blocks of 128 MiB.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The mounts, then `exec` of the rest of the command line with `PATH`
/// set to the second argument. `/sys/power/state` reads empty inside, so
/// no suspend command can suspend the host.
const NS_SCRIPT: &str = r#"t=$1; p=$2; shift 2
mount --bind "$t/etc" /etc &&
mount --bind "$t/home" /home &&
mount --bind "$t/cpu" /sys/devices/system/cpu &&
mount --bind "$t/mem" /sys/devices/system/memory &&
{ [ ! -e /sys/power/state ] || mount --bind "$t/power-state" /sys/power/state; } &&
export PATH="$p" &&
exec "$@""#;

/// The scratch user's name, uid and gid.
pub const USER: (&str, u32, u32) = ("alice", 4242, 4243);

/// `PATH` for an agent in the scratch guest (chpasswd is in sbin).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One scratch guest's files; removed on drop.
pub struct ScratchGuest {
    dir: tempfile::TempDir,
}

impl ScratchGuest {
    /// Builds the tree (copies `/etc`).
    pub fn new() -> ScratchGuest {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        let out = Command::new("cp")
            .arg("-a")
            .arg("/etc")
            .arg(t.join("etc"))
            .output()
            .expect("cp");
        assert!(out.status.success(), "cp -a /etc: {out:?}");
        let append = |file: &str, line: &str| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(t.join("etc").join(file))
                .expect("open");
            writeln!(f, "{line}").expect("append");
        };
        let (user, uid, gid) = USER;
        append(
            "passwd",
            &format!("{user}:x:{uid}:{gid}::/home/{user}:/bin/sh"),
        );
        append("shadow", &format!("{user}:!:19000:0:99999:7:::"));
        append("group", &format!("{user}:x:{gid}:"));
        std::fs::create_dir_all(t.join("home").join(user)).expect("home");
        let write = |rel: &str, text: &str| {
            let p = t.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        };
        std::fs::create_dir_all(t.join("cpu/cpu0")).expect("cpu0");
        write("cpu/cpu1/online", "1\n");
        write("cpu/cpu2/online", "0\n");
        write("mem/block_size_bytes", "8000000\n");
        write("mem/memory0/state", "online\n");
        write("mem/memory1/state", "offline\n");
        write("mem/memory1/removable", "1\n");
        std::fs::create_dir_all(t.join("mem/memory2")).expect("memory2");
        write("power-state", "");
        ScratchGuest { dir }
    }

    /// A file of the tree, by its path relative to the tree (`etc/shadow`,
    /// `home/alice/.ssh`, `cpu/cpu1/online`, `mem/memory0/state`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The program and arguments to put before an agent's command line:
    /// they set the namespace up and exec the agent (same pid) with `PATH`
    /// set to `path` (for example [`PATH`]).
    pub fn wrapper(&self, path: &str) -> Vec<OsString> {
        let mut w: Vec<OsString> = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            NS_SCRIPT,
            "sh",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        w.push(self.dir.path().as_os_str().to_owned());
        w.push(path.into());
        w
    }

    /// An executable script in the tree that runs `agent` with its own
    /// arguments inside the scratch guest (for harnesses that take one
    /// program path), `PATH` set to [`PATH`].
    pub fn wrapper_script(&self, agent: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let quote = |s: &OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
        let words: Vec<String> = self.wrapper(PATH).iter().map(|w| quote(w)).collect();
        let script = format!(
            "#!/bin/sh\nexec {} {} \"$@\"\n",
            words.join(" "),
            quote(agent.as_os_str())
        );
        let path = self.path("agent.sh");
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    /// The password field of `user` in the tree's `/etc/shadow`.
    pub fn shadow_hash(&self, user: &str) -> String {
        let text = std::fs::read_to_string(self.path("etc/shadow")).unwrap_or_default();
        text.lines()
            .find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(user)).then(|| f.next().unwrap_or("").to_owned())
            })
            .unwrap_or_default()
    }
}

impl Default for ScratchGuest {
    fn default() -> Self {
        Self::new()
    }
}
