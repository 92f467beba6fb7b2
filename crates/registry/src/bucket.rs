//! The two buckets: their names and settings, and opening them.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use qvirt_common::config::ConfigError;

use crate::RegistryError;

/// The bucket of host records (`qvirt.v1.HostRecord`), one key per host.
pub const HOSTS_BUCKET: &str = "QVIRT_HOSTS";

/// The bucket of domain records (`qvirt.v1.Domain`), one key per domain.
pub const DOMAINS_BUCKET: &str = "QVIRT_DOMAINS";

/// The default heartbeat TTL: the hosts bucket's `max_age`. A host puts
/// its record every third of it.
pub const DEFAULT_HEARTBEAT_TTL: Duration = Duration::from_secs(15);

/// The TTLs a host may configure: from 1 s (JetStream's smallest marker
/// TTL) to an hour.
pub const HEARTBEAT_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// The largest value either bucket takes (a Domain record with a large
/// spec stays far below it).
pub const MAX_VALUE_BYTES: i32 = 1 << 20;

/// How long one attempt to bind or create a bucket may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many attempts [`open_buckets`] makes (the first R3 bucket right
/// after a cluster forms can time out).
const ATTEMPTS: u32 = 6;

/// Both buckets, bound.
#[derive(Clone)]
pub struct Buckets {
    /// `QVIRT_HOSTS`.
    pub hosts: kv::Store,
    /// `QVIRT_DOMAINS`.
    pub domains: kv::Store,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets").finish_non_exhaustive()
    }
}

/// The hosts bucket's settings: `max_age` = `ttl`, one value per key,
/// and limit markers, so an expired key shows up in a watch as a Purge.
pub fn hosts_config(replicas: usize, ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: HOSTS_BUCKET.to_owned(),
        description: "qvirt fleet hosts: heartbeat records".to_owned(),
        history: 1,
        max_age: ttl,
        max_value_size: MAX_VALUE_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        // The marker of an expired key lives one more TTL: long enough for
        // every watcher to see it, and then the key is gone.
        limit_markers: Some(ttl.max(Duration::from_secs(1))),
        ..Default::default()
    }
}

/// The domains bucket's settings: no TTL, one value per key.
pub fn domains_config(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: DOMAINS_BUCKET.to_owned(),
        description: "qvirt fleet domains: each domain as its supervisor returns it".to_owned(),
        history: 1,
        max_value_size: MAX_VALUE_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Binds both buckets, creating those that do not exist yet
/// (`replicas`, heartbeat `ttl`), trying a few times. A bucket that
/// exists is used as it is.
pub async fn open_buckets(
    js: &jetstream::Context,
    replicas: usize,
    ttl: Duration,
) -> Result<Buckets, RegistryError> {
    let hosts = open_or_create(js, hosts_config(replicas, ttl)).await?;
    let domains = open_or_create(js, domains_config(replicas)).await?;
    Ok(Buckets { hosts, domains })
}

/// Binds both buckets, which must exist (one try each).
pub async fn bind_buckets(js: &jetstream::Context) -> Result<Buckets, RegistryError> {
    let bind = |name: &'static str| async move {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, js.get_key_value(name)).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(e)) => Err(RegistryError::Bucket {
                bucket: name,
                reason: e.to_string(),
            }),
            Err(_) => Err(RegistryError::Bucket {
                bucket: name,
                reason: "timed out".to_owned(),
            }),
        }
    };
    Ok(Buckets {
        hosts: bind(HOSTS_BUCKET).await?,
        domains: bind(DOMAINS_BUCKET).await?,
    })
}

async fn open_or_create(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, RegistryError> {
    let bucket = if config.bucket == HOSTS_BUCKET {
        HOSTS_BUCKET
    } else {
        DOMAINS_BUCKET
    };
    let mut backoff = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if let Ok(Ok(store)) = tokio::time::timeout(ATTEMPT_TIMEOUT, js.get_key_value(bucket)).await
        {
            return Ok(store);
        }
        match tokio::time::timeout(ATTEMPT_TIMEOUT, js.create_key_value(config.clone())).await {
            Ok(Ok(store)) => {
                tracing::info!(
                    bucket,
                    replicas = config.num_replicas,
                    "registry: created the bucket"
                );
                return Ok(store);
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".to_owned(),
        }
        tracing::debug!(bucket, attempt, error = %last, "registry: cannot open the bucket yet");
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    Err(RegistryError::Bucket {
        bucket,
        reason: last,
    })
}

/// The secret the fleet's NATS servers ask of clients (their
/// `authorization { token: ... }`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
struct NatsToken(Arc<str>);

impl fmt::Debug for NatsToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NatsToken(..)")
    }
}

/// What a service shows the fleet's NATS servers besides their URLs,
/// from its `nats:` or `fleet:` section: the token they ask of clients
/// (`token_file`) and the CA their certificates chain to (`ca_file`;
/// with one, the connection must be TLS). Its `Debug` hides the token.
#[derive(Clone, Debug, Default)]
pub struct NatsAccess {
    token: Option<NatsToken>,
    ca: Option<Arc<PinnedCa>>,
}

