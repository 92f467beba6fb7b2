//! The calls that take several agent commands: Exec (guest-exec, then, to
//! wait, guest-exec-status polled with a doubling pause), GetExecStatus,
//! and whole-file ReadFile / WriteFile over guest-file-open, -seek, -read
//! or -write in chunks, and -close (always sent once the open succeeded,
//! whatever happened in between). Each has a `check_*` of its request
//! fields, run before the domain is looked up.

use std::time::Duration;

use qvirt_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::call::{Limits, Target, no_nul};
use crate::convert::{self, ExecStarted, ExecStatus, FileRead, FileWrite};
use crate::status::CallError;

/// The first pause between guest-exec-status polls.
pub const EXEC_POLL_FIRST: Duration = Duration::from_millis(5);

/// `path` of a request: required, and no NUL byte.
fn check_path(path: &str) -> Result<(), CallError> {
    if path.is_empty() {
        return Err(CallError::request("path", "is required"));
    }
    no_nul("path", path)
}

/// The fields of an Exec request.
pub fn check_exec(req: &pb::ExecRequest) -> Result<(), CallError> {
    check_path(&req.path)?;
    for (i, a) in req.args.iter().enumerate() {
        no_nul(&format!("args[{i}]"), a)?;
    }
    for (i, e) in req.env.iter().enumerate() {
        no_nul(&format!("env[{i}]"), e)?;
    }
    wait_timeout(req).map(drop)
}

fn wait_timeout(req: &pb::ExecRequest) -> Result<Option<Duration>, CallError> {
    req.wait_timeout
        .map(|d| {
            Duration::try_from(d)
                .map_err(|_| CallError::request("wait_timeout", "must not be negative"))
        })
        .transpose()
}

