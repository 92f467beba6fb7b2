//! The gateway's index of one registry snapshot: hosts with their
//! addresses, capacity and liveness, and every domain sorted by
//! (name, host) with lookups by name and by UUID. Built once per change
//! of the view, read by every call until the next.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use qvirt_proto::v1::Domain;

use qvirt_registry::Snapshot;

/// One host as the index knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// The supervisor's URL (empty: the host is known only by its
    /// domains, its record is gone).
    pub supervisor_url: String,
    /// The agent service's URL (empty: none).
    pub agentd_url: String,
    /// A live heartbeat.
    pub live: bool,
    /// The host's memory.
    pub memory_bytes: u64,
    /// Memory of its defined domains.
    pub guest_memory_bytes: u64,
    /// Its defined domains, as its record counts them.
    pub domains: u32,
}

/// One domain.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The domain's name.
    pub name: String,
    /// Its host id.
    pub host: String,
    /// Its UUID, lower case.
    pub uuid: String,
    /// The record, as the host's supervisor last mirrored it.
    pub domain: Domain,
}

/// A snapshot, indexed.
#[derive(Debug, Default)]
pub struct Index {
    /// Every host: those with a record, and those known only by domains
    /// (not live).
    pub hosts: BTreeMap<String, Host>,
    /// Whether the view is connected to the broker.
    pub connected: bool,
    domains: Arc<Domains>,
}

/// The domains of a snapshot, indexed: shared by the indexes of
/// snapshots with the same domains (a heartbeat changes only hosts).
#[derive(Debug, Default)]
pub struct Domains {
    /// What they were built from.
    source: Arc<BTreeMap<(String, String), Domain>>,
    /// Every domain, sorted by (name, host).
    entries: Vec<Entry>,
    by_name: HashMap<String, Vec<usize>>,
    by_uuid: HashMap<String, Vec<usize>>,
    /// Per host: the memory of its domains and their count.
    per_host: HashMap<String, (u64, u32)>,
}

impl Domains {
    fn build(source: &Arc<BTreeMap<(String, String), Domain>>) -> Domains {
        let mut entries: Vec<Entry> = source
            .iter()
            .map(|((host, uuid), domain)| Entry {
                name: domain
                    .spec
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                host: host.clone(),
                uuid: uuid.to_ascii_lowercase(),
                domain: domain.clone(),
            })
            .collect();
        entries.sort_by(|a, b| (&a.name, &a.host).cmp(&(&b.name, &b.host)));
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_uuid: HashMap<String, Vec<usize>> = HashMap::new();
        let mut per_host: HashMap<String, (u64, u32)> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_name.entry(e.name.clone()).or_default().push(i);
            by_uuid.entry(e.uuid.clone()).or_default().push(i);
            let mib = e.domain.spec.as_ref().map_or(0, |s| s.memory_mib);
            let sum = per_host.entry(e.host.clone()).or_default();
            sum.0 = sum.0.saturating_add(mib.saturating_mul(1 << 20));
            sum.1 = sum.1.saturating_add(1);
        }
        Domains {
            source: Arc::clone(source),
            entries,
            by_name,
            by_uuid,
            per_host,
        }
    }
}

impl Index {
    /// The index of `snapshot`; `connected`: whether the view follows
    /// the buckets now. The domains of `previous` are reused when the
    /// snapshot's are the same map.
    pub fn build(snapshot: &Snapshot, connected: bool, previous: Option<&Index>) -> Index {
        let domains = match previous {
            Some(p) if Arc::ptr_eq(&p.domains.source, &snapshot.domains) => Arc::clone(&p.domains),
            _ => Arc::new(Domains::build(&snapshot.domains)),
        };
        let mut hosts: BTreeMap<String, Host> = snapshot
            .hosts
            .iter()
            .map(|(id, entry)| {
                let record = &entry.record;
                // The domains bucket changes with every define; a host's
                // record only with its next heartbeat: the larger counts.
                let (bytes, count) = domains.per_host.get(id).copied().unwrap_or_default();
                (
                    id.clone(),
                    Host {
                        supervisor_url: record.supervisor_url.clone(),
                        agentd_url: record.agentd_url.clone(),
                        live: entry.live,
                        memory_bytes: record.memory_bytes,
                        guest_memory_bytes: record.guest_memory_bytes.max(bytes),
                        domains: record.domains.max(count),
                    },
                )
            })
            .collect();
        for e in &domains.entries {
            if !hosts.contains_key(&e.host) {
                hosts.insert(e.host.clone(), Host::default());
            }
        }
        Index {
            hosts,
            connected,
            domains,
        }
    }

