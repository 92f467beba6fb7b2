//! Running one hook script as libvirt's `virRunScript` does, plus a timeout.
//!
//! - argv is `[SCRIPT, OBJECT, OP, SUBOP, EXTRA]`, executed directly (no
//!   shell); the environment is cleared and rebuilt by [`hook_env`].
//! - The input document goes to stdin from its own task (a script that
//!   does not read it gets EPIPE on our side, which is ignored); no input
//!   is `/dev/null`.
//! - stdout and stderr are drained to EOF, each kept up to a cap and the
//!   rest dropped, so a chatty script never blocks on a full pipe (stdout
//!   may instead keep only its last bytes: a diagnostic tail).
//! - The script leads its own process group. It is done when it has exited
//!   *and* both pipes are closed (as libvirt, which waits for EOF). If that
//!   takes longer than the timeout, the whole group gets SIGKILL and the
//!   script counts as timed out. A script that finished normally keeps its
//!   background children (libvirt kills nothing either).
//! - The child is reset as libvirt's: empty signal mask, every signal at
//!   its default action, every descriptor from 3 up closed on exec; it
//!   then calls `execve` itself.
//! - When `execve` fails the result is exit status 127 (ENOENT, e.g. a
//!   missing interpreter) or 126 (anything else, e.g. ENOEXEC), with
//!   libvirt's "cannot execute binary" text on stderr.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Variables passed through from the executor's own environment when set,
/// after `LC_ALL=C`, in libvirt's order (`virCommandAddEnvPassCommon`).
pub const PASSED_ENV: [&str; 9] = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "DYLD_INSERT_LIBRARIES",
    "DYLD_FORCE_FLAT_NAMESPACE",
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
];

/// Exit status reported when the script could not be executed because a
/// file was missing (its interpreter), as libvirt's child.
pub const EXIT_ENOENT: i32 = 127;
/// Exit status reported when the script could not be executed otherwise.
pub const EXIT_CANNOT_INVOKE: i32 = 126;

/// How long, after the group was killed, readers may take to see EOF
/// before what they have is taken as is.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long a SIGKILLed script may take to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(5);
/// Read size for stdout and stderr.
const READ_CHUNK: usize = 16 << 10;

/// The environment of every hook: `LC_ALL=C`, then each of [`PASSED_ENV`]
/// that `lookup` knows, in that order.
pub fn hook_env(lookup: impl Fn(&str) -> Option<OsString>) -> Vec<(String, OsString)> {
    let mut env = vec![("LC_ALL".to_owned(), OsString::from("C"))];
    for name in PASSED_ENV {
        if let Some(value) = lookup(name) {
            env.push((name.to_owned(), value));
        }
    }
    env
}

/// One script to run.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The script (`argv[0]`).
    pub path: &'a Path,
    /// `argv[1..]`: object, op, subop, extra.
    pub args: &'a [String; 4],
    /// The environment (the rest is cleared).
    pub env: &'a [(String, OsString)],
    /// Written to stdin; empty: stdin is `/dev/null`.
    pub input: &'a [u8],
    /// After this, the process group is killed.
    pub timeout: Duration,
    /// Bytes kept of stdout and of stderr.
    pub max_output: usize,
    /// `Some(n)`: keep only the last `n` bytes of stdout instead of its
    /// first `max_output` (libvirt discards stdout but for filters).
    pub stdout_tail: Option<usize>,
}

/// One captured output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    /// The bytes kept.
    pub bytes: Vec<u8>,
    /// More was written than kept.
    pub truncated: bool,
}

/// How a script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// Could not be waited for.
    Unknown,
}

/// What running one script gave.
#[derive(Debug, Clone)]
pub struct ScriptRun {
    /// The script.
    pub path: PathBuf,
    /// How it ended.
    pub termination: Termination,
    /// Its stdout.
    pub stdout: Capture,
    /// Its stderr.
    pub stderr: Capture,
    /// Spawn to exit (or to the kill, when it had to be killed).
    pub duration: Duration,
    /// Killed after the timeout (it, or something holding its output open,
    /// was still running).
    pub timed_out: bool,
    /// Killed because the executor is shutting down.
    pub cancelled: bool,
}

impl ScriptRun {
    /// Exit status 0, not timed out, not cancelled.
    pub fn success(&self) -> bool {
        self.termination == Termination::Exited(0) && !self.timed_out && !self.cancelled
    }
}

