//! Is a recorded pid still the same QEMU? Pids are reused, so a record keeps
//! the process start time (`/proc/PID/stat` field 22, clock ticks since
//! boot) and its command line; both must match.

use std::io;

use serde::{Deserialize, Serialize};

/// What identifies one process instance across a supervisor restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The command line (`/proc/PID/cmdline`), arguments lossily UTF-8.
    pub cmdline: Vec<String>,
}

/// Why a pid is not (or cannot be shown to be) the recorded process.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No such process, or it has exited (zombie).
    #[error("process {pid} is not running")]
    NotRunning {
        /// The pid.
        pid: u32,
    },
    /// Reading `/proc/PID/...` failed.
    #[error("reading /proc/{pid}/{file}")]
    ReadProc {
        /// The pid.
        pid: u32,
        /// `stat` or `cmdline`.
        file: &'static str,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// `/proc/PID/stat` did not have the expected shape.
    #[error("unexpected /proc/{pid}/stat: {reason}")]
    ParseStat {
        /// The pid.
        pid: u32,
        /// What was wrong.
        reason: &'static str,
    },
    /// The pid now belongs to a process started at another time.
    #[error("process {pid} started at tick {found}, not {recorded}: the pid was reused")]
    StartTimeMismatch {
        /// The pid.
        pid: u32,
        /// The recorded start time.
        recorded: u64,
        /// The start time found now.
        found: u64,
    },
    /// The pid runs another command line.
    #[error("process {pid} runs another command line")]
    CmdlineMismatch {
        /// The pid.
        pid: u32,
    },
}

impl IdentityError {
    /// Whether the error proves the recorded process is gone (exited, or
    /// its pid reused by another process), rather than that it could not
    /// be checked (a read or parse failure).
    pub fn proves_gone(&self) -> bool {
        matches!(
            self,
            IdentityError::NotRunning { .. }
                | IdentityError::StartTimeMismatch { .. }
                | IdentityError::CmdlineMismatch { .. }
        )
    }
}

/// Parse the state letter and start time (fields 3 and 22) of a
/// `/proc/PID/stat` line. Field 2, the command name in parentheses, may hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub(crate) fn parse_stat(stat: &str) -> Result<(char, u64), &'static str> {
    let close = stat.rfind(')').ok_or("no ')' after the command name")?;
    let mut fields = stat[close + 1..].split_ascii_whitespace();
    let state = fields
        .next()
        .and_then(|f| f.chars().next())
        .ok_or("no state field")?;
    // fields now starts at field 4; field 22 is 18 further on.
    let start = fields.nth(18).ok_or("no start time field")?;
    let start = start.parse().map_err(|_| "start time is not a number")?;
    Ok((state, start))
}

fn read_error(pid: u32, file: &'static str, source: io::Error) -> IdentityError {
    if source.kind() == io::ErrorKind::NotFound {
        IdentityError::NotRunning { pid }
    } else {
        IdentityError::ReadProc { pid, file, source }
    }
}

impl ProcessIdentity {
    /// Read the identity of the running process `pid`.
    pub async fn read(pid: u32) -> Result<Self, IdentityError> {
        let stat = tokio::fs::read(format!("/proc/{pid}/stat"))
            .await
            .map_err(|e| read_error(pid, "stat", e))?;
        let (state, start_time) = parse_stat(&String::from_utf8_lossy(&stat))
            .map_err(|reason| IdentityError::ParseStat { pid, reason })?;
        if matches!(state, 'Z' | 'X') {
            return Err(IdentityError::NotRunning { pid });
        }
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline"))
            .await
            .map_err(|e| read_error(pid, "cmdline", e))?;
        let cmdline = cmdline
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        Ok(ProcessIdentity {
            pid,
            start_time,
            cmdline,
        })
    }

    /// Check that the recorded process is still running as this pid:
    /// same start time and command line.
    pub async fn verify(&self) -> Result<(), IdentityError> {
        let now = Self::read(self.pid).await?;
        if now.start_time != self.start_time {
            return Err(IdentityError::StartTimeMismatch {
                pid: self.pid,
                recorded: self.start_time,
                found: now.start_time,
            });
        }
        if now.cmdline != self.cmdline {
            return Err(IdentityError::CmdlineMismatch { pid: self.pid });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_exit_or_pid_reuse_proves_gone() {
        let gone = [
            IdentityError::NotRunning { pid: 1 },
            IdentityError::StartTimeMismatch {
                pid: 1,
                recorded: 1,
                found: 2,
            },
            IdentityError::CmdlineMismatch { pid: 1 },
        ];
        assert!(gone.iter().all(IdentityError::proves_gone));
        let unknown = [
            IdentityError::ReadProc {
                pid: 1,
                file: "stat",
                source: io::Error::from_raw_os_error(libc::EACCES),
            },
            IdentityError::ParseStat {
                pid: 1,
                reason: "no ')'",
            },
        ];
        assert!(!unknown.iter().any(IdentityError::proves_gone));
    }

    #[test]
    fn test_parse_stat_table() {
        let table = [
            (
                "1234 (qemu-system-x86) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 98765 1000 200",
                Ok(('S', 98_765)),
            ),
            (
                "77 (a) b) (c) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0 0",
                Ok(('R', 42)),
            ),
            ("77 (short) S 1 2 3", Err("no start time field")),
            ("no parens", Err("no ')' after the command name")),
            (
                "77 (x) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 notanumber 0",
                Err("start time is not a number"),
            ),
        ];
        for (line, want) in table {
            assert_eq!(parse_stat(line), want, "{line}");
        }
    }

    #[tokio::test]
    async fn test_own_identity_verifies() {
        let me = ProcessIdentity::read(std::process::id())
            .await
            .expect("own identity");
        assert!(!me.cmdline.is_empty());
        me.verify().await.expect("same process");
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(matches!(
            reused.verify().await,
            Err(IdentityError::StartTimeMismatch { .. })
        ));
        let other = ProcessIdentity {
            cmdline: vec!["something-else".to_owned()],
            ..me
        };
        assert!(matches!(
            other.verify().await,
            Err(IdentityError::CmdlineMismatch { .. })
        ));
    }
}
