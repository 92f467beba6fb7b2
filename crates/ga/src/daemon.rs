//! `-d`: forking into the background as qemu-ga's `become_daemon` does,
//! and the pidfile, written and locked as `qemu_write_pidfile` does.

use std::path::Path;

use crate::{GaError, commands, log};

/// Forks into the background as qemu-ga's `become_daemon`: the child
/// writes and locks the pidfile (a second agent with the same pidfile
/// exits 1 with qemu-ga's message), starts a session, `chdir /`, umask 077,
/// stdio to /dev/null.
pub fn daemonize(pidfile: Option<&Path>) -> Result<(), GaError> {
    // SAFETY: the process is still single-threaded here; the parent exits
    // at once without touching shared state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(GaError::Daemonize(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: plain exit of the parent.
        unsafe { libc::_exit(0) };
    }
    if let Some(pidfile) = pidfile {
        write_pidfile(pidfile).map_err(|e| {
            log::critical(&e.to_string());
            GaError::Pidfile(e.source)
        })?;
    }
    // SAFETY: plain syscalls on our own process.
    unsafe {
        libc::setsid();
        libc::umask(0o077);
    }
    let null = std::env::set_current_dir("/")
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        })
        .map_err(GaError::Daemonize)?;
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    Ok(())
}

/// A pidfile that could not be written or locked, in qemu-ga's words
/// ("Cannot lock pid file: Resource temporarily unavailable").
#[derive(Debug, thiserror::Error)]
#[error("{what}: {}", commands::strerror(.source))]
pub struct PidfileError {
    what: String,
    source: std::io::Error,
}

/// qemu_write_pidfile: open (0600, no truncation), `lockf(F_TLOCK)`, then
/// truncate and write the pid. The descriptor stays open (and the lock
/// held) for the life of the process.
pub fn write_pidfile(pidfile: &Path) -> Result<(), PidfileError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    fn fail(what: &str) -> impl FnOnce(std::io::Error) -> PidfileError + '_ {
        move |source| PidfileError {
            what: what.to_owned(),
            source,
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(pidfile)
        .map_err(fail(&format!("Cannot open pid file {}", pidfile.display())))?;
    // SAFETY: lockf on our own open descriptor.
    if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } < 0 {
        return Err(fail("Cannot lock pid file")(std::io::Error::last_os_error()));
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(fail("Failed to write pid file"))?;
    // Keep the lock: the descriptor is never closed.
    std::mem::forget(file);
    Ok(())
}
