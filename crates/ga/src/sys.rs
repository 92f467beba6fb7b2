//! The raw system calls qvirt-ga makes, each behind a safe wrapper: the
//! daemon's fork/session/stdio and pidfile lock, the signal handlers and
//! their self-pipe, poll, the channel's sockets and serial line, and the
//! commands' ioctls and C library queries (interfaces, users, time zone,
//! uname, statvfs, the clock). The only `unsafe` code of the agent lives
//! here. Results are checked and returned as `io::Error`s; descriptors
//! this module creates come back as `OwnedFd`.

use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `Ok(rc)` for a non-negative result, else errno.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of a descriptor a system call just returned (or errno).
fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: `fd` is a new descriptor the caller's system call just
    // returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---- the daemon ----

/// The number of threads of this process, when /proc tells.
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// Forks; the parent exits at once with status 0 (`_exit`, no cleanup)
/// and the child returns. Refused when the process has more than one
/// thread (after a fork only the calling thread exists, and locks other
/// threads held would stay locked).
pub fn fork_to_background() -> io::Result<()> {
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        return Err(io::Error::other(format!(
            "cannot fork a process with {n} threads"
        )));
    }
    // SAFETY: the process is single-threaded (checked above), so the child
    // is a full copy that may go on running Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        p if p < 0 => Err(io::Error::last_os_error()),
        0 => Ok(()),
        // SAFETY: _exit ends the parent without running anything else.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Starts a new session (`setsid`).
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and only changes this process.
    check(unsafe { libc::setsid() }).map(|_| ())
}

/// Sets the file mode creation mask (it cannot fail).
pub fn umask(mask: libc::mode_t) {
    // SAFETY: umask takes a plain integer and always succeeds.
    unsafe { libc::umask(mask) };
}

/// Makes descriptor number `target` a copy of `fd` (`dup2`).
pub fn dup2(fd: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes plain integers; `fd` is open for the call. The
    // targets used (0, 1, 2) are the standard streams, which Rust code
    // only reaches by number.
    check(unsafe { libc::dup2(fd.as_raw_fd(), target) }).map(|_| ())
}

/// Locks the whole file for this process without waiting
/// (`lockf(F_TLOCK)`); EAGAIN/EACCES when another process holds it.
pub fn lockf_try(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: lockf takes plain integers; `fd` is open for the call.
    check(unsafe { libc::lockf(fd.as_raw_fd(), libc::F_TLOCK, 0) }).map(|_| ())
}

// ---- signals, pipes and poll ----

/// A pipe, both ends non-blocking and close-on-exec: (read, write).
pub fn pipe_nonblocking() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both are new descriptors owned by no one.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Installs `handler` for `signal`, without SA_RESTART and with an empty
/// mask. The handler must be async-signal-safe.
pub fn set_signal_handler(
    signal: libc::c_int,
    handler: extern "C" fn(libc::c_int),
) -> io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = 0;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to clear.
    check(unsafe { libc::sigemptyset(&mut sa.sa_mask) })?;
    // SAFETY: `sa` is a valid sigaction for the call; the old one is not
    // asked for. The handler is a plain `extern "C"` function.
    check(unsafe { libc::sigaction(signal, &sa, std::ptr::null_mut()) }).map(|_| ())
}

/// Ignores `signal` (SIG_IGN).
pub fn ignore_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no code of ours.
    if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes one byte to `fd`, ignoring the result. Async-signal-safe: for
/// a signal handler, with a descriptor number kept for the process's life.
pub fn write_byte(fd: RawFd, byte: u8) {
    // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte.
    // A bad or closed descriptor only gives EBADF.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// Reads into `buf` from `fd` (a descriptor number kept for the process's
/// life; a bad one gives EBADF).
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// poll(2) on `fds` (a negative fd is skipped, as poll does); returns how
/// many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fds` holds `n` valid pollfds, which poll updates.
    check(unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) }).map(|n| n as usize)
}

// ---- the channel ----

