//! This host in the fleet registry (a supervisor with `fleet:`;
//! docs/FLEET.md, "Registry").
//!
//! One task owns the broker connection. It puts this host's
//! `HostRecord` into `QVIRT_HOSTS` every third of the heartbeat TTL, and
//! mirrors each domain into `QVIRT_DOMAINS` as [`Manager::get`] returns it
//! (the record GetDomain answers, etag and all), deleting the key on
//! undefine. The domain table tells it which domains changed through a
//! set of UUIDs ([`Dirty`]): marking is a set insert, so no RPC ever waits
//! for the broker, and a domain that changes several times before the
//! task gets to it is put once, as it is by then. On every (re)connect
//! the task reconciles: it puts every domain it has and deletes the keys
//! under its host's prefix that it no longer has (undefined while the
//! broker was away). A broker outage only delays the registry.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures_util::StreamExt as _;
use prost::Message as _;
use qvirt_proto::v1::HostRecord;
use qvirt_registry::{Buckets, NatsAccess, domain_key, domain_prefix, host_key, parse_domain_key};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FleetConfig};
use crate::domain::{DomainError, Manager};

/// How often the connection is looked at while waiting for it.
const TICK: Duration = Duration::from_millis(250);

/// Bound on one JetStream call (a put and its ack, a bucket look-up).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The UUIDs of domains whose record changed since the mirror last put
/// them.
#[derive(Debug, Default)]
pub struct Dirty {
    uuids: Mutex<BTreeSet<String>>,
    notify: Notify,
}

impl Dirty {
    /// Marks domain `uuid` for the mirror; never blocks on the broker.
    pub fn mark(&self, uuid: &str) {
        let inserted = self
            .uuids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uuid.to_owned());
        if inserted {
            self.notify.notify_one();
        }
    }

    fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.uuids.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn put_back(&self, uuids: impl IntoIterator<Item = String>) {
        self.uuids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(uuids);
    }
}

/// Starts the registry task for `manager` until `shutdown`.
pub fn spawn(
    config: &Config,
    fleet: FleetConfig,
    access: NatsAccess,
    manager: Manager,
    shutdown: CancellationToken,
) {
    let dirty = Arc::new(Dirty::default());
    {
        let dirty = Arc::clone(&dirty);
        manager.on_change(Arc::new(move |uuid: &str| dirty.mark(uuid)));
    }
    let task = Registry {
        host: manager.host().to_owned(),
        ttl: Duration::from_secs(fleet.heartbeat_ttl_secs),
        max_memory_mib: config.max_memory_mib,
        started: SystemTime::now(),
        fleet,
        access,
        manager,
        dirty,
    };
    tokio::spawn(task.run(shutdown));
}

struct Registry {
    fleet: FleetConfig,
    access: NatsAccess,
    host: String,
    ttl: Duration,
    max_memory_mib: Option<u64>,
    started: SystemTime,
    manager: Manager,
    dirty: Arc<Dirty>,
}

/// Why following the broker stopped.
enum Stop {
    Shutdown,
    /// The broker is away (or a call failed): wait, then reconcile again.
    Again,
}