/// Runs one script to completion (or until its timeout, or `shutdown`).
pub async fn run_script(inv: &Invocation<'_>, shutdown: &CancellationToken) -> ScriptRun {
    let start = Instant::now();
    let image = match ExecImage::new(inv.path, inv.args, inv.env) {
        Ok(i) => i,
        Err(e) => {
            let e = io::Error::new(io::ErrorKind::InvalidInput, e);
            return not_executed(inv.path, &e, start.elapsed());
        }
    };
    // std's Command does the fork, the pipes and the process group; the
    // program, its argv and its environment are `image`'s, which the child
    // execs itself (below), so none is given to Command.
    let mut cmd = Command::new(inv.path);
    cmd.stdin(if inv.input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    // SAFETY: the closure runs in the forked child (after std has set up
    // stdio and the process group; std keeps the parent's signal mask) and
    // only makes system calls (rt_sigaction, rt_sigprocmask, close_range or
    // fcntl, execve) on memory prepared before the fork: no allocation, no
    // locks. It never returns on success; on failure std reports its errno
    // to the parent.
    unsafe {
        cmd.pre_exec(move || {
            image.exec();
            Err(io::Error::last_os_error())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return not_executed(inv.path, &e, start.elapsed()),
    };
    // The group id is the leader's pid; it stays valid (and is not reused)
    // as long as any member lives.
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());

    let writer = child.stdin.take().map(|mut stdin| {
        let input = inv.input.to_vec();
        tokio::spawn(async move {
            // EPIPE (the script did not read it all) is not an error.
            let _ = stdin.write_all(&input).await;
        })
    });
    let stop_reading = CancellationToken::new();
    let out_keep = match inv.stdout_tail {
        Some(n) => Keep::Tail(n),
        None => Keep::Head(inv.max_output),
    };
    let mut out = spawn_capture(child.stdout.take(), out_keep, stop_reading.clone());
    let mut err = spawn_capture(
        child.stderr.take(),
        Keep::Head(inv.max_output),
        stop_reading.clone(),
    );

    let deadline = tokio::time::sleep(inv.timeout);
    tokio::pin!(deadline);
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut exited_at = None;
    let (mut out_done, mut err_done) = (None, None);
    let (mut timed_out, mut cancelled) = (false, false);
    while status.is_none() || out_done.is_none() || err_done.is_none() {
        tokio::select! {
            st = child.wait(), if status.is_none() => {
                exited_at = Some(start.elapsed());
                status = Some(st);
            }
            c = &mut out, if out_done.is_none() => out_done = Some(c),
            c = &mut err, if err_done.is_none() => err_done = Some(c),
            () = &mut deadline => { timed_out = true; break; }
            () = shutdown.cancelled() => { cancelled = true; break; }
        }
    }
    if timed_out || cancelled {
        if let Some(pgid) = pgid {
            kill_group(pgid);
        }
        if status.is_none() {
            status = tokio::time::timeout(REAP_GRACE, child.wait()).await.ok();
            exited_at = Some(start.elapsed());
        }
        // Give the readers the bytes already in the pipes, then stop them
        // (a process outside the group may still hold a pipe open).
        let _ = tokio::time::timeout(DRAIN_GRACE, async {
            if out_done.is_none() {
                out_done = Some((&mut out).await);
            }
            if err_done.is_none() {
                err_done = Some((&mut err).await);
            }
        })
        .await;
        stop_reading.cancel();
    }
    if let Some(w) = writer {
        w.abort();
    }
    let stdout = finish_capture(out_done, out).await;
    let stderr = finish_capture(err_done, err).await;
    let termination = match status {
        Some(Ok(st)) => termination_of(st),
        _ => Termination::Unknown,
    };
    ScriptRun {
        path: inv.path.to_owned(),
        termination,
        stdout,
        stderr,
        duration: exited_at.unwrap_or_else(|| start.elapsed()),
        timed_out,
        cancelled,
    }
}

/// `execve(2)`'s arguments, built before the fork: the child may not
/// allocate. Executing it ourselves (rather than std's `execvp`) keeps
/// libvirt's behaviour for a script without a shebang (ENOEXEC: exit 126,
/// no `/bin/sh` fallback) and passes the environment in libvirt's order;
/// it also means std forks instead of using `posix_spawn`, whose glibc
/// implementation leaves glibc's internal signals ignored in the child.
struct ExecImage {
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// Owns what `argv` and `envp` point to (heap buffers: moving the
    /// vector does not move them).
    _strings: Vec<CString>,
}

// SAFETY: the raw pointers point into heap buffers owned by the same
// value and never written after construction.
unsafe impl Send for ExecImage {}
// SAFETY: as for Send: shared access only reads.
unsafe impl Sync for ExecImage {}

impl ExecImage {
    fn new(
        path: &Path,
        args: &[String; 4],
        env: &[(String, OsString)],
    ) -> Result<ExecImage, std::ffi::NulError> {
        let path = CString::new(path.as_os_str().as_bytes())?;
        let mut strings = vec![path.clone()];
        for a in args {
            strings.push(CString::new(a.as_bytes())?);
        }
        let nargs = strings.len();
        for (k, v) in env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            strings.push(CString::new(kv)?);
        }
        let pointers = |s: &[CString]| {
            s.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect::<Vec<_>>()
        };
        Ok(ExecImage {
            argv: pointers(&strings[..nargs]),
            envp: pointers(&strings[nargs..]),
            path,
            _strings: strings,
        })
    }

    /// In the forked child: every signal back to its default action (as
    /// libvirt's child does; an ignored signal would survive exec), the
    /// signal mask emptied (std's `Command` keeps the parent's since Rust
    /// 1.66, and a blocked signal survives exec too), every descriptor but
    /// 0, 1 and 2 closed on exec (libvirt closes them; the executor may
    /// have inherited some), then execve. Returns only if execve failed
    /// (errno says why; std's report pipe is still open).
    fn exec(&self) {
        for sig in 1..=64 {
            default_action(sig);
        }
        unblock_all_signals();
        close_inherited_fds();
        // SAFETY: NUL-terminated strings and NULL-terminated arrays owned
        // by `self`, alive for the call.
        unsafe { libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
    }
}

/// Empties the signal mask, in the child before exec, as libvirt's child
/// does. Async-signal-safe: sigemptyset fills memory we own and
/// sigprocmask is a system call.
fn unblock_all_signals() {
    // SAFETY: an all-zero sigset_t is a valid value that sigemptyset then
    // initialises; sigprocmask(2) reads it and writes no old set (NULL).
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Marks every descriptor from 3 up close-on-exec, in the child before
/// exec (closing them now would also close std's exec-error pipe).
/// Async-signal-safe: system calls only.
fn close_inherited_fds() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC changes descriptor
    // flags only.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if done {
        return;
    }
    // Kernels before 5.11: one fcntl per possible descriptor.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills the struct we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as libc::c_int
    } else {
        1024
    };
    for fd in 3..max {
        // SAFETY: fcntl(2) on a descriptor number; EBADF when not open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The kernel's `struct sigaction` (x86_64, aarch64): glibc's wrapper
/// refuses its own internal signals (32, 33), which the executor may have
/// inherited as ignored (a parent that used glibc's `posix_spawn`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets `sig` to its default action in the child before exec.
/// Async-signal-safe: one system call, no allocation.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn default_action(sig: libc::c_int) {
    let act = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction(2) with a valid struct of the kernel's layout
    // and size 8 for the mask; SIGKILL and SIGSTOP just give EINVAL.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &act as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            std::mem::size_of::<u64>(),
        );
    }
}

