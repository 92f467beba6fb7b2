//! The audit trail: one JSON line per read-write call and per denial,
//! logged with target `qvirt::audit` and appended to `audit_file` when one
//! is configured (opened for appending, never truncated). Lines go to the
//! file from a thread of their own through a bounded queue, so a slow disk
//! never stalls a call; a line the full queue cannot take is still in the
//! log, and a warning says it missed the file.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Lines queued for the file before new ones only reach the log.
pub const AUDIT_QUEUE: usize = 4096;

/// One audited call.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When the call arrived, RFC 3339 UTC.
    pub time: String,
    /// Who called (empty when not authenticated).
    pub principal: String,
    /// The peer: `IP:PORT` over TCP, `uid:N` on a unix socket.
    pub peer: String,
    /// `tcp`, `unix-rw` or `unix-ro`.
    pub transport: &'static str,
    /// `/SERVICE/METHOD`.
    pub method: String,
    /// The request's `domain` field, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The request's `request_id` field, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub status: &'static str,
    /// The gRPC status code number.
    pub code: i32,
    /// How long the call took, milliseconds.
    pub duration_ms: f64,
}

/// Where audit lines go.
#[derive(Debug, Clone)]
pub struct Audit {
    file: Option<std::sync::mpsc::SyncSender<String>>,
}

/// Why the audit file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit file {path} for appending")]
pub struct AuditError {
    path: String,
    #[source]
    source: std::io::Error,
}

impl Audit {
    /// Audit lines to the log, and to `path` when given.
    pub fn open(path: Option<&Path>) -> Result<Self, AuditError> {
        let Some(path) = path else {
            return Ok(Audit { file: None });
        };
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| AuditError {
                path: path.display().to_string(),
                source,
            })?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(AUDIT_QUEUE);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    if let Err(e) = file.write_all(line.as_bytes()) {
                        tracing::error!(error = %e, "cannot append to the audit file");
                    }
                }
            })
            .map_err(|source| AuditError {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Audit { file: Some(tx) })
    }

    /// Writes `record` once the calling task's turn is over: a call's
    /// line (a write to the log and a wake-up of the audit thread) then
    /// follows its answer onto the wire instead of delaying it, since the
    /// connection's task writes the answer out before it yields. Outside
    /// a runtime, or when the runtime goes away first, at once.
    pub fn write_after_turn(&self, record: Record) {
        let line = Deferred(Some((self.clone(), record)));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move { drop(line) })),
            Err(_) => drop(line),
        }
    }

    /// Writes `record` at once (callers use
    /// [`Audit::write_after_turn`]).
    fn write(&self, record: &Record) {
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        tracing::info!(target: "qvirt::audit", "{line}");
        if let Some(tx) = &self.file
            && tx.try_send(line + "\n").is_err()
        {
            tracing::warn!("audit queue full: the line above is missing from the audit file");
        }
    }
}

/// An audit line written when dropped: by the task that carries it, or
/// with that task when its runtime drops it unrun.
struct Deferred(Option<(Audit, Record)>);

impl Drop for Deferred {
    fn drop(&mut self) {
        if let Some((audit, record)) = self.0.take() {
            audit.write(&record);
        }
    }
}

/// The gRPC code name of `code`, as audit lines spell it.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// `t` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn test_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_733_551_200_123);
        assert_eq!(rfc3339(t), "2024-12-07T06:00:00.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn test_code_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(7), "PERMISSION_DENIED");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
    }

    #[test]
    fn test_lines_are_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let audit = Audit::open(Some(&path)).unwrap();
        audit.write(&record("alice"));
        drop(audit);
        wait_lines(&path, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("earlier\n"));
        let line: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(line["domain"], "vm1");
        assert_eq!(line["principal"], "alice");
        assert!(line.get("request_id").is_none());
    }

    fn record(principal: &str) -> Record {
        Record {
            time: rfc3339(SystemTime::now()),
            principal: principal.into(),
            peer: "127.0.0.1:1".into(),
            transport: "tcp",
            method: "/qvirt.v1.Supervisor/StartDomain".into(),
            domain: Some("vm1".into()),
            request_id: None,
            status: "OK",
            code: 0,
            duration_ms: 1.5,
        }
    }

    /// Waits (bounded) until `path` holds `n` lines.
    fn wait_lines(path: &Path, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() == n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A line deferred past the turn is written once the turn ends, and
    /// still once when the runtime goes away before it could run.
    #[test]
    fn test_a_deferred_line_is_written_after_the_turn_or_with_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(&path)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            audit.write_after_turn(record("ran"));
            // Nothing yet: the line waits for this task to yield.
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
            tokio::task::yield_now().await;
        });
        wait_lines(&path, 1);
        rt.block_on(async { audit.write_after_turn(record("dropped")) });
        drop(rt);
        drop(audit);
        wait_lines(&path, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"ran\"") && text.contains("\"dropped\""),
            "{text}"
        );
    }
}
