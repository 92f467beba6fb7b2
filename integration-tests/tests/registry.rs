//! The fleet registry's reading side (`qvirt_registry::View`) against a
//! real nats-server: records put by hand show up, a heartbeat that
//! expires makes its host not live (and says so once), a new record
//! makes it live again, and a view that loses its broker rebuilds from
//! the buckets when it is back.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use prost::Message as _;
use qvirt_integration_tests::nats::Nats;
use qvirt_proto::v1::{Domain, DomainSpec, DomainState, HostRecord};
use qvirt_registry::{Buckets, HostChange, Snapshot, View, domain_key, host_key, open_buckets};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Bound on every wait: a 2 s heartbeat TTL expires (and its marker is
/// written) well within it even on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// The hosts bucket's TTL in these tests.
const TTL: Duration = Duration::from_secs(2);

const UUID_A: &str = "0b9f6a2e-1c1d-4b8e-9a57-3f1f6d7c2a10";
const UUID_B: &str = "7d3c1f00-5a4b-4c2d-8e1f-000000000002";

async fn client(nats: &Nats) -> async_nats::Client {
    let access =
        qvirt_registry::NatsAccess::load("fleet", Some(nats.token_file()), nats.ca_file()).unwrap();
    qvirt_registry::connect(&nats.urls(), "registry test", &access)
        .await
        .unwrap()
}

async fn buckets(client: &async_nats::Client) -> Buckets {
    open_buckets(&jetstream::new(client.clone()), 1, TTL)
        .await
        .unwrap()
}

fn record(host: &str, domains: u32) -> HostRecord {
    HostRecord {
        host: host.into(),
        supervisor_url: format!("http://{host}:50052"),
        version: "test".into(),
        cpus: 2,
        memory_bytes: 8 << 30,
        domains,
        ..Default::default()
    }
}

fn domain(host: &str, uuid: &str, name: &str, state: DomainState) -> Domain {
    Domain {
        spec: Some(DomainSpec {
            name: name.into(),
            uuid: uuid.into(),
            ..Default::default()
        }),
        state: state as i32,
        host: host.into(),
        etag: format!("{name}-{}", state as i32),
        ..Default::default()
    }
}

async fn put_host(b: &Buckets, r: &HostRecord) {
    b.hosts
        .put(host_key(&r.host), r.encode_to_vec().into())
        .await
        .unwrap();
}

async fn put_domain(b: &Buckets, d: &Domain) {
    let uuid = &d.spec.as_ref().unwrap().uuid;
    b.domains
        .put(domain_key(&d.host, uuid), d.encode_to_vec().into())
        .await
        .unwrap();
}

/// Waits until the view's snapshot satisfies `what`.
async fn until(
    view: &View,
    why: &str,
    what: impl Fn(&Snapshot) -> bool,
) -> std::sync::Arc<Snapshot> {
    let mut rx = view.changed();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let snap = rx.borrow_and_update().clone();
            if what(&snap) {
                return snap;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("view: {why} within {WAIT:?}; last: {:?}", view.snapshot()))
}

async fn next_change(rx: &mut broadcast::Receiver<HostChange>) -> HostChange {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a host change in time")
        .unwrap()
}

async fn until_connected(view: &View, connected: bool) {
    let mut rx = view.connected_changes();
    tokio::time::timeout(WAIT, rx.wait_for(|c| *c == connected))
        .await
        .unwrap_or_else(|_| panic!("view connected={connected} within {WAIT:?}"))
        .unwrap();
}

#[tokio::test]
async fn test_view_shows_records_and_heartbeat_expiry() {
    let nats = Nats::single();
    let client = client(&nats).await;
    let shutdown = CancellationToken::new();
    // The view starts before the buckets exist, and waits for them.
    let view = View::start(client.clone(), shutdown.clone());
    let mut changes = view.host_changes();
    let b = buckets(&client).await;
    until_connected(&view, true).await;

    // A host id that needs escaping, and one that does not.
    let (h1, h2) = ("web.1 host", "h2");
    put_host(&b, &record(h1, 2)).await;
    put_domain(&b, &domain(h1, UUID_A, "a", DomainState::Running)).await;
    put_domain(&b, &domain(h1, UUID_B, "b", DomainState::Shutoff)).await;
    put_domain(&b, &domain(h2, UUID_A, "a", DomainState::Paused)).await;
    let snap = until(&view, "shows both hosts' domains", |s| {
        s.host_live(h1) && s.domains.len() == 3
    })
    .await;
    assert_eq!(snap.hosts[h1].record, record(h1, 2));
    assert_eq!(snap.domains_of(h1).count(), 2);
    let a = &snap.domains[&(h1.to_owned(), UUID_A.to_owned())];
    assert_eq!(a, &domain(h1, UUID_A, "a", DomainState::Running));
    // A host with domains but no heartbeat is known, not live.
    assert!(snap.hosts.contains_key(h2));
    assert!(!snap.host_live(h2));
    assert_eq!(
        next_change(&mut changes).await,
        HostChange {
            host: h1.into(),
            live: true,
            revision: snap.hosts[h1].revision
        }
    );

    // A domain change and a delete.
    put_domain(&b, &domain(h1, UUID_A, "a", DomainState::Paused)).await;
    b.domains.delete(domain_key(h1, UUID_B)).await.unwrap();
    until(&view, "follows a state change and a delete", |s| {
        s.domains_of(h1).count() == 1
            && s.domains[&(h1.to_owned(), UUID_A.to_owned())].state == DomainState::Paused as i32
    })
    .await;

    // The heartbeat stops: the key expires, the host is not live, once.
    let gone = next_change(&mut changes).await;
    assert_eq!((gone.host.as_str(), gone.live), (h1, false));
    let snap = view.snapshot();
    assert!(!snap.host_live(h1));
    assert_eq!(snap.hosts[h1].record, record(h1, 2), "last record kept");
    assert_eq!(snap.domains_of(h1).count(), 1, "domains kept");
    assert!(view.connected());

    // It comes back.
    put_host(&b, &record(h1, 1)).await;
    let back = next_change(&mut changes).await;
    assert_eq!((back.host.as_str(), back.live), (h1, true));
    assert!(back.revision > gone.revision);
    let snap = until(&view, "shows the new record", |s| s.host_live(h1)).await;
    assert_eq!(snap.hosts[h1].record.domains, 1);
    // Nothing else happened.
    assert!(matches!(
        changes.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
    shutdown.cancel();
}

#[tokio::test]
async fn test_view_rebuilds_after_broker_outage() {
    let mut nats = Nats::single();
    let client = client(&nats).await;
    let b = buckets(&client).await;
    put_host(&b, &record("h1", 1)).await;
    put_domain(&b, &domain("h1", UUID_A, "a", DomainState::Running)).await;

    let shutdown = CancellationToken::new();
    let view = View::start(client.clone(), shutdown.clone());
    let mut changes = view.host_changes();
    until(&view, "shows the host", |s| {
        s.host_live("h1") && s.domains.len() == 1
    })
    .await;
    until_connected(&view, true).await;

    // The broker goes away for longer than the TTL: the view keeps the
    // last known fleet and says it is not connected.
    nats.nodes[0].stop(libc::SIGTERM);
    until_connected(&view, false).await;
    assert!(view.snapshot().host_live("h1"));
    tokio::time::sleep(TTL * 2).await;
    nats.nodes[0].start();
    nats.wait_ready();

    // Back: rebuilt from the buckets, the expired host reported once.
    until_connected(&view, true).await;
    let gone = next_change(&mut changes).await;
    assert_eq!((gone.host.as_str(), gone.live), ("h1", false));
    let snap = until(&view, "shows the host not live", |s| !s.host_live("h1")).await;
    assert_eq!(snap.domains.len(), 1);

    // And it follows the buckets again.
    let b = buckets(&client).await;
    put_domain(&b, &domain("h1", UUID_B, "b", DomainState::Shutoff)).await;
    put_host(&b, &record("h1", 2)).await;
    until(&view, "follows new records", |s| {
        s.host_live("h1") && s.domains.len() == 2
    })
    .await;
    let back = next_change(&mut changes).await;
    assert_eq!((back.host.as_str(), back.live), ("h1", true));
    shutdown.cancel();
}

#[tokio::test]
async fn test_r3_buckets_right_after_the_cluster_forms() {
    // The first R3 bucket of a new cluster can time out: open_buckets
    // tries again. Expiry markers work on R3 as on one node.
    let nats = Nats::cluster3();
    let client = client(&nats).await;
    let js = jetstream::new(client.clone());
    let b = open_buckets(&js, 3, TTL).await.unwrap();
    let hosts = js
        .get_stream("KV_QVIRT_HOSTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!((hosts.num_replicas, hosts.max_age), (3, TTL));
    let shutdown = CancellationToken::new();
    let view = View::start(client.clone(), shutdown.clone());
    let mut changes = view.host_changes();
    until_connected(&view, true).await;
    put_host(&b, &record("h1", 0)).await;
    let joined = next_change(&mut changes).await;
    assert_eq!((joined.host.as_str(), joined.live), ("h1", true));
    let gone = next_change(&mut changes).await;
    assert_eq!((gone.host.as_str(), gone.live), ("h1", false));
    assert!(!view.snapshot().host_live("h1"));
    shutdown.cancel();
}
