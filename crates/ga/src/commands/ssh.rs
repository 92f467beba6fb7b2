//! guest-ssh-get-authorized-keys, guest-ssh-add-authorized-keys and
//! guest-ssh-remove-authorized-keys as qemu-ga 7.2 does them on Linux:
//! `~USER/.ssh/authorized_keys` read as lines split on `\n`, written back
//! whole (a temporary file renamed over it) owned by the user with mode
//! 0600, `~/.ssh` created 0700 and owned by the user when missing.
//!
//! The user comes from the password file (`/etc/passwd`; a parameter of
//! the `*_in` functions, so tests use their own): a static agent cannot
//! load NSS modules, so other NSS sources (LDAP, sssd) are not consulted.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use qvirt_qga::unicode::{lossy, to_mod_utf8};
use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::strerror;

/// The system password file.
pub const PASSWD: &str = "/etc/passwd";

/// An authorized_keys file larger than this is refused (qemu-ga reads any
/// size; the agent's replies are bounded).
pub const MAX_AUTHKEYS_BYTES: u64 = 16 << 20;

/// What the commands need of a password-file entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PwEntry {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory, as written in the file.
    pub dir: Vec<u8>,
}

/// Looks `name` up in the password file `passwd` (the first entry with
/// that name), with qemu-ga's error: "failed to lookup user 'X': Success"
/// when there is none (GLib reports errno 0).
pub fn lookup_user(passwd: &Path, name: &str) -> Result<PwEntry, QgaError> {
    let fail = |why: String| QgaError::generic(format!("failed to lookup user '{name}': {why}"));
    let text = std::fs::read(passwd).map_err(|e| fail(strerror(&e)))?;
    let want = to_mod_utf8(name);
    if want.is_empty() {
        return Err(fail("Success".into()));
    }
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b':').collect();
        if fields.len() < 7 || fields[0] != &want[..] {
            continue;
        }
        let num = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
        let (Some(uid), Some(gid)) = (num(fields[2]), num(fields[3])) else {
            continue;
        };
        return Ok(PwEntry {
            uid,
            gid,
            dir: fields[5].to_vec(),
        });
    }
    Err(fail("Success".into()))
}

/// `g_build_filename(dir, ".ssh", ...)`.
fn ssh_dir(home: &[u8]) -> Vec<u8> {
    let trimmed = {
        let mut end = home.len();
        while end > 0 && home[end - 1] == b'/' {
            end -= 1;
        }
        &home[..end]
    };
    let mut out = if home.is_empty() {
        Vec::new()
    } else {
        let mut v = trimmed.to_vec();
        v.push(b'/');
        v
    };
    out.extend_from_slice(b".ssh");
    out
}

fn as_path(bytes: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

fn show(path: &[u8]) -> String {
    lossy(path)
}

/// `check_openssh_pub_key`: not a comment, no newline.
fn check_keys(keys: &[String]) -> Result<(), QgaError> {
    for k in keys {
        if k.starts_with('#') || k.contains('\n') {
            return Err(QgaError::generic(format!(
                "invalid OpenSSH public key: '{k}'"
            )));
        }
    }
    Ok(())
}

/// `g_file_get_contents` then `g_strsplit(.., "\n", -1)` on the C string
/// (up to a NUL); GLib's message inside qemu-ga's "failed to read".
fn read_authkeys(path: &[u8]) -> Result<Vec<Vec<u8>>, QgaError> {
    let p = show(path);
    let fail = |glib: String| QgaError::generic(format!("failed to read '{p}': {glib}"));
    let file = std::fs::File::open(as_path(path)).map_err(|e| {
        fail(format!(
            "Failed to open file \u{201C}{p}\u{201D}: {}",
            strerror(&e)
        ))
    })?;
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    let mut content = Vec::new();
    use std::io::Read;
    file.take(MAX_AUTHKEYS_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(|e| {
            let what = if regular {
                "Failed to read from file"
            } else {
                "Error reading file"
            };
            fail(format!("{what} \u{201C}{p}\u{201D}: {}", strerror(&e)))
        })?;
    if content.len() as u64 > MAX_AUTHKEYS_BYTES {
        return Err(fail(format!(
            "file is larger than {MAX_AUTHKEYS_BYTES} bytes"
        )));
    }
    if let Some(nul) = content.iter().position(|&b| b == 0) {
        content.truncate(nul);
    }
    if content.is_empty() {
        return Ok(Vec::new());
    }
    Ok(content.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect())
}

/// `write_authkeys`: the lines joined with `\n` (no final newline),
/// written atomically, then owned by the user and made 0600.
fn write_authkeys(path: &[u8], keys: &[Vec<u8>], pw: &PwEntry) -> Result<(), QgaError> {
    let p = show(path);
    let contents = keys.join(&b'\n');
    let target = as_path(path);
    let mut tmp = path.to_vec();
    tmp.extend_from_slice(format!(".qvirt-{}", std::process::id()).as_bytes());
    let tmp_path = as_path(&tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp_path)?;
        f.write_all(&contents)?;
        f.sync_all()?;
        std::fs::rename(tmp_path, target)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp_path);
        return Err(QgaError::generic(format!(
            "failed to write to '{p}': Failed to write file \u{201C}{p}\u{201D}: {}",
            strerror(&e)
        )));
    }
    std::os::unix::fs::chown(target, Some(pw.uid), Some(pw.gid)).map_err(|e| {
        QgaError::generic(format!(
            "failed to set ownership of directory '{p}': {}",
            strerror(&e)
        ))
    })?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        QgaError::generic(format!(
            "failed to set permissions of '{p}': {}",
            strerror(&e)
        ))
    })
}

