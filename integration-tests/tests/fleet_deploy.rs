//! The fleet deployment, deploy/fleet/docker-compose.yml, for real: 3 NATS
//! servers (R3 stream), 3 qvirt hosts, 2 gateways, each scenario asserting
//! what a client sees through the gateways.
//!
//! These tests run only against a compose project that
//! scripts/test-fleet.sh (`make test-fleet`) brought up, in the order it
//! gives; it passes the project in the environment (`QVIRT_FLEET_*`).
//! nextest's default run leaves this binary out (.config/nextest.toml) and
//! each test is `#[ignore]`d for `cargo test`; run by hand without that
//! environment, every test fails (it never passes without a fleet).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qvirt_integration_tests::guest::GUEST_CMDLINE;
use qvirt_integration_tests::{COMMAND_TIMEOUT, run, text};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::event_ingest_client::EventIngestClient;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::publish_request::Event;
use qvirt_proto::v1::subscribe_domain_events_response::Kind as DomainKind;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind as MonitorKind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, Domain, DomainEventType, DomainState, HostEvent, HostEventType,
    ListDomainsRequest, MonitorEvent, MonitorEventFilterFlag, PingRequest, PublishRequest,
    ResumeDomainRequest, StartDomainRequest, SubscribeDomainEventsRequest,
    SubscribeDomainEventsResponse, SubscribeMonitorEventsRequest, SubscribeMonitorEventsResponse,
    SuspendDomainRequest, define_domain_request,
};
use tonic::transport::{Channel, Endpoint};

/// Bound on one message of a subscription: a stream leader's election
/// (4-9 s), a consumer made again after two missed heartbeats, on 2
/// loaded cores.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on the fleet getting back to health after a scenario's damage.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);

/// The hosts of the compose file.
const HOSTS: [&str; 3] = ["host1", "host2", "host3"];

/// The compose project under test, from scripts/test-fleet.sh.
struct Fleet {
    project: String,
    /// The gateways' published URLs (gw1, gw2).
    gateways: [String; 2],
    token_rw: String,
    token_ro: String,
    internal_token: String,
    nats_token: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests run against the fleet that \
             scripts/test-fleet.sh (`make test-fleet`) brings up"
        )
    })
}

