//! The few raw system calls the launcher needs: preparing the child
//! between `fork` and `exec` (exactly the intended fds inherited, then
//! setgroups/setgid/setuid to QEMU's user), looking users and groups up,
//! opening tap devices, sending signals, and the launcher's reaping. The only `unsafe` code of the launcher lives here.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

/// Who QEMU runs as: the ids the child switches to before `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Supplementary groups (e.g. `kvm` for /dev/kvm).
    pub groups: Vec<libc::gid_t>,
}

/// Set up the child started by `command` just before `exec`: every fd
/// above 2 except `keep` gets `FD_CLOEXEC` (so QEMU inherits exactly its
/// stdio and `keep`, whatever the supervisor inherited or opened), `keep`
/// loses it (each fd keeps its number, so the caller can name it on the
/// QEMU command line; each must be at least 3), and with `credentials`
/// the child drops to them (setgroups, setgid, setuid, in that order,
/// every result checked).
pub(crate) fn prepare_child(
    command: &mut std::process::Command,
    keep: Vec<RawFd>,
    credentials: Option<Credentials>,
) {
    prepare_child_remapped(command, Vec::new(), keep, credentials);
}

/// [`prepare_child`] for fds that arrive under other numbers than the ones
/// the command line names (the launcher receives them over a socket):
/// first each `(from, to)` in `remap` is `dup2`ed onto `to` (which then
/// lacks `FD_CLOEXEC`), then `keep` is handled as in [`prepare_child`].
/// Every `from` must be close-on-exec and above every `to`, so that no
/// `dup2` replaces a descriptor a later one still reads.
pub(crate) fn prepare_child_remapped(
    command: &mut std::process::Command,
    remap: Vec<(RawFd, RawFd)>,
    mut keep: Vec<RawFd>,
    credentials: Option<Credentials>,
) {
    keep.sort_unstable();
    keep.dedup();
    // Found here, not in the child: after fork only async-signal-safe
    // calls are allowed (the closure below only makes system calls on
    // data prepared here; no allocation, no locks).
    let fd_limit = open_fd_limit();
    // SAFETY: the closure runs in the forked child before `exec`. It calls
    // only dup2/close_range/fcntl/setgroups/setgid/setuid and builds
    // `io::Error`s from errno, all async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            for &(from, to) in &remap {
                // SAFETY: dup2 on integer fds; `to` is replaced in this
                // (child) process only.
                if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut from: RawFd = 3;
            for &fd in &keep {
                if fd > from {
                    cloexec_range(from, fd - 1, fd_limit)?;
                }
                from = from.max(fd.saturating_add(1));
            }
            cloexec_range(from, RawFd::MAX, fd_limit)?;
            for &fd in &keep {
                clear_cloexec(fd)?;
            }
            if let Some(credentials) = &credentials {
                drop_privileges(credentials)?;
            }
            Ok(())
        });
    }
}

/// A close-on-exec duplicate of `fd` numbered `min` or above
/// (`F_DUPFD_CLOEXEC`).
pub(crate) fn dup_cloexec_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own; on success the new fd is ours
    // alone and wrapped at once.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(new) })
}

/// Block until some child of this process has exited and return its pid
/// without reaping it (`waitid(P_ALL, WEXITED | WNOWAIT)`); `Ok(None)`
/// when the process has no children (ECHILD).
pub(crate) fn wait_any_child_exited() -> io::Result<Option<u32>> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            // SAFETY: after a successful waitid with WEXITED the siginfo
            // holds a SIGCHLD record, whose si_pid is set.
            let pid = unsafe { info.si_pid() };
            return Ok(u32::try_from(pid).ok());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(error),
        }
    }
}

/// Reap the exited child `pid` (`waitpid(pid, WNOHANG)`): its raw wait
/// status, or `None` when it was not a zombie child of ours (any more).
pub(crate) fn reap(pid: u32) -> Option<i32> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut status = 0;
    // SAFETY: waitpid writes only into `status`.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (rc == pid).then_some(status)
}

/// The highest fd number + 1 a process may have (RLIMIT_NOFILE), for the
/// fallback when close_range(2) is unavailable.
fn open_fd_limit() -> RawFd {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc < 0 {
        return 1 << 20;
    }
    RawFd::try_from(limit.rlim_cur).unwrap_or(RawFd::MAX)
}

