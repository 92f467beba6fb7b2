//! guest-exec and guest-exec-status: PATH search, `env` replacing the
//! environment, stdin only with input-data, stdout/stderr to /dev/null
//! unless captured, capture capped at 16 MiB per stream (then
//! `*-truncated: true`), and the pid forgotten after the first reply that
//! says it exited.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::b64;
use crate::commands::strerror;

/// Captured output kept per stream: 16 MiB.
pub const MAX_OUTPUT: usize = 16 << 20;

#[derive(Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

/// A started process.
pub struct ExecChild {
    child: Child,
    status: Option<std::process::ExitStatus>,
    readers: Vec<(JoinHandle<()>, Arc<Mutex<Captured>>)>,
}

/// Started processes by pid.
pub type Execs = HashMap<i64, ExecChild>;

fn reader(mut pipe: impl Read + Send + 'static) -> (JoinHandle<()>, Arc<Mutex<Captured>>) {
    let buf = Arc::new(Mutex::new(Captured::default()));
    let shared = Arc::clone(&buf);
    let handle = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let Ok(mut c) = shared.lock() else { break };
                    let room = MAX_OUTPUT - c.data.len();
                    if n > room {
                        c.truncated = true;
                    }
                    c.data.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    (handle, buf)
}

/// The C string qemu-ga passes to exec for `s`: QEMU's JSON parser stores
/// U+0000 as the overlong `C0 80`, so a NUL does not end the string; the
/// bytes reach exec as they are (checked against qemu-ga: a path with a
/// NUL is not found, an argument with one is passed with `C0 80`).
fn c_string(s: &str) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for part in s.split('\0').enumerate() {
        if part.0 > 0 {
            out.extend_from_slice(b"\xC0\x80");
        }
        out.extend_from_slice(part.1.as_bytes());
    }
    OsString::from_vec(out)
}

/// guest-exec.
pub fn exec(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let path = args.str("path")?;
    let arg = args.opt_str_list("arg")?;
    let env = args.opt_str_list("env")?;
    let input = args.opt_str("input-data")?;
    let capture = args.opt_bool("capture-output")?.unwrap_or(false);
    args.done()?;
    let input = input.map(|s| b64::decode(&s)).transpose()?;
    let mut cmd = Command::new(c_string(&path));
    cmd.args(arg.unwrap_or_default().iter().map(|a| c_string(a)));
    let env_given = env.is_some();
    let has_input = input.is_some();
    if let Some(env) = env {
        cmd.env_clear();
        for kv in env {
            match kv.split_once('=') {
                Some((k, v)) => cmd.env(c_string(k), c_string(v)),
                None => cmd.env(c_string(&kv), ""),
            };
        }
    }
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let spawned = match cmd.spawn() {
        // GLib runs a file the kernel cannot execute with /bin/sh.
        Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
            let mut sh = Command::new("/bin/sh");
            sh.arg(c_string(&path));
            sh.args(cmd.get_args());
            if env_given {
                sh.env_clear();
            }
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    sh.env(k, v);
                }
            }
            sh.stdin(if has_input {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            if capture {
                sh.stdout(Stdio::piped()).stderr(Stdio::piped());
            } else {
                sh.stdout(Stdio::null()).stderr(Stdio::null());
            }
            sh.spawn()
        }
        other => other,
    };
    let mut child = spawned.map_err(|e| {
        QgaError::generic(format!(
            "Guest agent command failed, error was 'Failed to execute child process \u{201C}{path}\u{201D} ({})'",
            strerror(&e)
        ))
    })?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(reader(out));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(reader(err));
    }
    let pid = i64::from(child.id());
    agent.execs.insert(
        pid,
        ExecChild {
            child,
            status: None,
            readers,
        },
    );
    let mut d = Dict::new();
    d.insert("pid", pid);
    Ok(Some(Value::Object(d)))
}

/// Reaps children that have exited (qemu-ga's child watch does this as
/// soon as they exit), so no zombie waits for a guest-exec-status.
pub fn reap(execs: &mut Execs) {
    for entry in execs.values_mut() {
        if entry.status.is_none() {
            entry.status = entry.child.try_wait().ok().flatten();
        }
    }
}

/// guest-exec-status.
pub fn status(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let pid = args.int("pid")?;
    args.done()?;
    let Some(entry) = agent.execs.get_mut(&pid) else {
        return Err(QgaError::generic("Invalid parameter 'pid'"));
    };
    if entry.status.is_none() {
        entry.status = entry.child.try_wait().ok().flatten();
    }
    let closed = entry.readers.iter().all(|(h, _)| h.is_finished());
    let mut d = Dict::new();
    let Some(status) = entry.status.filter(|_| closed) else {
        d.insert("exited", false);
        return Ok(Some(Value::Object(d)));
    };
    d.insert("exited", true);
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        d.insert("exitcode", i64::from(code));
    } else if let Some(sig) = status.signal() {
        d.insert("signal", i64::from(sig));
    }
    let Some(entry) = agent.execs.remove(&pid) else {
        return Ok(Some(Value::Object(d)));
    };
    let mut streams = Vec::new();
    for (handle, buf) in entry.readers {
        let _ = handle.join();
        let captured = buf
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        streams.push(captured);
    }
    let (out, err) = match streams.len() {
        2 => {
            let err = streams.pop().unwrap_or_default();
            (streams.pop().unwrap_or_default(), err)
        }
        _ => (Captured::default(), Captured::default()),
    };
    if !out.data.is_empty() {
        d.insert("out-data", b64::encode(&out.data));
    }
    if !err.data.is_empty() {
        d.insert("err-data", b64::encode(&err.data));
    }
    if !out.data.is_empty() {
        d.insert("out-truncated", out.truncated);
    }
    if !err.data.is_empty() {
        d.insert("err-truncated", err.truncated);
    }
    Ok(Some(Value::Object(d)))
}
