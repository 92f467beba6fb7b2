//! The `qvirt-gateway` config file (YAML; every field optional).

use std::path::PathBuf;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat, check_endpoint};
use serde::{Deserialize, Serialize};

use crate::roles::Role;

/// The port `qvirt-gateway` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50051;

/// The longest principal name a token may carry, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 64;

/// The most runtime threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The values `health_poll_ms` may take.
pub const HEALTH_POLL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=60_000;

/// `qvirt-gateway` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC: `IP:PORT` or `unix:PATH`. With a `tls`
    /// section a TCP `listen` serves TLS; without one it serves plaintext,
    /// which a non-loopback address accepts only with `plaintext: true`.
    pub listen: ListenAddr,
    /// Allow a plaintext TCP `listen` on a non-loopback address (e.g. in a
    /// container behind a private network). Development only: tokens then
    /// cross the network in the clear.
    pub plaintext: bool,
    /// Serve `listen` over TLS, and with `client_ca_file` require client
    /// certificates (mTLS) mapped to principals by `clients`.
    pub tls: Option<TlsConfig>,
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
    /// Without it the backends refuse the gateway's calls, unless they
    /// serve it on a unix socket as one of their internal uids.
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
    /// Fleet mode: the hosts' supervisors and agent services come from the
    /// fleet registry on these NATS servers (`supervisor` and `agentd`
    /// are then unused; `eventbus` is the fleet bus beside the gateway).
    pub fleet: Option<FleetConfig>,
    /// Connection threads (0, the default: one per core). Each accepts
    /// connections on every listener and serves them and their calls
    /// alone, over backend connections of its own ([`crate::serve`]).
    /// The gateway's own tasks (health polls, the fleet view, reloads)
    /// run on one more thread.
    pub worker_threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            plaintext: false,
            tls: None,
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
            fleet: None,
            worker_threads: 0,
        }
    }
}

/// The most `fleet.urls`.
pub const MAX_FLEET_URLS: usize = 16;

/// `fleet:`: a gateway in front of many hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The NATS servers holding the fleet registry (`nats://HOST:PORT`).
    pub urls: Vec<String>,
    /// A file holding the token the NATS servers ask of clients (their
    /// `authorization { token }`). Absent: connect without one.
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) the NATS servers' certificates chain to: connect with
    /// TLS, trusting it alone. Absent: TLS only for a `tls://` URL or a
    /// server that asks for it, trusting the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl FleetConfig {
    /// The token and CA it names, read and checked.
    pub fn access(&self) -> Result<qvirt_registry::NatsAccess, ConfigError> {
        qvirt_registry::NatsAccess::load(
            "fleet",
            self.token_file.as_deref(),
            self.ca_file.as_deref(),
        )
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.urls.is_empty() || self.urls.len() > MAX_FLEET_URLS {
            return Err(invalid(
                "fleet.urls",
                self.urls.join(","),
                "must list 1 to 16 NATS servers (nats://HOST:PORT)",
            ));
        }
        for url in &self.urls {
            if !qvirt_registry::valid_url(url) {
                return Err(invalid(
                    "fleet.urls",
                    url.clone(),
                    "expected nats://HOST:PORT (or tls://HOST:PORT)",
                ));
            }
        }
        self.access()?;
        Ok(())
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

/// The longest file `tls` reads (a certificate chain, a key, a CA
/// bundle), bytes.
pub use qvirt_common::pem::MAX_PEM_FILE_BYTES;

/// The most `tls.clients` entries.
pub const MAX_TLS_CLIENTS: usize = 4096;

/// The longest certificate name (`cn`, `dns`, `uri`, `email`) a
/// `tls.clients` entry may match, bytes.
pub const MAX_CERT_NAME_LEN: usize = 256;

/// TLS on the `listen` port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM (leaf first).
    pub cert_file: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to. When
    /// set, every TLS client must present a certificate (mTLS), and the
    /// certificate must match a `clients` entry.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Client certificates to principals: the first entry whose name the
    /// certificate carries decides.
    #[serde(default)]
    pub clients: Vec<ClientCertEntry>,
}

/// One client-certificate mapping: exactly one of `cn`, `dns`, `uri`,
/// `email` names the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertEntry {
    /// The principal (as a token's `name`).
    pub name: String,
    /// `read-only` or `read-write`.
    pub role: Role,
    /// The certificate's subject common name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    /// A DNS name in its subject alternative names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// A URI in its subject alternative names (e.g. a SPIFFE id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// An email address (rfc822Name) in its subject alternative names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Which certificate name a [`ClientCertEntry`] matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertNameKind {
    /// Subject common name.
    Cn,
    /// SAN dNSName.
    Dns,
    /// SAN uniformResourceIdentifier.
    Uri,
    /// SAN rfc822Name.
    Email,
}

impl CertNameKind {
    /// The key in config and the prefix in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CertNameKind::Cn => "cn",
            CertNameKind::Dns => "dns",
            CertNameKind::Uri => "uri",
            CertNameKind::Email => "email",
        }
    }
}

