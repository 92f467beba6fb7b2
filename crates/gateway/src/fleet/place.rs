//! Where a DefineDomain goes.
//!
//! - `host` given: that host (unknown: HOST_NOT_FOUND; no live
//!   heartbeat: HOST_UNREACHABLE).
//! - a name some host already has: that host, so `allow_update` and
//!   ALREADY_EXISTS behave as on one host (two hosts: DOMAIN_AMBIGUOUS).
//! - else placement: the live host with the most free memory
//!   (`memory_bytes - guest_memory_bytes`, less what this gateway placed
//!   there that the view does not show yet), ties by fewest domains, then
//!   host id.

use std::time::{Duration, Instant};

use super::FleetError;
use super::index::{Index, is_uuid};
use super::route::bounded;

/// How long a placement is counted while the view does not show it (a
/// define that failed is never shown).
pub const PENDING_TTL: Duration = Duration::from_secs(30);

/// A define this gateway sent to a host by placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The domain's name.
    pub name: String,
    /// Where it went.
    pub host: String,
    /// Its memory.
    pub memory_bytes: u64,
    /// When.
    pub at: Instant,
}

/// Where a define goes, and whether by placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host.
    pub host: String,
    /// Chosen by placement (to be counted until the view shows it).
    pub placed: bool,
}

/// The host a define of `name` (when the request's spec could be read;
/// `uuid` its UUID, empty when none) goes to; `host` is the request's,
/// empty when not given.
pub fn define_target(
    index: &Index,
    pending: &[Placed],
    name: Option<&str>,
    uuid: &str,
    host: &str,
) -> Result<Target, FleetError> {
    let live = |id: &str| index.hosts.get(id).is_some_and(|h| h.live);
    let chosen = |id: &str| {
        if live(id) {
            Ok(Target {
                host: id.to_owned(),
                placed: false,
            })
        } else {
            Err(FleetError::HostUnreachable { host: bounded(id) })
        }
    };
    if !host.is_empty() {
        if !index.hosts.contains_key(host) {
            return Err(FleetError::HostNotFound {
                host: bounded(host),
            });
        }
        return chosen(host);
    }
    if let Some(name) = name {
        let on: Vec<&str> = index.named(name).map(|e| e.host.as_str()).collect();
        match on.as_slice() {
            [] => {}
            [one] => return chosen(one),
            many => {
                return Err(FleetError::DomainAmbiguous {
                    domain: bounded(name),
                    hosts: many.iter().map(|h| (*h).to_owned()).collect(),
                });
            }
        }
        if let Some(p) = pending.iter().find(|p| p.name == name) {
            return chosen(&p.host);
        }
    }
    if is_uuid(uuid) {
        let lower = uuid.to_ascii_lowercase();
        if let Some(e) = index.lookup(uuid).into_iter().find(|e| e.uuid == lower) {
            return chosen(&e.host);
        }
    }
    place(index, pending)
        .map(|host| Target { host, placed: true })
        .ok_or(FleetError::NoHostAvailable)
}

/// The live host with the most free memory.
pub fn place(index: &Index, pending: &[Placed]) -> Option<String> {
    index
        .hosts
        .iter()
        .filter(|(_, h)| h.live && !h.supervisor_url.is_empty())
        .map(|(id, h)| {
            let (bytes, count) = pending
                .iter()
                .filter(|p| p.host == *id)
                .fold((0u64, 0u64), |(b, n), p| {
                    (b.saturating_add(p.memory_bytes), n + 1)
                });
            let used = h.guest_memory_bytes.saturating_add(bytes);
            let free = i128::from(h.memory_bytes) - i128::from(used);
            (free, u64::from(h.domains) + count, id)
        })
        // Most free, then fewest domains, then the smallest id.
        .min_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)))
        .map(|(_, _, id)| id.clone())
}

