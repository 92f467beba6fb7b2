//! guest-set-user-password as qemu-ga 7.2 does it on Linux: the base64
//! password decoded, `USER:PASSWORD\n` written to the stdin of `chpasswd`
//! (found in `PATH`; `-e` when the password is already crypted), run in
//! its own session with stdout and stderr on /dev/null.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use qvirt_qga::QgaError;
use qvirt_qga::unicode::to_mod_utf8;

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::with_errno;

/// GLib's search path when `PATH` is unset.
const DEFAULT_PATH: &str = "/bin:/usr/bin:.";

/// `g_find_program_in_path`: the first executable regular file named
/// `program` in the directories of `path` (an empty entry is the current
/// directory).
pub fn find_program_in_path(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    std::env::split_paths(path).find_map(|dir| {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        let regular = std::fs::metadata(&candidate).is_ok_and(|m| !m.is_dir());
        (regular && crate::sys::is_executable(&candidate)).then_some(candidate)
    })
}

/// guest-set-user-password `{username, password, crypted}`.
pub fn set_user_password(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    let username = args.str("username")?;
    let password = args.str("password")?;
    let crypted = args.bool("crypted")?;
    args.done()?;
    let path = std::env::var_os("PATH");
    set_in(&username, &password, crypted, path.as_deref())?;
    Ok(None)
}

/// The `chpasswd` input for `username` and the base64 `password`, with
/// qemu-ga's checks (the password is a C string: it ends at a NUL).
pub fn chpasswd_input(username: &str, password: &str) -> Result<Vec<u8>, QgaError> {
    let mut raw = crate::b64::decode(password)?;
    if let Some(nul) = raw.iter().position(|&b| b == 0) {
        raw.truncate(nul);
    }
    if raw.contains(&b'\n') {
        return Err(QgaError::generic("forbidden characters in raw password"));
    }
    let user = to_mod_utf8(username);
    if user.contains(&b'\n') || user.contains(&b':') {
        return Err(QgaError::generic("forbidden characters in username"));
    }
    let mut data = user.into_owned();
    data.push(b':');
    data.extend_from_slice(&raw);
    data.push(b'\n');
    Ok(data)
}

/// Sets the password with the `chpasswd` found in `path`.
pub fn set_in(
    username: &str,
    password: &str,
    crypted: bool,
    path: Option<&OsStr>,
) -> Result<(), QgaError> {
    use std::os::unix::process::CommandExt;
    let data = chpasswd_input(username, password)?;
    let Some(program) = find_program_in_path("chpasswd", path) else {
        return Err(QgaError::generic("cannot find 'passwd' program in PATH"));
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.arg0("chpasswd")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    if crypted {
        cmd.arg("-e");
    }
    let failed = || QgaError::generic("child process has failed to set user password");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // qemu-ga forks, and a failed exec is the child's exit status 1.
        Err(e)
            if e.raw_os_error()
                .is_some_and(|n| n != libc::EAGAIN && n != libc::ENOMEM) =>
        {
            return Err(failed());
        }
        Err(e) => return Err(with_errno("failed to create child process", &e)),
    };
    let wrote = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(&data),
        None => Ok(()),
    };
    if let Err(e) = wrote {
        // qemu-ga returns here and leaves the child to its SIGCHLD
        // handling; reap it so no zombie stays.
        let _ = child.wait();
        return Err(with_errno("cannot write new account password", &e));
    }
    let status = child.wait().map_err(|e| {
        with_errno(
            &format!("failed to wait for child (pid: {})", child.id()),
            &e,
        )
    })?;
    match status.code() {
        None => Err(QgaError::generic("child process has terminated abnormally")),
        Some(0) => Ok(()),
        Some(_) => Err(failed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_chpasswd_input_checks() {
        assert_eq!(
            chpasswd_input("alice", "c2VjcmV0").as_deref(),
            Ok(&b"alice:secret\n"[..])
        );
        // The password ends at a NUL, as a C string.
        assert_eq!(
            chpasswd_input("a", "YQBiCg==").as_deref(),
            Ok(&b"a:a\n"[..])
        );
        let err = |u: &str, p: &str| chpasswd_input(u, p).expect_err("error").desc;
        assert_eq!(err("a", "!!"), "Base64 data contains invalid characters");
        assert_eq!(err("a", "YQo="), "forbidden characters in raw password");
        assert_eq!(err("a:b", "YQ=="), "forbidden characters in username");
        assert_eq!(err("a\nb", "YQ=="), "forbidden characters in username");
    }

    #[test]
    fn test_chpasswd_missing_or_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = set_in("a", "YQ==", false, Some(dir.path().as_os_str())).expect_err("none");
        assert_eq!(e.desc, "cannot find 'passwd' program in PATH");
        // A chpasswd that reads its input and fails, as the real one does
        // for an unknown user.
        let script = dir.path().join("chpasswd");
        std::fs::write(
            &script,
            "#!/bin/sh\ncat > \"$0.in\"\necho \"$@\" > \"$0.args\"\nexit 1\n",
        )
        .expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = set_in("bob", "YQ==", true, Some(dir.path().as_os_str())).expect_err("fails");
        assert_eq!(e.desc, "child process has failed to set user password");
        assert_eq!(
            std::fs::read(dir.path().join("chpasswd.in")).expect("in"),
            b"bob:a\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("chpasswd.args")).expect("args"),
            b"-e\n"
        );
    }
}