/// Set `FD_CLOEXEC` on every open fd in `first..=last`: close_range(2)
/// with `CLOSE_RANGE_CLOEXEC` (Linux 5.11), else one fcntl per fd below
/// `fd_limit`. Async-signal-safe.
fn cloexec_range(first: RawFd, last: RawFd, fd_limit: RawFd) -> io::Result<()> {
    if first > last {
        return Ok(());
    }
    let (Ok(lo), Ok(hi)) = (libc::c_uint::try_from(first), libc::c_uint::try_from(last)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: close_range takes plain integers; with CLOSE_RANGE_CLOEXEC it
    // only sets a flag on the fds of this (child) process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            lo,
            hi,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    for fd in first..=last.min(fd_limit.saturating_sub(1)) {
        // SAFETY: fcntl on an integer fd; an unused number gives EBADF,
        // which is ignored.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 {
            // SAFETY: as above, F_SETFD only changes the fd's flags.
            let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// setgroups, setgid, setuid, each checked. Async-signal-safe.
fn drop_privileges(credentials: &Credentials) -> io::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gids from the vector's buffer,
    // which outlives the call.
    let rc = unsafe { libc::setgroups(credentials.groups.len(), credentials.groups.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setgid/setuid take plain integers.
    if unsafe { libc::setgid(credentials.gid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(credentials.uid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// The supervisor's effective user id.
pub fn effective_uid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The supervisor's effective group id.
pub fn effective_gid() -> libc::gid_t {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

/// Size of the buffer for getpwnam_r/getgrnam_r strings; grown on ERANGE.
const NSS_BUFFER_START: usize = 1024;
/// Largest buffer tried.
const NSS_BUFFER_MAX: usize = 1 << 20;

/// Runs a reentrant NSS look-up (`getpwnam_r`, `getgrnam_r`) with a string
/// buffer, doubled on ERANGE up to [`NSS_BUFFER_MAX`]; `call` gets the
/// buffer and returns the look-up's result code.
fn nss_lookup(mut call: impl FnMut(&mut [libc::c_char]) -> libc::c_int) -> io::Result<()> {
    let mut buffer = vec![0 as libc::c_char; NSS_BUFFER_START];
    loop {
        let rc = call(&mut buffer);
        if rc == libc::ERANGE && buffer.len() < NSS_BUFFER_MAX {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok(());
    }
}

/// A user's uid, primary gid and group list (getpwnam_r,
/// getgrouplist); `None` when there is no such user. Blocking (NSS).
pub fn lookup_user(name: &str) -> io::Result<Option<Credentials>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    let mut ids = None;
    nss_lookup(|buffer| {
        // SAFETY: an all-zero passwd is a valid value (null pointers,
        // zero ids); getpwnam_r fills it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is a NUL-
        // terminated string, the buffer has `buffer.len()` bytes, and the
        // entry and result pointers point at locals.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        // Only the ids are kept: the entry's strings live in `buffer`.
        ids = (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid));
        rc
    })?;
    let Some((uid, gid)) = ids else {
        return Ok(None);
    };
    Ok(Some(Credentials {
        uid,
        gid,
        groups: group_list(&cname, gid)?,
    }))
}

/// The groups of user `name` whose primary group is `gid` (getgrouplist).
fn group_list(name: &std::ffi::CStr, gid: libc::gid_t) -> io::Result<Vec<libc::gid_t>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` has room for `count` gids; getgrouplist writes at
        // most that many and stores the real number in `count`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        if count <= groups.len() || count > 65536 {
            return Err(io::Error::other("getgrouplist failed"));
        }
        groups.resize(count, 0);
    }
}

/// A group's id (getgrnam_r); `None` when there is no such group.
/// Blocking (NSS).
pub fn lookup_group(name: &str) -> io::Result<Option<libc::gid_t>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name contains NUL"))?;
    let mut gid = None;
    nss_lookup(|buffer| {
        // SAFETY: an all-zero group is a valid value; getgrnam_r fills it.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `lookup_user`: valid name, buffer of the given
        // length, pointers to locals.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        gid = (rc == 0 && !found.is_null()).then_some(entry.gr_gid);
        rc
    })?;
    Ok(gid)
}

/// `/dev/net/tun` with `TUNSETIFF` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
/// which attaches to an existing tap or creates one that lives as long as
/// the fd. Needs CAP_NET_ADMIN (or a persistent tap owned by the caller),
/// which an unprivileged QEMU lacks. Blocking.
pub fn open_tap(ifname: &str) -> io::Result<OwnedFd> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is a valid value (a union of integers,
    // arrays and a pointer left null).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    request.ifr_ifru.ifru_flags =
        libc::c_short::try_from(flags).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: TUNSETIFF reads (and updates) the ifreq we pass, which lives
    // across the call; the fd is the open /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = OwnedFd::from(tun);
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    fd.try_clone()
}

/// The kernel's `struct open_how` (linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// openat2(2) of `relative` beneath the directory `dir`, with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: no
/// component may leave `dir` (`..`, an absolute path) or be a symlink, so
/// a directory swapped for a symlink after a path was checked makes the
/// open fail (ELOOP, EXDEV) instead of reaching a file elsewhere.
/// `O_CLOEXEC` is always added. Blocking.
pub fn open_beneath(
    dir: &impl AsRawFd,
    relative: &std::path::Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        mode: u64::from(mode),
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2(2) reads the NUL-terminated name and the open_how of
    // the size passed, both alive across the call; the directory fd is
    // borrowed for the call only.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
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
    #![allow(clippy::unwrap_used)]

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
    fn test_lookup_root_and_a_missing_user() {
        let root = lookup_user("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert_eq!(lookup_user("qvirt-no-such-user").unwrap(), None);
        assert_eq!(lookup_group("root").unwrap(), Some(0));
        assert_eq!(lookup_group("qvirt-no-such-group").unwrap(), None);
    }

    #[test]
    fn test_signal_zero_probes_own_process() {
        assert!(signal_process(std::process::id(), 0).is_ok());
    }
}