/// guest-exec, and with `wait` guest-exec-status until it exits or
/// `wait_timeout` passes.
pub async fn exec(
    t: &Target<'_>,
    limits: &Limits,
    req: pb::ExecRequest,
) -> Result<pb::ExecResponse, CallError> {
    let wait_timeout = wait_timeout(&req)?;
    let mut args = json!({ "path": req.path, "capture-output": req.capture_output });
    if !req.args.is_empty() {
        args["arg"] = json!(req.args);
    }
    if !req.env.is_empty() {
        args["env"] = json!(req.env);
    }
    if !req.input.is_empty() {
        args["input-data"] = Value::String(convert::b64(&req.input));
    }
    let started: ExecStarted = t.get("guest-exec", Some(args)).await?;
    let pid = started.pid;
    if !req.wait {
        return Ok(pb::ExecResponse { pid, status: None });
    }
    let begin = Instant::now();
    let mut pause = EXEC_POLL_FIRST;
    loop {
        let status = exec_status(t, pid).await?;
        if status.exited {
            return Ok(pb::ExecResponse {
                pid,
                status: Some(status),
            });
        }
        if let Some(limit) = wait_timeout {
            let left = limit.saturating_sub(begin.elapsed());
            if left.is_zero() {
                return Ok(pb::ExecResponse {
                    pid,
                    status: Some(status),
                });
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(limits.exec_poll_max);
    }
}

/// guest-exec-status of `pid`.
pub async fn exec_status(t: &Target<'_>, pid: i64) -> Result<pb::GuestExecStatus, CallError> {
    let execute = "guest-exec-status";
    let st: ExecStatus = t.get(execute, Some(json!({ "pid": pid }))).await?;
    st.into_proto()
        .map_err(|member| CallError::bad_reply(execute, format!("invalid base64 in {member}")))
}

async fn open(t: &Target<'_>, path: &str, mode: &str) -> Result<i64, CallError> {
    t.get(
        "guest-file-open",
        Some(json!({ "path": path, "mode": mode })),
    )
    .await
}

async fn close(t: &Target<'_>, handle: i64) -> Result<(), CallError> {
    t.call("guest-file-close", Some(json!({ "handle": handle })))
        .await
        .map(drop)
}

/// The fields of a ReadFile request; its offset as the agent takes it.
pub fn check_read(limits: &Limits, req: &pb::ReadFileRequest) -> Result<i64, CallError> {
    check_path(&req.path)?;
    if req.length > limits.max_file_bytes as u64 {
        return Err(CallError::FileTooLarge {
            what: format!("length {}", req.length),
            limit: limits.max_file_bytes,
            hint: "",
        });
    }
    i64::try_from(req.offset).map_err(|_| CallError::request("offset", "is too large"))
}

/// Reads a file (or a range of it) in chunks.
pub async fn file_read(
    t: &Target<'_>,
    limits: &Limits,
    req: pb::ReadFileRequest,
) -> Result<pb::ReadFileResponse, CallError> {
    let offset = check_read(limits, &req)?;
    let handle = open(t, &req.path, "r").await?;
    let result = read_chunks(t, limits, handle, offset, req.length).await;
    let closed = close(t, handle).await;
    if let Err(e) = &closed {
        tracing::warn!(handle, error = %qvirt_common::error_chain(e), "guest-file-close failed after reading");
    }
    result
}

async fn read_chunks(
    t: &Target<'_>,
    limits: &Limits,
    handle: i64,
    offset: i64,
    length: u64,
) -> Result<pb::ReadFileResponse, CallError> {
    if offset > 0 {
        t.call(
            "guest-file-seek",
            Some(json!({ "handle": handle, "offset": offset, "whence": "set" })),
        )
        .await?;
    }
    let max = limits.max_file_bytes;
    let chunk = limits.file_chunk_bytes;
    let whole = length == 0;
    let want = if whole { max + 1 } else { length as usize };
    let mut data = Vec::new();
    let mut eof = false;
    while data.len() < want {
        let count = chunk.min(want - data.len());
        let r: FileRead = t
            .get(
                "guest-file-read",
                Some(json!({ "handle": handle, "count": count })),
            )
            .await?;
        let bytes = convert::unb64(&r.buf_b64)
            .map_err(|_| CallError::bad_reply("guest-file-read", "invalid base64"))?;
        // qemu-ga never returns more than asked; a guest that does would
        // grow a ranged read past its length, and a whole one past
        // max_file_bytes by a chunk of its choosing.
        if bytes.len() > count {
            return Err(CallError::bad_reply(
                "guest-file-read",
                format!("{} bytes where at most {count} were asked", bytes.len()),
            ));
        }
        if usize::try_from(r.count).ok() != Some(bytes.len()) {
            tracing::debug!(
                count = r.count,
                len = bytes.len(),
                "guest-file-read count differs from data"
            );
        }
        let empty = bytes.is_empty();
        data.extend_from_slice(&bytes);
        if r.eof || empty {
            eof = true;
            break;
        }
    }
    if whole && data.len() > max {
        return Err(CallError::FileTooLarge {
            what: "the file".into(),
            limit: max,
            hint: "; read it in ranges with offset and length",
        });
    }
    Ok(pb::ReadFileResponse {
        data,
        eof: eof || whole,
    })
}

/// The fields of a WriteFile request; the fopen mode it asks for.
pub fn check_write(limits: &Limits, req: &pb::WriteFileRequest) -> Result<&'static str, CallError> {
    check_path(&req.path)?;
    if req.data.len() > limits.max_file_bytes {
        return Err(CallError::FileTooLarge {
            what: format!("data of {} bytes", req.data.len()),
            limit: limits.max_file_bytes,
            hint: "",
        });
    }
    match pb::FileWriteMode::try_from(req.mode) {
        Ok(pb::FileWriteMode::Unspecified | pb::FileWriteMode::Create) => Ok("w"),
        Ok(pb::FileWriteMode::Append) => Ok("a"),
        Err(_) => Err(CallError::request("mode", "unknown file write mode")),
    }
}

/// Writes a whole file in chunks, opened with `mode` (from
/// [`check_write`]).
pub async fn file_write(
    t: &Target<'_>,
    limits: &Limits,
    mode: &str,
    req: pb::WriteFileRequest,
) -> Result<pb::WriteFileResponse, CallError> {
    let handle = open(t, &req.path, mode).await?;
    let result = write_chunks(t, limits, handle, &req.data).await;
    let closed = close(t, handle).await;
    let written_bytes = result?;
    closed?;
    Ok(pb::WriteFileResponse { written_bytes })
}

async fn write_chunks(
    t: &Target<'_>,
    limits: &Limits,
    handle: i64,
    data: &[u8],
) -> Result<u64, CallError> {
    let mut written = 0u64;
    for piece in data.chunks(limits.file_chunk_bytes) {
        let w: FileWrite = t
            .get(
                "guest-file-write",
                Some(json!({ "handle": handle, "buf-b64": convert::b64(piece) })),
            )
            .await?;
        if usize::try_from(w.count).ok() != Some(piece.len()) {
            return Err(CallError::ShortWrite {
                written: w.count,
                asked: piece.len(),
            });
        }
        written += piece.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