/// `mkdir_for_user`: `~/.ssh` with `mode`, owned by the user.
fn mkdir_for_user(path: &[u8], pw: &PwEntry, mode: u32) -> Result<(), QgaError> {
    let p = show(path);
    let dir = as_path(path);
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(|e| {
            QgaError::generic(format!(
                "failed to create directory '{p}': {}",
                strerror(&e)
            ))
        })?;
    std::os::unix::fs::chown(dir, Some(pw.uid), Some(pw.gid)).map_err(|e| {
        QgaError::generic(format!(
            "failed to set ownership of directory '{p}': {}",
            strerror(&e)
        ))
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        QgaError::generic(format!(
            "failed to set permissions of directory '{p}': {}",
            strerror(&e)
        ))
    })
}

fn authkeys_path(ssh: &[u8]) -> Vec<u8> {
    let mut v = ssh.to_vec();
    v.extend_from_slice(b"/authorized_keys");
    v
}

/// guest-ssh-get-authorized-keys `{username}`.
pub fn get(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let username = args.str("username")?;
    args.done()?;
    let keys = get_in(Path::new(PASSWD), &username)?;
    let mut d = Dict::new();
    d.insert(
        "keys",
        Value::Array(keys.into_iter().map(Value::String).collect()),
    );
    Ok(Some(Value::Object(d)))
}

/// The keys of `username`: lines stripped of ASCII white space, blank
/// lines and comments left out, in reverse file order (qemu-ga prepends
/// each to its list).
pub fn get_in(passwd: &Path, username: &str) -> Result<Vec<String>, QgaError> {
    let pw = lookup_user(passwd, username)?;
    let lines = read_authkeys(&authkeys_path(&ssh_dir(&pw.dir)))?;
    let mut keys: Vec<String> = lines
        .iter()
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty() && l[0] != b'#')
        .map(lossy)
        .collect();
    keys.reverse();
    Ok(keys)
}

/// guest-ssh-add-authorized-keys `{username, keys, reset?}`.
pub fn add(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let username = args.str("username")?;
    let keys = args.str_list("keys")?;
    let reset = args.opt_bool("reset")?.unwrap_or(false);
    args.done()?;
    add_in(Path::new(PASSWD), &username, &keys, reset)?;
    Ok(None)
}

/// Appends the keys not already there (or, with `reset`, replaces the
/// file with them), creating `~/.ssh` if needed.
pub fn add_in(passwd: &Path, username: &str, keys: &[String], reset: bool) -> Result<(), QgaError> {
    check_keys(keys)?;
    let pw = lookup_user(passwd, username)?;
    let ssh = ssh_dir(&pw.dir);
    let path = authkeys_path(&ssh);
    let existing = if reset {
        None
    } else {
        read_authkeys(&path).ok()
    };
    if existing.is_none() && !as_path(&ssh).is_dir() {
        mkdir_for_user(&ssh, &pw, 0o700)?;
    }
    let mut lines = existing.unwrap_or_default();
    for k in keys {
        let k = to_mod_utf8(k);
        if !lines.iter().any(|l| l[..] == k[..]) {
            lines.push(k.into_owned());
        }
    }
    write_authkeys(&path, &lines, &pw)
}

