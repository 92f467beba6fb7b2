//! The `qvirt-gateway` config file (YAML; every field optional).

use std::path::PathBuf;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat, check_endpoint};
use serde::{Deserialize, Serialize};

use crate::roles::Role;

/// The port `qvirt-gateway` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50051;

/// The longest principal name a token may carry, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 64;

/// The values `health_poll_ms` may take.
pub const HEALTH_POLL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=60_000;

/// `qvirt-gateway` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC in plaintext, with bearer tokens: `IP:PORT` or
    /// `unix:PATH`. Plaintext TCP is for loopback and development only.
    pub listen: ListenAddr,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Close a new connection that has not sent the HTTP/2 preface within
    /// this many milliseconds (100 to 600000).
    pub preface_timeout_ms: u64,
    /// The supervisor's endpoint (`http://HOST:PORT` or `unix:PATH`).
    pub supervisor: String,
    /// The event bus's endpoint.
    pub eventbus: String,
    /// The agent service's endpoint.
    pub agentd: String,
    /// A file holding the internal plane's shared secret, presented to
    /// every backend with the caller's principal (`x-qvirt-principal`).
    /// Without it the backends see the gateway as an anonymous caller.
    pub internal_token_file: Option<PathBuf>,
    /// Bearer tokens, as SHA-256 hashes (`qvirt-gateway token new` prints
    /// an entry). Reloaded from the config file on SIGHUP.
    pub tokens: Vec<TokenEntry>,
    /// How often each backend's health is checked, in milliseconds.
    pub health_poll_ms: u64,
    /// Append one JSON line per read-write call and per denial here (also
    /// logged with target `qvirt::audit`).
    pub audit_file: Option<PathBuf>,
    /// The read-write unix socket (libvirt's `libvirt-sock`): its file
    /// permissions are the access control; callers are `unix:uid:N`.
    pub rw_socket: Option<SocketConfig>,
    /// The read-only unix socket (libvirt's `libvirt-sock-ro`).
    pub ro_socket: Option<SocketConfig>,
    /// Per-principal limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            supervisor: "http://127.0.0.1:50052".into(),
            eventbus: "http://127.0.0.1:50053".into(),
            agentd: "http://127.0.0.1:50055".into(),
            internal_token_file: None,
            tokens: Vec::new(),
            health_poll_ms: 1000,
            audit_file: None,
            rw_socket: None,
            ro_socket: None,
            limits: Limits::default(),
        }
    }
}

/// One bearer token: only its hash is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The principal the token authenticates (letters, digits, `.`, `_`,
    /// `-`, `@`; at most [`MAX_PRINCIPAL_LEN`] bytes).
    pub name: String,
    /// `read-only` or `read-write`.
    pub role: Role,
    /// SHA-256 of the token, 64 lowercase hex digits.
    pub sha256: String,
}

/// A unix socket the gateway serves on, as libvirt's sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// The socket's path.
    pub path: PathBuf,
    /// Its file mode, octal text (`"0600"`); default 0600 for the
    /// read-write socket, 0666 for the read-only one.
    #[serde(default)]
    pub mode: Option<String>,
    /// Owner (user name or uid); default: the gateway's user.
    #[serde(default)]
    pub owner: Option<String>,
    /// Group (group name or gid); default: the gateway's group.
    #[serde(default)]
    pub group: Option<String>,
}

