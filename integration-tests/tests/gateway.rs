//! The gateway as users meet it: real backends (supervisor, bus, agentd)
//! behind a real `qvirt-gateway`, called with real grpcurl and tonic
//! clients over TCP and over its read-write and read-only unix sockets.
#![allow(clippy::unwrap_used)]
// Requests are built with `..Default::default()` even where every field
// is named today, so fields added later (e.g. `host`) need no change here.
#![allow(clippy::needless_update)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use qvirt_integration_tests::pki::{self, Ca, CertFiles};
use qvirt_integration_tests::{
    Service, Token, audit_lines_until, code_of, free_port, grpcurl, start_supervisor, text,
    token_new, write_internal_token,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::hook_executor_client::HookExecutorClient;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, ListDomainsRequest, ListHooksRequest, StartDomainRequest,
    SubscribeDomainEventsRequest, SubscribeMonitorEventsRequest, define_domain_request,
    subscribe_domain_events_response,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

/// The backends and a gateway in front of them.
struct Stack {
    _dir: tempfile::TempDir,
    bus: Service,
    _sup: Service,
    _agentd: Service,
    gw: Service,
    viewer: Token,
    operator: Token,
    operator2: Token,
    audit: PathBuf,
    rw_sock: PathBuf,
    ro_sock: PathBuf,
    tokens_yaml: String,
    base_yaml: String,
    backends_yaml: String,
}

impl Stack {
    async fn start(bus_yaml: &str, limits_yaml: &str) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = Service::start_with_config("qvirt-eventbus", bus_yaml, &[]);
        bus.wait_serving("qvirt.v1.EventBus").await;
        let sup = start_supervisor(
            &dir.path().join("state"),
            &dir.path().join("run"),
            None,
            &["--eventbus", &bus.url()],
        )
        .await;
        let mut agentd = Service::start("qvirt-agentd", &["--supervisor", &sup.url()]);
        agentd.wait_serving("qvirt.v1.GuestAgent").await;
        let viewer = token_new("viewer", "read-only");
        let operator = token_new("operator", "read-write");
        let operator2 = token_new("operator2", "read-write");
        let audit = dir.path().join("audit.log");
        let rw_sock = dir.path().join("gw.sock");
        let ro_sock = dir.path().join("gw-ro.sock");
        let token_file = write_internal_token(dir.path());
        let backends_yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: {}\ninternal_token_file: {}\n\
             health_poll_ms: 200\nlimits:\n{limits_yaml}",
            sup.url(),
            bus.url(),
            agentd.url(),
            token_file.display(),
        );
        let base_yaml = format!(
            "{backends_yaml}audit_file: {}\nrw_socket:\n  path: {}\nro_socket:\n  path: {}\n",
            audit.display(),
            rw_sock.display(),
            ro_sock.display(),
        );
        let tokens_yaml = format!(
            "tokens:\n{}{}{}",
            viewer.entry, operator.entry, operator2.entry
        );
        let mut gw =
            Service::start_with_config("qvirt-gateway", &format!("{base_yaml}{tokens_yaml}"), &[]);
        for svc in [
            "",
            "qvirt.v1.Supervisor",
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
        ] {
            gw.wait_serving(svc).await;
        }
        Stack {
            _dir: dir,
            bus,
            _sup: sup,
            _agentd: agentd,
            gw,
            viewer,
            operator,
            operator2,
            audit,
            rw_sock,
            ro_sock,
            tokens_yaml,
            base_yaml,
            backends_yaml,
        }
    }

    /// A second gateway in front of the same backends, serving mTLS: a
    /// read-only certificate (CN `viewer-host`) and a read-write one (DNS
    /// SAN `operator.qvirt.test`), and this stack's tokens.
    async fn mtls_gateway(&self) -> Mtls {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "clients");
        let server = ca.server("server");
        let ro = ca.client("ro", "viewer-host", vec![]);
        let rw = ca.client("rw", "operator-host", vec![pki::dns("operator.qvirt.test")]);
        let tls = pki::gateway_tls_yaml(
            &server,
            Some(&ca.cert),
            &[
                ("cert-ro", "read-only", "cn", "viewer-host"),
                ("cert-rw", "read-write", "dns", "operator.qvirt.test"),
            ],
        );
        let yaml = format!("{}{}{tls}", self.backends_yaml, self.tokens_yaml);
        let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        for svc in [
            "",
            "qvirt.v1.Supervisor",
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
        ] {
            gw.wait_serving_at(svc, pki::tls_endpoint(gw.addr, &ca.cert, Some(&rw)))
                .await;
        }
        Mtls {
            _dir: dir,
            gw,
            ca,
            ro,
            rw,
        }
    }

    /// grpcurl against the gateway's TCP port, with `token` if any.
    fn grpcurl(&self, token: Option<&str>, data: &str, method: &str, max_time: &str) -> Output {
        let addr = self.gw.addr.to_string();
        let header = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args = vec!["-plaintext", "-max-time", max_time];
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["-d", data, addr.as_str(), method]);
        grpcurl(&args)
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.gw.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// A gateway serving mTLS, and its client certificates.
struct Mtls {
    _dir: tempfile::TempDir,
    gw: Service,
    ca: Ca,
    ro: CertFiles,
    rw: CertFiles,
}

