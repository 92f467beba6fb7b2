//! [`View`]: the fleet as the two buckets tell it, kept in memory.
//!
//! One task watches both buckets (each key's last value, then every
//! change) and keeps a [`Snapshot`]: every host with its last record and
//! whether its heartbeat is live, every domain by (host, uuid). Readers
//! take the snapshot (an `Arc`, cheap) or wait for the next one
//! ([`View::changed`]). A host becomes not live when its key is purged
//! (its heartbeat expired: the bucket's limit marker) or deleted, and
//! live again with its next record; each change goes to
//! [`View::host_changes`] with the KV revision that caused it.
//!
//! When the broker connection drops, the snapshot stays as it was (the
//! last known fleet) and [`View::connected`] turns false; once the
//! client is connected again the task watches both buckets afresh,
//! builds a new snapshot from them, and reports the hosts whose liveness
//! differs from before (e.g. one that expired meanwhile).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use prost::Message as _;
use qvirt_proto::v1::{Domain, HostRecord};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bucket::{DOMAINS_BUCKET, HOSTS_BUCKET, bind_buckets};
use crate::key::{parse_domain_key, parse_host_key};

/// Host liveness changes buffered for a slow [`View::host_changes`]
/// receiver before it lags (and misses some).
pub const HOST_CHANGES: usize = 256;

/// How often the task checks the connection and waits between tries.
const TICK: Duration = Duration::from_millis(500);

/// How long a fresh watch may take to deliver what the buckets hold
/// before the view is built from what arrived (a key that expires while
/// the watch starts can leave its count of pending entries stale).
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// One host as the view knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostEntry {
    /// Its last record. A host known only from its domains (its key is
    /// gone) has a record with only `host` set.
    pub record: HostRecord,
    /// Whether its heartbeat is live (its key holds a record).
    pub live: bool,
    /// The KV revision of the key's last change (0: none seen).
    pub revision: u64,
}

/// The fleet at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every host by id: those with a key in `QVIRT_HOSTS`, and those
    /// that only have domains (not live).
    pub hosts: Arc<BTreeMap<String, HostEntry>>,
    /// Every domain by (host id, uuid), as its supervisor last wrote it.
    pub domains: Arc<BTreeMap<(String, String), Domain>>,
}

impl Snapshot {
    /// Whether `host` has a live heartbeat.
    pub fn host_live(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|h| h.live)
    }

    /// The hosts with a live heartbeat.
    pub fn live_hosts(&self) -> impl Iterator<Item = &HostEntry> {
        self.hosts.values().filter(|h| h.live)
    }

    /// The domains of `host`, by uuid.
    pub fn domains_of<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Domain> + 'a {
        self.domains
            .range((host.to_owned(), String::new())..)
            .take_while(move |((h, _), _)| h == host)
            .map(|(_, d)| d)
    }
}

/// A host's liveness changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostChange {
    /// The host id.
    pub host: String,
    /// Live now (reachable) or not (unreachable).
    pub live: bool,
    /// The KV revision of the entry that made the change: every watcher
    /// sees the same one, so it names the change fleet-wide.
    pub revision: u64,
}

/// A watcher of the registry's buckets; see the module docs.
#[derive(Debug, Clone)]
pub struct View {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    connected: watch::Receiver<bool>,
    changes: broadcast::Sender<HostChange>,
}