/// Per-principal limits; past one, RESOURCE_EXHAUSTED naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent calls whose responses stream (subscriptions), per
    /// principal.
    pub max_streams_per_principal: u32,
    /// Concurrent monitor-event subscriptions per principal (also counted
    /// in `max_streams_per_principal`).
    pub max_monitor_subscriptions_per_principal: u32,
    /// Calls per second per principal (a burst of as many is allowed).
    pub calls_per_second: u32,
    /// The largest request message accepted, bytes.
    pub max_request_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_principal: 64,
            max_monitor_subscriptions_per_principal: 8,
            calls_per_second: 200,
            max_request_bytes: 4 << 20,
        }
    }
}

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        check_endpoint("supervisor", &self.supervisor)?;
        check_endpoint("eventbus", &self.eventbus)?;
        check_endpoint("agentd", &self.agentd)?;
        check_tokens(&self.tokens)?;
        if !HEALTH_POLL_MS_RANGE.contains(&self.health_poll_ms) {
            return Err(invalid(
                "health_poll_ms",
                self.health_poll_ms.to_string(),
                "must be between 100 and 60000",
            ));
        }
        let l = &self.limits;
        for (field, value) in [
            (
                "limits.max_streams_per_principal",
                l.max_streams_per_principal,
            ),
            (
                "limits.max_monitor_subscriptions_per_principal",
                l.max_monitor_subscriptions_per_principal,
            ),
            ("limits.calls_per_second", l.calls_per_second),
            ("limits.max_request_bytes", l.max_request_bytes),
        ] {
            if value == 0 {
                return Err(invalid(field, "0".into(), "must be at least 1"));
            }
        }
        for (field, socket) in [
            ("rw_socket", &self.rw_socket),
            ("ro_socket", &self.ro_socket),
        ] {
            if let Some(s) = socket {
                s.mode_bits(0).map_err(|reason| {
                    invalid(field, s.mode.clone().unwrap_or_default(), &reason)
                })?;
            }
        }
        Ok(())
    }
}

impl SocketConfig {
    /// The mode bits, `default` when none is configured.
    pub fn mode_bits(&self, default: u32) -> Result<u32, String> {
        match &self.mode {
            None => Ok(default),
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| format!("mode {text:?} is not octal permission bits like \"0660\"")),
        }
    }
}

fn invalid(field: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value,
        reason: reason.to_owned(),
    }
}

/// Checks the `tokens` list: principal names, hash form, no hash twice.
pub fn check_tokens(tokens: &[TokenEntry]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for t in tokens {
        let name_ok = !t.name.is_empty()
            && t.name.len() <= MAX_PRINCIPAL_LEN
            && t.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !name_ok {
            return Err(invalid(
                "tokens[].name",
                t.name.clone(),
                "must be 1 to 64 letters, digits, '.', '_', '-' or '@'",
            ));
        }
        let hash_ok = t.sha256.len() == 64
            && t.sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hash_ok {
            return Err(invalid(
                "tokens[].sha256",
                t.sha256.clone(),
                "must be 64 lowercase hex digits (qvirt-gateway token new prints one)",
            ));
        }
        if !seen.insert(t.sha256.as_str()) {
            return Err(invalid(
                "tokens[].sha256",
                t.sha256.clone(),
                "appears twice",
            ));
        }
    }
    Ok(())
}

qvirt_common::impl_service_config!(Config, Config::check);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_common::cli::ServiceConfig as _;

    use super::*;

    #[test]
    fn test_tokens_parse_and_bad_entries_are_refused() {
        let good = format!(
            "tokens:\n  - name: alice\n    role: read-write\n    sha256: {}\n",
            "ab".repeat(32)
        );
        let c: Config = qvirt_common::config::parse(std::path::Path::new("g.yaml"), &good).unwrap();
        assert_eq!(c.tokens[0].role, Role::ReadWrite);
        c.validate().unwrap();
        for (yaml, want) in [
            (good.replace("alice", "a b"), "tokens[].name"),
            (good.replace(&"ab".repeat(32), "xyz"), "tokens[].sha256"),
            (good.replace("read-write", "admin"), "unknown variant"),
        ] {
            let err = qvirt_common::config::parse::<Config>(std::path::Path::new("g.yaml"), &yaml)
                .and_then(|c| c.validate());
            let line = qvirt_common::error_chain(&err.unwrap_err());
            assert!(line.contains(want), "{line}");
        }
    }

    #[test]
    fn test_socket_mode_parses_octal() {
        let s = SocketConfig {
            path: "/x".into(),
            mode: Some("0660".into()),
            owner: None,
            group: None,
        };
        assert_eq!(s.mode_bits(0o600).unwrap(), 0o660);
        let s = SocketConfig {
            mode: Some("999".into()),
            ..s
        };
        assert!(s.mode_bits(0).is_err());
    }
}
