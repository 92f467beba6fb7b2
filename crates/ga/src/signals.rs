//! SIGTERM/SIGINT handling without races: the handler sets a flag and
//! writes a byte to a self-pipe that every blocking wait polls alongside
//! its descriptor, so a stop request is seen even if it lands just before
//! the agent goes to sleep. SIGPIPE is ignored.

use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::sys;

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNUM: AtomicI32 = AtomicI32::new(0);
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNUM.store(sig, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        sys::write_byte(fd, 1);
    }
}

/// Installs the handlers (no SA_RESTART) and the self-pipe, whose ends
/// stay open for the life of the process.
pub fn install() -> io::Result<()> {
    let (read, write) = sys::pipe_nonblocking()?;
    PIPE_READ.store(read.into_raw_fd(), Ordering::SeqCst);
    PIPE_WRITE.store(write.into_raw_fd(), Ordering::SeqCst);
    sys::set_signal_handler(libc::SIGTERM, on_signal)?;
    sys::set_signal_handler(libc::SIGINT, on_signal)?;
    sys::ignore_signal(libc::SIGPIPE)
}

/// Whether a stop was requested since the last [`clear`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The number of the last stop signal (0 if none arrived).
pub fn last_signal() -> i32 {
    SIGNUM.load(Ordering::SeqCst)
}

/// Forgets a stop request (qemu-ga ignores them while frozen).
pub fn clear() {
    STOP.store(false, Ordering::SeqCst);
}

fn drain() {
    let fd = PIPE_READ.load(Ordering::SeqCst);
    let mut buf = [0u8; 64];
    while sys::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
}

/// Polls `fd` for `events` together with the self-pipe. Returns the
/// revents of `fd`, or `Interrupted` when a signal arrived.
pub fn poll_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<libc::c_short> {
    let pipe = PIPE_READ.load(Ordering::SeqCst);
    let mut pfds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: pipe,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n = if pipe >= 0 { 2 } else { 1 };
    sys::poll(&mut pfds[..n], timeout_ms)?;
    if n == 2 && pfds[1].revents != 0 {
        drain();
        return Err(io::Error::from(io::ErrorKind::Interrupted));
    }
    if stop_requested() {
        return Err(io::Error::from(io::ErrorKind::Interrupted));
    }
    Ok(pfds[0].revents)
}