fn read_secret(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn fleet() -> Fleet {
    let config = PathBuf::from(env("QVIRT_FLEET_CONFIG"));
    Fleet {
        project: env("QVIRT_FLEET_PROJECT"),
        gateways: [env("QVIRT_FLEET_GW1"), env("QVIRT_FLEET_GW2")],
        token_rw: read_secret(&config, "token-rw"),
        token_ro: read_secret(&config, "token-ro"),
        internal_token: read_secret(&config, "internal-token"),
        nats_token: read_secret(&config, "nats-token"),
    }
}

/// `docker ARGS`, which must succeed; its stdout.
fn docker(args: &[&str]) -> String {
    let out = run(std::path::Path::new("docker"), args, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_owned()
}

impl Fleet {
    /// The container of a compose service.
    fn container(&self, service: &str) -> String {
        let id = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        assert!(
            !id.is_empty() && !id.contains('\n'),
            "service {service}: {id:?}"
        );
        id
    }

    /// A service's address on the fleet network, as this machine reaches
    /// it (the hosts' buses and the NATS servers publish no port).
    fn address(&self, service: &str) -> String {
        let id = self.container(service);
        let ip = docker(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}_fleet\").IPAddress}}}}",
                self.project
            ),
            &id,
        ]);
        assert!(
            !ip.is_empty(),
            "{service} has no address on the fleet network"
        );
        ip
    }

    fn health(&self, service: &str) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
            &self.container(service),
        ])
    }

    /// Waits until every service of the project is healthy (or, without a
    /// health check, running).
    async fn wait_healthy(&self, services: &[&str]) {
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        for s in services {
            loop {
                let h = self.health(s);
                if h == "healthy" || h == "running" && !self.has_healthcheck(s) {
                    break;
                }
                assert!(Instant::now() < deadline, "{s} is {h}, not healthy");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    fn has_healthcheck(&self, service: &str) -> bool {
        docker(&[
            "inspect",
            "-f",
            "{{if .State.Health}}yes{{end}}",
            &self.container(service),
        ]) == "yes"
    }

    /// A channel to a gateway whose dead peer shows within seconds (HTTP/2
    /// pings): a killed container sends no reset.
    async fn gateway(&self, i: usize) -> Channel {
        Endpoint::from_shared(self.gateways[i].clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("gateway {}: {e}", self.gateways[i]))
    }

    /// A request carrying a gateway bearer token.
    fn bearer<T>(&self, message: T, token: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }

    /// Publishes `count` monitor events `event` (details `{"n": N}`, N from
    /// `from`) at `host`'s own bus, as its supervisor does: the internal
    /// plane, the real forwarding path to the stream.
    async fn publish(&self, host: &str, domain: &str, event: &str, from: u64, count: u64) {
        let url = format!("http://{}:50053", self.address(host));
        let mut ingest = EventIngestClient::connect(url).await.unwrap();
        let reqs: Vec<PublishRequest> = (from..from + count)
            .map(|n| PublishRequest {
                event: Some(Event::MonitorEvent(MonitorEvent {
                    domain_name: domain.into(),
                    event: event.into(),
                    details_json: format!("{{\"n\":{n}}}"),
                    ..Default::default()
                })),
            })
            .collect();
        let mut request = tonic::Request::new(tokio_stream::iter(reqs));
        request.metadata_mut().insert(
            "x-qvirt-internal-token",
            self.internal_token.parse().unwrap(),
        );
        let reply = ingest.publish(request).await.unwrap().into_inner();
        assert_eq!(reply.accepted, count, "{host}'s bus took every event");
    }

    /// The running NATS servers' client addresses.
    fn nats_addrs(&self) -> Vec<async_nats::ServerAddr> {
        ["nats1", "nats2", "nats3"]
            .iter()
            .filter(|s| self.health(s) == "running")
            .map(|s| format!("nats://{}:4222", self.address(s)).parse().unwrap())
            .collect()
    }

    /// The JetStream cluster, reached at the servers' own addresses with
    /// the fleet's NATS token.
    async fn jetstream(&self) -> async_nats::jetstream::Context {
        let urls = self.nats_addrs();
        let client = async_nats::ConnectOptions::with_token(self.nats_token.clone())
            .connection_timeout(Duration::from_secs(5))
            .connect(urls)
            .await
            .unwrap();
        async_nats::jetstream::new(client)
    }
}

/// A monitor-event subscription through a gateway, read-write token;
/// returns once it is established.
async fn subscribe_monitor(
    fleet: &Fleet,
    gateway: usize,
    req: SubscribeMonitorEventsRequest,
) -> tonic::Streaming<SubscribeMonitorEventsResponse> {
    let mut client = EventBusClient::new(fleet.gateway(gateway).await);
    let mut stream = client
        .subscribe_monitor_events(fleet.bearer(req, &fleet.token_rw))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .expect("established in time")
        .unwrap()
        .expect("stream open");
    assert!(
        matches!(first.kind, Some(MonitorKind::Established(_))),
        "{first:?}"
    );
    stream
}

/// What one subscriber received, per host: the events' `n` in arrival
/// order, and the last cursor.
#[derive(Default, Debug)]
struct Received {
    by_host: BTreeMap<String, Vec<u64>>,
    total: usize,
    last_cursor: String,
}

impl Received {
    fn take(&mut self, msg: SubscribeMonitorEventsResponse) {
        match msg.kind {
            Some(MonitorKind::Event(e)) => {
                let v: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
                self.by_host
                    .entry(e.host)
                    .or_default()
                    .push(v["n"].as_u64().unwrap());
                self.total += 1;
                self.last_cursor = e.cursor;
            }
            Some(MonitorKind::Lost(l)) => panic!("events lost: {l:?}"),
            other => panic!("unexpected message {other:?}"),
        }
    }

    /// Every host's events exactly once and in its order: `0..count`.
    fn assert_exactly(&self, who: &str, per_host: &BTreeMap<String, u64>) {
        for (host, count) in per_host {
            let got = self.by_host.get(host).cloned().unwrap_or_default();
            let want: Vec<u64> = (0..*count).collect();
            if got != want {
                let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
                panic!(
                    "{who}: {host}'s events: {} received, {} sent; first difference at \
                     {first_bad:?}",
                    got.len(),
                    count
                );
            }
        }
        assert_eq!(
            self.by_host.len(),
            per_host.len(),
            "{who}: events of other hosts"
        );
    }
}

/// Reads `stream` until `total` events arrived.
async fn read_until(
    who: &str,
    stream: &mut tonic::Streaming<SubscribeMonitorEventsResponse>,
    received: &mut Received,
    total: usize,
) {
    while received.total < total {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{who}: stalled after {} events", received.total))
            .unwrap_or_else(|e| panic!("{who}: stream failed after {}: {e}", received.total))
            .unwrap_or_else(|| panic!("{who}: stream ended after {}", received.total));
        received.take(msg);
    }
}

/// The name of the server leading the event stream.
async fn stream_leader(fleet: &Fleet) -> String {
    let js = fleet.jetstream().await;
    let mut stream = js.get_stream("QVIRT_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader")
}

/// The guests of scenario 1, the test guest booting from the images dir
/// every host mounts.
const GUESTS: [&str; 6] = [
    "fleet-g1", "fleet-g2", "fleet-g3", "fleet-g4", "fleet-g5", "fleet-g6",
];

/// Bound on the guests' agents answering: six TCG guests booting at once
/// on two loaded cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn guest_yaml(name: &str) -> String {
    format!(
        "name: {name}\nmemory_mib: 128\nvcpus: 1\nmachine: q35\naccel: tcg\n\
         kernel: /var/lib/qvirt-images/vmlinux\ninitrd: /var/lib/qvirt-images/initramfs\n\
         cmdline: \"{GUEST_CMDLINE}\"\nagent: true\n"
    )
}

impl Fleet {
    async fn supervisor(&self, gateway: usize) -> SupervisorClient<Channel> {
        SupervisorClient::new(self.gateway(gateway).await)
    }

    /// Every domain as `ListDomains` at a gateway pages them out.
    async fn list(&self, gateway: usize) -> Vec<Domain> {
        let mut client = self.supervisor(gateway).await;
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = ListDomainsRequest {
                page_token: page_token.clone(),
                ..Default::default()
            };
            let reply = client
                .list_domains(self.bearer(req, &self.token_ro))
                .await
                .unwrap()
                .into_inner();
            out.extend(reply.domains);
            if reply.next_page_token.is_empty() {
                return out;
            }
            page_token = reply.next_page_token;
        }
    }

    /// The hosts of scenario 1's guests, by name, as a gateway lists them.
    async fn guest_hosts(&self, gateway: usize) -> BTreeMap<String, String> {
        self.list(gateway)
            .await
            .into_iter()
            .filter_map(|d| {
                let name = d.spec.as_ref()?.name.clone();
                GUESTS.contains(&name.as_str()).then_some((name, d.host))
            })
            .collect()
    }
}

