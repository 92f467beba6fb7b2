//! The bus's NATS JetStream side, for a fleet of hosts (docs/FLEET.md).
//!
//! - [`subject`]: the subjects events travel under and how names are
//!   escaped into them.
//! - [`outbox`]: the bounded on-disk outbox every forwarded event passes
//!   through.
//! - [`forward`]: the host side: every event the hub stores goes to the
//!   stream from one ordered publishing loop.
//! - [`fleet`]: the gateway side: subscriptions served from the stream.
//!
//! Both sides are off unless configured (`nats:` on a host's bus, `fleet:`
//! on a gateway's); a single host needs no NATS.

use std::path::PathBuf;
use std::time::Duration;

use qvirt_common::config::ConfigError;
use qvirt_registry::NatsAccess;
use serde::{Deserialize, Serialize};

pub mod fleet;
pub mod forward;
pub mod outbox;
pub mod subject;

/// The default name of the events stream.
pub const DEFAULT_STREAM: &str = "QVIRT_EVENTS";

/// The default outbox cap: 256 MiB.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 256 << 20;

/// The values `outbox_max_bytes` may take.
pub const OUTBOX_MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 40);

/// The most `urls` accepted.
pub const MAX_URLS: usize = 16;

/// The broker connection and stream, as both sides name them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Broker {
    /// The NATS servers, `nats://HOST:PORT` (any one is enough; the client
    /// learns the rest of a cluster from it).
    pub urls: Vec<String>,
    /// The JetStream stream that holds the fleet's events.
    pub stream: String,
    /// A file holding the token the servers ask of clients (their
    /// `authorization { token }`). Absent: connect without one.
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) the servers' certificates chain to: connect with TLS,
    /// trusting it alone. Absent: TLS only for a `tls://` URL or a server
    /// that asks for it, trusting the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            stream: DEFAULT_STREAM.to_owned(),
            token_file: None,
            ca_file: None,
        }
    }
}

impl Broker {
    /// The token and CA it names, read and checked; `section` is the
    /// config section (`nats` or `fleet`) errors name.
    pub fn access(&self, section: &'static str) -> Result<NatsAccess, ConfigError> {
        NatsAccess::load(section, self.token_file.as_deref(), self.ca_file.as_deref())
    }

    fn check(&self, section: &'static str) -> Result<(), ConfigError> {
        let field = |name: &'static str| match section {
            "nats" => match name {
                "urls" => "nats.urls",
                _ => "nats.stream",
            },
            _ => match name {
                "urls" => "fleet.urls",
                _ => "fleet.stream",
            },
        };
        if self.urls.is_empty() || self.urls.len() > MAX_URLS {
            return Err(ConfigError::Invalid {
                field: field("urls"),
                value: self.urls.len().to_string(),
                reason: format!("must name 1 to {MAX_URLS} servers"),
            });
        }
        for url in &self.urls {
            if !qvirt_registry::valid_url(url) {
                return Err(ConfigError::Invalid {
                    field: field("urls"),
                    value: url.chars().take(200).collect(),
                    reason: "is not a NATS server address (nats://HOST:PORT)".into(),
                });
            }
        }
        let name_ok = !self.stream.is_empty()
            && self.stream.len() <= 64
            && self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(ConfigError::Invalid {
                field: field("stream"),
                value: self.stream.chars().take(200).collect(),
                reason: "must be 1 to 64 letters, digits, '-' or '_'".into(),
            });
        }
        self.access(section)?;
        Ok(())
    }
}

