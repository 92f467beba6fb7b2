//! A real `qvirt-supervisor` with `fleet:` against a real nats-server and
//! real QEMU (TCG): it mirrors each domain into `QVIRT_DOMAINS` exactly as
//! GetDomain returns it (same etag) on define, start, suspend and undefine,
//! heartbeats a sane `HostRecord` into `QVIRT_HOSTS` whose key expires
//! once the supervisor is killed, and after a broker outage during which
//! domains changed and the supervisor restarted, brings the bucket up to
//! date (a domain undefined meanwhile is deleted). Read back with async-nats directly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use prost::Message as _;
use qvirt_integration_tests::nats::{Nats, assert_refused_without_token};
use qvirt_integration_tests::{
    InternalChannel, QemuGuard, Service, define_yaml, internal_channel, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, Domain, DomainState, GetDomainRequest, HostRecord, StartDomainRequest,
    SuspendDomainRequest, UndefineDomainRequest,
};
use qvirt_registry::{DOMAINS_BUCKET, HOSTS_BUCKET, domain_key, host_key};

/// Bound on every wait for the registry to follow.
const WAIT: Duration = Duration::from_secs(30);

/// A host id that needs escaping in keys.
const HOST: &str = "fleet.host-1";

async fn supervisor(nats: &Nats, dir: &Path) -> Service {
    supervisor_with_token(nats, dir, nats.token_file()).await
}

/// The fleet host [`HOST`], presenting the token in `token_file` (and
/// trusting the CA of a TLS `nats`).
async fn supervisor_with_token(nats: &Nats, dir: &Path, token_file: &Path) -> Service {
    supervisor_trusting(nats, dir, token_file, nats.ca_file(), &[]).await
}

