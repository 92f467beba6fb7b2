//! Stand-in for the registry's snapshot until `qvirt-registry` lands.

use std::collections::BTreeMap;

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

/// What the view holds.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Whether the view is connected.
    pub connected: bool,
    /// host id -> (record, live).
    pub hosts: BTreeMap<String, (HostRecord, bool)>,
    /// (host id, uuid) -> domain.
    pub domains: BTreeMap<(String, String), Domain>,
}