    /// Every domain, sorted by (name, host).
    pub fn entries(&self) -> &[Entry] {
        &self.domains.entries
    }

    /// The domains named `name`, one per host at most, in host order.
    pub fn named(&self, name: &str) -> impl Iterator<Item = &Entry> {
        let d = &self.domains;
        d.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &d.entries[i])
    }

    /// The domains `key` (a name or a UUID) names: on each host, the
    /// domain with that UUID if `key` is in UUID form and one has it,
    /// else the one with that name (the supervisor's own rule). At most
    /// one per host, in host order.
    pub fn lookup(&self, key: &str) -> Vec<&Entry> {
        let mut found: BTreeMap<&str, &Entry> = BTreeMap::new();
        for e in self.named(key) {
            found.insert(&e.host, e);
        }
        if is_uuid(key) {
            let lower = key.to_ascii_lowercase();
            let d = &self.domains;
            for &i in d.by_uuid.get(&lower).into_iter().flatten() {
                let e = &d.entries[i];
                found.insert(&e.host, e);
            }
        }
        found.into_values().collect()
    }

    /// The domain `key` names on `host`, by the same rule.
    pub fn lookup_on(&self, host: &str, key: &str) -> Option<&Entry> {
        self.lookup(key).into_iter().find(|e| e.host == host)
    }

    /// Whether some host has a live heartbeat.
    pub fn any_live(&self) -> bool {
        self.hosts.values().any(|h| h.live)
    }
}

