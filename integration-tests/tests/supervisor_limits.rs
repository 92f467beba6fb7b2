//! What a hostile or careless client of the real `qvirt-supervisor` meets,
//! through grpcurl as an operator would see it: a small YAML document whose
//! aliases expand to hundreds of megabytes is INVALID_ARGUMENT at once, with
//! no memory growth; definitions stop (RESOURCE_EXHAUSTED) before a
//! ListDomains answer outgrows a gRPC client's 4 MiB; a name shaped like a
//! UUID and memory beyond the host are refused at define; a full state dir
//! (a tiny tmpfs) is RESOURCE_EXHAUSTED "state dir full" and a read-only
//! one UNAVAILABLE "read-only", leaving nothing behind. And the supervisor
//! reaches the event bus, the hook executor and the agent service over
//! unix sockets, each service listening on one.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    ChildGuard, QemuGuard, bin_path, define_yaml, grpcurl, grpcurl_internal, internal_channel,
    rss_kib, start_supervisor, text, tool_path,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::subscribe_domain_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, DomainEventType, DomainSpec, ShutdownDomainRequest,
    ShutdownMode, StartDomainRequest, SubscribeDomainEventsRequest, define_domain_request,
};
use tonic::Code;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);

/// grpcurl `method` on the supervisor at `addr` with JSON `body`; returns
/// (success, stdout, stderr).
fn call(addr: &str, method: &str, body: &str) -> (bool, String, String) {
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        body,
        addr,
        &format!("qvirt.v1.Supervisor/{method}"),
    ]);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A JSON string literal of `s`.
