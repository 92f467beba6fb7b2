//! The harness of the qemu-ga comparison suite: starts the real qemu-ga
//! and qvirt-ga side by side (unix-listen, or a pty for the serial
//! methods), each in its own temporary state directory, kills them by pid
//! on drop, and sends and reads bytes with deadlines (no fixed sleeps).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// An unknown command, so it answers the same whatever is blocked or frozen.
pub const END: &[u8] = b"\xff{\"execute\":\"__end__\",\"id\":\"__end__\"}";
pub const END_LINE: &[u8] =
    b"{\"id\": \"__end__\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command __end__ has not been found\"}}\n";
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn qemu_ga() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/sbin".into());
    for d in dirs {
        let p = d.join("qemu-ga");
        if p.is_file() {
            return p;
        }
    }
    panic!("qemu-ga (the reference agent) is not installed: run `make deps`");
}

/// A running agent; killed by pid (SIGKILL: a frozen agent ignores
/// SIGTERM) and reaped on drop.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
pub enum Which {
    Qemu,
    Qvirt,
}

pub fn start(which: Which, extra: &[&str], env: &[(&str, &str)], prepare: impl Fn(&Path)) -> Agent {
    start_named(which, "sock".as_ref(), extra, env, prepare)
}

/// As [`start`], the socket named `sock_name` in the agent's directory.
pub fn start_named(
    which: Which,
    sock_name: &std::ffi::OsStr,
    extra: &[&str],
    env: &[(&str, &str)],
    prepare: impl Fn(&Path),
) -> Agent {
    start_wrapped(which, &[], sock_name, extra, env, prepare)
}

