//! The `qvirt-agentd` config file (YAML; every field optional): where to
//! serve, where each guest's agent socket is (a static map, or the
//! supervisor), and the timeouts and size limits of agent commands.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

/// The port `qvirt-agentd` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50055;

/// The most a single agent reply may be, in bytes (qemu-ga's own message
/// limit is 64 MiB; a guest-exec-status with two full 16 MiB captures is
/// about 43 MiB of base64).
pub const MAX_REPLY_BYTES_LIMIT: usize = 128 << 20;

/// `qvirt-agentd` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC: `IP:PORT` or `unix:PATH`.
    pub listen: ListenAddr,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Close a new connection that has not sent the HTTP/2 preface within
    /// this many milliseconds (100 to 600000).
    pub preface_timeout_ms: u64,
    /// Static agent sockets: domain name or UUID -> host path of the
    /// guest agent's unix socket. Looked up before the supervisor; for
    /// tests and for guests started outside qvirt.
    pub agents: BTreeMap<String, PathBuf>,
    /// The supervisor's gRPC endpoint (`http://HOST:PORT` or `unix:PATH`), asked for
    /// `Domain.agent_socket` of domains not in `agents`. Absent: only
    /// `agents` is used.
    pub supervisor: Option<String>,
    /// Limit for one agent command when the request gives no `timeout` (or
    /// zero), milliseconds.
    pub command_timeout_ms: u64,
    /// Limit for the resynchronisation handshake (0xFF +
    /// guest-sync-delimited) before a command, milliseconds; an agent that
    /// does not answer it in time is UNAVAILABLE.
    pub sync_timeout_ms: u64,
    /// Largest agent reply line accepted, bytes; a bigger one fails the
    /// call with RESOURCE_EXHAUSTED and the connection is reopened.
    pub max_reply_bytes: usize,
    /// Largest ReadFile result and WriteFile payload, bytes (also the gRPC
    /// message size limit of this service, plus framing room).
    pub max_file_bytes: usize,
    /// Bytes per guest-file-read / guest-file-write command.
    pub file_chunk_bytes: usize,
    /// Longest pause between guest-exec-status polls of a waiting Exec,
    /// milliseconds (polls start at 5 ms and double up to this).
    pub exec_poll_max_ms: u64,
    /// Commands that may wait for one guest's channel; more are refused
    /// with RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Close a guest's agent connection after this many seconds without
    /// commands (it is reopened and resynchronised on the next one); 0:
    /// keep it open. qemu-ga serves one client at a time, so an idle
    /// connection blocks other clients such as `virsh` or a debugging
    /// session.
    pub idle_close_secs: u64,
    /// Runtime threads. 0 (the default): one worker per core, so one
    /// guest's large file transfer (base64 and JSON work) never holds up
    /// other guests' calls; 1: the whole service on one thread, as qemu-ga
    /// itself (no cross-thread wake-ups; the ping bench measures both side
    /// by side and found no consistent difference on this 2-core VM); N: N
    /// workers.
    pub worker_threads: usize,
    /// A file holding the internal plane's shared secret (at least 32
    /// bytes, not readable by every user). The agent service serves
    /// `qvirt.v1.GuestAgent` only to callers that present it in
    /// `x-qvirt-internal-token` (the gateway, the supervisor) or to
    /// `internal_uids` peers on a unix socket, and presents it to the
    /// supervisor. Absent (the default): every TCP caller is refused, and
    /// so are this service's calls to a supervisor over TCP.
    pub internal_token_file: Option<PathBuf>,
    /// Unix-socket peers (by uid) served without the token, besides uid 0
    /// and the agent service's own uid.
    pub internal_uids: Vec<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            agents: BTreeMap::new(),
            supervisor: None,
            command_timeout_ms: 10_000,
            sync_timeout_ms: 5_000,
            max_reply_bytes: 64 << 20,
            max_file_bytes: 16 << 20,
            file_chunk_bytes: 1 << 20,
            exec_poll_max_ms: 500,
            queue_depth: 64,
            idle_close_secs: 60,
            worker_threads: 0,
            internal_token_file: None,
            internal_uids: Vec::new(),
        }
    }
}