impl ClientCertEntry {
    /// The one certificate name this entry matches, if exactly one is set.
    pub fn identity(&self) -> Option<(CertNameKind, &str)> {
        let set: Vec<(CertNameKind, &str)> = [
            (CertNameKind::Cn, &self.cn),
            (CertNameKind::Dns, &self.dns),
            (CertNameKind::Uri, &self.uri),
            (CertNameKind::Email, &self.email),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
        match set.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
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
        if let Some(fleet) = &self.fleet {
            fleet.check()?;
        }
        self.check_listen()?;
        if !HEALTH_POLL_MS_RANGE.contains(&self.health_poll_ms) {
            return Err(invalid(
                "health_poll_ms",
                self.health_poll_ms.to_string(),
                "must be between 100 and 60000",
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "worker_threads",
                self.worker_threads.to_string(),
                "must be at most 1024 (0: one per core)",
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

impl Config {
    /// The plaintext rule and the `tls` section (its files are read and
    /// parsed here, so a bad one stops the gateway before it binds).
    fn check_listen(&self) -> Result<(), ConfigError> {
        match (&self.listen, &self.tls) {
            (ListenAddr::Unix(_), Some(_)) => {
                return Err(invalid(
                    "tls",
                    self.listen.to_string(),
                    "TLS needs a TCP `listen` (IP:PORT); unix sockets rely on file permissions",
                ));
            }
            (ListenAddr::Tcp(_), Some(_)) if self.plaintext => {
                return Err(invalid(
                    "plaintext",
                    "true".into(),
                    "`plaintext: true` and a `tls` section exclude each other",
                ));
            }
            (ListenAddr::Tcp(addr), None) if !addr.ip().is_loopback() && !self.plaintext => {
                return Err(invalid(
                    "listen",
                    addr.to_string(),
                    "plaintext beyond loopback: add a `tls` section, or `plaintext: true` \
                     (development only: tokens cross the network in the clear)",
                ));
            }
            _ => {}
        }
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        crate::tls::Material::load(tls)?;
        if tls.clients.len() > MAX_TLS_CLIENTS {
            return Err(invalid(
                "tls.clients",
                tls.clients.len().to_string(),
                &format!("at most {MAX_TLS_CLIENTS} entries"),
            ));
        }
        if tls.client_ca_file.is_none() && !tls.clients.is_empty() {
            return Err(invalid(
                "tls.clients",
                format!("{} entries", tls.clients.len()),
                "client certificates need `tls.client_ca_file`",
            ));
        }
        if tls.client_ca_file.is_some() && tls.clients.is_empty() {
            return Err(invalid(
                "tls.clients",
                "[]".into(),
                "with `tls.client_ca_file` set, map at least one client certificate",
            ));
        }
        for c in &tls.clients {
            check_principal("tls.clients[].name", &c.name)?;
            let Some((_, value)) = c.identity() else {
                return Err(invalid(
                    "tls.clients[]",
                    c.name.clone(),
                    "needs exactly one of cn, dns, uri, email",
                ));
            };
            if value.is_empty()
                || value.len() > MAX_CERT_NAME_LEN
                || value.chars().any(char::is_control)
            {
                return Err(invalid(
                    "tls.clients[]",
                    c.name.clone(),
                    "the certificate name must be 1 to 256 bytes, without control characters",
                ));
            }
        }
        Ok(())
    }
}

fn check_principal(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PRINCIPAL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        return Ok(());
    }
    Err(invalid(
        field,
        name.to_owned(),
        "must be 1 to 64 letters, digits, '.', '_', '-' or '@'",
    ))
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
        check_principal("tokens[].name", &t.name)?;
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

qvirt_common::impl_service_config!(Config, Config::check, workers = worker_threads);

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
    fn test_worker_threads_default_to_one_per_core_and_are_bounded() {
        let c = Config::default();
        assert_eq!(c.worker_threads(), 0);
        let one: Config =
            qvirt_common::config::parse(std::path::Path::new("g.yaml"), "worker_threads: 1\n")
                .unwrap();
        assert_eq!(one.worker_threads(), 1);
        let many = Config {
            worker_threads: MAX_WORKER_THREADS + 1,
            ..Config::default()
        };
        let err = many.check().unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
    }

    #[test]
    fn test_fleet_section_needs_nats_urls() {
        let parse = |yaml: &str| {
            qvirt_common::config::parse::<Config>(std::path::Path::new("g.yaml"), yaml)
                .and_then(|c| c.validate().map(|()| c))
        };
        let c = parse("fleet:\n  urls: [nats://n1:4222, nats://n2:4222]\n").unwrap();
        assert_eq!(c.fleet.unwrap().urls.len(), 2);
        assert!(parse("").unwrap().fleet.is_none());
        for bad in [
            "fleet: {}\n",
            "fleet: {urls: [http://n1:4222]}\n",
            "fleet: {urls: ['nats://']}\n",
            "fleet: {urls: [nats://n1:4222], stream: x}\n",
        ] {
            let line = qvirt_common::error_chain(&parse(bad).unwrap_err());
            assert!(line.contains("fleet"), "{bad}: {line}");
        }
        let line = qvirt_common::error_chain(
            &parse("fleet: {urls: [nats://n1:4222], token_file: /nonexistent/t}\n").unwrap_err(),
        );
        assert!(line.contains("fleet.token_file"), "{line}");
        let line = qvirt_common::error_chain(
            &parse("fleet: {urls: [nats://n1:4222], ca_file: /nonexistent/c}\n").unwrap_err(),
        );
        assert!(line.contains("fleet.ca_file"), "{line}");
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
