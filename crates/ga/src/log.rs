//! qemu-ga's own log (`ga_log`): lines `<secs>.<usecs>: <level>: <msg>`
//! to the `-l` file (appended) or to stderr. Critical messages are always
//! written, warnings and debug messages only with `-v`; nothing is written while the
//! agent is frozen (qemu-ga disables logging then, since the log file may
//! be on a frozen filesystem). qemu-ga's syslog lines (`slog`) are not
//! produced.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static SINK: Mutex<Option<File>> = Mutex::new(None);
static ENABLED: AtomicBool = AtomicBool::new(true);
// Checked before anything else, so a quiet agent pays one atomic load per
// debug call.
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Sends the log to `file` (stderr if `None`); `verbose` adds debug lines.
pub fn init(file: Option<File>, verbose: bool) {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = file;
    VERBOSE.store(verbose, Ordering::Relaxed);
}

/// Opens (creates) `path` for appending and sends the log there; on
/// failure the log stays where it was and the error is returned.
pub fn open_file(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(())
}

/// A warning on stderr whatever `-v` says, as GLib prints qemu-ga's
/// warnings before its log is set up.
pub fn warning_to_stderr(msg: &str) {
    let _ = std::io::stderr().write_all(&line("warning", msg.as_bytes()));
}

/// Turns logging off while frozen and on again after the thaw.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether `-v` was given.
pub fn debug_verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Whether debug lines are written (so callers can skip formatting).
pub fn debug_enabled() -> bool {
    VERBOSE.load(Ordering::Relaxed) && ENABLED.load(Ordering::Relaxed)
}

/// One line in qemu-ga's format.
pub fn line(level: &str, msg: &[u8]) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = format!("{}.{:06}: {level}: ", now.as_secs(), now.subsec_micros()).into_bytes();
    out.extend_from_slice(msg);
    out.push(b'\n');
    out
}

fn write(level: &str, msg: &[u8]) {
    if level != "critical" && !VERBOSE.load(Ordering::Relaxed) {
        return;
    }
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let text = line(level, msg);
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    let _ = match sink.as_mut() {
        Some(f) => f.write_all(&text),
        None => std::io::stderr().write_all(&text),
    };
}

/// A debug message with raw bytes after `prefix` (the data read, logged
/// as is, like qemu-ga's `%s`).
pub fn debug_bytes(prefix: &str, data: &[u8]) {
    let mut msg = prefix.as_bytes().to_vec();
    msg.extend_from_slice(data);
    write("debug", &msg);
}

/// A critical message (always written).
pub fn critical(msg: &str) {
    write("critical", msg.as_bytes());
}

/// A warning (`-v` only, as qemu-ga's default level leaves them out).
pub fn warning(msg: &str) {
    write("warning", msg.as_bytes());
}

/// A debug message (`-v` only).
pub fn debug(msg: &str) {
    write("debug", msg.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_line_format() {
        let l = String::from_utf8(line("debug", b"received EOF")).expect("utf-8");
        let (stamp, rest) = l.split_once(": ").expect("stamp");
        assert_eq!(rest, "debug: received EOF\n");
        let (secs, usecs) = stamp.split_once('.').expect("dot");
        assert!(secs.parse::<u64>().is_ok() && usecs.len() == 6, "{l}");
    }
}