/// Sets `sig` to its default action in the child before exec.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn default_action(sig: libc::c_int) {
    // SAFETY: signal(3) is async-signal-safe; signals it refuses stay as
    // they are.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

fn termination_of(st: ExitStatus) -> Termination {
    match (st.code(), st.signal()) {
        (Some(code), _) => Termination::Exited(code),
        (None, Some(sig)) => Termination::Signaled(sig),
        (None, None) => Termination::Unknown,
    }
}

/// The result for a script `execve` refused, as libvirt's child reports
/// it: 127 for ENOENT, else 126, and the reason on stderr.
fn not_executed(path: &Path, e: &io::Error, elapsed: Duration) -> ScriptRun {
    let code = if e.kind() == io::ErrorKind::NotFound {
        EXIT_ENOENT
    } else {
        EXIT_CANNOT_INVOKE
    };
    let reason = os_error_text(e);
    ScriptRun {
        path: path.to_owned(),
        termination: Termination::Exited(code),
        stdout: Capture::default(),
        stderr: Capture {
            bytes: format!("cannot execute binary {}: {reason}\n", path.display()).into_bytes(),
            truncated: false,
        },
        duration: elapsed,
        timed_out: false,
        cancelled: false,
    }
}

/// The system's text for `e` as libvirt shows it (`strerror`): `"No such
/// file or directory"`, without std's `" (os error 2)"`.
pub fn os_error_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => strip_os_error(&io::Error::from_raw_os_error(errno).to_string()),
        None => e.to_string(),
    }
}

/// `"No such file or directory (os error 2)"` -> `"No such file or directory"`.
fn strip_os_error(text: &str) -> String {
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group our
    // spawned script leads; no memory is involved. ESRCH (already gone) is
    // fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Which bytes of a stream a capture keeps.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// The first n.
    Head(usize),
    /// The last n.
    Tail(usize),
}