/// Scenario 1: six guests defined without a host spread over the three
/// hosts; either gateway lists all six with their hosts; started, each
/// guest's agent answers through a gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s1_guests_spread_over_the_hosts() {
    let fleet = fleet();
    // Every NATS server refuses a client without the fleet's token: no
    // one else on the fleet network reads the events or the registry.
    for addr in fleet.nats_addrs() {
        qvirt_integration_tests::nats::assert_refused_without_token(addr).await;
    }
    let mut gw1 = fleet.supervisor(0).await;
    for name in GUESTS {
        let req = DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(guest_yaml(name))),
            ..Default::default()
        };
        let domain = gw1
            .define_domain(fleet.bearer(req, &fleet.token_rw))
            .await
            .unwrap_or_else(|e| panic!("define {name}: {e}"))
            .into_inner()
            .domain
            .unwrap();
        assert!(
            HOSTS.contains(&domain.host.as_str()),
            "{name}: {}",
            domain.host
        );
    }
    // Both gateways list the six, each on its host; two per host (the
    // hosts are alike: placement by most free memory alternates). A
    // listing comes from the registry, which a host updates just after
    // it answers: wait for the last define to show.
    for gateway in [0, 1] {
        fleet
            .wait_guests(gateway, "all six listed", MESSAGE_TIMEOUT, |g| {
                g.len() == GUESTS.len()
            })
            .await;
    }
    let hosts = fleet.guest_hosts(0).await;
    assert_eq!(hosts.len(), GUESTS.len(), "{hosts:?}");
    assert_eq!(fleet.guest_hosts(1).await, hosts);
    for host in HOSTS {
        let n = hosts.values().filter(|h| *h == host).count();
        assert_eq!(n, 2, "{host} holds {n} of the six: {hosts:?}");
    }

    let mut gw2 = fleet.supervisor(1).await;
    for name in GUESTS {
        let req = StartDomainRequest {
            domain: name.into(),
            ..Default::default()
        };
        gw2.start_domain(fleet.bearer(req, &fleet.token_rw))
            .await
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
    }
    // Each agent answers, asked at one gateway or the other.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    for (i, name) in GUESTS.iter().enumerate() {
        let mut agent = GuestAgentClient::new(fleet.gateway(i % 2).await);
        loop {
            let req = PingRequest {
                domain: name.to_string(),
                timeout: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                ..Default::default()
            };
            match agent.ping(fleet.bearer(req, &fleet.token_rw)).await {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{name}'s agent (on {}): {e}",
                    hosts[*name]
                ),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    fleet
        .wait_guests(
            1,
            "all six running at the other gateway",
            MESSAGE_TIMEOUT,
            |g| g.len() == GUESTS.len() && g.values().all(|(_, s, _)| *s == DomainState::Running),
        )
        .await;
}