/// [`supervisor_with_token`] with `ca_file` its CA file, and `env` set
/// for it.
async fn supervisor_trusting(
    nats: &Nats,
    dir: &Path,
    token_file: &Path,
    ca_file: Option<&Path>,
    env: &[(&str, &str)],
) -> Service {
    let ca = ca_file
        .map(|ca| format!("  ca_file: {}\n", ca.display()))
        .unwrap_or_default();
    let yaml = format!(
        "node_name: {HOST}\nfleet:\n  urls: [{}]\n  token_file: {}\n{ca}  \
         supervisor_url: http://10.0.0.1:50052\n  agentd_url: http://10.0.0.1:50055\n  \
         heartbeat_ttl_secs: 3\n",
        nats.urls().join(", "),
        token_file.display()
    );
    let (state, run) = (dir.join("state"), dir.join("run"));
    let args = [
        "--state-dir",
        state.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let mut svc = Service::start_with_config_env("qvirt-supervisor", &yaml, &args, env);
    svc.wait_serving("qvirt.v1.Supervisor").await;
    svc
}

/// Both buckets, read directly (waiting for the supervisor to make them).
async fn buckets(nats: &Nats) -> (kv::Store, kv::Store) {
    let client = nats.client().await;
    let js = jetstream::new(client);
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let (Ok(h), Ok(d)) = (
                js.get_key_value(HOSTS_BUCKET).await,
                js.get_key_value(DOMAINS_BUCKET).await,
            ) {
                return (h, d);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.expect("the supervisor creates the buckets")
}

async fn stored(domains: &kv::Store, uuid: &str) -> Option<Domain> {
    let value = domains.get(domain_key(HOST, uuid)).await.ok()??;
    Some(Domain::decode(value).unwrap())
}

async fn get(client: &mut SupervisorClient<InternalChannel>, uuid: &str) -> Domain {
    client
        .get_domain(GetDomainRequest {
            domain: uuid.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
}

/// Waits until the bucket holds exactly what GetDomain returns for
/// `uuid`, in `state`.
async fn until_mirrored(
    client: &mut SupervisorClient<InternalChannel>,
    domains: &kv::Store,
    uuid: &str,
    state: DomainState,
) {
    let done = tokio::time::timeout(WAIT, async {
        loop {
            let want = get(client, uuid).await;
            if want.state == state as i32 && stored(domains, uuid).await.as_ref() == Some(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    done.unwrap_or_else(|_| {
        panic!("the registry does not show {uuid} {state:?} as GetDomain does within {WAIT:?}")
    });
}

async fn until_gone(store: &kv::Store, key: &str) {
    let done = tokio::time::timeout(WAIT, async {
        while store.get(key).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    done.unwrap_or_else(|_| panic!("{key} still in the registry after {WAIT:?}"));
}

/// Waits (up to [`WAIT`]) until [`HOST`]'s record is in the hosts
/// bucket; `what` names the wait in its panic.
async fn until_heartbeat(hosts: &kv::Store, what: &str) {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Some(_)) = hosts.get(host_key(HOST)).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"));
}

async fn heartbeat(hosts: &kv::Store) -> HostRecord {
    let value = hosts
        .get(host_key(HOST))
        .await
        .unwrap()
        .expect("a heartbeat");
    HostRecord::decode(value).unwrap()
}

async fn start(client: &mut SupervisorClient<InternalChannel>, uuid: &str) -> QemuGuard {
    let d = client
        .start_domain(StartDomainRequest {
            domain: uuid.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    QemuGuard(d.pid, uuid.to_owned())
}

async fn define(client: &mut SupervisorClient<InternalChannel>, name: &str) -> String {
    let yaml = format!("name: {name}\nmemory_mib: 128\naccel: tcg\n");
    define_yaml(client, yaml).await.unwrap().spec.unwrap().uuid
}

async fn undefine(client: &mut SupervisorClient<InternalChannel>, uuid: &str) {
    client
        .undefine_domain(UndefineDomainRequest {
            domain: uuid.into(),
            destroy: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The fleet's NATS asks every client for its token: a client without
/// one is refused at connect, and a supervisor holding the wrong one says
/// why in its log and never registers (a rogue client can neither read
/// the registry nor announce a host of its own).
#[tokio::test(flavor = "multi_thread")]
async fn test_nats_refuses_clients_without_the_fleet_token() {
    let nats = Nats::single();
    assert_refused_without_token(nats.urls()[0].parse().unwrap()).await;

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong-token");
    qvirt_integration_tests::write_secret(&wrong, &qvirt_integration_tests::random_secret());
    let mut svc = supervisor_with_token(&nats, dir.path(), &wrong).await;
    svc.wait_log("authorization violation", WAIT).await;
    // The broker itself saw the refusal, and no bucket was made.
    let js = jetstream::new(nats.client().await);
    assert!(js.get_key_value(HOSTS_BUCKET).await.is_err());
}

/// With `ca_file` a host reaches NATS over TLS only: a supervisor
/// trusting the servers' CA heartbeats into the registry; a client that
/// does not trust it gets no connection, token or not.
#[tokio::test(flavor = "multi_thread")]
async fn test_a_fleet_host_over_tls() {
    let nats = Nats::single_tls();
    let dir = tempfile::tempdir().unwrap();
    let _sup = supervisor(&nats, dir.path()).await;
    let (hosts, _) = buckets(&nats).await;
    until_heartbeat(&hosts, "the host's heartbeat in the registry").await;
    assert_eq!(heartbeat(&hosts).await.host, HOST);

    // A client trusting another CA (a server posing as the fleet's) is
    // refused by its own side of the handshake, token or not.
    let connect = |nats: &Nats, ca: &Path| {
        let token = std::fs::read_to_string(nats.token_file()).unwrap();
        async_nats::ConnectOptions::with_token(token.trim().to_owned())
            .add_root_certificates(ca.to_owned())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(5))
            .connect(nats.urls()[0].clone())
    };
    let other = qvirt_integration_tests::pki::Ca::new(dir.path(), "other");
    let untrusted = connect(&nats, &other.cert).await;
    assert!(untrusted.is_err(), "a client trusting another CA connected");
    // And with a CA, a server that offers no TLS is refused (its own
    // token presented).
    let plain = Nats::single();
    let refused = connect(&plain, nats.ca_file().unwrap()).await;
    assert!(refused.is_err(), "a TLS client connected without TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_fleet_host_keeps_trusting_the_ca_it_checked_at_start() {
    let mut nats = Nats::single_tls();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("fleet-ca.pem");
    std::fs::copy(nats.ca_file().unwrap(), &ca).unwrap();
    // A system certificate store that cannot be read is none of its
    // business: it trusts the CA file alone.
    let _sup = supervisor_trusting(
        &nats,
        dir.path(),
        nats.token_file(),
        Some(&ca),
        &[("SSL_CERT_FILE", "/nonexistent/ca-bundle.crt")],
    )
    .await;
    let (hosts, _) = buckets(&nats).await;
    until_heartbeat(&hosts, "the host's heartbeat in the registry").await;
    // The file changes under the running service (here: another CA's
    // certificate), then the server restarts: the reconnection still
    // trusts the CA checked at start, not what the file holds now. (The
    // record's expiry marker, which the server writes itself, is no
    // heartbeat.)
    let other = qvirt_integration_tests::pki::Ca::new(dir.path(), "other");
    std::fs::copy(&other.cert, &ca).unwrap();
    nats.nodes[0].stop(libc::SIGTERM);
    let restarted = std::time::SystemTime::now();
    nats.nodes[0].start();
    nats.wait_ready();
    let (hosts, _) = buckets(&nats).await;
    let beat = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Some(e)) = hosts.entry(host_key(HOST)).await
                && e.operation == kv::Operation::Put
                && std::time::SystemTime::from(e.created) > restarted
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    beat.unwrap_or_else(|_| panic!("no heartbeat after the server's restart within {WAIT:?}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_mirrors_domains_and_heartbeats() {
    tool_path("qemu-system-x86_64");
    let nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(&nats, dir.path()).await;
    let (hosts, domains) = buckets(&nats).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);

    let uuid = define(&mut client, "fr1").await;
    until_mirrored(&mut client, &domains, &uuid, DomainState::Shutoff).await;
    let _qemu = start(&mut client, &uuid).await;
    until_mirrored(&mut client, &domains, &uuid, DomainState::Running).await;
    client
        .suspend_domain(SuspendDomainRequest {
            domain: uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_mirrored(&mut client, &domains, &uuid, DomainState::Paused).await;
    let other = define(&mut client, "fr2").await;
    until_mirrored(&mut client, &domains, &other, DomainState::Shutoff).await;

    // The heartbeat: what gateways place and route by.
    let done = tokio::time::timeout(WAIT, async {
        loop {
            let r = heartbeat(&hosts).await;
            if r.domains == 2 && r.running_domains == 1 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let r = done.expect("a heartbeat counting both domains");
    assert_eq!(r.host, HOST);
    assert_eq!(r.supervisor_url, "http://10.0.0.1:50052");
    assert_eq!(r.agentd_url, "http://10.0.0.1:50055");
    assert!(!r.version.is_empty());
    assert!(r.cpus >= 1);
    assert!(r.memory_bytes > 0 && r.memory_available_bytes > 0);
    assert!(r.memory_available_bytes <= r.memory_bytes);
    assert_eq!(r.guest_memory_bytes, 2 * (128 << 20));
    let (start, beat) = (r.start_time.unwrap(), r.heartbeat_time.unwrap());
    assert!((start.seconds, start.nanos) <= (beat.seconds, beat.nanos));

    // Undefine deletes the key.
    undefine(&mut client, &uuid).await;
    until_gone(&domains, &domain_key(HOST, &uuid)).await;
    client
        .destroy_domain(DestroyDomainRequest {
            domain: other.clone(),
            ..Default::default()
        })
        .await
        .ok();

    // A supervisor that dies stops heartbeating: its key expires (its
    // domains stay, as last known).
    sup.signal(libc::SIGKILL);
    until_gone(&hosts, &host_key(HOST)).await;
    assert!(stored(&domains, &other).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_reconciles_after_broker_outage() {
    tool_path("qemu-system-x86_64");
    let mut nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(&nats, dir.path()).await;
    let (_, domains) = buckets(&nats).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let kept = define(&mut client, "kept").await;
    let dropped = define(&mut client, "dropped").await;
    until_mirrored(&mut client, &domains, &kept, DomainState::Shutoff).await;
    until_mirrored(&mut client, &domains, &dropped, DomainState::Shutoff).await;

    // The broker goes away; calls go on as if nothing happened.
    nats.nodes[0].stop(libc::SIGTERM);
    let _qemu = start(&mut client, &kept).await;
    undefine(&mut client, &dropped).await;
    let fresh = define(&mut client, "fresh").await;
    // The supervisor restarts meanwhile (what it had not mirrored yet is
    // only in its domains now), and starts without the broker.
    sup.signal(libc::SIGKILL);
    drop(sup);
    let sup = supervisor(&nats, dir.path()).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    nats.nodes[0].start();
    nats.wait_ready();

    // Back: the bucket is current.
    let (hosts, domains) = buckets(&nats).await;
    until_mirrored(&mut client, &domains, &kept, DomainState::Running).await;
    until_mirrored(&mut client, &domains, &fresh, DomainState::Shutoff).await;
    until_gone(&domains, &domain_key(HOST, &dropped)).await;
    until_heartbeat(&hosts, "the heartbeat resumes").await;
    undefine(&mut client, &kept).await;
}