/// As [`start_named`], the agent started by `wrapper` (a program and its
/// arguments that ends by exec'ing the rest of its command line, so the
/// child's pid is the agent's).
pub fn start_wrapped(
    which: Which,
    wrapper: &[&std::ffi::OsStr],
    sock_name: &std::ffi::OsStr,
    extra: &[&str],
    env: &[(&str, &str)],
    prepare: impl Fn(&Path),
) -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let sock = dir.path().join(sock_name);
    let bin = agent_bin(which);
    let mut cmd = match wrapper.split_first() {
        None => Command::new(bin),
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
    };
    cmd.args(["-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-t")
        .arg(dir.path())
        .args(extra)
        .current_dir(dir.path())
        .env_remove("QGA_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn agent");
    let agent = Agent { child, dir, sock };
    let deadline = Instant::now() + DEADLINE;
    while UnixStream::connect(&agent.sock).is_err() {
        assert!(Instant::now() < deadline, "agent socket never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The probe connection above was accepted and closed; that is harmless.
    agent
}

pub fn agent_bin(which: Which) -> PathBuf {
    match which {
        Which::Qemu => qemu_ga(),
        Which::Qvirt => PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
    }
}

pub fn both(extra: &[&str], env: &[(&str, &str)], prepare: impl Fn(&Path)) -> (Agent, Agent) {
    (
        start(Which::Qemu, extra, env, &prepare),
        start(Which::Qvirt, extra, env, &prepare),
    )
}

pub fn read_until_end(s: &mut UnixStream) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    while !out.ends_with(END_LINE) {
        assert!(
            Instant::now() < deadline,
            "no end marker; got {:?}",
            String::from_utf8_lossy(&out)
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("agent closed; got {:?}", String::from_utf8_lossy(&out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
    out.truncate(out.len() - END_LINE.len());
    // Drop the marker's own lines: the "stray" error and the ping.
    let text = out;
    let mut lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    lines.pop(); // the error for the marker's 0xFF
    lines.concat()
}

/// Sends `chunks` (one write each) on a fresh connection and returns
/// everything answered before the end marker.
pub fn exchange(agent: &Agent, chunks: &[&[u8]]) -> Vec<u8> {
    let mut s = UnixStream::connect(&agent.sock).expect("connect");
    for c in chunks {
        s.write_all(c).expect("write");
    }
    s.write_all(END).expect("write end");
    read_until_end(&mut s)
}

/// As [`exchange`], but `req` and the end marker go in one write, so the
/// agent reads them in one go (where the log's "read data" lines are
/// compared).
pub fn exchange_one_write(agent: &Agent, req: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&agent.sock).expect("connect");
    let mut all = req.to_vec();
    all.extend_from_slice(END);
    s.write_all(&all).expect("write");
    read_until_end(&mut s)
}

pub fn same(agents: &(Agent, Agent), chunks: &[&[u8]]) -> Vec<u8> {
    let a = exchange(&agents.0, chunks);
    let b = exchange(&agents.1, chunks);
    assert_eq!(
        String::from_utf8_lossy(&b),
        String::from_utf8_lossy(&a),
        "qvirt-ga (left) differs from qemu-ga (right)"
    );
    assert_eq!(a, b);
    a
}

pub fn wait_exit(agent: &mut Agent) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(st) = agent.child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

pub fn sigterm(agent: &Agent) {
    let pid = agent.child.id() as libc::pid_t;
    // SAFETY: signalling a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

pub fn cli_output(which: Which, args: &[&str], conf: Option<&Path>) -> (Option<i32>, Vec<u8>) {
    let bin = match which {
        Which::Qemu => qemu_ga(),
        Which::Qvirt => PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
    };
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    match conf {
        Some(c) => cmd.env("QGA_CONF", c),
        None => cmd.env("QGA_CONF", "/nonexistent/qemu-ga.conf"),
    };
    let out = cmd.output().expect("run");
    (out.status.code(), out.stdout)
}

/// A pseudo-terminal: the agent gets the slave path, the test talks on
/// the master.
pub struct Pty {
    pub master: std::fs::File,
    _slave: std::fs::File,
    pub path: String,
}

pub fn open_pty() -> Pty {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // Close-on-exec, so that no agent (nor anything else spawned) keeps a
    // copy: dropping the master must hang the port up.
    // SAFETY: fcntl on the two fds just opened.
    unsafe {
        libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: both fds were just opened and are owned here.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    use std::os::fd::AsRawFd;
    // Raw mode, so a virtio-serial agent (which sets no termios) gets
    // bytes unchanged, like a real port.
    // SAFETY: termios is plain data; valid fd and pointer.
    unsafe {
        let mut tio: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut tio), 0);
        libc::cfmakeraw(&mut tio);
        assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio), 0);
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is writable for its length.
    let rc = unsafe { libc::ttyname_r(slave.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    assert_eq!(rc, 0);
    // SAFETY: ttyname_r NUL-terminated it.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Pty {
        master,
        _slave: slave,
        path,
    }
}

/// Reads from the pty master until `done` says so or `wait` passes.
pub fn pty_read(pty: &mut Pty, wait: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: pty.master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if rc <= 0 {
            continue;
        }
        match pty.master.read(&mut buf) {
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

pub fn start_on_pty(which: Which, method: &str) -> (Agent, Pty) {
    let mut pty = open_pty();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = match which {
        Which::Qemu => qemu_ga(),
        Which::Qvirt => PathBuf::from(env!("CARGO_BIN_EXE_qvirt-ga")),
    };
    let child = Command::new(bin)
        .args(["-m", method, "-p", &pty.path, "-t"])
        .arg(dir.path())
        .current_dir(dir.path())
        .env_remove("QGA_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let sock = dir.path().join("unused");
    let agent = Agent { child, dir, sock };
    // Poll with sync requests until the agent has opened the port (an
    // isa-serial agent flushes what came before).
    let deadline = Instant::now() + DEADLINE;
    for id in 1.. {
        assert!(
            Instant::now() < deadline,
            "agent never answered on {}",
            pty.path
        );
        let mut bytes = vec![0xff];
        bytes.extend_from_slice(
            format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}").as_bytes(),
        );
        pty.master.write_all(&bytes).expect("write");
        let want = format!("{{\"return\": {id}}}\n");
        let got = pty_read(&mut pty, Duration::from_millis(200), |o| {
            o.ends_with(want.as_bytes())
        });
        if got.ends_with(want.as_bytes()) {
            break;
        }
    }
    (agent, pty)
}

/// Serialises the tests that freeze or thaw filesystems (a thaw in one
/// test would undo another test's real freeze).
pub static FREEZE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A scratch ext4 filesystem on a loop device, thawed and unmounted on
/// drop.
pub struct LoopFs {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopFs {
    /// Makes and mounts the filesystem, or says why it cannot.
    pub fn new() -> Result<Self, String> {
        Self::with("mnt", "loop")
    }

    /// As `new`, mounted on `name` (which may need escaping in
    /// mountinfo) with mount `options`.
    pub fn with(name: &str, options: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("img");
        let mnt = dir.path().join(name);
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(16 << 20))
            .map_err(|e| e.to_string())?;
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
        run_tool(
            Command::new("mount")
                .args(["-o", options])
                .arg(&img)
                .arg(&mnt),
        )?;
        Ok(LoopFs { dir, mnt })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Ok(f) = std::fs::File::open(&self.mnt) {
            // SAFETY: FITHAW on our own mount point; the int argument is
            // ignored by the kernel.
            unsafe { libc::ioctl(f.as_raw_fd(), 0xC004_5878, 0) };
        }
        let _ = run_tool(Command::new("umount").arg(&self.mnt));
    }
}
