//! guest-file-open/close/read/write/seek/flush with qemu-ga's semantics:
//! handles from the persistent counter, fopen-style modes, new files 0666,
//! O_NONBLOCK, `eof` as stdio's `feof` after one fread, and qemu-ga's
//! error texts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use qvirt_qga::{Dict, QgaError, Value};

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::b64;
use crate::commands::with_errno;

/// Largest guest-file-read count: 48 MiB.
pub const READ_COUNT_MAX: i64 = 48 << 20;
/// Default guest-file-read count.
pub const READ_COUNT_DEFAULT: i64 = 4096;

/// Open files by handle.
pub type Files = BTreeMap<i64, File>;

fn find(agent: &mut Agent, handle: i64) -> Result<&mut File, QgaError> {
    agent
        .files
        .get_mut(&handle)
        .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))
}

/// (read, write, create, truncate, append) for an fopen mode.
fn open_flags(mode: &str) -> Option<(bool, bool, bool, bool, bool)> {
    Some(match mode {
        "r" | "rb" => (true, false, false, false, false),
        "w" | "wb" => (false, true, true, true, false),
        "a" | "ab" => (false, true, true, false, true),
        "r+" | "rb+" | "r+b" => (true, true, false, false, false),
        "w+" | "wb+" | "w+b" => (true, true, true, true, false),
        "a+" | "ab+" | "a+b" => (true, true, true, false, true),
        _ => return None,
    })
}

fn c_path(path: &str) -> std::path::PathBuf {
    std::ffi::OsStr::from_bytes(&qvirt_qga::unicode::to_mod_utf8(path)).into()
}

/// guest-file-open.
pub fn open(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let path = args.str("path")?;
    let mode = args.opt_str("mode")?;
    args.done()?;
    let mode = mode.unwrap_or_else(|| "r".to_owned());
    let Some((read, write, create, truncate, append)) = open_flags(&mode) else {
        return Err(QgaError::generic(format!(
            "invalid file open mode '{mode}'"
        )));
    };
    let cpath = c_path(&path);
    let mut opts = std::fs::OpenOptions::new();
    opts.read(read)
        .write(write)
        .truncate(truncate)
        .append(append);
    let mut created = false;
    let result = if create {
        let first = opts.clone().create_new(true).mode(0o000).open(&cpath);
        match first {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => opts.open(&cpath),
            other => {
                created = other.is_ok();
                other
            }
        }
    } else {
        opts.open(&cpath)
    };
    let file = result.map_err(|e| {
        with_errno(
            &format!("failed to open file '{path}' (mode: '{mode}')"),
            &e,
        )
    })?;
    if created {
        file.set_permissions(std::fs::Permissions::from_mode(0o666))
            .map_err(|e| {
                with_errno(
                    &format!("failed to set permission 0666 on new file '{path}' (mode: '{mode}')"),
                    &e,
                )
            })?;
    }
    crate::sys::set_nonblocking(file.as_fd())
        .map_err(|e| with_errno("Failed to set FD nonblocking", &e))?;
    let handle = agent
        .state
        .next_handle()
        .map_err(|_| QgaError::generic("failed to commit persistent state to disk"))?;
    agent.files.insert(handle, file);
    Ok(Some(Value::Int(handle)))
}

/// guest-file-close.
pub fn close(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let handle = args.int("handle")?;
    args.done()?;
    find(agent, handle)?;
    agent.files.remove(&handle);
    Ok(None)
}

/// guest-file-read.
pub fn read(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let handle = args.int("handle")?;
    let count = args.opt_int("count")?;
    args.done()?;
    let file = find(agent, handle)?;
    let count = match count {
        None => READ_COUNT_DEFAULT,
        Some(c) if !(0..=READ_COUNT_MAX).contains(&c) => {
            return Err(QgaError::generic(format!(
                "value '{c}' is invalid for argument count"
            )));
        }
        Some(c) => c,
    };
    let mut buf = vec![0u8; count as usize];
    let mut got = 0;
    let mut eof = false;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(with_errno("failed to read file", &e)),
        }
    }
    buf.truncate(got);
    let mut d = Dict::new();
    d.insert("count", got as i64);
    d.insert("buf-b64", b64::encode(&buf));
    d.insert("eof", eof);
    Ok(Some(Value::Object(d)))
}

/// guest-file-write.
pub fn write(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let handle = args.int("handle")?;
    let buf_b64 = args.str("buf-b64")?;
    let count = args.opt_int("count")?;
    args.done()?;
    let file = find(agent, handle)?;
    let data = b64::decode(&buf_b64)?;
    let count = match count {
        None => data.len(),
        Some(c) if c < 0 || c as u64 > data.len() as u64 => {
            return Err(QgaError::generic(format!(
                "value '{c}' is invalid for argument count"
            )));
        }
        Some(c) => c as usize,
    };
    let mut done = 0;
    while done < count {
        match file.write(&data[done..count]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(with_errno("failed to write to file", &e)),
        }
    }
    let mut d = Dict::new();
    d.insert("count", done as i64);
    d.insert("eof", false);
    Ok(Some(Value::Object(d)))
}

/// guest-file-seek. `whence` is the alternate of an int (0, 1, 2) and the
/// enum "set", "cur", "end".
pub fn seek(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let handle = args.int("handle")?;
    let offset = args.int("offset")?;
    let whence = match args.opt_any("whence") {
        None => return Err(QgaError::generic("Parameter 'whence' is missing")),
        Some(Value::Int(i)) => Ok(i),
        Some(Value::UInt(_)) | Some(Value::Double(_)) => Err(QgaError::generic(
            "Invalid parameter type for 'whence', expected: integer",
        )),
        Some(Value::String(s)) => match s.as_str() {
            "set" => Ok(0),
            "cur" => Ok(1),
            "end" => Ok(2),
            other => {
                return Err(QgaError::generic(format!(
                    "Parameter 'whence' does not accept value '{other}'"
                )));
            }
        },
        Some(_) => {
            return Err(QgaError::generic(
                "Invalid parameter type for 'whence', expected: GuestFileWhence",
            ));
        }
    }?;
    args.done()?;
    let file = find(agent, handle)?;
    let pos = match whence {
        0 => {
            if offset < 0 {
                return Err(with_errno(
                    "failed to seek file",
                    &io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
            SeekFrom::Start(offset as u64)
        }
        1 => SeekFrom::Current(offset),
        2 => SeekFrom::End(offset),
        other => return Err(QgaError::generic(format!("invalid whence code {other}"))),
    };
    let position = file
        .seek(pos)
        .map_err(|e| with_errno("failed to seek file", &e))?;
    let mut d = Dict::new();
    d.insert("position", position as i64);
    d.insert("eof", false);
    Ok(Some(Value::Object(d)))
}

/// guest-file-flush (writes are not buffered here, so this only checks
/// the handle and syncs nothing).
pub fn flush(agent: &mut Agent, args: &mut Args) -> CmdResult {
    let handle = args.int("handle")?;
    args.done()?;
    let file = find(agent, handle)?;
    file.flush()
        .map_err(|e| with_errno("failed to flush file", &e))?;
    Ok(None)
}