/// Puts a serial line in raw mode at 38400 baud (what qemu-ga sets up for
/// isa-serial).
pub fn set_raw_38400(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: termios is plain data; all-zero is a valid value.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `tio` a valid termios to fill.
    check(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut tio) })?;
    // SAFETY: `tio` is a valid termios.
    unsafe { libc::cfmakeraw(&mut tio) };
    // What cfsetispeed/cfsetospeed do on Linux; those two symbols do not
    // link in a static glibc build.
    tio.c_cflag = (tio.c_cflag & !libc::CBAUD) | libc::B38400;
    tio.c_ispeed = libc::B38400;
    tio.c_ospeed = libc::B38400;
    // SAFETY: `fd` is open and `tio` a valid termios.
    check(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &tio) }).map(|_| ())
}

/// Discards input received but not read (`tcflush(TCIFLUSH)`).
pub fn flush_input(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: tcflush takes plain integers; `fd` is open for the call.
    check(unsafe { libc::tcflush(fd.as_raw_fd(), libc::TCIFLUSH) }).map(|_| ())
}

/// Sends from `data` without blocking and without SIGPIPE.
pub fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is readable for its length; `fd` is open.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Accepts a connection on a listening socket (close-on-exec; the peer
/// address is not asked for).
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers ask for no address; `fd` is open.
    owned(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })
}

/// listen(2) with `backlog` (again on a listening socket: only changes
/// the backlog).
pub fn listen(fd: BorrowedFd<'_>, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: listen takes plain integers; `fd` is open.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(|_| ())
}

/// A vsock stream socket (close-on-exec) bound to `cid:port`.
pub fn vsock_bound(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers.
    let fd =
        owned(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `sa` is a valid sockaddr_vm of length `len`; `fd` is open.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    Ok(fd)
}

// ---- files ----

/// Sets O_NONBLOCK on an open file.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL takes plain integers; `fd` is open.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above, F_SETFL only changes the file's status flags.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })
        .map(|_| ())
}

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;
/// `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xC018_5879;

/// FIFREEZE on the filesystem `fd` is open on.
pub fn freeze_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument that the kernel ignores.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE as _, 0) }).map(|_| ())
}

/// FITHAW on the filesystem `fd` is open on.
pub fn thaw_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FITHAW takes an int argument that the kernel ignores.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FITHAW as _, 0) }).map(|_| ())
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// FITRIM of the whole filesystem `fd` is open on, with `minlen`; returns
/// (bytes trimmed, the minimum the kernel used).
pub fn fitrim(fd: BorrowedFd<'_>, minlen: u64) -> io::Result<(u64, u64)> {
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen,
    };
    // SAFETY: FITRIM reads and updates the fstrim_range we pass, which
    // lives across the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), FITRIM as _, &mut range as *mut FstrimRange) })?;
    Ok((range.len, range.minlen))
}

/// What statvfs says of a filesystem: (fragment size, blocks, free
/// blocks, blocks available to non-root).
pub fn statvfs(path: &Path) -> io::Result<(u64, u64, u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out pointer.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok((st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail))
}

/// Whether `path` is executable by this process (`access(X_OK)`).
pub fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

// ---- the system ----

/// The host name (`gethostname`), its bytes up to the NUL.
pub fn hostname() -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for the length given, one less than its
    // size, so it stays NUL-terminated even when the name is truncated.
    check(unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) })?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(buf[..end].to_vec())
}

/// The local time zone now: its offset east of UTC in seconds and its
/// abbreviation (`None` when there is none); `None` when localtime fails.
pub fn local_zone() -> Option<(i64, Option<Vec<u8>>)> {
    // SAFETY: time(NULL) only reads the clock.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: tm is plain data; all-zero is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return None;
    }
    let zone = if tm.tm_zone.is_null() {
        None
    } else {
        // SAFETY: tm_zone points at a NUL-terminated string that lives as
        // long as the time zone data (it is copied at once).
        Some(unsafe { CStr::from_ptr(tm.tm_zone) }.to_bytes().to_vec())
    };
    Some((tm.tm_gmtoff, zone))
}