impl Config {
    /// The default per-command timeout.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, reason: String| ConfigError::Invalid {
            field,
            value,
            reason,
        };
        for (field, value) in [
            ("command_timeout_ms", self.command_timeout_ms),
            ("sync_timeout_ms", self.sync_timeout_ms),
            ("exec_poll_max_ms", self.exec_poll_max_ms),
        ] {
            if value == 0 {
                return Err(invalid(field, "0".into(), "must be at least 1".into()));
            }
        }
        if self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                self.worker_threads.to_string(),
                "must be at most 1024 (0: one per core)".into(),
            ));
        }
        if self.max_reply_bytes < 4096 || self.max_reply_bytes > MAX_REPLY_BYTES_LIMIT {
            return Err(invalid(
                "max_reply_bytes",
                self.max_reply_bytes.to_string(),
                format!("must be between 4096 and {MAX_REPLY_BYTES_LIMIT}"),
            ));
        }
        // A chunk is sent and received base64-encoded (4/3) inside a reply.
        let chunk_limit = (self.max_reply_bytes / 4) * 3 - 1024;
        if self.file_chunk_bytes == 0 || self.file_chunk_bytes > chunk_limit {
            return Err(invalid(
                "file_chunk_bytes",
                self.file_chunk_bytes.to_string(),
                format!("must be between 1 and {chunk_limit} (3/4 of max_reply_bytes)"),
            ));
        }
        if self.max_file_bytes == 0 || self.max_file_bytes > (1 << 30) {
            return Err(invalid(
                "max_file_bytes",
                self.max_file_bytes.to_string(),
                "must be between 1 and 1 GiB".into(),
            ));
        }
        if self.queue_depth == 0 || self.queue_depth > 65_536 {
            return Err(invalid(
                "queue_depth",
                self.queue_depth.to_string(),
                "must be between 1 and 65536".into(),
            ));
        }
        for (name, path) in &self.agents {
            if name.is_empty() {
                return Err(invalid(
                    "agents",
                    path.display().to_string(),
                    "a domain name must not be empty".into(),
                ));
            }
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    "agents",
                    name.clone(),
                    "the socket path must not be empty".into(),
                ));
            }
        }
        if let Some(url) = &self.supervisor {
            qvirt_common::config::check_endpoint("supervisor", url)?;
        }
        qvirt_common::internal_auth::InternalToken::load_optional(
            self.internal_token_file.as_ref(),
        )?;
        Ok(())
    }
}

qvirt_common::impl_service_config!(Config, Config::check, workers = worker_threads);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use qvirt_common::cli::ServiceConfig;

    use super::*;

    #[test]
    fn test_defaults_are_valid() {
        let c = Config::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.command_timeout(), Duration::from_secs(10));
        // A runtime thread per core unless asked otherwise (see the field).
        assert_eq!(c.worker_threads(), 0);
        let c: Config =
            qvirt_common::config::parse(Path::new("a.yaml"), "worker_threads: 1\n").unwrap();
        assert_eq!(c.worker_threads(), 1);
    }

    #[test]
    fn test_agents_map_parses_names_and_uuids() {
        let c: Config = qvirt_common::config::parse(
            Path::new("a.yaml"),
            "agents:\n  web1: /run/a.sock\n  6f9619ff-8b86-d011-b42d-00c04fc964ff: /run/b.sock\n\
             supervisor: http://127.0.0.1:50052\ncommand_timeout_ms: 250\n",
        )
        .unwrap();
        assert_eq!(c.agents["web1"], PathBuf::from("/run/a.sock"));
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.command_timeout(), Duration::from_millis(250));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn test_unknown_field_is_rejected_with_location() {
        let err = qvirt_common::config::parse::<Config>(
            Path::new("a.yaml"),
            "command_timeout_ms: 5\nagent: {}\n",
        )
        .unwrap_err();
        let line = qvirt_common::error_chain(&err);
        assert!(line.contains("unknown field `agent`"), "{line}");
        assert!(line.contains("line 2 column 1"), "{line}");
    }

    #[test]
    fn test_validate_rejects_bad_values() {
        type Edit = fn(&mut Config);
        let cases: [(&str, Edit); 7] = [
            ("worker_threads", |c| c.worker_threads = 5000),
            ("command_timeout_ms", |c| c.command_timeout_ms = 0),
            ("sync_timeout_ms", |c| c.sync_timeout_ms = 0),
            ("max_reply_bytes", |c| c.max_reply_bytes = 10),
            ("file_chunk_bytes", |c| c.file_chunk_bytes = 64 << 20),
            ("queue_depth", |c| c.queue_depth = 0),
            ("supervisor", |c| c.supervisor = Some("not a url".into())),
        ];
        for (field, edit) in cases {
            let mut c = Config::default();
            edit(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }
}