fn json(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_alias_bomb_is_invalid_argument_without_memory_growth() {
    let dirs = tempfile::tempdir().unwrap();
    let sup = start_supervisor(&dirs.path().join("s"), &dirs.path().join("r"), None, &[]).await;
    let addr = sup.addr.to_string();
    let before = rss_kib(sup.pid());
    // 62 KB of YAML: one 30 KB anchor used 8000 times, 240 MB expanded.
    let mut yaml = format!("name: bomb\nextra_args: [&a \"{}\"", "x".repeat(30_000));
    yaml.push_str(&", *a".repeat(8_000));
    yaml.push_str("]\n");
    let body = format!("{{\"spec_yaml\": {}}}", json(&yaml));
    let (ok, _, stderr) = call(&addr, "DefineDomain", &body);
    assert!(!ok);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("expands to more than 65536 bytes"),
        "{stderr}"
    );
    let grown = rss_kib(sup.pid()).saturating_sub(before);
    assert!(grown < 64 * 1024, "the supervisor grew by {grown} KiB");
    // Nothing stored; the list answers.
    let (ok, stdout, stderr) = call(&addr, "ListDomains", "{}");
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("bomb"), "{stdout}");
    // A document over 64 KiB is refused before it is parsed.
    let yaml = format!("name: long\ncmdline: \"{}\"\n", "y".repeat(70_000));
    let (ok, _, stderr) = call(
        &addr,
        "DefineDomain",
        &format!("{{\"spec_yaml\": {}}}", json(&yaml)),
    );
    assert!(!ok && stderr.contains("at most 65536"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_list_domains_stays_under_the_client_message_limit() {
    let dirs = tempfile::tempdir().unwrap();
    let sup = start_supervisor(&dirs.path().join("s"), &dirs.path().join("r"), None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    // Definitions near the per-definition bound: 7 arguments of 4 KiB.
    let mut defined = 0;
    let refused = loop {
        assert!(defined < 200, "no refusal after {defined} definitions");
        let spec = DomainSpec {
            name: format!("big{defined}"),
            extra_args: vec!["z".repeat(4096); 7],
            ..DomainSpec::default()
        };
        let reply = client
            .define_domain(DefineDomainRequest {
                source: Some(define_domain_request::Source::Spec(spec)),
                allow_update: false,
                ..Default::default()
            })
            .await;
        match reply {
            Ok(_) => defined += 1,
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("ListDomains"), "{refused:?}");
    // grpcurl, with its default 4 MiB limit, still reads the whole list
    // in one page of the largest size.
    let (ok, stdout, stderr) = call(
        &sup.addr.to_string(),
        "ListDomains",
        r#"{"page_size": 1000}"#,
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.matches("\"name\": \"big").count(), defined);
    // One definition over its own bound is refused naming it.
    let (ok, _, stderr) = call(
        &sup.addr.to_string(),
        "DefineDomain",
        &format!(
            "{{\"spec\": {{\"name\": \"huge\", \"extra_args\": {}}}}}",
            serde_json::to_string(&vec!["w".repeat(4096); 9]).unwrap()
        ),
    );
    assert!(!ok && stderr.contains("at most 32768"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_uuid_names_and_memory_beyond_the_host_are_refused_at_define() {
    let dirs = tempfile::tempdir().unwrap();
    let sup = start_supervisor(&dirs.path().join("s"), &dirs.path().join("r"), None, &[]).await;
    let addr = sup.addr.to_string();
    let (ok, stdout, stderr) = call(&addr, "DefineDomain", r#"{"spec": {"name": "b"}}"#);
    assert!(ok, "{stderr}");
    let reply: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let uuid = reply["domain"]["spec"]["uuid"].as_str().unwrap().to_owned();
    let (ok, _, stderr) = call(
        &addr,
        "DefineDomain",
        &format!("{{\"spec\": {{\"name\": \"{uuid}\"}}}}"),
    );
    assert!(!ok, "a domain named like b's UUID was defined");
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(stderr.contains("name: must not be a UUID"), "{stderr}");
    // Memory beyond this host is refused now, not by QEMU at start.
    let (ok, _, stderr) = call(
        &addr,
        "DefineDomain",
        r#"{"spec": {"name": "fat", "memory_mib": "1000000000"}}"#,
    );
    assert!(!ok);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("memory_mib") && stderr.contains("max_memory_mib"),
        "{stderr}"
    );
}

/// Runs `mount ARGS`, panicking with its output on failure.
fn mount(args: &[&str]) {
    let out = qvirt_integration_tests::run(Path::new("mount"), args, WAIT);
    assert!(
        out.status.success(),
        "mount {args:?}: {} (this test needs root)",
        text(&out.stderr)
    );
}

/// Unmounts its mount points (last first) on drop, lazily, so a test that
/// fails half-way leaves no mount behind.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(path)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn test_full_and_read_only_state_dir_are_told_to_the_client() {
    let dirs = tempfile::tempdir().unwrap();
    let state = dirs.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut mounts = Mounts(Vec::new());
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=1m",
        "tmpfs",
        state.to_str().unwrap(),
    ]);
    mounts.0.push(state.clone());
    let sup = start_supervisor(&state, &dirs.path().join("run"), None, &[]).await;
    let addr = sup.addr.to_string();
    let domains = state.join("domains");

    // Fill the tmpfs.
    let filler = state.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let full = loop {
        if let Err(e) = std::io::Write::write_all(&mut file, &chunk) {
            break e;
        }
    };
    drop(file);
    assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");
    let (ok, _, stderr) = call(&addr, "DefineDomain", r#"{"spec": {"name": "a"}}"#);
    assert!(!ok);
    assert!(stderr.contains("Code: ResourceExhausted"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "state dir full: cannot write in {}",
            state.display()
        )),
        "{stderr}"
    );
    assert!(
        names(&domains).is_empty(),
        "left behind: {:?}",
        names(&domains)
    );
    let (ok, stdout, _) = call(&addr, "ListDomains", "{}");
    assert!(ok && !stdout.contains("\"a\""), "{stdout}");

    // Room again: the same define works.
    std::fs::remove_file(&filler).unwrap();
    let (ok, _, stderr) = call(&addr, "DefineDomain", r#"{"spec": {"name": "a"}}"#);
    assert!(ok, "{stderr}");

    // Read-only (a read-only bind mount over the definitions).
    let d = domains.to_str().unwrap();
    mount(&["--bind", d, d]);
    mounts.0.push(domains.clone());
    mount(&["-o", "remount,bind,ro", d]);
    let (ok, _, stderr) = call(&addr, "DefineDomain", r#"{"spec": {"name": "b"}}"#);
    assert!(!ok);
    assert!(stderr.contains("Code: Unavailable"), "{stderr}");
    assert!(stderr.contains("state dir read-only"), "{stderr}");
    let (ok, _, stderr) = call(&addr, "UndefineDomain", r#"{"domain": "a"}"#);
    assert!(!ok && stderr.contains("state dir read-only"), "{stderr}");
    assert_eq!(names(&domains), ["a.yaml"]);
    let (ok, stdout, _) = call(&addr, "ListDomains", "{}");
    assert!(
        ok && stdout.contains("\"a\"") && !stdout.contains("\"b\""),
        "{stdout}"
    );
    drop(sup);
    drop(mounts);
}

/// Waits until the gRPC server on unix socket `sock` reports SERVING.
fn wait_unix_serving(child: &mut ChildGuard, sock: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "{} not serving", sock.display());
        assert!(child.try_wait().is_none(), "{} exited", sock.display());
        if sock.exists() {
            let out = grpcurl(&[
                "-plaintext",
                "-unix",
                "-authority",
                "localhost",
                sock.to_str().unwrap(),
                "grpc.health.v1.Health/Check",
            ]);
            if text(&out.stdout).contains("SERVING") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `bin` listening on unix socket `sock` with `args`, logging to
/// `sock`.log, and waits until it serves.
fn start_on_unix(bin: &str, sock: &Path, args: &[&str]) -> ChildGuard {
    let log = std::fs::File::create(sock.with_extension("log")).unwrap();
    let mut child = ChildGuard::spawn(
        Command::new(bin_path(bin))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_unix_serving(&mut child, sock);
    child
}

/// Polls `path` until it holds `want`.
fn wait_for_line(path: &Path, want: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = std::fs::read_to_string(path).unwrap_or_default();
        if seen.contains(want) {
            return seen;
        }
        assert!(Instant::now() < deadline, "no {want:?} in {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_reaches_bus_hooks_and_agentd_over_unix_sockets() {
    tool_path("qemu-system-x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hooks = t.join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    let calls = t.join("calls");
    for driver in ["qemu", "daemon"] {
        let path = hooks.join(driver);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nprintf '%s %s %s %s\\n' \"$1\" \"$2\" \"$3\" \"$4\" >> '{}'\ncat > /dev/null\n",
                calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (bus_sock, hook_sock, agent_sock, sup_sock) = (
        t.join("bus.sock"),
        t.join("hook.sock"),
        t.join("agentd.sock"),
        t.join("sup.sock"),
    );
    let unix = |p: &Path| format!("unix:{}", p.display());
    let _bus = start_on_unix("qvirt-eventbus", &bus_sock, &[]);
    let _hookexec = start_on_unix(
        "qvirt-hookexec",
        &hook_sock,
        &["--hooks-dir", hooks.to_str().unwrap()],
    );
    let (state, run) = (t.join("state"), t.join("run"));
    let mut sup = start_on_unix(
        "qvirt-supervisor",
        &sup_sock,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--eventbus",
            &unix(&bus_sock),
            "--hookexec",
            &unix(&hook_sock),
            "--agentd",
            &unix(&agent_sock),
        ],
    );
    let _agentd = start_on_unix(
        "qvirt-agentd",
        &agent_sock,
        &["--supervisor", &unix(&sup_sock), "--sync-timeout-ms", "500"],
    );
    // The daemon hook ran through the executor's socket.
    wait_for_line(&calls, "- start - start");

    let channel = |sock: &Path| {
        qvirt_common::config::endpoint(&unix(sock))
            .unwrap()
            .connect_lazy()
    };
    let mut events = EventBusClient::new(channel(&bus_sock))
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "ux".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = SupervisorClient::new(channel(&sup_sock));
    let defined = define_yaml(
        &mut client,
        "name: ux\nmemory_mib: 64\naccel: tcg\nagent: true\n".into(),
    )
    .await
    .unwrap();
    let uuid = defined.spec.unwrap().uuid;
    // The DEFINED event went through the bus's socket.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, events.message())
            .await
            .expect("DEFINED event in time")
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(e)) = msg.kind
            && e.r#type == DomainEventType::Defined as i32
        {
            assert_eq!(e.domain_uuid, uuid);
            break;
        }
    }

    // A start runs the domain hooks through the executor's socket.
    let started = client
        .start_domain(StartDomainRequest {
            domain: "ux".into(),
            paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _qemu = QemuGuard(started.pid, uuid.clone());
    wait_for_line(&calls, "ux prepare begin -");
    // Agent mode goes to agentd's socket; agentd finds the guest through
    // the supervisor's socket and finds no agent answering in the guest
    // (there is no guest OS): its answer, not a transport error.
    let err = client
        .shutdown_domain(ShutdownDomainRequest {
            domain: "ux".into(),
            mode: ShutdownMode::Agent as i32,
            timeout: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        !err.message().contains("transport error"),
        "agentd not reached: {err:?}"
    );
    assert!(err.message().contains("guest agent"), "{err:?}");
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "ux".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_line(&calls, "ux release end destroyed");
    assert!(sup.terminate().success());
}