/// The user name and login time (seconds) of each USER_PROCESS record of
/// the utmpx database, in its order.
pub fn user_logins() -> Vec<(Vec<u8>, f64)> {
    let mut out = Vec::new();
    // SAFETY: only the agent's main thread reads utmpx; each record of
    // getutxent's static buffer is copied before the next call, and the
    // database is closed at the end.
    unsafe {
        libc::setutxent();
        loop {
            let ent = libc::getutxent();
            if ent.is_null() {
                break;
            }
            let ent = &*ent;
            if ent.ut_type != libc::USER_PROCESS {
                continue;
            }
            let user = c_chars(&ent.ut_user);
            let t = ent.ut_tv.tv_sec as f64 + ent.ut_tv.tv_usec as f64 / 1_000_000.0;
            out.push((user, t));
        }
        libc::endutxent();
    }
    out
}

/// The bytes of a fixed-size C char array up to its first NUL.
fn c_chars(field: &[libc::c_char]) -> Vec<u8> {
    field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect()
}

/// What uname reports: (release, version, machine).
pub fn uname() -> io::Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    // SAFETY: utsname is plain data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid out pointer.
    check(unsafe { libc::uname(&mut uts) })?;
    Ok((
        c_chars(&uts.release),
        c_chars(&uts.version),
        c_chars(&uts.machine),
    ))
}

/// Sets the system clock (`settimeofday`, no time zone).
pub fn set_time_of_day(secs: i64, usecs: i64) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: secs as libc::time_t,
        tv_usec: usecs as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval; a null time zone is allowed.
    check(unsafe { libc::settimeofday(&tv, std::ptr::null()) }).map(|_| ())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), if known.
pub fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf takes a plain integer and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0)
}

// ---- network interfaces ----

/// One entry of getifaddrs: the interface name, and its address with the
/// prefix length of its netmask when it is IPv4 or IPv6 (`None` for no
/// address or another family).
pub struct IfAddr {
    /// Interface name bytes.
    pub name: Vec<u8>,
    /// Address and prefix length.
    pub addr: Option<(IpAddr, u32)>,
}

/// The getifaddrs list, in its order.
pub fn interface_addresses() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head, freed below.
    check(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string of the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes().to_vec();
        // SAFETY: the address and netmask of a node point at sockaddrs of
        // the family the address says (or are null).
        let addr = unsafe { ip_and_prefix(ifa.ifa_addr, ifa.ifa_netmask) };
        out.push(IfAddr { name, addr });
    }
    // SAFETY: `head` came from getifaddrs and is freed once; nothing
    // borrowed from the list outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IPv4/IPv6 address of a sockaddr and the prefix length of its
/// netmask (0 without one).
///
/// # Safety
/// `addr` is null or points at a sockaddr of the family it says;
/// `netmask` is null or points at a sockaddr of that same family.
unsafe fn ip_and_prefix(
    addr: *const libc::sockaddr,
    netmask: *const libc::sockaddr,
) -> Option<(IpAddr, u32)> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: `addr` is a valid sockaddr (caller's promise).
    let family = i32::from(unsafe { (*addr).sa_family });
    if family == libc::AF_INET {
        // SAFETY: the family says sockaddr_in.
        let sin = unsafe { &*(addr as *const libc::sockaddr_in) };
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let prefix = if netmask.is_null() {
            0
        } else {
            // SAFETY: the netmask has the address's family.
            let m = unsafe { &*(netmask as *const libc::sockaddr_in) };
            m.sin_addr.s_addr.count_ones()
        };
        Some((IpAddr::V4(ip), prefix))
    } else if family == libc::AF_INET6 {
        // SAFETY: the family says sockaddr_in6.
        let sin6 = unsafe { &*(addr as *const libc::sockaddr_in6) };
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        let prefix = if netmask.is_null() {
            0
        } else {
            // SAFETY: the netmask has the address's family.
            let m = unsafe { &*(netmask as *const libc::sockaddr_in6) };
            m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
        };
        Some((IpAddr::V6(ip), prefix))
    } else {
        None
    }
}

/// The hardware address of interface `name` (SIOCGIFHWADDR), its first six
/// bytes.
pub fn hw_address(name: &[u8]) -> io::Result<[u8; 6]> {
    // SAFETY: socket takes plain integers.
    let sock = owned(unsafe { libc::socket(libc::PF_INET, libc::SOCK_STREAM, 0) })?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.iter().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid, NUL-terminated ifreq for SIOCGIFHWADDR.
    check(unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) })?;
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifru_hwaddr.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, &src) in mac.iter_mut().zip(data.iter()) {
        *dst = src as u8;
    }
    Ok(mac)
}