fn spawn_capture<R>(reader: Option<R>, keep: Keep, stop: CancellationToken) -> JoinHandle<Capture>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut capture = Capture::default();
        let Some(mut reader) = reader else {
            return capture;
        };
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let n = tokio::select! {
                r = reader.read(&mut chunk) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                () = stop.cancelled() => break,
            };
            match keep {
                Keep::Head(cap) => {
                    let room = cap.saturating_sub(capture.bytes.len());
                    if n > room {
                        capture.truncated = true;
                    }
                    capture.bytes.extend_from_slice(&chunk[..n.min(room)]);
                }
                Keep::Tail(cap) => {
                    capture.bytes.extend_from_slice(&chunk[..n]);
                    if capture.bytes.len() > cap {
                        capture.truncated = true;
                        let extra = capture.bytes.len() - cap;
                        capture.bytes.drain(..extra);
                    }
                }
            }
        }
        capture
    })
}

async fn finish_capture(
    done: Option<Result<Capture, tokio::task::JoinError>>,
    handle: JoinHandle<Capture>,
) -> Capture {
    let result = match done {
        Some(r) => r,
        // Cancelled just before: it returns at once.
        None => handle.await,
    };
    result.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn args() -> [String; 4] {
        ["vm1", "prepare", "begin", "-"].map(String::from)
    }

    async fn run(path: &Path, input: &[u8], timeout: Duration, cap: usize) -> ScriptRun {
        run_tail(path, input, timeout, cap, None).await
    }

    async fn run_tail(
        path: &Path,
        input: &[u8],
        timeout: Duration,
        cap: usize,
        stdout_tail: Option<usize>,
    ) -> ScriptRun {
        let env = hook_env(|k| std::env::var_os(k));
        let args = args();
        let inv = Invocation {
            path,
            args: &args,
            env: &env,
            input,
            timeout,
            max_output: cap,
            stdout_tail,
        };
        run_script(&inv, &CancellationToken::new()).await
    }

    /// A diagnostic tail keeps the last bytes of stdout, across reads;
    /// stderr still keeps its head.
    #[tokio::test]
    async fn test_stdout_tail_keeps_the_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "chatty",
            "#!/bin/sh\nhead -c 100000 /dev/zero\nprintf 'the end'\n\
             printf 'first' >&2\nhead -c 5000 /dev/zero >&2\nexit 0\n",
        );
        let r = run_tail(&path, b"", Duration::from_secs(30), 1000, Some(10)).await;
        assert!(r.success(), "{r:?}");
        assert_eq!(r.stdout.bytes, b"\0\0\0the end");
        assert!(r.stdout.truncated);
        assert!(r.stderr.bytes.starts_with(b"first") && r.stderr.bytes.len() == 1000);
        assert!(r.stderr.truncated);
        // Short output: whole, not truncated.
        let path = script(dir.path(), "short", "#!/bin/sh\nprintf hi\n");
        let r = run_tail(&path, b"", Duration::from_secs(30), 1000, Some(10)).await;
        assert_eq!(r.stdout.bytes, b"hi");
        assert!(!r.stdout.truncated);
    }

    #[test]
    fn test_env_is_lc_all_then_passed_vars_in_order() {
        let env = hook_env(|k| match k {
            "HOME" => Some("/root".into()),
            "PATH" => Some("/bin".into()),
            _ => None,
        });
        let names: Vec<_> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["LC_ALL", "PATH", "HOME"]);
    }

    #[tokio::test]
    async fn test_large_input_not_read_and_large_output_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "chatty",
            "#!/bin/sh\nhead -c 200000 /dev/zero\nhead -c 200000 /dev/zero >&2\nexit 0\n",
        );
        let input = vec![b'x'; 1 << 20];
        let r = run(&path, &input, Duration::from_secs(30), 1000).await;
        assert!(r.success(), "{r:?}");
        assert_eq!(r.stdout.bytes.len(), 1000);
        assert!(r.stdout.truncated && r.stderr.truncated);
    }

    #[tokio::test]
    async fn test_missing_interpreter_is_127_and_no_shebang_is_126() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "bad-interp", "#!/nonexistent/sh\nexit 0\n");
        let r = run(&path, b"", Duration::from_secs(30), 1000).await;
        assert_eq!(r.termination, Termination::Exited(127));
        let msg = String::from_utf8(r.stderr.bytes).unwrap();
        assert!(
            msg.starts_with("cannot execute binary ")
                && msg.ends_with(": No such file or directory\n"),
            "{msg}"
        );
        let path = script(dir.path(), "no-shebang", "echo ran\nexit 0\n");
        let r = run(&path, b"", Duration::from_secs(30), 1000).await;
        assert_eq!(r.termination, Termination::Exited(126), "{r:?}");
    }

    #[tokio::test]
    async fn test_timeout_kills_and_reports_signal() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "hang",
            "#!/bin/sh\necho started\nexec sleep 600\n",
        );
        let r = run(&path, b"", Duration::from_millis(300), 1000).await;
        assert!(r.timed_out && !r.success());
        assert_eq!(r.termination, Termination::Signaled(libc::SIGKILL));
        assert_eq!(r.stdout.bytes, b"started\n");
    }
}
