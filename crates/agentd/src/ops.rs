//! The calls that take several agent commands: Exec (guest-exec, then, to
//! wait, guest-exec-status polled with a doubling pause), ExecStatus, and
//! whole-file FileRead / FileWrite over guest-file-open, -seek, -read or
//! -write in chunks, and -close (always sent once the open succeeded,
//! whatever happened in between).

use std::time::Duration;

use qvirt_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::Status;

use crate::convert::{self, ExecStarted, ExecStatus, FileRead, FileWrite};
use crate::service::{Limits, Target};

/// The first pause between guest-exec-status polls.
pub const EXEC_POLL_FIRST: Duration = Duration::from_millis(5);

/// guest-exec, and with `wait` guest-exec-status until it exits or
/// `wait_timeout` passes.
pub async fn exec(
    t: &Target<'_>,
    limits: &Limits,
    req: pb::ExecRequest,
) -> Result<pb::ExecResponse, Status> {
    if req.path.is_empty() {
        return Err(Status::invalid_argument("path is required"));
    }
    let wait_timeout = match req.wait_timeout {
        None => None,
        Some(d) => Some(
            Duration::try_from(d)
                .map_err(|_| Status::invalid_argument("wait_timeout must not be negative"))?,
        ),
    };
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
pub async fn exec_status(t: &Target<'_>, pid: i64) -> Result<pb::GuestExecStatus, Status> {
    let st: ExecStatus = t
        .get("guest-exec-status", Some(json!({ "pid": pid })))
        .await?;
    st.into_proto().map_err(|member| {
        crate::status::untrusted_reply(&format!("invalid base64 in guest-exec-status {member}"))
    })
}

async fn open(t: &Target<'_>, path: &str, mode: &str) -> Result<i64, Status> {
    t.get(
        "guest-file-open",
        Some(json!({ "path": path, "mode": mode })),
    )
    .await
}

async fn close(t: &Target<'_>, handle: i64) -> Result<(), Status> {
    t.call("guest-file-close", Some(json!({ "handle": handle })))
        .await
        .map(drop)
}

/// Reads a file (or a range of it) in chunks.
pub async fn file_read(
    t: &Target<'_>,
    limits: &Limits,
    req: pb::FileReadRequest,
) -> Result<pb::FileReadResponse, Status> {
    if req.path.is_empty() {
        return Err(Status::invalid_argument("path is required"));
    }
    let max = limits.max_file_bytes as u64;
    if req.length > max {
        return Err(Status::resource_exhausted(format!(
            "length {} exceeds this service's limit of {max} bytes (max_file_bytes)",
            req.length
        )));
    }
    let offset =
        i64::try_from(req.offset).map_err(|_| Status::invalid_argument("offset is too large"))?;
    let handle = open(t, &req.path, "r").await?;
    let result = read_chunks(t, limits, handle, offset, req.length).await;
    let closed = close(t, handle).await;
    if let Err(e) = &closed {
        tracing::warn!(handle, error = %e.message(), "guest-file-close failed after reading");
    }
    result
}

async fn read_chunks(
    t: &Target<'_>,
    limits: &Limits,
    handle: i64,
    offset: i64,
    length: u64,
) -> Result<pb::FileReadResponse, Status> {
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
            .map_err(|_| crate::status::untrusted_reply("invalid base64 in guest-file-read"))?;
        // qemu-ga never returns more than asked; a guest that does would
        // grow a ranged read past its length, and a whole one past
        // max_file_bytes by a chunk of its choosing.
        if bytes.len() > count {
            return Err(crate::status::untrusted_reply(&format!(
                "guest-file-read returned {} bytes where at most {count} were asked",
                bytes.len()
            )));
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
        return Err(Status::resource_exhausted(format!(
            "the file is larger than this service's limit of {max} bytes (max_file_bytes); \
             read it in ranges with offset and length"
        )));
    }
    Ok(pb::FileReadResponse {
        data,
        eof: eof || whole,
    })
}

/// Writes a whole file in chunks.
pub async fn file_write(
    t: &Target<'_>,
    limits: &Limits,
    req: pb::FileWriteRequest,
) -> Result<pb::FileWriteResponse, Status> {
    if req.path.is_empty() {
        return Err(Status::invalid_argument("path is required"));
    }
    if req.data.len() > limits.max_file_bytes {
        return Err(Status::resource_exhausted(format!(
            "data of {} bytes exceeds this service's limit of {} bytes (max_file_bytes)",
            req.data.len(),
            limits.max_file_bytes
        )));
    }
    let mode = match pb::FileWriteMode::try_from(req.mode) {
        Ok(pb::FileWriteMode::Unspecified | pb::FileWriteMode::Create) => "w",
        Ok(pb::FileWriteMode::Append) => "a",
        Err(_) => return Err(Status::invalid_argument("mode: unknown file write mode")),
    };
    let handle = open(t, &req.path, mode).await?;
    let result = write_chunks(t, limits, handle, &req.data).await;
    let closed = close(t, handle).await;
    let written = result?;
    closed?;
    Ok(pb::FileWriteResponse { written })
}

async fn write_chunks(
    t: &Target<'_>,
    limits: &Limits,
    handle: i64,
    data: &[u8],
) -> Result<u64, Status> {
    let mut written = 0u64;
    for piece in data.chunks(limits.file_chunk_bytes) {
        let w: FileWrite = t
            .get(
                "guest-file-write",
                Some(json!({ "handle": handle, "buf-b64": convert::b64(piece) })),
            )
            .await?;
        if usize::try_from(w.count).ok() != Some(piece.len()) {
            return Err(Status::failed_precondition(format!(
                "guest agent wrote {} of {} bytes",
                w.count,
                piece.len()
            )));
        }
        written += piece.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
