//! The fleet registry: which hosts exist, how to reach them, whether
//! their heartbeat is live, and every domain of the fleet, kept in two
//! JetStream KV buckets (docs/FLEET.md, "Registry").
//!
//! - [`key`]: the keys (`host_key`, `domain_key`) and their escaping.
//! - [`bucket`]: the bucket names and settings, [`open_buckets`] (bind or
//!   create, with retries), and [`connect`].
//! - [`view`]: [`View`], a watcher of both buckets that keeps the fleet in
//!   memory; gateways and fleet event buses use it.
//!
//! What a supervisor writes (its heartbeat and its domains) lives in the
//! supervisor; this crate owns only the shared names and formats and the
//! reading side.

pub mod bucket;
pub mod key;
pub mod view;

pub use bucket::{
    Buckets, DEFAULT_HEARTBEAT_TTL, DOMAINS_BUCKET, HEARTBEAT_TTL_RANGE, HOSTS_BUCKET, NatsAccess,
    bind_buckets, connect, open_buckets, valid_url,
};
pub use key::{domain_key, domain_prefix, host_key, parse_domain_key, parse_host_key};
pub use view::{HostChange, HostEntry, Snapshot, View};

/// Why the registry could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A bucket could not be bound or created.
    #[error("cannot open the KV bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket's name.
        bucket: &'static str,
        /// What the broker or client said.
        reason: String,
    },
    /// A broker URL does not parse.
    #[error("invalid NATS server URL {url:?}")]
    Url {
        /// The URL (at most 200 characters of it).
        url: String,
    },
    /// The client could not be set up.
    #[error("cannot create a NATS client: {0}")]
    Connect(String),
}