/// `8-4-4-4-12` hex digits, any case.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use qvirt_proto::v1::{DomainSpec, DomainState};

    use super::*;
    use qvirt_proto::v1::HostRecord;
    use qvirt_registry::HostEntry;

    /// A domain record as a supervisor mirrors it.
    pub fn domain(host: &str, name: &str, uuid: &str, state: DomainState, mib: u64) -> Domain {
        Domain {
            spec: Some(DomainSpec {
                name: name.into(),
                uuid: uuid.into(),
                memory_mib: mib,
                ..Default::default()
            }),
            state: state as i32,
            host: host.into(),
            ..Default::default()
        }
    }

    /// A host record.
    pub fn record(host: &str, memory_mib: u64, guest_mib: u64, domains: u32) -> HostRecord {
        HostRecord {
            host: host.into(),
            supervisor_url: format!("http://{host}:50052"),
            agentd_url: format!("http://{host}:50055"),
            memory_bytes: memory_mib << 20,
            guest_memory_bytes: guest_mib << 20,
            domains,
            ..Default::default()
        }
    }

    /// A snapshot of `hosts` (id, live, memory MiB, guest MiB) and
    /// `domains`.
    pub fn snapshot(hosts: &[(&str, bool, u64, u64)], domains: &[Domain]) -> Snapshot {
        let mut h = std::collections::BTreeMap::new();
        for &(id, live, mem, guest) in hosts {
            let n = domains.iter().filter(|d| d.host == id).count() as u32;
            let entry = HostEntry {
                record: record(id, mem, guest, n),
                live,
                revision: 1,
            };
            h.insert(id.to_owned(), entry);
        }
        let mut d = std::collections::BTreeMap::new();
        for dom in domains {
            let uuid = dom.spec.as_ref().unwrap().uuid.clone();
            d.insert((dom.host.clone(), uuid), dom.clone());
        }
        Snapshot {
            hosts: std::sync::Arc::new(h),
            domains: std::sync::Arc::new(d),
        }
    }

    pub const U1: &str = "6b1e2f7a-0c1d-4e5f-8a9b-0c1d2e3f4a5b";
    pub const U2: &str = "0d6f3c1e-7b2a-4c8d-9e0f-1a2b3c4d5e6f";
    pub const U3: &str = "a0a0a0a0-b1b1-4c2c-8d3d-e4e4e4e4e4e4";

    #[test]
    fn test_lookup_finds_by_name_or_uuid_one_per_host() {
        let s = snapshot(
            &[("h1", true, 1024, 0), ("h2", true, 1024, 0)],
            &[
                domain("h1", "web", U1, DomainState::Shutoff, 128),
                domain("h2", "web", U2, DomainState::Running, 128),
                domain("h2", "db", U3, DomainState::Shutoff, 128),
            ],
        );
        let index = Index::build(&s, true, None);
        let hosts = |key: &str| {
            index
                .lookup(key)
                .iter()
                .map(|e| e.host.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(hosts("web"), ["h1", "h2"]);
        assert_eq!(hosts(&U2.to_uppercase()), ["h2"]);
        assert_eq!(hosts("db"), ["h2"]);
        assert!(hosts("nope").is_empty());
        assert_eq!(index.lookup_on("h2", "web").unwrap().uuid, U2);
        assert!(index.lookup_on("h1", "db").is_none());
        let names: Vec<_> = index
            .entries()
            .iter()
            .map(|e| (e.name.as_str(), e.host.as_str()))
            .collect();
        assert_eq!(names, [("db", "h2"), ("web", "h1"), ("web", "h2")]);
    }

    #[test]
    fn test_a_host_known_only_by_its_domains_is_not_live() {
        let s = snapshot(
            &[("h1", true, 1024, 0)],
            &[domain("gone", "old", U1, DomainState::Running, 128)],
        );
        let index = Index::build(&s, true, None);
        let gone = &index.hosts["gone"];
        assert!(!gone.live);
        assert!(gone.supervisor_url.is_empty());
        assert!(index.any_live());
    }

    #[test]
    fn test_a_heartbeat_reuses_the_domains_index() {
        let s = snapshot(
            &[("h1", true, 1024, 0)],
            &[domain("h1", "web", U1, DomainState::Running, 128)],
        );
        let first = Index::build(&s, true, None);
        let mut beat = s.clone();
        Arc::make_mut(&mut beat.hosts).get_mut("h1").unwrap().live = false;
        let second = Index::build(&beat, true, Some(&first));
        assert!(Arc::ptr_eq(&first.domains, &second.domains));
        assert!(!second.hosts["h1"].live);
        let changed = snapshot(&[("h1", true, 1024, 0)], &[]);
        let third = Index::build(&changed, true, Some(&second));
        assert!(third.entries().is_empty());
    }

    #[test]
    fn test_domains_the_view_shows_count_before_the_next_heartbeat() {
        // h1's record (0 MiB of guests, 0 domains) predates its two domains.
        let mut s = snapshot(
            &[("h1", true, 4096, 0)],
            &[
                domain("h1", "a", U1, DomainState::Shutoff, 512),
                domain("h1", "b", U2, DomainState::Shutoff, 256),
            ],
        );
        Arc::make_mut(&mut s.hosts)
            .get_mut("h1")
            .unwrap()
            .record
            .domains = 0;
        let index = Index::build(&s, true, None);
        let h1 = &index.hosts["h1"];
        assert_eq!(h1.guest_memory_bytes, 768 << 20);
        assert_eq!(h1.domains, 2);
    }

    #[test]
    fn test_uuid_form() {
        assert!(is_uuid(U1));
        assert!(is_uuid(&U1.to_uppercase()));
        assert!(!is_uuid("6b1e2f7a0c1d4e5f8a9b0c1d2e3f4a5b"));
        assert!(!is_uuid("web"));
    }
}