/// Drops the placements the view now shows on their host, and those
/// older than [`PENDING_TTL`].
pub fn prune(pending: &mut Vec<Placed>, index: &Index, now: Instant) {
    pending.retain(|p| {
        now.duration_since(p.at) < PENDING_TTL && !index.named(&p.name).any(|e| e.host == p.host)
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_proto::v1::DomainState::Shutoff;

    use super::super::index::tests::{U1, U2, domain, snapshot};
    use super::*;

    fn placed(name: &str, host: &str, mib: u64) -> Placed {
        Placed {
            name: name.into(),
            host: host.into(),
            memory_bytes: mib << 20,
            at: Instant::now(),
        }
    }

    #[test]
    fn test_placement_prefers_free_memory_then_fewer_domains_then_id() {
        // h1: 4096 - 1024 free; h2: 8192 - 4096; h3 most free but dead.
        let index = Index::build(
            &snapshot(
                &[
                    ("h1", true, 4096, 1024),
                    ("h2", true, 8192, 4096),
                    ("h3", false, 65536, 0),
                ],
                &[],
            ),
            true,
            None,
        );
        assert_eq!(place(&index, &[]).unwrap(), "h2");
        // What this gateway placed counts: h2 now has 3072 free.
        assert_eq!(place(&index, &[placed("a", "h2", 1024)]).unwrap(), "h1");
        // Equal free memory: fewer domains wins, then the smaller id.
        let tie = Index::build(
            &snapshot(
                &[
                    ("b", true, 4096, 0),
                    ("a", true, 4096, 0),
                    ("c", true, 4096, 0),
                ],
                &[domain("a", "x", U1, Shutoff, 0)],
            ),
            true,
            None,
        );
        assert_eq!(place(&tie, &[]).unwrap(), "b");
        let dead = Index::build(&snapshot(&[("h1", false, 4096, 0)], &[]), true, None);
        assert_eq!(place(&dead, &[]), None);
    }

    #[test]
    fn test_defines_spread_as_placements_accumulate() {
        let index = Index::build(
            &snapshot(&[("h1", true, 4096, 0), ("h2", true, 4096, 0)], &[]),
            true,
            None,
        );
        let mut pending = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..4 {
            let name = format!("vm{i}");
            let t = define_target(&index, &pending, Some(&name), "", "").unwrap();
            assert!(t.placed);
            pending.push(placed(&name, &t.host, 512));
            hosts.push(t.host);
        }
        assert_eq!(hosts, ["h1", "h2", "h1", "h2"]);
        // A second define of a name just placed goes where the first went.
        let again = define_target(&index, &pending, Some("vm1"), "", "").unwrap();
        assert_eq!(again.host, "h2");
        assert!(!again.placed);
    }

    #[test]
    fn test_an_existing_name_or_a_given_host_decides() {
        let index = Index::build(
            &snapshot(
                &[
                    ("h1", true, 1024, 0),
                    ("h2", true, 8192, 0),
                    ("h3", false, 8192, 0),
                ],
                &[
                    domain("h1", "web", U1, Shutoff, 128),
                    domain("h1", "db", U2, Shutoff, 128),
                    domain(
                        "h2",
                        "db",
                        "00000000-0000-4000-8000-000000000001",
                        Shutoff,
                        128,
                    ),
                ],
            ),
            true,
            None,
        );
        let t = define_target(&index, &[], Some("web"), "", "").unwrap();
        assert_eq!((t.host.as_str(), t.placed), ("h1", false));
        let t = define_target(&index, &[], Some("web"), "", "h2").unwrap();
        assert_eq!(t.host, "h2");
        assert!(matches!(
            define_target(&index, &[], Some("db"), "", ""),
            Err(FleetError::DomainAmbiguous { hosts, .. }) if hosts == ["h1", "h2"]
        ));
        assert!(matches!(
            define_target(&index, &[], Some("x"), "", "h3"),
            Err(FleetError::HostUnreachable { .. })
        ));
        assert!(matches!(
            define_target(&index, &[], Some("x"), "", "h9"),
            Err(FleetError::HostNotFound { .. })
        ));
        // A UUID some host has decides when the name is new.
        let t = define_target(&index, &[], Some("renamed"), &U1.to_uppercase(), "").unwrap();
        assert_eq!(t.host, "h1");
        let dead = Index::build(&snapshot(&[("h1", false, 4096, 0)], &[]), true, None);
        assert!(matches!(
            define_target(&dead, &[], None, "", ""),
            Err(FleetError::NoHostAvailable)
        ));
    }

    #[test]
    fn test_prune_forgets_what_the_view_shows_and_what_is_old() {
        let index = Index::build(
            &snapshot(
                &[("h1", true, 4096, 0)],
                &[domain("h1", "shown", U1, Shutoff, 128)],
            ),
            true,
            None,
        );
        let now = Instant::now();
        let mut pending = vec![placed("shown", "h1", 1), placed("waiting", "h1", 1)];
        prune(&mut pending, &index, now);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].name, "waiting");
        prune(&mut pending, &index, Instant::now() + PENDING_TTL);
        assert!(pending.is_empty());
    }
}