impl Registry {
    async fn run(self, shutdown: CancellationToken) {
        let client = tokio::select! {
            c = qvirt_registry::connect(&self.fleet.urls, "qvirt-supervisor", &self.access) => c,
            () = shutdown.cancelled() => return,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // Checked at config load; only a client that cannot be
                // built at all ends up here.
                tracing::error!(error = %e, "fleet: no registry");
                return;
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(CALL_TIMEOUT)
            .build(client.clone());
        let mut warned = false;
        loop {
            if client.connection_state() == async_nats::connection::State::Connected {
                match self.follow(&client, &js, &shutdown, &mut warned).await {
                    Stop::Shutdown => return,
                    Stop::Again => {}
                }
            }
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Opens the buckets, reconciles, then heartbeats and mirrors until
    /// something fails.
    async fn follow(
        &self,
        client: &async_nats::Client,
        js: &jetstream::Context,
        shutdown: &CancellationToken,
        warned: &mut bool,
    ) -> Stop {
        let fail = |warned: &mut bool, what: &str, error: &dyn std::fmt::Display| {
            if !std::mem::replace(warned, true) {
                tracing::warn!(%error, "fleet: {what}; trying again (calls are not affected)");
            }
            Stop::Again
        };
        let buckets = match qvirt_registry::open_buckets(js, self.fleet.replicas, self.ttl).await {
            Ok(b) => b,
            Err(e) => return fail(warned, "cannot open the registry's buckets", &e),
        };
        if let Err(e) = self.heartbeat(&buckets).await {
            return fail(warned, "cannot put the heartbeat", &e);
        }
        if let Err(e) = self.reconcile(&buckets).await {
            return fail(warned, "cannot reconcile the domains", &e);
        }
        if std::mem::replace(warned, false) {
            tracing::info!("fleet: registry reachable again");
        }
        // A bucket made by another host with a shorter TTL sets the pace.
        let ttl = match buckets.hosts.status().await.map(|s| s.max_age()) {
            Ok(age) if !age.is_zero() && age < self.ttl => {
                tracing::warn!(bucket_ttl = ?age, configured = ?self.ttl, "fleet: the hosts bucket has a shorter TTL than configured; heartbeating by the bucket's");
                age
            }
            _ => self.ttl,
        };
        tracing::info!(host = %self.host, "fleet: registered; heartbeat every {:?}", ttl / 3);
        let mut heartbeat = tokio::time::interval(ttl / 3);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Stop::Shutdown,
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat(&buckets).await {
                        return fail(warned, "cannot put the heartbeat", &e);
                    }
                }
                () = self.dirty.notify.notified() => {
                    if let Err(e) = self.mirror(&buckets).await {
                        return fail(warned, "cannot mirror a domain", &e);
                    }
                }
                _ = tick.tick() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return fail(warned, "lost the broker", &"disconnected");
                    }
                }
            }
        }
    }

    /// Puts this host's record.
    async fn heartbeat(&self, buckets: &Buckets) -> Result<(), String> {
        let record = self.record().await;
        timed(
            buckets
                .hosts
                .put(host_key(&self.host), record.encode_to_vec().into()),
        )
        .await?;
        Ok(())
    }

    /// This host's record now.
    async fn record(&self) -> HostRecord {
        let domains = self.manager.list(&[]);
        let meminfo = tokio::fs::read_to_string("/proc/meminfo")
            .await
            .unwrap_or_default();
        let mib = 1u64 << 20;
        let memory_bytes = match self.max_memory_mib {
            Some(m) => m.saturating_mul(mib),
            None => meminfo_bytes(&meminfo, "MemTotal:"),
        };
        HostRecord {
            host: self.host.clone(),
            supervisor_url: self.fleet.supervisor_url.clone(),
            agentd_url: self.fleet.agentd_url.clone().unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            memory_bytes,
            memory_available_bytes: meminfo_bytes(&meminfo, "MemAvailable:"),
            guest_memory_bytes: domains
                .iter()
                .filter_map(|d| d.spec.as_ref())
                .map(|s| s.memory_mib.saturating_mul(mib))
                .fold(0, u64::saturating_add),
            domains: u32::try_from(domains.len()).unwrap_or(u32::MAX),
            running_domains: u32::try_from(domains.iter().filter(|d| d.pid != 0).count())
                .unwrap_or(u32::MAX),
            start_time: Some(self.started.into()),
            heartbeat_time: Some(SystemTime::now().into()),
        }
    }

    /// Puts every domain, and deletes the keys under this host's prefix
    /// of domains it no longer has.
    async fn reconcile(&self, buckets: &Buckets) -> Result<(), String> {
        // Everything is put below: what was marked so far is covered.
        let marked = self.dirty.take();
        let result = async {
            let prefix = domain_prefix(&self.host);
            let mut keys = timed(buckets.domains.keys()).await?;
            let mut stored = BTreeSet::new();
            loop {
                match tokio::time::timeout(CALL_TIMEOUT, keys.next()).await {
                    Ok(Some(Ok(key))) => {
                        if key.starts_with(&prefix)
                            && let Some((_, uuid)) = parse_domain_key(&key)
                        {
                            stored.insert(uuid);
                        }
                    }
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(None) => break,
                    Err(_) => return Err("listing the keys timed out".to_owned()),
                }
            }
            let domains = self.manager.list(&[]);
            let mut have = BTreeSet::new();
            for d in &domains {
                let uuid = d.spec.as_ref().map(|s| s.uuid.clone()).unwrap_or_default();
                timed(
                    buckets
                        .domains
                        .put(domain_key(&self.host, &uuid), d.encode_to_vec().into()),
                )
                .await?;
                have.insert(uuid);
            }
            let mut deleted = 0;
            for uuid in stored.difference(&have) {
                timed(buckets.domains.delete(domain_key(&self.host, uuid))).await?;
                deleted += 1;
            }
            tracing::info!(
                domains = domains.len(),
                deleted,
                "fleet: domains reconciled with the registry"
            );
            Ok(())
        }
        .await;
        if result.is_err() {
            self.dirty.put_back(marked);
        }
        result
    }

    /// Puts (or deletes) every marked domain as it is now.
    async fn mirror(&self, buckets: &Buckets) -> Result<(), String> {
        let mut marked = self.dirty.take().into_iter();
        while let Some(uuid) = marked.next() {
            let key = domain_key(&self.host, &uuid);
            let done = match self.manager.get(&uuid) {
                Ok(d) => timed(buckets.domains.put(&key, d.encode_to_vec().into()))
                    .await
                    .map(drop),
                Err(DomainError::NotFound(_)) => timed(buckets.domains.delete(&key)).await,
                Err(e) => {
                    tracing::debug!(%uuid, error = %e, "fleet: domain not mirrored");
                    Ok(())
                }
            };
            if let Err(e) = done {
                // Kept for the reconcile after the broker is back.
                self.dirty.put_back(std::iter::once(uuid).chain(marked));
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A JetStream call under [`CALL_TIMEOUT`], its error as text.
async fn timed<T, E: std::fmt::Display>(
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// A `/proc/meminfo` line's value in bytes (0 if absent).
fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_meminfo_bytes() {
        let m = "MemTotal:        8000000 kB\nMemAvailable:    6000 kB\n";
        assert_eq!(meminfo_bytes(m, "MemTotal:"), 8_000_000 * 1024);
        assert_eq!(meminfo_bytes(m, "MemAvailable:"), 6000 * 1024);
        assert_eq!(meminfo_bytes(m, "MemFree:"), 0);
    }

    #[test]
    fn test_dirty_coalesces() {
        let d = Dirty::default();
        d.mark("a");
        d.mark("a");
        d.mark("b");
        assert_eq!(d.take().len(), 2);
        assert!(d.take().is_empty());
    }
}