/// Scenario 2: guests on every host suspended and resumed while one
/// subscriber per gateway watches monitor events (REGEX filter,
/// read-write token) and one domain events (read-only token): every event
/// arrives once, with its host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s2_events_of_every_host_once_with_their_host() {
    let fleet = fleet();
    let hosts = fleet.guest_hosts(0).await;
    assert_eq!(hosts.len(), GUESTS.len(), "scenario 1 defines the guests");
    let mut monitor = Vec::new();
    let mut domain = Vec::new();
    for gw in 0..2 {
        monitor.push(
            subscribe_monitor(
                &fleet,
                gw,
                SubscribeMonitorEventsRequest {
                    event: "^(STOP|RESUME)$".into(),
                    flags: vec![MonitorEventFilterFlag::Regex as i32],
                    ..Default::default()
                },
            )
            .await,
        );
        domain.push(subscribe_domain(&fleet, gw, &fleet.token_ro).await);
    }

    // Each guest suspended and resumed, every other one at each gateway.
    for (i, name) in GUESTS.iter().enumerate() {
        let mut client = fleet.supervisor(i % 2).await;
        let req = SuspendDomainRequest {
            domain: name.to_string(),
            ..Default::default()
        };
        client
            .suspend_domain(fleet.bearer(req, &fleet.token_rw))
            .await
            .unwrap_or_else(|e| panic!("suspend {name}: {e}"));
        let req = ResumeDomainRequest {
            domain: name.to_string(),
            ..Default::default()
        };
        client
            .resume_domain(fleet.bearer(req, &fleet.token_rw))
            .await
            .unwrap_or_else(|e| panic!("resume {name}: {e}"));
    }

    // Per subscriber: (domain, host, what) of each event, in order.
    let want: Vec<(String, String, &str)> = GUESTS
        .iter()
        .flat_map(|g| {
            let h = hosts[*g].clone();
            [
                (g.to_string(), h.clone(), "stop"),
                (g.to_string(), h, "resume"),
            ]
        })
        .collect();
    for (gw, stream) in monitor.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let msg = next(stream, &format!("monitor events at gw{}", gw + 1)).await;
            match msg.kind {
                Some(MonitorKind::Event(e)) if GUESTS.contains(&e.domain_name.as_str()) => {
                    let what = if e.event == "STOP" { "stop" } else { "resume" };
                    got.push((e.domain_name, e.host, what));
                }
                Some(MonitorKind::Event(_)) => {}
                other => panic!("gw{}: {other:?}", gw + 1),
            }
        }
        assert_eq!(sorted_by_guest(got), want, "monitor events at gw{}", gw + 1);
    }
    for (gw, stream) in domain.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let msg = next(stream, &format!("domain events at gw{}", gw + 1)).await;
            match msg.kind {
                Some(DomainKind::Event(e)) if GUESTS.contains(&e.domain_name.as_str()) => {
                    let what = match e.r#type() {
                        DomainEventType::Suspended => "stop",
                        DomainEventType::Resumed => "resume",
                        other => panic!("gw{}: {} {other:?}", gw + 1, e.domain_name),
                    };
                    got.push((e.domain_name, e.host, what));
                }
                Some(DomainKind::Event(_)) => {}
                other => panic!("gw{}: {other:?}", gw + 1),
            }
        }
        assert_eq!(sorted_by_guest(got), want, "domain events at gw{}", gw + 1);
    }
    // Once: nothing more of these guests follows.
    for stream in &mut monitor {
        if let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(2), stream.message()).await
        {
            panic!("a repeated event: {m:?}");
        }
    }
    for stream in &mut domain {
        if let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(2), stream.message()).await
        {
            panic!("a repeated event: {m:?}");
        }
    }
}