impl View {
    /// Starts watching the buckets through `client` until `shutdown`.
    /// The buckets need not exist yet: the view waits for them (a
    /// supervisor creates them) and is not connected until then.
    pub fn start(client: async_nats::Client, shutdown: CancellationToken) -> View {
        let (snap_tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let (conn_tx, connected) = watch::channel(false);
        let (changes, _) = broadcast::channel(HOST_CHANGES);
        let task = Watcher {
            js: jetstream::ContextBuilder::new()
                .timeout(Duration::from_secs(5))
                .build(client.clone()),
            client,
            snapshot: snap_tx,
            connected: conn_tx,
            changes: changes.clone(),
            current: State::default(),
            synced_once: false,
        };
        tokio::spawn(task.run(shutdown));
        View {
            snapshot,
            connected,
            changes,
        }
    }

    /// The fleet now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// A receiver that sees every new snapshot.
    pub fn changed(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Whether the view follows the buckets now (connected, and both
    /// watched and read through); while false, the snapshot is the last
    /// one known.
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A receiver that sees [`View::connected`] change.
    pub fn connected_changes(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Host liveness changes from now on. A receiver that falls more
    /// than [`HOST_CHANGES`] behind gets `Lagged` and misses some.
    pub fn host_changes(&self) -> broadcast::Receiver<HostChange> {
        self.changes.subscribe()
    }
}

/// The maps a snapshot is made of, being updated.
#[derive(Debug, Clone, Default)]
struct State {
    hosts: Arc<BTreeMap<String, HostEntry>>,
    domains: Arc<BTreeMap<(String, String), Domain>>,
}

impl State {
    /// Applies a `QVIRT_HOSTS` entry; the liveness change it makes.
    fn apply_host(&mut self, entry: &kv::Entry) -> Option<HostChange> {
        let Some(host) = parse_host_key(&entry.key) else {
            tracing::debug!(key = %entry.key, "registry: ignoring a host key not made by host_key");
            return None;
        };
        let was_live = self.hosts.get(&host).is_some_and(|h| h.live);
        let hosts = Arc::make_mut(&mut self.hosts);
        match entry.operation {
            kv::Operation::Put => {
                let record = match HostRecord::decode(entry.value.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "registry: ignoring a host record that does not decode");
                        return None;
                    }
                };
                hosts.insert(
                    host.clone(),
                    HostEntry {
                        record,
                        live: true,
                        revision: entry.revision,
                    },
                );
                (!was_live).then_some(HostChange {
                    host,
                    live: true,
                    revision: entry.revision,
                })
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                let e = hosts.entry(host.clone()).or_insert_with(|| HostEntry {
                    record: HostRecord {
                        host: host.clone(),
                        ..Default::default()
                    },
                    live: false,
                    revision: 0,
                });
                e.live = false;
                e.revision = entry.revision;
                was_live.then_some(HostChange {
                    host,
                    live: false,
                    revision: entry.revision,
                })
            }
        }
    }

    /// Applies a `QVIRT_DOMAINS` entry.
    fn apply_domain(&mut self, entry: &kv::Entry) {
        let Some((host, uuid)) = parse_domain_key(&entry.key) else {
            tracing::debug!(key = %entry.key, "registry: ignoring a domain key not made by domain_key");
            return;
        };
        match entry.operation {
            kv::Operation::Put => match Domain::decode(entry.value.clone()) {
                Ok(d) => {
                    Arc::make_mut(&mut self.domains).insert((host.clone(), uuid), d);
                    self.imply_host(&host);
                }
                Err(e) => {
                    tracing::warn!(%host, %uuid, error = %e, "registry: ignoring a domain record that does not decode");
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                Arc::make_mut(&mut self.domains).remove(&(host, uuid));
            }
        }
    }

    /// Makes sure a host that has domains is known (not live when it has
    /// no key).
    fn imply_host(&mut self, host: &str) {
        if !self.hosts.contains_key(host) {
            Arc::make_mut(&mut self.hosts).insert(
                host.to_owned(),
                HostEntry {
                    record: HostRecord {
                        host: host.to_owned(),
                        ..Default::default()
                    },
                    live: false,
                    revision: 0,
                },
            );
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            hosts: Arc::clone(&self.hosts),
            domains: Arc::clone(&self.domains),
        })
    }
}

struct Watcher {
    client: async_nats::Client,
    js: jetstream::Context,
    snapshot: watch::Sender<Arc<Snapshot>>,
    connected: watch::Sender<bool>,
    changes: broadcast::Sender<HostChange>,
    /// What the last published snapshot was made of.
    current: State,
    /// Whether a first snapshot was built (its hosts are no changes).
    synced_once: bool,
}

/// Why one round of watching ended.
enum Ended {
    Shutdown,
    /// Start again: the connection dropped, or a watch failed or ended.
    Again,
}

impl Watcher {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut warned = false;
        loop {
            if self.client.connection_state() == async_nats::connection::State::Connected {
                match self.round(&shutdown, &mut warned).await {
                    Ended::Shutdown => break,
                    Ended::Again => {}
                }
            }
            self.connected
                .send_if_modified(|c| std::mem::replace(c, false));
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.connected.send_replace(false);
    }

    /// Watches both buckets from scratch: builds a snapshot from what
    /// they hold, then follows them until something breaks.
    async fn round(&mut self, shutdown: &CancellationToken, warned: &mut bool) -> Ended {
        let buckets = match bind_buckets(&self.js).await {
            Ok(b) => b,
            Err(e) => {
                if !std::mem::replace(warned, true) {
                    tracing::warn!(error = %e, "registry: waiting for the buckets");
                }
                return Ended::Again;
            }
        };
        let (mut hosts, mut domains) = match tokio::try_join!(
            buckets.hosts.watch_with_history(">"),
            buckets.domains.watch_with_history(">")
        ) {
            Ok(w) => w,
            Err(e) => {
                if !std::mem::replace(warned, true) {
                    tracing::warn!(error = %e, "registry: cannot watch the buckets");
                }
                return Ended::Again;
            }
        };
        *warned = false;
        // A bucket that holds nothing delivers nothing: it is read through
        // at once.
        let mut hosts_synced = self.is_empty(HOSTS_BUCKET).await;
        let mut domains_synced = self.is_empty(DOMAINS_BUCKET).await;
        let mut fresh = State::default();
        let sync_deadline = Instant::now() + SYNC_TIMEOUT;
        let mut synced = false;
        let mut tick = tokio::time::interval(TICK);
        loop {
            if !synced && ((hosts_synced && domains_synced) || Instant::now() >= sync_deadline) {
                synced = true;
                self.install(std::mem::take(&mut fresh));
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                _ = tick.tick() => {
                    if self.client.connection_state() != async_nats::connection::State::Connected {
                        tracing::warn!("registry: lost the broker; keeping the last known fleet");
                        return Ended::Again;
                    }
                }
                entry = hosts.next() => {
                    let entry = match entry {
                        Some(Ok(e)) => e,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "registry: hosts watch hiccup");
                            continue;
                        }
                        None => return Ended::Again,
                    };
                    if synced {
                        if let Some(change) = self.current.apply_host(&entry) {
                            self.emit(change);
                        }
                        if entry.delta == 0 {
                            self.publish();
                        }
                    } else {
                        fresh.apply_host(&entry);
                        hosts_synced |= entry.delta == 0;
                    }
                }
                entry = domains.next() => {
                    let entry = match entry {
                        Some(Ok(e)) => e,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "registry: domains watch hiccup");
                            continue;
                        }
                        None => return Ended::Again,
                    };
                    if synced {
                        self.current.apply_domain(&entry);
                        if entry.delta == 0 {
                            self.publish();
                        }
                    } else {
                        fresh.apply_domain(&entry);
                        domains_synced |= entry.delta == 0;
                    }
                }
            }
        }
    }

    async fn is_empty(&self, bucket: &str) -> bool {
        match self.js.get_stream(format!("KV_{bucket}")).await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 0),
            Err(_) => false,
        }
    }

    /// Makes `fresh` (read through from the buckets) the current state,
    /// reporting the hosts whose liveness differs from the last known
    /// (none the first time: a view that starts reports no changes).
    fn install(&mut self, fresh: State) {
        let old = std::mem::replace(&mut self.current, fresh);
        let domain_hosts: Vec<String> = self
            .current
            .domains
            .keys()
            .map(|(h, _)| h.clone())
            .collect();
        for host in domain_hosts {
            self.current.imply_host(&host);
        }
        if self.synced_once {
            let mut changes = Vec::new();
            for (host, before) in old.hosts.iter() {
                let now = self.current.hosts.get(host);
                let live = now.is_some_and(|h| h.live);
                if before.live != live {
                    changes.push(HostChange {
                        host: host.clone(),
                        live,
                        // Gone without a marker: name the change after the
                        // last record seen.
                        revision: now.map_or(before.revision, |h| h.revision),
                    });
                }
            }
            for (host, now) in self.current.hosts.iter() {
                if now.live && !old.hosts.contains_key(host) {
                    changes.push(HostChange {
                        host: host.clone(),
                        live: true,
                        revision: now.revision,
                    });
                }
            }
            for c in changes {
                self.emit(c);
            }
        }
        self.synced_once = true;
        tracing::info!(
            hosts = self.current.hosts.len(),
            live = self.current.hosts.values().filter(|h| h.live).count(),
            domains = self.current.domains.len(),
            "registry: following the buckets"
        );
        self.publish();
        self.connected.send_replace(true);
    }

    fn emit(&self, change: HostChange) {
        tracing::info!(host = %change.host, live = change.live, revision = change.revision, "registry: host liveness changed");
        // No receiver is fine.
        let _ = self.changes.send(change);
    }

    fn publish(&self) {
        self.snapshot.send_replace(self.current.snapshot());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::key::{domain_key, host_key};

    fn entry(key: String, value: Vec<u8>, revision: u64, operation: kv::Operation) -> kv::Entry {
        kv::Entry {
            bucket: String::new(),
            key,
            value: value.into(),
            revision,
            delta: 0,
            created: async_nats::datetime::now(),
            operation,
            seen_current: true,
        }
    }

    fn host(h: &str, revision: u64, operation: kv::Operation) -> kv::Entry {
        let record = HostRecord {
            host: h.into(),
            ..Default::default()
        };
        entry(host_key(h), record.encode_to_vec(), revision, operation)
    }

    #[test]
    fn test_host_liveness_changes_once_per_transition() {
        let mut s = State::default();
        let change = |live, revision| {
            Some(HostChange {
                host: "h.1".into(),
                live,
                revision,
            })
        };
        assert_eq!(
            s.apply_host(&host("h.1", 1, kv::Operation::Put)),
            change(true, 1)
        );
        // Heartbeats are no changes.
        assert_eq!(s.apply_host(&host("h.1", 2, kv::Operation::Put)), None);
        assert_eq!(
            s.apply_host(&entry(host_key("h.1"), vec![], 3, kv::Operation::Purge)),
            change(false, 3)
        );
        assert!(!s.hosts["h.1"].live);
        assert_eq!(s.hosts["h.1"].record.host, "h.1", "last record kept");
        assert_eq!(
            s.apply_host(&entry(host_key("h.1"), vec![], 4, kv::Operation::Delete)),
            None
        );
        assert_eq!(
            s.apply_host(&host("h.1", 5, kv::Operation::Put)),
            change(true, 5)
        );
        // Keys that are not host keys, values that are not records.
        assert_eq!(
            s.apply_host(&host("x", 6, kv::Operation::Put)),
            change_of("x", 6)
        );
        assert_eq!(
            s.apply_host(&entry("a.b".into(), vec![], 7, kv::Operation::Put)),
            None
        );
        assert_eq!(
            s.apply_host(&entry(
                host_key("y"),
                vec![0xff, 0xff],
                8,
                kv::Operation::Put
            )),
            None
        );
        assert!(!s.hosts.contains_key("y"));
    }

    fn change_of(host: &str, revision: u64) -> Option<HostChange> {
        Some(HostChange {
            host: host.into(),
            live: true,
            revision,
        })
    }

    #[test]
    fn test_domains_by_host_and_implied_hosts() {
        let mut s = State::default();
        let d = |h: &str, u: &str| Domain {
            host: h.into(),
            etag: u.into(),
            ..Default::default()
        };
        for (h, u) in [("a", "u1"), ("a", "u2"), ("b", "u1")] {
            s.apply_domain(&entry(
                domain_key(h, u),
                d(h, u).encode_to_vec(),
                1,
                kv::Operation::Put,
            ));
        }
        s.apply_domain(&entry(
            domain_key("a", "u2"),
            vec![],
            2,
            kv::Operation::Delete,
        ));
        let snap = s.snapshot();
        let of_a: Vec<&str> = snap.domains_of("a").map(|d| d.etag.as_str()).collect();
        assert_eq!(of_a, ["u1"]);
        assert_eq!(snap.domains_of("b").count(), 1);
        assert_eq!(snap.domains_of("c").count(), 0);
        // Hosts known only from their domains are not live.
        assert!(snap.hosts.contains_key("a") && !snap.host_live("a"));
        assert_eq!(snap.live_hosts().count(), 0);
    }
}