/// guest-ssh-remove-authorized-keys `{username, keys}`.
pub fn remove(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let username = args.str("username")?;
    let keys = args.str_list("keys")?;
    args.done()?;
    remove_in(Path::new(PASSWD), &username, &keys)?;
    Ok(None)
}

/// Drops every line equal to one of `keys`; no file, nothing to do.
pub fn remove_in(passwd: &Path, username: &str, keys: &[String]) -> Result<(), QgaError> {
    check_keys(keys)?;
    let pw = lookup_user(passwd, username)?;
    let path = authkeys_path(&ssh_dir(&pw.dir));
    if std::fs::metadata(as_path(&path)).is_err() {
        return Ok(());
    }
    let keys: Vec<_> = keys.iter().map(|k| to_mod_utf8(k)).collect();
    let lines: Vec<Vec<u8>> = read_authkeys(&path)?
        .into_iter()
        .filter(|l| !keys.iter().any(|k| k[..] == l[..]))
        .collect();
    write_authkeys(&path, &lines, &pw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    struct Home {
        _dir: tempfile::TempDir,
        passwd: std::path::PathBuf,
        home: std::path::PathBuf,
    }

    fn home() -> Home {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("alice");
        std::fs::create_dir(&home).expect("mkdir");
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            format!(
                "root:x:0:0:root:/root:/bin/sh\nalice:x:4242:4243::{}/:/bin/sh\n",
                home.display()
            ),
        )
        .expect("passwd");
        Home {
            _dir: dir,
            passwd,
            home,
        }
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_lookup_user_from_the_password_file() {
        let h = home();
        let pw = lookup_user(&h.passwd, "alice").expect("alice");
        assert_eq!((pw.uid, pw.gid), (4242, 4243));
        for name in ["bob", "", "alice:x", "ali"] {
            let e = lookup_user(&h.passwd, name).expect_err(name);
            assert_eq!(e.desc, format!("failed to lookup user '{name}': Success"));
        }
        assert_eq!(ssh_dir(b"/home/a//"), b"/home/a/.ssh");
        assert_eq!(ssh_dir(b"/"), b"/.ssh");
        assert_eq!(ssh_dir(b""), b".ssh");
    }

    #[test]
    fn test_add_get_remove_as_qemu_ga() {
        let h = home();
        let file = h.home.join(".ssh/authorized_keys");
        let e = get_in(&h.passwd, "alice").expect_err("no file");
        assert_eq!(
            e.desc,
            format!(
                "failed to read '{0}': Failed to open file \u{201C}{0}\u{201D}: No such file or directory",
                file.display()
            )
        );
        // Removing from a missing file does nothing, creates nothing.
        remove_in(&h.passwd, "alice", &keys(&["k1"])).expect("remove");
        assert!(!h.home.join(".ssh").exists());
        // Duplicates are added once; an empty key is a key.
        add_in(&h.passwd, "alice", &keys(&["k1", "k2", "k1", ""]), false).expect("add");
        assert_eq!(std::fs::read(&file).expect("read"), b"k1\nk2\n");
        let ssh = std::fs::metadata(h.home.join(".ssh")).expect("stat");
        assert_eq!(
            (ssh.mode() & 0o7777, ssh.uid(), ssh.gid()),
            (0o700, 4242, 4243)
        );
        let f = std::fs::metadata(&file).expect("stat");
        assert_eq!((f.mode() & 0o7777, f.uid(), f.gid()), (0o600, 4242, 4243));
        // Reverse order, stripped, no blanks or comments.
        std::fs::write(&file, "k1\n  # c\n\tk2 x \n\n").expect("write");
        assert_eq!(get_in(&h.passwd, "alice"), Ok(keys(&["k2 x", "k1"])));
        add_in(&h.passwd, "alice", &keys(&["k3"]), true).expect("reset");
        assert_eq!(std::fs::read(&file).expect("read"), b"k3");
        remove_in(&h.passwd, "alice", &keys(&["k3"])).expect("remove");
        assert_eq!(std::fs::read(&file).expect("read"), b"");
        assert_eq!(get_in(&h.passwd, "alice"), Ok(vec![]));
        // Invalid keys are refused before the user is looked up.
        let e = add_in(&h.passwd, "nobody", &keys(&["ok", "#c"]), false).expect_err("key");
        assert_eq!(e.desc, "invalid OpenSSH public key: '#c'");
        let e = remove_in(&h.passwd, "nobody", &keys(&["a\nb"])).expect_err("key");
        assert_eq!(e.desc, "invalid OpenSSH public key: 'a\nb'");
    }
}
