//! SIGTERM/SIGINT handling without races: the handler sets a flag and
//! writes a byte to a self-pipe that every blocking wait polls alongside
//! its descriptor, so a stop request is seen even if it lands just before
//! the agent goes to sleep. SIGPIPE is ignored.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNUM: AtomicI32 = AtomicI32::new(0);
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNUM.store(sig, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is valid.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Installs the handlers (no SA_RESTART) and the self-pipe.
pub fn install() {
    let mut fds = [-1; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } == 0 {
        PIPE_READ.store(fds[0], Ordering::SeqCst);
        PIPE_WRITE.store(fds[1], Ordering::SeqCst);
    }
    // SAFETY: the handler only touches atomics and write(2); sigaction
    // gets valid pointers.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
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
    // SAFETY: non-blocking read into a valid buffer.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
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
    // SAFETY: n valid pollfds.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 2 && pfds[1].revents != 0 {
        drain();
        return Err(io::Error::from(io::ErrorKind::Interrupted));
    }
    if stop_requested() {
        return Err(io::Error::from(io::ErrorKind::Interrupted));
    }
    Ok(pfds[0].revents)
}
