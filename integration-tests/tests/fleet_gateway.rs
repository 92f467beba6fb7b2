//! Two gateways in front of two hosts, all real: one nats-server, two
//! `qvirt-supervisor`s with `fleet:` (hosts h1 and h2: their own node
//! names, state dirs and ports, heartbeats and domains in the registry),
//! and two `qvirt-gateway`s with `fleet:`. Driven through the gateways as
//! a user would: defines spread over the hosts, either gateway lists the
//! whole fleet, calls reach the domain's host, a name on both hosts needs
//! `host`, and a host whose heartbeat expires is shown unreachable.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use qvirt_common::rpc::reason_of;
use qvirt_integration_tests::nats::{Nats, fleet_supervisor};
use qvirt_integration_tests::stack::{BearerChannel, bearer_channel, bearer_value};
use qvirt_integration_tests::{
    Service, bin_path, free_port, grpcurl, run_command, text, token_new, write_internal_token,
};
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, Domain, DomainState, GetDomainRequest,
    ListDomainsRequest, PingRequest, StartDomainRequest, define_domain_request,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The hosts' heartbeat TTL: short, so an expiry is seen quickly.
const TTL_SECS: u64 = 3;
/// How long the registry may take to show a change at a gateway.
const SETTLE: Duration = Duration::from_secs(30);

struct Host {
    sup: Service,
    id: &'static str,
    /// h1 only: its agent service (h2 advertises none).
    _agentd: Option<Service>,
}

impl Host {
    /// The host dies: its supervisor (and so its heartbeat) stops.
    fn kill(&self) {
        self.sup.signal(libc::SIGKILL);
    }
}

struct Fleet {
    hosts: Vec<Host>,
    gws: Vec<Service>,
    token: String,
    nats: Nats,
    _dir: tempfile::TempDir,
}

async fn start_host(nats: &Nats, dir: &Path, id: &'static str) -> Host {
    let agentd_addr = (id == "h1").then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let agentd_url = agentd_addr
        .map(|a| format!("  agentd_url: http://{a}\n"))
        .unwrap_or_default();
    let extra = format!("  heartbeat_ttl_secs: {TTL_SECS}\n{agentd_url}");
    let sup = fleet_supervisor(nats, dir, id, &extra).await;
    let agentd = match agentd_addr {
        Some(a) => {
            let mut agentd = Service::start_at("qvirt-agentd", a, &["--supervisor", &sup.url()]);
            agentd.wait_serving("qvirt.v1.GuestAgent").await;
            Some(agentd)
        }
        None => None,
    };
    Host {
        sup,
        id,
        _agentd: agentd,
    }
}

/// Fleet gateway `n`: the first has its `fleet:` in its config file,
/// the others get it from `--fleet-url`, `--fleet-token-file` and
/// `--fleet-ca-file`.
async fn start_gateway(nats: &Nats, dir: &Path, n: usize, entry: &str) -> Service {
    let fleet_yaml = format!(
        "fleet:\n  urls: [{}]\n{}",
        nats.urls().join(", "),
        nats.access_yaml(),
    );
    let mut flags: Vec<String> = Vec::new();
    if n > 0 {
        for url in nats.urls() {
            flags.extend(["--fleet-url".into(), url]);
        }
        flags.extend([
            "--fleet-token-file".into(),
            nats.token_file().display().to_string(),
        ]);
        if let Some(ca) = nats.ca_file() {
            flags.extend(["--fleet-ca-file".into(), ca.display().to_string()]);
        }
    }
    let yaml = format!(
        "{}eventbus: http://127.0.0.1:{}\n\
         internal_token_file: {}\nhealth_poll_ms: 200\ntokens:\n{entry}",
        if n == 0 { fleet_yaml.as_str() } else { "" },
        free_port(),
        write_internal_token(&dir.join(format!("gw{n}"))).display(),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &flags);
    gw.wait_serving("qvirt.v1.Supervisor").await;
    gw
}

