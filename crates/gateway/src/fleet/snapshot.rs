//! Stand-in for the registry's snapshot until `qvirt-registry` lands.

use std::collections::BTreeMap;
use std::sync::Arc;

use qvirt_proto::v1::Domain;

/// A host's record (the fields the gateway reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRecord {
    /// The host id.
    pub host: String,
    /// How gateways reach its supervisor.
    pub supervisor_url: String,
    /// How gateways reach its agent service (empty: none).
    pub agentd_url: String,
    /// Its memory.
    pub memory_bytes: u64,
    /// Memory of its defined domains.
    pub guest_memory_bytes: u64,
    /// Its defined domains.
    pub domains: u32,
}

/// One host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostEntry {
    /// Its last record.
    pub record: HostRecord,
    /// Whether its heartbeat is live.
    pub live: bool,
    /// The KV revision of its key's last change.
    pub revision: u64,
}

/// What the view holds.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// host id -> entry.
    pub hosts: Arc<BTreeMap<String, HostEntry>>,
    /// (host id, uuid) -> domain.
    pub domains: Arc<BTreeMap<(String, String), Domain>>,
}