/// `nats:` in a host's bus config: forward every stored event to the
/// fleet's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// The NATS servers.
    pub urls: Vec<String>,
    /// The stream (created at start if missing).
    pub stream: String,
    /// A file holding the servers' client token. Absent: none.
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) of the servers' certificates: TLS (see [`Broker`]).
    pub ca_file: Option<PathBuf>,
    /// Its replicas when the bus creates it (1, or 3 on a 3-server
    /// cluster; at most 5).
    pub replicas: usize,
    /// This host's id in subjects and message ids. Empty (the default):
    /// the machine's host name.
    pub host: String,
    /// The outbox directory (required): events wait here until JetStream
    /// acknowledges them.
    pub outbox_dir: Option<PathBuf>,
    /// The outbox's cap on disk, in bytes. Past it, events are dropped and
    /// counted; fleet subscribers get an EventsLost (OUTBOX_FULL).
    pub outbox_max_bytes: u64,
    /// How long JetStream remembers message ids to drop re-sent events, in
    /// seconds, when the bus creates the stream.
    pub duplicate_window_secs: u64,
    /// How long the stream keeps events, in seconds, when the bus creates
    /// it (0: no age limit).
    pub max_age_secs: u64,
    /// The stream's cap in bytes when the bus creates it (oldest dropped
    /// first; 0: none).
    pub max_bytes: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        let broker = Broker::default();
        NatsConfig {
            urls: broker.urls,
            stream: broker.stream,
            token_file: None,
            ca_file: None,
            replicas: 1,
            host: String::new(),
            outbox_dir: None,
            outbox_max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            duplicate_window_secs: 120,
            max_age_secs: 7 * 24 * 3600,
            max_bytes: 0,
        }
    }
}

/// The longest host id, in bytes (a DNS name).
pub const MAX_HOST_LEN: usize = 253;

impl NatsConfig {
    /// The broker part.
    pub fn broker(&self) -> Broker {
        Broker {
            urls: self.urls.clone(),
            stream: self.stream.clone(),
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
        }
    }

    /// The host id: `host`, else the machine's host name.
    pub fn host_id(&self) -> String {
        if self.host.is_empty() {
            qvirt_common::config::host_name()
        } else {
            self.host.clone()
        }
    }

    /// The duplicate window.
    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.duplicate_window_secs)
    }

    /// Checks every field.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.broker().check("nats")?;
        let invalid = |field: &'static str, value: String, reason: &str| ConfigError::Invalid {
            field,
            value,
            reason: reason.to_owned(),
        };
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid(
                "nats.replicas",
                self.replicas.to_string(),
                "must be between 1 and 5",
            ));
        }
        if self.host.len() > MAX_HOST_LEN || self.host.chars().any(char::is_control) {
            return Err(invalid(
                "nats.host",
                self.host.chars().take(200).collect(),
                "must be at most 253 bytes, no control characters",
            ));
        }
        if self.outbox_dir.is_none() {
            return Err(invalid(
                "nats.outbox_dir",
                String::new(),
                "is required with nats",
            ));
        }
        if !OUTBOX_MAX_BYTES_RANGE.contains(&self.outbox_max_bytes) {
            return Err(invalid(
                "nats.outbox_max_bytes",
                self.outbox_max_bytes.to_string(),
                "must be between 1 MiB and 1 TiB",
            ));
        }
        if !(1..=24 * 3600).contains(&self.duplicate_window_secs) {
            return Err(invalid(
                "nats.duplicate_window_secs",
                self.duplicate_window_secs.to_string(),
                "must be between 1 and 86400",
            ));
        }
        Ok(())
    }
}

/// `fleet:` in a gateway-side bus config: serve subscriptions from the
/// fleet's stream instead of a local hub.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The NATS servers.
    pub urls: Vec<String>,
    /// The stream the hosts forward to.
    pub stream: String,
    /// A file holding the servers' client token. Absent: none.
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) of the servers' certificates: TLS (see [`Broker`]).
    pub ca_file: Option<PathBuf>,
}

impl FleetConfig {
    /// The broker part.
    pub fn broker(&self) -> Broker {
        let default = Broker::default();
        Broker {
            urls: if self.urls.is_empty() {
                default.urls
            } else {
                self.urls.clone()
            },
            stream: if self.stream.is_empty() {
                default.stream
            } else {
                self.stream.clone()
            },
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
        }
    }

    /// Checks every field.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.broker().check("fleet")
    }
}

/// How often a bus looks at its broker connection for its health.
pub const CONNECTION_POLL: Duration = Duration::from_secs(1);

/// Keeps `ready` equal to "`client` is connected", looking every
/// [`CONNECTION_POLL`], until `shutdown` (then `false`).
pub async fn follow_connection(
    client: &async_nats::Client,
    ready: &tokio::sync::watch::Sender<bool>,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    loop {
        let up = client.connection_state() == async_nats::connection::State::Connected;
        ready.send_if_modified(|was| std::mem::replace(was, up) != up);
        tokio::select! {
            () = tokio::time::sleep(CONNECTION_POLL) => {}
            () = shutdown.cancelled() => break,
        }
    }
    ready.send_replace(false);
}