impl Fleet {
    async fn start() -> Fleet {
        // Over TLS: the hosts and both gateways trust the servers' CA.
        let nats = Nats::single_tls();
        let dir = tempfile::tempdir().unwrap();
        let mut hosts = Vec::new();
        for id in ["h1", "h2"] {
            hosts.push(start_host(&nats, dir.path(), id).await);
        }
        let token = token_new("operator", "read-write");
        let mut gws = Vec::new();
        for n in 0..2 {
            std::fs::create_dir(dir.path().join(format!("gw{n}"))).unwrap();
            gws.push(start_gateway(&nats, dir.path(), n, &token.entry).await);
        }
        let fleet = Fleet {
            hosts,
            gws,
            token: token.token,
            nats,
            _dir: dir,
        };
        // Both hosts live at both gateways before anything is placed.
        for gw in 0..2 {
            fleet
                .until(gw, "knowing both hosts", |mut c| async move {
                    for host in ["h1", "h2"] {
                        let known = c
                            .list_domains(ListDomainsRequest {
                                host: host.into(),
                                ..Default::default()
                            })
                            .await;
                        if known.is_err() {
                            return false;
                        }
                    }
                    true
                })
                .await;
        }
        fleet
    }

    /// Waits until gateway `gw` lists exactly `want` (name, host,
    /// host_unreachable), in that order.
    async fn until_listed(&self, gw: usize, want: &[(String, String, bool)]) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let got = listed(self.client(gw).await).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {gw} lists {got:?}, not {want:?}, after {SETTLE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `qvirtctl ARGS` at gateway `gw` with the read-write token: its
    /// stdout (it must succeed).
    fn qvirtctl(&self, gw: usize, args: &[&str]) -> String {
        let token = self._dir.path().join("ctl-token");
        std::fs::write(&token, &self.token).unwrap();
        let out = run_command(
            std::process::Command::new(bin_path("qvirtctl"))
                .env_remove("QVIRT_URL")
                .env_remove("QVIRT_TOKEN")
                .env_remove("QVIRT_TOKEN_FILE")
                .arg("--connect")
                .arg(self.gws[gw].url())
                .arg("--token-file")
                .arg(&token)
                .args(args),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "qvirtctl {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    async fn client(&self, gw: usize) -> SupervisorClient<BearerChannel> {
        let channel = bearer_channel(&self.gws[gw].url(), Some(bearer_value(&self.token))).await;
        SupervisorClient::new(channel)
    }

    /// Waits until `check` holds for gateway `gw`'s client.
    async fn until<F, Fut>(&self, gw: usize, what: &str, check: F)
    where
        F: Fn(SupervisorClient<BearerChannel>) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + SETTLE;
        let client = self.client(gw).await;
        while !check(client.clone()).await {
            assert!(
                Instant::now() < deadline,
                "gateway {gw}: not {what} within {SETTLE:?}; stderr:\n{}",
                self.gws[gw].stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spec(name: &str) -> Option<define_domain_request::Source> {
    Some(define_domain_request::Source::SpecYaml(format!(
        "name: {name}\nmemory_mib: 64\naccel: tcg\n"
    )))
}

async fn define(c: &mut SupervisorClient<BearerChannel>, name: &str, host: &str) -> Domain {
    c.define_domain(DefineDomainRequest {
        source: spec(name),
        host: host.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("define {name} on {host:?}: {e:?}"))
    .into_inner()
    .domain
    .unwrap()
}

/// A qvirtctl table's rows, split on runs of spaces (a state such as
/// "shut off" is one cell: cells are at least two spaces apart).
fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('-'))
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// Every domain a gateway lists, as `name@host` (walking the pages).
async fn listed(mut c: SupervisorClient<BearerChannel>) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_domains(ListDomainsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for d in page.domains {
            out.push((d.spec.unwrap().name, d.host, d.host_unreachable));
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_two_gateways_route_list_and_place_over_two_hosts() {
    let fleet = Fleet::start().await;
    let mut c0 = fleet.client(0).await;

    // Four defines without `host` spread over both hosts.
    let mut placed = Vec::new();
    for i in 0..4 {
        let d = define(&mut c0, &format!("vm{i}"), "").await;
        placed.push(d.host);
    }
    for host in ["h1", "h2"] {
        assert_eq!(
            placed.iter().filter(|h| *h == host).count(),
            2,
            "placed on {placed:?}"
        );
    }
    // The same name on both hosts, each given.
    define(&mut c0, "twin", "h1").await;
    define(&mut c0, "twin", "h2").await;

    // Either gateway lists the whole fleet, sorted by (name, host).
    let mut want: Vec<(String, String, bool)> = (0..4)
        .map(|i| (format!("vm{i}"), placed[i].clone(), false))
        .collect();
    want.push(("twin".into(), "h1".into(), false));
    want.push(("twin".into(), "h2".into(), false));
    want.sort();
    for gw in 0..2 {
        fleet.until_listed(gw, &want).await;
    }
    // qvirtctl shows each domain's host once the list spans hosts, and
    // lists one host's alone.
    let rows = table_rows(&fleet.qvirtctl(0, &["list", "--all"]));
    assert_eq!(rows[0], ["Name", "State", "UUID", "Host"], "{rows:?}");
    let shown: Vec<(String, String)> = rows[1..]
        .iter()
        .map(|r| (r[0].clone(), r[r.len() - 1].clone()))
        .collect();
    let placed_all: Vec<(String, String)> = want
        .iter()
        .map(|(n, h, _)| (n.clone(), h.clone()))
        .collect();
    assert_eq!(shown, placed_all);
    let rows = table_rows(&fleet.qvirtctl(1, &["list", "--all", "--host", "h1"]));
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    let on_h1: Vec<&str> = want
        .iter()
        .filter(|(_, h, _)| h == "h1")
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(names, on_h1, "{rows:?}");
    assert_eq!(
        rows[0],
        ["Name", "State", "UUID"],
        "one host: no Host column"
    );

    // A name on both hosts needs `host`.
    let mut c1 = fleet.client(1).await;
    let err = c1
        .get_domain(GetDomainRequest {
            domain: "twin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("DOMAIN_AMBIGUOUS"));
    assert!(
        err.message().contains("h1") && err.message().contains("h2"),
        "{err:?}"
    );
    let twin = c1
        .get_domain(GetDomainRequest {
            domain: "twin".into(),
            host: "h2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(twin.host, "h2");
    // By UUID, no `host` needed.
    let uuid = twin.spec.unwrap().uuid;
    let by_uuid = c1
        .get_domain(GetDomainRequest {
            domain: uuid,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(by_uuid.host, "h2");
    let err = c1
        .get_domain(GetDomainRequest {
            domain: "vm0".into(),
            host: "h9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason_of(&err).as_deref(), Some("HOST_NOT_FOUND"));
    let err = c1
        .get_domain(GetDomainRequest {
            domain: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&err).as_deref(), Some("DOMAIN_NOT_FOUND"));

    // h2's supervisor dies: its heartbeat expires, its domains are shown
    // as last known and calls to it are UNAVAILABLE.
    let mut fleet = fleet;
    let h2 = fleet.hosts.remove(1);
    assert_eq!(h2.id, "h2");
    h2.kill();
    let on_h2: Vec<String> = want
        .iter()
        .filter(|(n, h, _)| h == "h2" && n != "twin")
        .map(|(n, _, _)| n.clone())
        .collect();
    for gw in 0..2 {
        let want: Vec<_> = want
            .iter()
            .map(|(n, h, _)| (n.clone(), h.clone(), h == "h2"))
            .collect();
        fleet.until_listed(gw, &want).await;
    }
    // qvirtctl marks the states it can only report as last known.
    let listing = fleet.qvirtctl(0, &["list", "--all"]);
    for row in &table_rows(&listing)[1..] {
        let unreachable = row.join(" ").contains("(host unreachable)");
        assert_eq!(unreachable, row[row.len() - 1] == "h2", "{listing}");
    }
    let info = fleet.qvirtctl(1, &["dominfo", &on_h2[0]]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("Host reachable:") && l.trim_end().ends_with("no")),
        "{info}"
    );
    let stale = c1
        .get_domain(GetDomainRequest {
            domain: on_h2[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert!(stale.host_unreachable);
    assert_eq!(stale.host, "h2");
    assert_eq!(stale.state, DomainState::Shutoff as i32);
    let err = c1
        .start_domain(StartDomainRequest {
            domain: on_h2[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("HOST_UNREACHABLE"));
    // grpcurl (through reflection) sees the same, errors with reasons.
    let addr = fleet.gws[1].addr.to_string();
    let auth = format!("authorization: Bearer {}", fleet.token);
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &auth,
        "-d",
        "{\"host\": \"h2\"}",
        &addr,
        "qvirt.v1.Supervisor/ListDomains",
    ]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        listing.matches("\"hostUnreachable\": true").count(),
        3,
        "{listing}"
    );
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &auth,
        "-d",
        &format!("{{\"domain\": \"{}\"}}", on_h2[0]),
        &addr,
        "qvirt.v1.Supervisor/StartDomain",
    ]);
    let err = text(&out.stderr);
    assert!(
        err.contains("Unavailable") && err.contains("HOST_UNREACHABLE"),
        "{err}"
    );
    // New defines go to the live host.
    assert_eq!(define(&mut c1, "after", "").await.host, "h1");

    // With no live host the gateways stop serving the hosts' services,
    // and a define has nowhere to go.
    fleet.hosts[0].kill();
    let deadline = Instant::now() + SETTLE;
    for gw in &fleet.gws {
        while gw.health("qvirt.v1.Supervisor").await != Ok(ServingStatus::NotServing) {
            assert!(Instant::now() < deadline, "{}", gw.stderr());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(gw.health("").await, Ok(ServingStatus::Serving));
    }
    let err = c1
        .define_domain(DefineDomainRequest {
            source: spec("nowhere"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("NO_HOST_AVAILABLE"));
    drop(h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_call_reaches_the_host_of_its_domain() {
    let fleet = Fleet::start().await;
    let mut c0 = fleet.client(0).await;
    define(&mut c0, "runner", "h2").await;
    define(&mut c0, "idle", "h1").await;
    // Defined through gateway 0, started through gateway 1 once its view
    // shows the domains.
    fleet
        .until(1, "listing runner and idle", |c| async move {
            listed(c).await.len() == 2
        })
        .await;
    let mut c1 = fleet.client(1).await;
    let started = c1
        .start_domain(StartDomainRequest {
            domain: "runner".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("start: {e:?}; h2:\n{}", fleet.hosts[1].sup.stderr()))
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(started.host, "h2");
    assert_eq!(started.state, DomainState::Running as i32);
    let got = c0
        .get_domain(GetDomainRequest {
            domain: "runner".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(
        (got.host.as_str(), got.state),
        ("h2", DomainState::Running as i32)
    );
    // Agent calls go to the agent service of the domain's host: h1's
    // answers for its domain (defined without `agent`, which it learnt
    // from h1's supervisor), h2 advertises none.
    let channel = bearer_channel(&fleet.gws[1].url(), Some(bearer_value(&fleet.token))).await;
    let mut agent = GuestAgentClient::new(channel);
    let ping = |domain: &str| PingRequest {
        domain: domain.into(),
        ..Default::default()
    };
    let err = agent.ping(ping("idle")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason_of(&err).as_deref(), Some("AGENT_NOT_CONFIGURED"));
    let err = agent.ping(ping("runner")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        reason_of(&err).as_deref(),
        Some("AGENT_SERVICE_NOT_CONFIGURED")
    );
    // The registry shows it running too.
    fleet
        .until(0, "listing runner RUNNING", |mut c| async move {
            let page = c
                .list_domains(ListDomainsRequest {
                    states: vec![DomainState::Running as i32],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            page.domains.len() == 1 && page.domains[0].host == "h2"
        })
        .await;
    c0.destroy_domain(DestroyDomainRequest {
        domain: "runner".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(fleet.hosts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_broker_outage_keeps_the_last_fleet_and_stops_serving() {
    let mut fleet = Fleet::start().await;
    let mut c0 = fleet.client(0).await;
    define(&mut c0, "steady", "h1").await;
    let want = [("steady".to_owned(), "h1".to_owned(), false)];
    fleet.until_listed(0, &want).await;

    fleet.nats.nodes[0].stop(libc::SIGKILL);
    let deadline = Instant::now() + SETTLE;
    while fleet.gws[0].health("qvirt.v1.Supervisor").await != Ok(ServingStatus::NotServing) {
        assert!(Instant::now() < deadline, "{}", fleet.gws[0].stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Calls still go by the last fleet the gateway saw, and its listing
    // is that fleet.
    let got = c0
        .get_domain(GetDomainRequest {
            domain: "steady".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(got.host, "h1");
    assert!(!got.host_unreachable);
    assert_eq!(listed(fleet.client(0).await).await, want);

    fleet.nats.nodes[0].start();
    fleet.nats.wait_ready();
    fleet.gws[0].wait_serving("qvirt.v1.Supervisor").await;
    fleet.until_listed(0, &want).await;
}
