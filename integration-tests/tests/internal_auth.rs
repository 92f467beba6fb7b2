//! The internal plane refuses callers that are not part of it: the real
//! backends (supervisor, bus, agent service, hook executor), called with
//! the real grpcurl, without the internal token, with a wrong one, with
//! the right one, and over a unix socket. Their public services too:
//! users reach those through the gateway only.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    COMMAND_TIMEOUT, ChildGuard, Service, bin_path, grpcurl, internal_channel, internal_token,
    run_command, start_supervisor, text, tool_path,
};
use qvirt_proto::v1::SubscribeDomainEventsRequest;
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::subscribe_domain_events_response::Kind;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);

/// A forged "the guest stopped" event.
const STOPPED: &str =
    r#"{"domain_event": {"domain_name": "vm1", "type": "DOMAIN_EVENT_TYPE_STOPPED"}}"#;

fn token_header(token: &str) -> String {
    format!("x-qvirt-internal-token: {token}")
}

/// grpcurl `method` on `target` (`HOST:PORT`, or a socket path with
/// `-unix`) with `data` and `headers`.
fn call(target: &[&str], method: &str, data: &str, headers: &[String]) -> Output {
    let mut args: Vec<&str> = vec!["-plaintext", "-d", data];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    args.extend_from_slice(target);
    args.push(method);
    grpcurl(&args)
}

