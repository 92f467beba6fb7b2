//! The few raw system calls the launcher needs: keeping the monitor listener
//! open across `exec` in the child, and sending signals. The only `unsafe`
//! code of the launcher lives here.

use std::io;
use std::os::fd::RawFd;

/// Arrange for `fd` to stay open in the child started by `command`: the
/// child clears `FD_CLOEXEC` on it between `fork` and `exec` (like Python's
/// `pass_fds`). The fd keeps its number, so the caller can name it on the
/// QEMU command line. `fd` must be at least 3 (0-2 are replaced by stdio).
pub(crate) fn inherit_fd(command: &mut tokio::process::Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe calls are allowed. It only calls `fcntl` and builds an
    // `io::Error` from errno (no allocation, no locks).
    unsafe {
        command.pre_exec(move || clear_cloexec(fd));
    }
}

/// Clear `FD_CLOEXEC` on `fd`. Async-signal-safe.
fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD on an integer fd has no memory-safety preconditions;
    // an invalid fd gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, F_SETFD only changes the descriptor's flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn checked_pid(pid: u32) -> io::Result<libc::pid_t> {
    match libc::pid_t::try_from(pid) {
        Ok(pid) if pid > 1 => Ok(pid),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        )),
    }
}

/// Send `signal` (e.g. `libc::SIGTERM`) to one process.
pub fn signal_process(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = checked_pid(pid)?;
    // SAFETY: kill(2) takes plain integers and has no memory-safety
    // preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send `signal` to every process of the process group `pgid` (QEMU runs
/// in its own group, whose id is its pid).
pub fn signal_process_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    let pgid = checked_pid(pgid)?;
    // SAFETY: kill(2) with a negative pid signals a process group; plain
    // integers, no memory-safety preconditions.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_signal_refuses_init_and_group_zero() {
        for pid in [0, 1, u32::MAX] {
            assert_eq!(
                signal_process_group(pid, 0).map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput)
            );
            assert_eq!(
                signal_process(pid, 0).map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput)
            );
        }
    }

    #[test]
    fn test_signal_zero_probes_own_process() {
        assert!(signal_process(std::process::id(), 0).is_ok());
    }
}
