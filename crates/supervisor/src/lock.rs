//! One supervisor per state dir: an exclusive `flock` on
//! `STATE_DIR/supervisor.lock`, taken before anything else touches the
//! dirs and held for the life of the process (the kernel drops it when the
//! process ends, however it ends: no stale lock after a kill -9). The file
//! holds the owner's pid, for the error the next one prints.
//!
//! Two supervisors on the same dirs would both re-attach to, watch and
//! signal the same QEMUs, and overwrite each other's status files. The run
//! dir is covered too: the state dir's lock is the one lock, and a run dir
//! shared by two state dirs is an operator error we cannot see.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// File name of the lock inside the state dir.
pub const LOCK_FILE_NAME: &str = "supervisor.lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "state dir {} is in use by another qvirt-supervisor (pid {}, lock {})",
        state_dir.display(),
        holder.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        path.display()
    )]
    Held {
        /// The state dir.
        state_dir: PathBuf,
        /// The lock file.
        path: PathBuf,
        /// The pid written by the holder, when readable.
        holder: Option<u32>,
    },
    /// Creating, opening, locking or writing the lock file failed.
    #[error("locking {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file
/// description holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock(2) takes an fd we own (borrowed from `file`, open for
    // the call) and an integer operation; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(error)
}

/// Take the lock of `state_dir` (creating the dir, mode 0755, if needed),
/// without waiting. Blocking (file-system calls).
pub fn lock_state_dir(state_dir: &Path) -> Result<StateLock, LockError> {
    let path = state_dir.join(LOCK_FILE_NAME);
    let io_error = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(state_dir)
        .map_err(io_error)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io_error)?;
    if !try_flock(&file).map_err(io_error)? {
        let mut text = String::new();
        let holder = file
            .read_to_string(&mut text)
            .ok()
            .and_then(|_| text.trim().parse().ok());
        return Err(LockError::Held {
            state_dir: state_dir.to_owned(),
            path,
            holder,
        });
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()))
        .map_err(io_error)?;
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_second_lock_names_the_holder_and_first_release_frees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).expect("first lock");
        assert_eq!(
            std::fs::read_to_string(first.path()).expect("read").trim(),
            std::process::id().to_string()
        );
        // flock locks belong to the open file description: a second open
        // in the same process conflicts like another process would.
        match lock_state_dir(&state) {
            Err(LockError::Held { holder, path, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
                assert_eq!(path, state.join(LOCK_FILE_NAME));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        lock_state_dir(&state).expect("free again after drop");
    }
}
