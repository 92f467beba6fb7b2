//! `-d`: forking into the background as qemu-ga's `become_daemon` does,
//! and the pidfile, written and locked as `qemu_write_pidfile` does.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Mutex;

use crate::{GaError, commands, log, sys};

/// The locked pidfiles, open (and so locked) for the life of the process.
static PIDFILES: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Forks into the background as qemu-ga's `become_daemon`: the child
/// writes and locks the pidfile (a second agent with the same pidfile
/// exits 1 with qemu-ga's message), starts a session, `chdir /`, umask 077,
/// stdio to /dev/null.
pub fn daemonize(pidfile: Option<&Path>) -> Result<(), GaError> {
    sys::fork_to_background().map_err(GaError::Daemonize)?;
    if let Some(pidfile) = pidfile {
        write_pidfile(pidfile).map_err(|e| {
            log::critical(&e.to_string());
            GaError::Pidfile(e.source)
        })?;
    }
    sys::setsid().map_err(GaError::Daemonize)?;
    sys::umask(0o077);
    let null = std::env::set_current_dir("/")
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        })
        .map_err(GaError::Daemonize)?;
    for fd in 0..3 {
        sys::dup2(null.as_fd(), fd).map_err(GaError::Daemonize)?;
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
    sys::lockf_try(file.as_fd()).map_err(fail("Cannot lock pid file"))?;
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(fail("Failed to write pid file"))?;
    // Keep the lock: closing any descriptor of the file would release it.
    PIDFILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(file);
    Ok(())
}