fn assert_unauthenticated(out: &Output, method: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{method} was accepted");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(
        stderr.contains(&format!("{method} is internal: present the internal token")),
        "{stderr}"
    );
    // The reason a program acts on, in the status details.
    assert!(stderr.contains("\"INTERNAL_CALLER_REQUIRED\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_publish_needs_the_internal_token_over_tcp() {
    // The harness gives the bus the shared token file.
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let mut client = EventBusClient::new(internal_channel(bus.url()).await);
    let mut events = client
        .subscribe_domain_events(SubscribeDomainEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, events.message()).await.unwrap();
    assert!(matches!(
        first.unwrap().unwrap().kind,
        Some(Kind::Established(_))
    ));

    let addr = bus.addr.to_string();
    let method = "qvirt.v1.EventIngest/Publish";
    let out = call(&[&addr], method, STOPPED, &[]);
    assert_unauthenticated(&out, "Publish");
    let wrong = token_header(&"0123456789abcdef".repeat(4));
    let out = call(&[&addr], method, STOPPED, &[wrong]);
    assert_unauthenticated(&out, "Publish");
    assert!(
        text(&out.stderr).contains("is wrong"),
        "{}",
        text(&out.stderr)
    );

    // With the token it is stored: sequence 1, so neither refused event
    // took a number, and it is the first event the subscriber sees.
    let legit =
        r#"{"domain_event": {"domain_name": "legit", "type": "DOMAIN_EVENT_TYPE_STOPPED"}}"#;
    let out = call(&[&addr], method, legit, &[token_header(internal_token())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("\"lastSequence\": \"1\""),
        "{}",
        text(&out.stdout)
    );
    let got = tokio::time::timeout(WAIT, events.message()).await.unwrap();
    match got.unwrap().unwrap().kind {
        Some(Kind::Event(e)) => {
            assert_eq!(e.domain_name, "legit");
            assert_eq!(e.sequence, 1);
        }
        other => panic!("expected the legit event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_publish_without_a_configured_token_refuses_every_tcp_caller() {
    let mut bus = Service::start_without_internal_token("qvirt-eventbus", "", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let addr = bus.addr.to_string();
    let out = call(
        &[&addr],
        "qvirt.v1.EventIngest/Publish",
        STOPPED,
        &[token_header(internal_token())],
    );
    assert_unauthenticated(&out, "Publish");
    assert!(
        bus.stderr().contains("no internal_token_file"),
        "{}",
        bus.stderr()
    );
}

/// grpcurl's refusal of public `method` (`package.Service/Method`) at a
/// backend: UNAUTHENTICATED, pointing at the gateway.
fn assert_backend_refused(out: &Output, method: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{method} was served");
    assert!(stderr.contains("Unauthenticated"), "{method}: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{method} is served here to internal callers only (clients call it through the gateway)"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("\"INTERNAL_CALLER_REQUIRED\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_backends_serve_public_services_to_internal_callers_only() {
    let dirs = tempfile::tempdir().unwrap();
    let (state, run) = (dirs.path().join("state"), dirs.path().join("run"));
    let sup = start_supervisor(&state, &run, None, &[]).await;
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let mut agentd = Service::start("qvirt-agentd", &["--supervisor", &sup.url()]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let (sup_addr, bus_addr, agentd_addr) = (
        sup.addr.to_string(),
        bus.addr.to_string(),
        agentd.addr.to_string(),
    );
    let define = r#"{"spec": {"name": "sneaky", "memory_mib": 64}}"#;
    let wrong = token_header(&"0123456789abcdef".repeat(4));
    let calls = [
        (&sup_addr, "qvirt.v1.Supervisor/ListDomains", "{}"),
        (&sup_addr, "qvirt.v1.Supervisor/DefineDomain", define),
        (
            &sup_addr,
            "qvirt.v1.Supervisor/MonitorCommand",
            r#"{"domain": "x", "command_json": "{}"}"#,
        ),
        (&bus_addr, "qvirt.v1.EventBus/SubscribeMonitorEvents", "{}"),
        (&bus_addr, "qvirt.v1.EventBus/SubscribeDomainEvents", "{}"),
        (
            &agentd_addr,
            "qvirt.v1.GuestAgent/Ping",
            r#"{"domain": "ghost"}"#,
        ),
        (
            &agentd_addr,
            "qvirt.v1.GuestAgent/Exec",
            r#"{"domain": "ghost", "path": "/bin/true"}"#,
        ),
    ];
    for (addr, method, data) in calls {
        assert_backend_refused(&call(&[addr], method, data, &[]), method);
        assert_backend_refused(
            &call(&[addr], method, data, std::slice::from_ref(&wrong)),
            method,
        );
    }

    // Health and reflection stay open: probes and `grpcurl list` work
    // without the token.
    for (addr, service) in [
        (&sup_addr, "qvirt.v1.Supervisor"),
        (&bus_addr, "qvirt.v1.EventBus"),
        (&agentd_addr, "qvirt.v1.GuestAgent"),
    ] {
        let listed = grpcurl(&["-plaintext", addr.as_str(), "list"]);
        assert!(listed.status.success(), "{}", text(&listed.stderr));
        assert!(text(&listed.stdout).lines().any(|l| l == service));
        let health = call(
            &[addr],
            "grpc.health.v1.Health/Check",
            &format!(r#"{{"service": "{service}"}}"#),
            &[],
        );
        assert!(
            text(&health.stdout).contains("SERVING"),
            "{}",
            text(&health.stderr)
        );
    }

    // With the token: the refused define stored nothing.
    let token = token_header(internal_token());
    let listed = call(
        &[&sup_addr],
        "qvirt.v1.Supervisor/ListDomains",
        "{}",
        std::slice::from_ref(&token),
    );
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(
        !text(&listed.stdout).contains("sneaky"),
        "{}",
        text(&listed.stdout)
    );
    // And agentd, past its own check, asks the supervisor with the token:
    // an unknown domain is NOT_FOUND there, not a refusal.
    let ping = call(
        &[&agentd_addr],
        "qvirt.v1.GuestAgent/Ping",
        r#"{"domain": "ghost"}"#,
        &[token],
    );
    let stderr = text(&ping.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
    assert!(!stderr.contains("Unauthenticated"), "{stderr}");
}

/// A hooks dir whose `qemu` hook writes `marker` into `out`.
fn marker_hook(hooks: &Path, out: &Path) {
    fs::create_dir_all(hooks).unwrap();
    let script = hooks.join("qemu");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\n",
            out.join("marker").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
}

const RUN_HOOK: &str =
    r#"{"driver": "HOOK_DRIVER_QEMU", "object": "vm1", "op": "prepare", "sub_op": "begin"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn test_hook_executor_needs_the_internal_token_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    marker_hook(&hooks, dir.path());
    let mut exec = Service::start("qvirt-hookexec", &["--hooks-dir", hooks.to_str().unwrap()]);
    exec.wait_serving("qvirt.v1.HookExecutor").await;
    let addr = exec.addr.to_string();
    let wrong = token_header(&"0123456789abcdef".repeat(4));
    for (method, data) in [
        ("RunHook", RUN_HOOK),
        ("ReloadHooks", "{}"),
        ("ListHooks", "{}"),
    ] {
        let full = format!("qvirt.v1.HookExecutor/{method}");
        assert_unauthenticated(&call(&[&addr], &full, data, &[]), method);
        assert_unauthenticated(
            &call(&[&addr], &full, data, std::slice::from_ref(&wrong)),
            method,
        );
    }
    assert!(
        !dir.path().join("marker").exists(),
        "a refused RunHook ran the hook"
    );

    let out = call(
        &[&addr],
        "qvirt.v1.HookExecutor/RunHook",
        RUN_HOOK,
        &[token_header(internal_token())],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("HOOK_OUTCOME_SUCCESS"));
    assert_eq!(
        fs::read_to_string(dir.path().join("marker")).unwrap(),
        "vm1 prepare begin -\n"
    );
}

/// Starts `bin` on the unix socket `sock` with no internal token and
/// `extra` flags, and waits until it answers health checks there.
async fn start_on_unix(bin: &str, sock: &Path, extra: &[&str]) -> ChildGuard {
    let mut child = ChildGuard::spawn(
        Command::new(bin_path(bin))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stderr(std::process::Stdio::null()),
    );
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "{bin}: no answer on {}",
            sock.display()
        );
        assert!(child.try_wait().is_none(), "{bin} exited");
        if sock.exists()
            && unix_call(sock, "grpc.health.v1.Health/Check", "{}", None)
                .status
                .success()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// grpcurl over the unix socket `sock`, as `uid` when given (then from a
/// copy beside the socket, which that user can reach).
fn unix_call(sock: &Path, method: &str, data: &str, uid: Option<u32>) -> Output {
    let program = match uid {
        None => tool_path("grpcurl"),
        Some(_) => {
            let copy = sock.with_file_name("grpcurl");
            if !copy.exists() {
                fs::copy(tool_path("grpcurl"), &copy).unwrap();
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
            }
            copy
        }
    };
    let mut cmd = Command::new(program);
    // Over a unix socket grpcurl must be told a valid :authority.
    cmd.args(["-plaintext", "-unix", "-authority", "localhost", "-d", data])
        .arg(sock)
        .arg(method);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    run_command(&mut cmd, COMMAND_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unix_socket_peers_are_trusted_by_uid() {
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    assert_eq!(
        me, 0,
        "this test runs grpcurl as another user: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    // Another user must reach the sockets to be refused by uid.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let hooks = dir.path().join("hooks");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    marker_hook(&hooks, &out);

    let bus_sock = dir.path().join("bus.sock");
    let _bus = start_on_unix("qvirt-eventbus", &bus_sock, &[]).await;
    let agentd_sock = dir.path().join("agentd.sock");
    let _agentd = start_on_unix("qvirt-agentd", &agentd_sock, &[]).await;
    let exec_sock = dir.path().join("exec.sock");
    let _exec = start_on_unix(
        "qvirt-hookexec",
        &exec_sock,
        &["--hooks-dir", hooks.to_str().unwrap()],
    )
    .await;
    for sock in [&bus_sock, &exec_sock, &agentd_sock] {
        fs::set_permissions(sock, fs::Permissions::from_mode(0o777)).unwrap();
    }

    // Root needs no token.
    let published = unix_call(&bus_sock, "qvirt.v1.EventIngest/Publish", STOPPED, None);
    assert!(published.status.success(), "{}", text(&published.stderr));
    let ran = unix_call(&exec_sock, "qvirt.v1.HookExecutor/RunHook", RUN_HOOK, None);
    assert!(ran.status.success(), "{}", text(&ran.stderr));
    assert!(out.join("marker").exists());
    fs::remove_file(out.join("marker")).unwrap();
    // A public service too: past the check, the unknown domain is NOT_FOUND.
    let ping = r#"{"domain": "ghost"}"#;
    let pinged = unix_call(&agentd_sock, "qvirt.v1.GuestAgent/Ping", ping, None);
    assert!(
        text(&pinged.stderr).contains("NotFound"),
        "{}",
        text(&pinged.stderr)
    );

    // Another user (nobody) is not an internal uid.
    let nobody = 65534;
    let refused = unix_call(
        &bus_sock,
        "qvirt.v1.EventIngest/Publish",
        STOPPED,
        Some(nobody),
    );
    assert_unauthenticated(&refused, "Publish");
    assert!(text(&refused.stderr).contains("uid 65534 is not an internal uid"));
    let refused = unix_call(
        &exec_sock,
        "qvirt.v1.HookExecutor/RunHook",
        RUN_HOOK,
        Some(nobody),
    );
    assert_unauthenticated(&refused, "RunHook");
    assert!(
        !out.join("marker").exists(),
        "a refused RunHook ran the hook"
    );
    let refused = unix_call(&agentd_sock, "qvirt.v1.GuestAgent/Ping", ping, Some(nobody));
    assert_backend_refused(&refused, "qvirt.v1.GuestAgent/Ping");
    assert!(text(&refused.stderr).contains("uid 65534 is not an internal uid"));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_supervisor_without_the_token_is_refused_and_retries_slowly() {
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let dirs = tempfile::tempdir().unwrap();
    let (state, run) = (dirs.path().join("state"), dirs.path().join("run"));
    let url = bus.url();
    let mut sup = Service::start_without_internal_token(
        "qvirt-supervisor",
        "",
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--eventbus",
            &url,
        ],
    );
    sup.wait_serving("qvirt.v1.Supervisor").await;
    assert!(
        sup.stderr().contains("no internal_token_file"),
        "{}",
        sup.stderr()
    );
    // Its Publish stream is refused...
    let refused = "event bus stream failed";
    let deadline = Instant::now() + WAIT;
    while !sup.stderr().contains(refused) {
        assert!(
            Instant::now() < deadline,
            "never refused:\n{}",
            sup.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sup.stderr().contains("Unauthenticated"), "{}", sup.stderr());
    // ...and retried every 5 s, not at once: reconnecting at once after
    // each refusal tried hundreds of times a second. Counted over 2 s: at
    // most the first refusal and one retry.
    let before = sup.stderr().matches(refused).count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sup.stderr().matches(refused).count();
    assert!(after - before <= 1, "{} refusals in 2 s", after - before);
}