impl Mtls {
    async fn channel(&self, client: &CertFiles) -> Channel {
        pki::tls_endpoint(self.gw.addr, &self.ca.cert, Some(client))
            .connect()
            .await
            .unwrap()
    }
}

async fn unix_channel(path: &Path) -> Channel {
    qvirt_common::config::endpoint(&format!("unix:{}", path.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn define_request(name: &str) -> DefineDomainRequest {
    DefineDomainRequest {
        source: Some(define_domain_request::Source::SpecYaml(format!(
            "name: {name}\naccel: tcg\n"
        ))),
        ..Default::default()
    }
}

/// Subscribes to monitor events through `client` as `token`; the stream
/// past its Established message, or the refusal.
async fn subscribe_monitor(
    client: &mut EventBusClient<Channel>,
    token: &str,
) -> Result<Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>, tonic::Status> {
    let mut stream = client
        .subscribe_monitor_events(bearer(SubscribeMonitorEventsRequest::default(), token))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an Established message or an error")?;
    assert!(first.is_some(), "the stream ended before Established");
    Ok(stream)
}

async fn subscribe_domain(
    client: &mut EventBusClient<Channel>,
    token: &str,
) -> Streaming<qvirt_proto::v1::SubscribeDomainEventsResponse> {
    let mut stream = client
        .subscribe_domain_events(bearer(SubscribeDomainEventsRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.kind,
        Some(subscribe_domain_events_response::Kind::Established(_))
    ));
    stream
}

/// The audit file's lines as JSON, once `want` lines are there.
async fn audit_lines(path: &Path, want: usize) -> Vec<serde_json::Value> {
    audit_lines_until(path, |lines| lines.len() >= want).await
}

const ALL_CALLS: [(&str, &str); 4] = [
    ("qvirt.v1.EventBus/SubscribeMonitorEvents", "{}"),
    (
        "qvirt.v1.Supervisor/MonitorCommand",
        r#"{"domain": "nope", "command_json": "{\"execute\": \"query-status\"}"}"#,
    ),
    ("qvirt.v1.Supervisor/StartDomain", r#"{"domain": "nope"}"#),
    (
        "qvirt.v1.GuestAgent/Exec",
        r#"{"domain": "nope", "path": "/bin/true"}"#,
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn test_read_only_token_reads_and_is_denied_writes_read_write_token_is_not() {
    let s = Stack::start("", "  calls_per_second: 1000\n").await;
    let ro = s.viewer.token.as_str();
    let rw = s.operator.token.as_str();

    let out = s.grpcurl(Some(ro), "{}", "qvirt.v1.Supervisor/ListDomains", "20");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The subscription stays open: its first message, then the deadline.
    let out = s.grpcurl(
        Some(ro),
        "{}",
        "qvirt.v1.EventBus/SubscribeDomainEvents",
        "3",
    );
    assert!(
        text(&out.stdout).contains("established"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(code_of(&out), "DeadlineExceeded", "{}", text(&out.stderr));

    for (method, data) in ALL_CALLS {
        let out = s.grpcurl(Some(ro), data, method, "20");
        assert_eq!(
            code_of(&out),
            "PermissionDenied",
            "{method}: {}",
            text(&out.stderr)
        );
        let stderr = text(&out.stderr);
        let short = method.rsplit('/').next().unwrap();
        assert!(
            stderr.contains(&format!("{short} needs the read-write role")),
            "{stderr}"
        );
        // grpcurl decodes the ErrorInfo through the gateway's reflection.
        assert!(stderr.contains("PERMISSION_DENIED_ROLE"), "{stderr}");
        // The read-write token passes: the backend answers (an unknown
        // domain), or the subscription opens.
        let out = s.grpcurl(Some(rw), data, method, "3");
        let code = code_of(&out);
        assert!(
            ["NotFound", "DeadlineExceeded", "FailedPrecondition"].contains(&code.as_str()),
            "{method} with a read-write token: {code}: {}",
            text(&out.stderr)
        );
    }

    for token in [None, Some("0".repeat(64).as_str()), Some("not a token")] {
        let out = s.grpcurl(token, "{}", "qvirt.v1.Supervisor/ListDomains", "20");
        assert_eq!(code_of(&out), "Unauthenticated", "{}", text(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_denied_write_never_reaches_the_backend_and_writes_and_denials_are_audited() {
    let s = Stack::start("", "  calls_per_second: 1000\n").await;
    let mut sup = SupervisorClient::new(s.channel().await);
    let err = sup
        .define_domain(bearer(define_request("denied"), &s.viewer.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        qvirt_common::rpc::reason_of(&err).as_deref(),
        Some("PERMISSION_DENIED_ROLE")
    );
    let listed = sup
        .list_domains(bearer(ListDomainsRequest::default(), &s.viewer.token))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.domains.is_empty(), "{listed:?}");

    sup.define_domain(bearer(define_request("vm1"), &s.operator.token))
        .await
        .unwrap();
    let err = sup
        .list_domains(Request::new(ListDomainsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let lines = audit_lines(&s.audit, 3).await;
    assert_eq!(lines.len(), 3, "reads are not audited: {lines:?}");
    // Lines are written as calls end, so they are found by content.
    let find = |principal: &str, method: &str, status: &str| {
        lines.iter().find(|l| {
            l["principal"] == principal
                && l["method"] == format!("/qvirt.v1.Supervisor/{method}")
                && l["status"] == status
        })
    };
    let denied = find("viewer", "DefineDomain", "PERMISSION_DENIED").expect("the denial");
    assert_eq!(denied["transport"], "tcp");
    assert_eq!(denied["code"], 7);
    find("operator", "DefineDomain", "OK").expect("the write");
    find("", "ListDomains", "UNAUTHENTICATED").expect("the unauthenticated call");
    for line in &lines {
        for key in ["time", "peer", "duration_ms", "code"] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
    // The gateway's log carries the same lines.
    assert!(s.gw.stderr().contains("qvirt::audit"), "{}", s.gw.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_reflection_lists_public_services_and_internal_methods_are_unimplemented() {
    let s = Stack::start("", "  calls_per_second: 1000\n").await;
    let addr = s.gw.addr.to_string();
    let out = grpcurl(&["-plaintext", &addr, "list"]);
    let mut listed: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
            "qvirt.v1.Supervisor",
        ]
    );
    let out = grpcurl(&["-plaintext", &addr, "describe", "qvirt.v1.EventBus"]);
    let described = text(&out.stdout);
    assert!(described.contains("SubscribeMonitorEvents"), "{described}");
    assert!(!described.contains("rpc Publish"), "{described}");
    // Internal services are unknown here, even to a read-write caller.
    let mut hooks = HookExecutorClient::new(s.channel().await);
    let err = hooks
        .list_hooks(bearer(ListHooksRequest::default(), &s.operator.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(
        qvirt_common::rpc::reason_of(&err).as_deref(),
        Some("METHOD_NOT_FOUND")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_backend_killed_mid_stream_ends_with_unavailable_and_the_gateway_reconnects() {
    let mut s = Stack::start("", "  calls_per_second: 1000\n").await;
    let mut bus = EventBusClient::new(s.channel().await);
    let mut stream = subscribe_domain(&mut bus, &s.viewer.token).await;
    let addr = s.bus.addr;
    s.bus.signal(libc::SIGKILL);
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the stream ends, it does not hang");
    let err = ended.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("qvirt.v1.EventBus"), "{err:?}");

    // While it is down: UNAVAILABLE naming the service, and health says so.
    let err = bus
        .subscribe_domain_events(bearer(
            SubscribeDomainEventsRequest::default(),
            &s.viewer.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("qvirt.v1.EventBus"), "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.gw.health("qvirt.v1.EventBus").await
        != Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    {
        assert!(
            Instant::now() < deadline,
            "EventBus still SERVING at the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back on the same address: the gateway reconnects by itself.
    s.bus = Service::start_at("qvirt-eventbus", addr, &[]);
    s.bus.wait_serving("qvirt.v1.EventBus").await;
    s.gw.wait_serving("qvirt.v1.EventBus").await;
    let _again = subscribe_domain(&mut bus, &s.viewer.token).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_cancelled_call_is_cancelled_at_the_backend_and_caps_count_real_principals() {
    // The bus allows each principal one monitor subscription: a slot
    // comes back only when the bus sees the cancellation.
    let s = Stack::start(
        "max_monitor_subscriptions_per_principal: 1\n",
        "  calls_per_second: 1000\n",
    )
    .await;
    let mut bus = EventBusClient::new(s.channel().await);
    let first = subscribe_monitor(&mut bus, &s.operator.token)
        .await
        .unwrap();
    let err = subscribe_monitor(&mut bus, &s.operator.token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("operator"),
        "the bus counts the real principal: {err:?}"
    );
    // Another principal through the same gateway has its own slot.
    let _other = subscribe_monitor(&mut bus, &s.operator2.token)
        .await
        .unwrap();

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match subscribe_monitor(&mut bus, &s.operator.token).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    Instant::now() < deadline,
                    "the bus never saw the cancelled subscription go"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Duplicate monitor-event subscriptions, the denial of service libvirt
/// keeps from read-only users, fired by one read-write principal.
const DUPLICATES: usize = 10_000;

#[tokio::test(flavor = "multi_thread")]
async fn test_monitor_subscription_cap_per_principal_holds_against_duplicates() {
    const CAP: usize = 4;
    const CONNECTIONS: usize = 4;
    const TASKS_PER_CONNECTION: usize = 25;
    let s = Stack::start(
        "",
        &format!(
            "  calls_per_second: 10000000\n  max_monitor_subscriptions_per_principal: {CAP}\n"
        ),
    )
    .await;
    let rss_before = qvirt_integration_tests::rss_kib(s.gw.pid());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = DUPLICATES / (CONNECTIONS * TASKS_PER_CONNECTION);
    for _ in 0..CONNECTIONS {
        // One HTTP/2 connection, shared by its tasks' calls.
        let channel = s.channel().await;
        for _ in 0..TASKS_PER_CONNECTION {
            let mut bus = EventBusClient::new(channel.clone());
            let token = s.operator.token.clone();
            let held = std::sync::Arc::clone(&held);
            tasks.spawn(async move {
                let mut refused = Vec::new();
                for _ in 0..per_task {
                    match subscribe_monitor(&mut bus, &token).await {
                        Ok(stream) => held.lock().unwrap().push(stream),
                        Err(e) => refused.push((e.code(), e.message().to_owned())),
                    }
                }
                refused
            });
        }
    }
    let mut refused = Vec::new();
    while let Some(done) = tasks.join_next().await {
        refused.extend(done.unwrap());
    }
    assert_eq!(held.lock().unwrap().len(), CAP);
    assert_eq!(refused.len(), DUPLICATES - CAP);
    for (code, message) in &refused {
        assert_eq!(*code, Code::ResourceExhausted, "{message}");
        assert!(
            message.contains("limits.max_monitor_subscriptions_per_principal"),
            "{message}"
        );
    }
    // Refusals hold nothing: the gateway's memory stays where it was
    // (give or take its allocator), not thousands of streams' worth.
    let rss_after = qvirt_integration_tests::rss_kib(s.gw.pid());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Another principal still subscribes while the first is held off.
    let mut bus = EventBusClient::new(s.channel().await);
    let _other = subscribe_monitor(&mut bus, &s.operator2.token)
        .await
        .unwrap();
    let err = subscribe_monitor(&mut bus, &s.operator.token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unix_sockets_decide_the_role_and_a_token_only_lowers_it() {
    let s = Stack::start("", "  calls_per_second: 1000\n").await;
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&s.rw_sock), 0o600);
    assert_eq!(mode(&s.ro_sock), 0o666);

    let mut ro = SupervisorClient::new(unix_channel(&s.ro_sock).await);
    ro.list_domains(ListDomainsRequest::default())
        .await
        .unwrap();
    let err = ro.define_domain(define_request("vm-ro")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A read-write token does not raise the read-only socket's role.
    let err = ro
        .define_domain(bearer(define_request("vm-ro"), &s.operator.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let mut rw = SupervisorClient::new(unix_channel(&s.rw_sock).await);
    rw.define_domain(define_request("vm-rw")).await.unwrap();
    // A read-only token lowers the read-write socket's role.
    let err = rw
        .define_domain(bearer(define_request("vm-rw2"), &s.viewer.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Audit lines carry the domain a request names.
    let err = rw
        .start_domain(StartDomainRequest {
            domain: "no-such-domain".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let lines = audit_lines(&s.audit, 5).await;
    // Lines are written as calls end, so they are found by content.
    let uid = unsafe_free_uid();
    let has = |transport: &str, principal: &str, method: &str, status: &str| {
        lines.iter().any(|l| {
            l["transport"] == transport
                && l["principal"] == principal
                && l["method"] == format!("/qvirt.v1.Supervisor/{method}")
                && l["status"] == status
        })
    };
    let me = format!("unix:uid:{uid}");
    assert!(
        has("unix-ro", &me, "DefineDomain", "PERMISSION_DENIED"),
        "{lines:?}"
    );
    assert!(
        has("unix-ro", "operator", "DefineDomain", "PERMISSION_DENIED"),
        "{lines:?}"
    );
    assert!(has("unix-rw", &me, "DefineDomain", "OK"), "{lines:?}");
    assert!(
        has("unix-rw", "viewer", "DefineDomain", "PERMISSION_DENIED"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["domain"] == "no-such-domain" && l["status"] == "NOT_FOUND"),
        "{lines:?}"
    );
}

/// The uid and gid of this process, from /proc.
fn ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// The name of `id` in `/etc/passwd` or `/etc/group`, else the number.
fn name_of(db: &str, id: u32) -> String {
    std::fs::read_to_string(db)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == id.to_string()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| id.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unix_sockets_get_their_owner_group_and_mode_and_a_bad_group_leaves_none() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (uid, gid) = ids();
    let (user, group) = (name_of("/etc/passwd", uid), name_of("/etc/group", gid));
    let rw = dir.path().join("rw.sock");
    let ro = dir.path().join("ro.sock");
    let yaml = format!(
        "supervisor: {dead}\neventbus: {dead}\nagentd: {dead}\n\
         rw_socket: {{path: {}, mode: \"0660\", owner: {user}, group: {group}}}\n\
         ro_socket: {{path: {}, mode: \"0640\", group: \"{gid}\"}}\n",
        rw.display(),
        ro.display()
    );
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
    gw.wait_serving("").await;
    for (path, mode) in [(&rw, 0o660), (&ro, 0o640)] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.mode() & 0o777, mode, "{}", path.display());
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{}", path.display());
    }
    // Both sockets answer, and nothing else was left in their directory.
    let mut rw_client = SupervisorClient::new(unix_channel(&rw).await);
    let err = rw_client
        .list_domains(ListDomainsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "reaches the dead backend: {err:?}"
    );
    let mut entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["ro.sock", "rw.sock"]);
    drop(gw);

    // A group that does not exist: the gateway stops, and no socket was
    // ever at the path (it is bound out of sight and moved in last).
    let bad = dir.path().join("bad.sock");
    let yaml = format!(
        "supervisor: {dead}\neventbus: {dead}\nagentd: {dead}\n\
         rw_socket: {{path: {}, group: no-such-group-qvirt}}\n",
        bad.display()
    );
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = qvirt_integration_tests::run(
        &qvirt_integration_tests::bin_path("qvirt-gateway"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no-such-group-qvirt"),
        "{}",
        text(&out.stderr)
    );
    assert!(!bad.exists(), "a socket was left at {}", bad.display());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("bad.sock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A backend standing in for the supervisor that records each call's
/// deadline (`grpc-timeout`) and principal, never answers, and reports
/// when its call is dropped. No real backend reports the deadline it was
/// given, so this one is a recorder.
#[derive(Clone)]
struct Silent {
    seen: tokio::sync::mpsc::UnboundedSender<Seen>,
}

struct Seen {
    timeout: Option<String>,
    principal: Option<String>,
    dropped: tokio::sync::oneshot::Receiver<()>,
}

impl tonic::server::NamedService for Silent {
    const NAME: &'static str = "qvirt.v1.Supervisor";
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Silent {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
        let _ = self.seen.send(Seen {
            timeout: header("grpc-timeout"),
            principal: header("x-qvirt-principal"),
            dropped,
        });
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(http::Response::new(tonic::body::Body::empty()))
        })
    }
}

/// A `grpc-timeout` value (`1999870u`) as a duration.
fn grpc_timeout(text: &str) -> Duration {
    let (n, unit) = text.split_at(text.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        other => panic!("unit {other:?} in grpc-timeout {text:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_client_deadline_reaches_the_backend_and_ends_the_call_there() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Silent { seen: tx })
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dead = format!("http://127.0.0.1:{}", free_port());
    let op = token_new("operator", "read-write");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "supervisor: http://{backend}\neventbus: {dead}\nagentd: {dead}\n\
         internal_token_file: {}\ntokens:\n{}",
        write_internal_token(dir.path()).display(),
        op.entry
    );
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
    gw.wait_serving("").await;

    // grpcurl's -max-time is its deadline: grpc-timeout on the wire. It
    // runs off the runtime's workers, which serve the recording backend.
    let header = format!("authorization: Bearer {}", op.token);
    let addr = gw.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        grpcurl(&[
            "-plaintext",
            "-max-time",
            "5",
            "-H",
            &header,
            "-d",
            "{}",
            &addr,
            "qvirt.v1.Supervisor/ListDomains",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code_of(&out), "DeadlineExceeded", "{}", text(&out.stderr));
    let call = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the call reached the backend")
        .unwrap();
    let timeout = call.timeout.expect("grpc-timeout reached the backend");
    let left = grpc_timeout(&timeout);
    assert!(
        left > Duration::ZERO && left <= Duration::from_secs(5),
        "{timeout}"
    );
    assert_eq!(call.principal.as_deref(), Some("operator"));
    // The deadline ended the backend's call too.
    tokio::time::timeout(Duration::from_secs(20), call.dropped)
        .await
        .expect("the backend call ended at the deadline")
        .unwrap_err();

    // A client with no timer of its own, only `grpc-timeout` on the wire,
    // hears the gateway's answer: DEADLINE_EXCEEDED, never the CANCELLED
    // that tonic's server gives when its own copy of the timer fires.
    for _ in 0..5 {
        let trailers = call_without_own_timer(&gw.addr.to_string(), &op.token, "300m").await;
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("4"),
            "{trailers:?}"
        );
        let call = tokio::time::timeout(Duration::from_secs(20), seen.recv())
            .await
            .expect("the call reached the backend")
            .unwrap();
        assert_eq!(call.timeout.as_deref(), Some("300m"));
        tokio::time::timeout(Duration::from_secs(20), call.dropped)
            .await
            .expect("the backend call ended at the deadline")
            .unwrap_err();
    }
    server.abort();
}

/// Calls ListDomains over a bare HTTP/2 stream carrying `grpc-timeout:
/// timeout` and waits (up to 20 s, far past the deadline) for the status,
/// from the response headers of a trailers-only answer or the trailers.
async fn call_without_own_timer(addr: &str, token: &str, timeout: &str) -> http::HeaderMap {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}/qvirt.v1.Supervisor/ListDomains"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    // One empty message: the compressed flag and a zero length.
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let answer = async {
        let response = response.await.unwrap();
        if response.headers().contains_key("grpc-status") {
            return response.headers().clone();
        }
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            data.unwrap();
        }
        body.trailers().await.unwrap().unwrap_or_default()
    };
    tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("the gateway answered after the deadline")
}

/// This process's uid, from /proc (no unsafe call needed).
fn unsafe_free_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sighup_revokes_a_removed_token_and_keeps_other_streams() {
    let mut s = Stack::start("", "  calls_per_second: 1000\n").await;
    let mut bus = EventBusClient::new(s.channel().await);
    let mut revoked = subscribe_domain(&mut bus, &s.operator2.token).await;
    let mut kept = subscribe_domain(&mut bus, &s.operator.token).await;

    let without = format!("tokens:\n{}{}", s.viewer.entry, s.operator.entry);
    assert_ne!(without, s.tokens_yaml);
    std::fs::write(
        s.gw.dir.path().join("config.yaml"),
        format!("{}{without}", s.base_yaml),
    )
    .unwrap();
    s.gw.signal(libc::SIGHUP);

    let ended = tokio::time::timeout(Duration::from_secs(20), revoked.message())
        .await
        .expect("the revoked token's stream ends");
    let err = ended.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        qvirt_common::rpc::reason_of(&err).as_deref(),
        Some("TOKEN_REVOKED")
    );
    let mut sup = SupervisorClient::new(s.channel().await);
    let err = sup
        .list_domains(bearer(ListDomainsRequest::default(), &s.operator2.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The other token's stream is still open: it gets the next event.
    sup.define_domain(bearer(define_request("after-reload"), &s.operator.token))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), kept.message())
        .await
        .expect("an event on the kept stream")
        .unwrap()
        .unwrap();
    assert!(
        matches!(next.kind, Some(subscribe_domain_events_response::Kind::Event(ref e)) if e.domain_name == "after-reload"),
        "{next:?}"
    );

    // The log says what was reloaded, and nothing about a restart: only
    // tokens changed.
    s.gw.wait_log("SIGHUP: tokens reloaded", Duration::from_secs(20))
        .await;
    let log = s.gw.stderr();
    assert!(!log.contains("need a restart"), "{log}");
    assert!(!log.contains("after a restart"), "{log}");
    // A key that only a restart applies is named as such.
    let slower = s
        .base_yaml
        .replace("health_poll_ms: 200", "health_poll_ms: 300");
    assert_ne!(slower, s.base_yaml);
    std::fs::write(
        s.gw.dir.path().join("config.yaml"),
        format!("{slower}{without}"),
    )
    .unwrap();
    s.gw.signal(libc::SIGHUP);
    s.gw.wait_log("take effect after a restart", Duration::from_secs(20))
        .await;
    let log = s.gw.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("take effect after a restart"))
        .unwrap();
    assert!(line.contains("health_poll_ms"), "{line}");
    assert!(!line.contains("tokens"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unreachable_backends_are_unavailable_and_not_serving() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let op = token_new("operator", "read-write");
    let yaml = format!(
        "supervisor: {dead}\neventbus: {dead}\nagentd: {dead}\nhealth_poll_ms: 200\ntokens:\n{}",
        op.entry
    );
    let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
    gw.wait_serving("").await;
    for svc in [
        "qvirt.v1.Supervisor",
        "qvirt.v1.EventBus",
        "qvirt.v1.GuestAgent",
    ] {
        assert_eq!(
            gw.health(svc).await,
            Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing),
            "{svc}"
        );
    }
    let header = format!("authorization: Bearer {}", op.token);
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        "{}",
        &gw.addr.to_string(),
        "qvirt.v1.Supervisor/ListDomains",
    ]);
    assert_eq!(code_of(&out), "Unavailable", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("qvirt.v1.Supervisor is unavailable"),
        "{}",
        text(&out.stderr)
    );
}

/// A codec for the matrix: sends an empty message (every request's
/// defaults) and ignores what comes back.
#[derive(Debug, Clone, Copy, Default)]
struct Empty;

impl tonic::codec::Codec for Empty {
    type Encode = ();
    type Decode = ();
    type Encoder = Empty;
    type Decoder = Empty;
    fn encoder(&mut self) -> Empty {
        Empty
    }
    fn decoder(&mut self) -> Empty {
        Empty
    }
}

impl tonic::codec::Encoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl tonic::codec::Decoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf as _;
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

/// Calls `path` with an empty request; the first message (or the end of
/// a subscription's wait) is success.
async fn call_raw(channel: Channel, path: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = Request::new(());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    let mut stream = grpc.server_streaming(req, path, Empty).await?.into_inner();
    match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Every public method, listed by the gateway's reflection, called as
/// every kind of caller: the outcome is what the role table says.
#[tokio::test(flavor = "multi_thread")]
async fn test_method_by_caller_matrix_from_reflection_matches_the_role_table() {
    use qvirt_gateway::roles::{Role, role_of};
    let s = Stack::start("", "  calls_per_second: 100000\n").await;
    let addr = s.gw.addr.to_string();
    let out = grpcurl(&["-plaintext", &addr, "list"]);
    let services: Vec<String> = text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("qvirt."))
        .map(str::to_owned)
        .collect();
    assert_eq!(services.len(), 3, "{services:?}");
    let mut methods = Vec::new();
    for svc in &services {
        let out = grpcurl(&["-plaintext", &addr, "list", svc]);
        for line in text(&out.stdout).lines() {
            let method = line.strip_prefix(&format!("{svc}.")).unwrap();
            methods.push(format!("/{svc}/{method}"));
        }
    }
    assert!(methods.len() > 20, "{methods:?}");

    let tcp = s.channel().await;
    let ro_sock = unix_channel(&s.ro_sock).await;
    let rw_sock = unix_channel(&s.rw_sock).await;
    let mtls = s.mtls_gateway().await;
    let mtls_ro = mtls.channel(&mtls.ro).await;
    let mtls_rw = mtls.channel(&mtls.rw).await;
    let forged = "f".repeat(64);
    let gateway_reasons = [
        "UNAUTHENTICATED_TOKEN",
        "PERMISSION_DENIED_ROLE",
        "METHOD_NOT_FOUND",
    ];
    for path in &methods {
        let role = role_of(path).unwrap_or_else(|| panic!("{path} has no row in the role table"));
        let callers: [(&str, Channel, Option<&str>, Option<Role>); 8] = [
            ("no token", tcp.clone(), None, None),
            ("forged token", tcp.clone(), Some(&forged), None),
            (
                "read-only token",
                tcp.clone(),
                Some(&s.viewer.token),
                Some(Role::ReadOnly),
            ),
            (
                "read-write token",
                tcp.clone(),
                Some(&s.operator.token),
                Some(Role::ReadWrite),
            ),
            (
                "read-only socket",
                ro_sock.clone(),
                None,
                Some(Role::ReadOnly),
            ),
            (
                "read-write socket",
                rw_sock.clone(),
                None,
                Some(Role::ReadWrite),
            ),
            (
                "mTLS read-only",
                mtls_ro.clone(),
                None,
                Some(Role::ReadOnly),
            ),
            (
                "mTLS read-write",
                mtls_rw.clone(),
                None,
                Some(Role::ReadWrite),
            ),
        ];
        for (who, channel, token, has) in callers {
            let got = call_raw(channel, path, token).await;
            let reason = got.as_ref().err().and_then(qvirt_common::rpc::reason_of);
            match has {
                None => assert_eq!(
                    reason.as_deref(),
                    Some("UNAUTHENTICATED_TOKEN"),
                    "{path} as {who}: {got:?}"
                ),
                Some(has) if has < role => assert_eq!(
                    reason.as_deref(),
                    Some("PERMISSION_DENIED_ROLE"),
                    "{path} as {who}: {got:?}"
                ),
                Some(_) => assert!(
                    !reason
                        .as_deref()
                        .is_some_and(|r| gateway_reasons.contains(&r)),
                    "{path} as {who} reached no backend: {got:?}"
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_request_size_and_call_rate_are_limited_per_principal() {
    let s = Stack::start("", "  calls_per_second: 2\n  max_request_bytes: 1000\n").await;
    let mut sup = SupervisorClient::new(s.channel().await);
    let big = DefineDomainRequest {
        source: Some(define_domain_request::Source::SpecYaml(format!(
            "name: big\naccel: tcg\n# {}\n",
            "x".repeat(2000)
        ))),
        ..Default::default()
    };
    let err = sup
        .define_domain(bearer(big, &s.operator.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.max_request_bytes"),
        "{err:?}"
    );

    // A burst well past 2 calls a second: some are refused, naming the
    // limit, and another principal is not held back by them.
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = sup
            .list_domains(bearer(ListDomainsRequest::default(), &s.viewer.token))
            .await
        {
            refused = Some(e);
        }
    }
    let err = refused.expect("a call over the rate");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limits.calls_per_second"), "{err:?}");
    sup.list_domains(bearer(ListDomainsRequest::default(), &s.operator2.token))
        .await
        .unwrap();
}

/// The next monitor event's name on `stream`.
async fn next_monitor_event(
    stream: &mut Streaming<qvirt_proto::v1::SubscribeMonitorEventsResponse>,
) -> String {
    use qvirt_proto::v1::subscribe_monitor_events_response::Kind;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a monitor event within 30 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(Kind::Event(e)) = msg.kind {
            return e.event;
        }
    }
}

/// As libvirt's `virConnectDomainQemuMonitorEventRegister` on a read-write
/// connection: a real guest's suspend and resume reach a subscriber of
/// the gateway as STOP and RESUME, every call made through the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn test_monitor_events_of_a_real_guest_stream_through_the_gateway() {
    use qvirt_proto::v1::{
        DestroyDomainRequest, ResumeDomainRequest, StartDomainRequest, SuspendDomainRequest,
    };
    qvirt_integration_tests::tool_path("qemu-system-x86_64");
    let s = Stack::start("", "  calls_per_second: 1000\n").await;
    let rw = s.operator.token.as_str();
    let mut bus = EventBusClient::new(s.channel().await);
    let mut sup = SupervisorClient::new(s.channel().await);
    let mut monitor = subscribe_monitor(&mut bus, rw).await.unwrap();

    let define = DefineDomainRequest {
        source: Some(define_domain_request::Source::SpecYaml(
            "name: gw-e2e\nmemory_mib: 128\naccel: tcg\n".into(),
        )),
        ..Default::default()
    };
    let uuid = sup
        .define_domain(bearer(define, rw))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .spec
        .unwrap()
        .uuid;
    let started = sup
        .start_domain(bearer(
            StartDomainRequest {
                domain: "gw-e2e".into(),
                ..Default::default()
            },
            rw,
        ))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _qemu = qvirt_integration_tests::QemuGuard(started.pid, uuid);
    sup.suspend_domain(bearer(
        SuspendDomainRequest {
            domain: "gw-e2e".into(),
            ..Default::default()
        },
        rw,
    ))
    .await
    .unwrap();
    while next_monitor_event(&mut monitor).await != "STOP" {}
    sup.resume_domain(bearer(
        ResumeDomainRequest {
            domain: "gw-e2e".into(),
            ..Default::default()
        },
        rw,
    ))
    .await
    .unwrap();
    while next_monitor_event(&mut monitor).await != "RESUME" {}
    sup.destroy_domain(bearer(
        DestroyDomainRequest {
            domain: "gw-e2e".into(),
            ..Default::default()
        },
        rw,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sigterm_refuses_new_connections_ends_open_streams_and_removes_the_sockets() {
    let mut s = Stack::start("", "").await;
    let mut tcp = EventBusClient::new(s.channel().await);
    let mut over_tcp = subscribe_domain(&mut tcp, &s.operator.token).await;
    let mut unix = EventBusClient::new(unix_channel(&s.rw_sock).await);
    let mut over_unix = subscribe_domain(&mut unix, &s.operator.token).await;
    let (rw_sock, ro_sock) = (s.rw_sock.clone(), s.ro_sock.clone());
    assert!(rw_sock.exists() && ro_sock.exists());

    // New connections are refused at once, while the open streams still
    // have their grace period: a client is never left hanging on a port
    // nobody serves any more.
    s.gw.signal(libc::SIGTERM);
    let addr = s.gw.addr;
    let refused = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the gateway's port still took connections 3 s after SIGTERM"
    );
    // (SIGTERM again, as `terminate` sends it, changes nothing.)
    let status = tokio::task::spawn_blocking(move || {
        let status = s.gw.terminate();
        (s, status)
    });
    // Each open stream ends (GOAWAY, then the grace period at most)
    // rather than hanging.
    for stream in [&mut over_tcp, &mut over_unix] {
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream ended after SIGTERM");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    }
    let (s, status) = status.await.unwrap();
    assert!(status.success(), "{status:?}; stderr:\n{}", s.gw.stderr());
    assert!(s.gw.stderr().contains("stopped"), "{}", s.gw.stderr());
    for sock in [&rw_sock, &ro_sock] {
        assert!(!sock.exists(), "{} left behind", sock.display());
    }
}