/// Events grouped by guest (keeping each guest's order): guests on
/// different hosts have no order between them.
fn sorted_by_guest(mut v: Vec<(String, String, &str)>) -> Vec<(String, String, &str)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A domain-event subscription through a gateway with `token`; returns
/// once it is established.
async fn subscribe_domain(
    fleet: &Fleet,
    gateway: usize,
    token: &str,
) -> tonic::Streaming<SubscribeDomainEventsResponse> {
    let mut client = EventBusClient::new(fleet.gateway(gateway).await);
    let mut stream = client
        .subscribe_domain_events(fleet.bearer(SubscribeDomainEventsRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream, "domain events").await;
    assert!(
        matches!(first.kind, Some(DomainKind::Established(_))),
        "{first:?}"
    );
    stream
}

/// The next message of a stream, within [`MESSAGE_TIMEOUT`].
async fn next<T>(stream: &mut tonic::Streaming<T>, what: &str) -> T {
    tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing in time"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

/// Waits until all three servers hold the stream, current.
async fn wait_stream_current(fleet: &Fleet) {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        let state = async {
            let js = fleet.jetstream().await;
            let mut stream = js.get_stream("QVIRT_EVENTS").await.ok()?;
            let info = stream.info().await.ok()?;
            let cluster = info.cluster.as_ref()?;
            let current = cluster.replicas.iter().filter(|r| r.current).count();
            Some((cluster.leader.is_some(), current))
        };
        let state = tokio::time::timeout(Duration::from_secs(10), state)
            .await
            .ok()
            .flatten();
        if state == Some((true, 2)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stream is not current on 3 servers: {state:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Scenario 3: one NATS server (the stream's leader) is killed during a
/// burst of 10,000 events from the three hosts; a subscriber at each
/// gateway sees every event exactly once, in each host's order. Then the
/// server comes back and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s3_nats_server_killed_during_a_burst() {
    let fleet = fleet();
    const EVENT: &str = "QVIRT_TEST_BURST";
    const TOTAL: u64 = 10_000;
    wait_stream_current(&fleet).await;
    let per_host: BTreeMap<String, u64> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_string(), TOTAL / 3 + u64::from(i == 0) * (TOTAL % 3)))
        .collect();
    let req = SubscribeMonitorEventsRequest {
        event: EVENT.into(),
        ..Default::default()
    };
    let mut subs = [
        subscribe_monitor(&fleet, 0, req.clone()).await,
        subscribe_monitor(&fleet, 1, req).await,
    ];
    let mut got = [Received::default(), Received::default()];

    // A first tenth, seen by both, so the kill lands mid-burst.
    for (host, count) in &per_host {
        fleet.publish(host, "burst", EVENT, 0, count / 10).await;
    }
    let first: u64 = per_host.values().map(|c| c / 10).sum();
    for (i, (s, r)) in subs.iter_mut().zip(got.iter_mut()).enumerate() {
        read_until(&format!("gw{}", i + 1), s, r, first as usize).await;
    }

    // The rest from all hosts at once, and the stream's leader killed
    // while the hosts forward it.
    let leader = stream_leader(&fleet).await;
    let publishers: Vec<_> = per_host
        .iter()
        .map(|(host, count)| {
            let (host, count) = (host.clone(), *count);
            let fleet = self::fleet();
            tokio::spawn(async move {
                fleet
                    .publish(&host, "burst", EVENT, count / 10, count - count / 10)
                    .await;
            })
        })
        .collect();
    docker(&["kill", &fleet.container(&leader)]);
    eprintln!(
        "fleet-note: killed {leader}, the stream's leader, with {first} of {TOTAL} events delivered"
    );
    for p in publishers {
        p.await.unwrap();
    }
    for (i, (s, r)) in subs.iter_mut().zip(got.iter_mut()).enumerate() {
        read_until(&format!("gw{}", i + 1), s, r, TOTAL as usize).await;
        r.assert_exactly(&format!("gw{}", i + 1), &per_host);
    }
    // Nothing more: one more event per host arrives next, not a repeat.
    for host in HOSTS {
        fleet.publish(host, "burst", EVENT, per_host[host], 1).await;
    }
    let per_host: BTreeMap<String, u64> = per_host.into_iter().map(|(h, c)| (h, c + 1)).collect();
    for (i, (s, r)) in subs.iter_mut().zip(got.iter_mut()).enumerate() {
        read_until(&format!("gw{}", i + 1), s, r, TOTAL as usize + 3).await;
        r.assert_exactly(&format!("gw{}", i + 1), &per_host);
    }

    docker(&["start", &fleet.container(&leader)]);
    wait_stream_current(&fleet).await;
}

/// Scenario 5: a gateway (and its bus) is killed while a client streams
/// events through it; the client resumes at the other gateway with its
/// last cursor: no gap, no duplicate. Then the gateway comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s5_gateway_killed_client_resumes_at_the_other() {
    let fleet = fleet();
    const EVENT: &str = "QVIRT_TEST_RESUME";
    const PER_HOST: u64 = 600;
    const CHUNK: u64 = 50;
    let per_host: BTreeMap<String, u64> = HOSTS.iter().map(|h| (h.to_string(), PER_HOST)).collect();
    let req = SubscribeMonitorEventsRequest {
        event: EVENT.into(),
        ..Default::default()
    };
    let mut stream = subscribe_monitor(&fleet, 0, req.clone()).await;

    // The hosts publish in chunks, on and on, while the client reads.
    let publishers: Vec<_> = HOSTS
        .iter()
        .map(|host| {
            let host = host.to_string();
            let fleet = self::fleet();
            tokio::spawn(async move {
                for from in (0..PER_HOST).step_by(CHUNK as usize) {
                    fleet.publish(&host, "resume", EVENT, from, CHUNK).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();

    let mut got = Received::default();
    read_until("gw1", &mut stream, &mut got, 300).await;
    let killed_at = got.total;
    docker(&["kill", &fleet.container("gw1"), &fleet.container("gw1-bus")]);
    // The stream through gw1 ends (an error, or the HTTP/2 pings going
    // unanswered): what arrived before that still counts.
    loop {
        match tokio::time::timeout(MESSAGE_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(msg))) => got.take(msg),
            Ok(Ok(None)) | Ok(Err(_)) => break,
            Err(_) => panic!("the stream through the killed gateway neither ended nor failed"),
        }
    }
    eprintln!(
        "fleet-note: gw1 killed after {killed_at} events; its stream ended after {}",
        got.total
    );
    let cursor = got.last_cursor.clone();
    assert!(!cursor.is_empty());
    let mut stream = subscribe_monitor(
        &fleet,
        1,
        SubscribeMonitorEventsRequest {
            resume_after: cursor,
            ..req
        },
    )
    .await;
    for p in publishers {
        p.await.unwrap();
    }
    read_until("gw2", &mut stream, &mut got, 3 * PER_HOST as usize).await;
    got.assert_exactly("gw1 then gw2", &per_host);
    if let Ok(m) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
        panic!("more than was sent: {m:?}");
    }

    docker(&[
        "start",
        &fleet.container("gw1-bus"),
        &fleet.container("gw1"),
    ]);
    fleet.wait_healthy(&["gw1-bus", "gw1"]).await;
}

/// The heartbeat TTL of the hosts' records (supervisor `fleet:`
/// `heartbeat_ttl_secs`, as scripts/fleet-init.sh writes it).
const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

/// How long after a heartbeat stops a host must show unreachable: the
/// bucket's `max_age` (the TTL) after its last put, plus the server's
/// expiry sweep and the watch's delivery on loaded cores.
const UNREACHABLE_WITHIN: Duration = Duration::from_secs(2 * HEARTBEAT_TTL.as_secs() + 15);

impl Fleet {
    /// `qvirtctl ARGS` inside a host's container, at its own supervisor
    /// (not through a gateway: what a host does while cut off), with the
    /// internal secret every backend asks of its callers.
    fn ctl_on_host(&self, host: &str, args: &[&str]) -> String {
        let container = self.container(host);
        let mut all = vec![
            "exec",
            &container,
            "qvirtctl",
            "--connect",
            "http://127.0.0.1:50052",
            "--internal-token-file",
            "/etc/qvirt/internal-token",
        ];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// Scenario 1's guests as a gateway lists them: name -> (host, state,
    /// host_unreachable).
    async fn guests(&self, gateway: usize) -> BTreeMap<String, (String, DomainState, bool)> {
        self.list(gateway)
            .await
            .into_iter()
            .filter_map(|d| {
                let name = d.spec.as_ref()?.name.clone();
                GUESTS
                    .contains(&name.as_str())
                    .then(|| (name, (d.host.clone(), d.state(), d.host_unreachable)))
            })
            .collect()
    }

    /// Waits until `ok` holds for what gateway `gateway` lists, within
    /// `timeout`; returns that listing.
    async fn wait_guests(
        &self,
        gateway: usize,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&BTreeMap<String, (String, DomainState, bool)>) -> bool,
    ) -> BTreeMap<String, (String, DomainState, bool)> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.guests(gateway).await;
            if ok(&now) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The next host event of a domain-event stream, skipping domain events.
async fn next_host_event(
    stream: &mut tonic::Streaming<SubscribeDomainEventsResponse>,
    what: &str,
) -> HostEvent {
    loop {
        match next(stream, what).await.kind {
            Some(DomainKind::HostEvent(h)) => return h,
            Some(DomainKind::Event(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// Scenario 4: a host cut off the network for 20 s while its guests run
/// and change state: it shows unreachable within the heartbeat TTL (its
/// domains listed with `host_unreachable`, a host event), the other hosts
/// not; reconnected, the events of the cut arrive, each once and in
/// order, and its domains are current again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s4_host_cut_off_the_network() {
    let fleet = fleet();
    const HOST: &str = "host2";
    let before = fleet.guests(0).await;
    let mine: Vec<String> = before
        .iter()
        .filter(|(_, (h, _, _))| h == HOST)
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        mine.len(),
        2,
        "scenario 1 put two guests on {HOST}: {before:?}"
    );
    let mut monitor = subscribe_monitor(
        &fleet,
        0,
        SubscribeMonitorEventsRequest {
            event: "^(STOP|RESUME)$".into(),
            flags: vec![MonitorEventFilterFlag::Regex as i32],
            host: HOST.into(),
            ..Default::default()
        },
    )
    .await;
    let mut hosts = subscribe_domain(&fleet, 1, &fleet.token_ro).await;

    let network = format!("{}_fleet", fleet.project);
    let container = fleet.container(HOST);
    docker(&["network", "disconnect", &network, &container]);
    let cut = Instant::now();
    // The guests run on and change state, at the host's own supervisor.
    fleet.ctl_on_host(HOST, &["suspend", &mine[0]]);
    fleet.ctl_on_host(HOST, &["suspend", &mine[1]]);
    fleet.ctl_on_host(HOST, &["resume", &mine[1]]);

    let seen = fleet
        .wait_guests(0, "the cut host unreachable", UNREACHABLE_WITHIN, |g| {
            g.values().all(|(h, _, u)| *u == (h == HOST))
        })
        .await;
    // What the gateways knew last: both running.
    for name in &mine {
        assert_eq!(seen[name].1, DomainState::Running, "{name}: {seen:?}");
    }
    let event = next_host_event(&mut hosts, "host events at gw2").await;
    assert_eq!(
        (event.host.as_str(), event.r#type()),
        (HOST, HostEventType::Unreachable)
    );
    eprintln!(
        "fleet-note: {HOST} cut off; unreachable {:.1} s later (heartbeat TTL {} s)",
        cut.elapsed().as_secs_f64(),
        HEARTBEAT_TTL.as_secs()
    );

    // 20 s of cut in all, then back on the network under its name.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    docker(&["network", "connect", "--alias", HOST, &network, &container]);

    let event = next_host_event(&mut hosts, "host events at gw2").await;
    assert_eq!(
        (event.host.as_str(), event.r#type()),
        (HOST, HostEventType::Reachable)
    );
    let mut got = Vec::new();
    while got.len() < 3 {
        match next(&mut monitor, "the cut's monitor events").await.kind {
            Some(MonitorKind::Event(e)) => got.push((e.domain_name, e.host, e.event)),
            other => panic!("{other:?}"),
        }
    }
    let want = [
        (mine[0].clone(), HOST.to_owned(), "STOP".to_owned()),
        (mine[1].clone(), HOST.to_owned(), "STOP".to_owned()),
        (mine[1].clone(), HOST.to_owned(), "RESUME".to_owned()),
    ];
    assert_eq!(got, want);
    if let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(2), monitor.message()).await {
        panic!("a repeated event: {m:?}");
    }
    let first = mine[0].clone();
    fleet
        .wait_guests(1, "the host's domains current", RECOVERY_TIMEOUT, |g| {
            g.values().all(|(_, _, u)| !u) && g[&first].1 == DomainState::Paused
        })
        .await;
    // Whole again for the next scenario.
    let mut client = fleet.supervisor(0).await;
    let req = ResumeDomainRequest {
        domain: first,
        ..Default::default()
    };
    client
        .resume_domain(fleet.bearer(req, &fleet.token_rw))
        .await
        .unwrap();
}

/// Scenario 6: a host's container killed: its domains show stale
/// (`host_unreachable`, last known state), the other hosts' guests answer
/// as before; started again, its supervisor recovers and the fleet list
/// is current (the guests shut off: their QEMU died with the container).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs against the fleet scripts/test-fleet.sh brings up"]
async fn test_s6_host_container_killed_and_restarted() {
    let fleet = fleet();
    const HOST: &str = "host3";
    let before = fleet.guests(0).await;
    let (mine, others): (Vec<_>, Vec<_>) = before.iter().partition(|(_, (h, _, _))| h == HOST);
    assert_eq!(mine.len(), 2, "{before:?}");
    let container = fleet.container(HOST);
    docker(&["kill", &container]);
    let killed = Instant::now();
    let seen = fleet
        .wait_guests(
            1,
            "the killed host's domains stale",
            UNREACHABLE_WITHIN,
            |g| g.values().all(|(h, _, u)| *u == (h == HOST)),
        )
        .await;
    eprintln!(
        "fleet-note: {HOST} killed; its domains stale {:.1} s later (heartbeat TTL {} s)",
        killed.elapsed().as_secs_f64(),
        HEARTBEAT_TTL.as_secs()
    );
    for (name, _) in &mine {
        assert_eq!(
            seen[*name].1,
            DomainState::Running,
            "last known state of {name}"
        );
    }
    // The other hosts' guests are unaffected: running, agents answer.
    let mut agent = GuestAgentClient::new(fleet.gateway(0).await);
    for (name, (_, state, _)) in &others {
        assert_eq!(seen[*name].1, *state, "{name}");
        let req = PingRequest {
            domain: name.to_string(),
            ..Default::default()
        };
        agent
            .ping(fleet.bearer(req, &fleet.token_rw))
            .await
            .unwrap_or_else(|e| panic!("{name}'s agent: {e}"));
    }
    // A call for a domain of the dead host says so.
    let mut client = fleet.supervisor(0).await;
    let req = SuspendDomainRequest {
        domain: mine[0].0.clone(),
        ..Default::default()
    };
    let err = client
        .suspend_domain(fleet.bearer(req, &fleet.token_rw))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    docker(&["start", &container]);
    fleet.wait_healthy(&[HOST]).await;
    let now = fleet
        .wait_guests(0, "the fleet list current", RECOVERY_TIMEOUT, |g| {
            g.values().all(|(_, _, u)| !u)
                && g.iter()
                    .filter(|(_, (h, _, _))| h == HOST)
                    .all(|(_, (_, s, _))| *s == DomainState::Shutoff)
        })
        .await;
    // Both gateways list the same (each follows the registry on its own).
    fleet
        .wait_guests(
            1,
            "the other gateway listing the same",
            MESSAGE_TIMEOUT,
            |g| *g == now,
        )
        .await;
}