/// The CA bundle as it was checked at start, in a sealed memory file
/// that only this process holds. async-nats reads its CA from a path at
/// every connection attempt; given `/proc/self/fd/N` of this file, every
/// connection and reconnection trusts what was checked, whatever the
/// operator's file holds later. (Handing it a prebuilt rustls config
/// instead would make it read the system's certificate store at every
/// attempt, and fail the connection on any error there.) A client
/// outlives the [`NatsAccess`] it was made with, so each pinned bundle
/// stays open for the life of the process, one per distinct content
/// ([`PINNED`]).
#[derive(Debug)]
struct PinnedCa {
    /// Never closed: the path names it.
    _file: std::fs::File,
    path: std::path::PathBuf,
}

/// Every bundle pinned so far, with its bytes: loading the same CA again
/// (a config checked, then used) reuses its file.
static PINNED: std::sync::Mutex<Vec<(Vec<u8>, Arc<PinnedCa>)>> = std::sync::Mutex::new(Vec::new());

impl NatsAccess {
    /// Reads and checks the files of section `section` (`nats` or
    /// `fleet`, for the fields errors name): the token with the internal
    /// secret's rules
    /// ([`read_secret_file`](qvirt_common::internal_auth::read_secret_file)),
    /// the CA as a bundle of certificates that parse.
    pub fn load(
        section: &'static str,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let (token_field, ca_field) = match section {
            "nats" => ("nats.token_file", "nats.ca_file"),
            _ => ("fleet.token_file", "fleet.ca_file"),
        };
        let token = token_file
            .map(|p| qvirt_common::internal_auth::read_secret_file(p, token_field))
            .transpose()?
            .map(|t| NatsToken(t.into()));
        let ca = ca_file.map(|path| pin(ca_field, path)).transpose()?;
        Ok(NatsAccess { token, ca })
    }
}

/// Reads and checks the CA bundle at `path` (config key `field`) and
/// pins it ([`PinnedCa`]).
fn pin(field: &'static str, path: &Path) -> Result<Arc<PinnedCa>, ConfigError> {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    let pem = qvirt_common::pem::load_certificates(field, path)?;
    let mut pinned = PINNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ca)) = pinned.iter().find(|(bytes, _)| *bytes == pem) {
        return Ok(Arc::clone(ca));
    }
    let failed = |e: std::io::Error| {
        ConfigError::invalid_file(field, path, format!("cannot keep a copy in memory: {e}"))
    };
    let fd = rustix::fs::memfd_create(
        c"qvirt-nats-ca",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| failed(e.into()))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&pem).map_err(failed)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .map_err(|e| failed(e.into()))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd()).into();
    let ca = Arc::new(PinnedCa { _file: file, path });
    pinned.push((pem, Arc::clone(&ca)));
    Ok(ca)
}

/// Whether `url` names a NATS server the way the services take one:
/// `nats://HOST:PORT` or `tls://HOST:PORT`. WebSocket URLs are refused:
/// the client is built without WebSocket support and would send the
/// token over plain TCP to them.
pub fn valid_url(url: &str) -> bool {
    let host = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"));
    host.is_some_and(|h| !h.is_empty() && !h.starts_with(':'))
        && !url.contains(char::is_whitespace)
        && url.parse::<async_nats::ServerAddr>().is_ok()
}

/// A client connected to `urls` (`nats://HOST:PORT`, any one of a
/// cluster is enough), presenting `access` (over TLS when it has a CA). It
/// returns at once and keeps trying in the background while the broker
/// is away, reconnecting after 0, 100 ms, 200 ms, ... up to 2 s.
pub async fn connect(
    urls: &[String],
    name: &str,
    access: &NatsAccess,
) -> Result<async_nats::Client, RegistryError> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| {
            u.parse().map_err(|_| RegistryError::Url {
                url: u.chars().take(200).collect(),
            })
        })
        .collect::<Result<_, _>>()?;
    let mut options = match &access.token {
        Some(t) => async_nats::ConnectOptions::with_token(t.0.to_string()),
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &access.ca {
        options = options
            .add_root_certificates(ca.path.clone())
            .require_tls(true);
    }
    // async-nats logs a refused token itself ("authorization
    // violation", at error) on every attempt.
    options
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(2000))
        })
        .retry_on_initial_connect()
        .connect(addrs)
        .await
        .map_err(|e| RegistryError::Connect(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_valid_url_takes_nats_and_tls_only() {
        for ok in ["nats://n1:4222", "tls://10.0.0.1:4222", "nats://[::1]:4222"] {
            assert!(valid_url(ok), "{ok}");
        }
        for bad in [
            "ws://n1:8080",
            "wss://n1:443",
            "http://n1:4222",
            "n1:4222",
            "nats://n1 :4222",
            "nats://",
            "tls://:4222",
            "",
        ] {
            assert!(!valid_url(bad), "{bad}");
        }
    }
}
