//! Manager tests: without QEMU, definitions, uniqueness, updates, lookups,
//! persistence across a reopen, state checks, status on restart, guests
//! re-attached concurrently at open (fake monitors); with real QEMU (TCG),
//! event order and a monitor lost while QEMU runs (reconnected, or for
//! good: the domain is kept and destroy still stops QEMU).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use qvirt_proto::v1::{DomainSpec, DomainState, DomainStateReason};

use super::store::{Status, Store};
use super::{DomainError, Manager};
use crate::config::Config;
use crate::launch::ProcessIdentity;
use crate::seams::{LogEvents, NoHooks};

fn config(dir: &tempfile::TempDir) -> Config {
    Config {
        state_dir: dir.path().join("state"),
        run_dir: dir.path().join("run"),
        node_name: "test-node".into(),
        ..Config::default()
    }
}

async fn open(dir: &tempfile::TempDir) -> Manager {
    Manager::open(config(dir), Arc::new(LogEvents), Arc::new(NoHooks), None)
        .await
        .unwrap()
}

fn spec(yaml: &str) -> DomainSpec {
    DomainSpec::from_yaml(yaml).unwrap()
}

#[tokio::test]
async fn test_define_fills_defaults_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    let d = m.define(spec("name: a"), false).await.unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.host, "test-node");
    let uuid = d.spec.unwrap().uuid;
    match m.define(spec("name: a"), false).await {
        Err(DomainError::AlreadyExists { field: "name", .. }) => {}
        other => panic!("{other:?}"),
    }
    match m
        .define(spec(&format!("name: b\nuuid: {uuid}")), false)
        .await
    {
        Err(DomainError::AlreadyExists { field: "uuid", .. }) => {}
        other => panic!("{other:?}"),
    }
    match m.define(spec("name: \"..\""), false).await {
        Err(DomainError::Spec(e)) => assert_eq!(e.field, "name"),
        other => panic!("{other:?}"),
    }
    // Update keeps the UUID when none is given.
    let d = m
        .define(spec("name: a\nmemory_mib: 256"), true)
        .await
        .unwrap();
    let s = d.spec.unwrap();
    assert_eq!((s.uuid.as_str(), s.memory_mib), (uuid.as_str(), 256));
    // By UUID (any case) or name.
    assert_eq!(m.get(&uuid.to_uppercase()).unwrap().spec.unwrap().name, "a");
    assert!(matches!(m.get("zz"), Err(DomainError::NotFound(_))));
}

#[tokio::test]
async fn test_definitions_survive_a_reopen_and_undefine_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: b\nvcpus: 2"), false).await.unwrap();
    m.define(spec("name: a"), false).await.unwrap();
    m.close().await;
    let m = open(&dir).await;
    let names: Vec<_> = m
        .list(&[])
        .into_iter()
        .map(|d| d.spec.unwrap().name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(m.get("b").unwrap().spec.unwrap().vcpus, 2);
    m.undefine("a", false, None).await.unwrap();
    assert!(!dir.path().join("state/domains/a.yaml").exists());
    let m = open(&dir).await;
    assert_eq!(m.list(&[]).len(), 1);
    assert!(m.list(&[DomainState::Running as i32]).is_empty());
}

#[tokio::test]
async fn test_calls_on_a_shut_off_domain_are_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: off"), false).await.unwrap();
    let results = [
        m.suspend("off").await.map(drop),
        m.resume("off").await.map(drop),
        m.reset("off").await.map(drop),
        m.destroy("off", false).await.map(drop),
        m.monitor_command("off", r#"{"execute":"query-status"}"#)
            .await
            .map(drop),
    ];
    for r in results {
        assert!(matches!(r, Err(DomainError::WrongState { .. })), "{r:?}");
    }
    for bad in ["nope", "[1]", r#"{"arguments":{}}"#] {
        let r = m.monitor_command("off", bad).await;
        assert!(
            matches!(r, Err(DomainError::InvalidArgument { .. })),
            "{bad}: {r:?}"
        );
    }
}

#[tokio::test]
async fn test_recorded_qemu_that_is_gone_is_shutoff_crashed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: gone"), false).await.unwrap();
    m.close().await;
    // A status file left by a supervisor whose QEMU has since died: the
    // recorded start time cannot match the pid's (our own process).
    let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
    let status = Status {
        state: DomainState::Running as i32,
        reason: DomainStateReason::RunningBooted as i32,
        pid: std::process::id(),
        identity: Some(ProcessIdentity {
            pid: std::process::id(),
            start_time: 1,
            cmdline: vec!["qemu-system-x86_64".into()],
        }),
        monitor_socket: "/nonexistent.sock".into(),
        ..Status::default()
    };
    store.save_status("gone", &status).unwrap();
    let m = open(&dir).await;
    let d = m.get("gone").unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffCrashed);
    assert_eq!(d.pid, 0);
}

/// Records what the supervisor publishes.
#[derive(Default)]
struct Recorder {
    monitor: std::sync::Mutex<Vec<String>>,
    lifecycle: std::sync::Mutex<Vec<(qvirt_proto::v1::DomainEventType, i32)>>,
}

/// The detail number of `event`, as the bus would carry it.
fn lifecycle_detail(event: crate::seams::Lifecycle) -> i32 {
    use qvirt_proto::v1::domain_event::Detail;
    match event.detail() {
        Detail::Defined(d)
        | Detail::Undefined(d)
        | Detail::Started(d)
        | Detail::Suspended(d)
        | Detail::Resumed(d)
        | Detail::Stopped(d)
        | Detail::Shutdown(d)
        | Detail::Pmsuspended(d)
        | Detail::Crashed(d) => d,
    }
}

impl crate::seams::EventSink for Recorder {
    fn monitor_event(&self, _domain: &crate::seams::DomainRef, event: &crate::qmp::QmpEvent) {
        self.monitor.lock().unwrap().push(event.name.clone());
    }

    fn lifecycle(&self, _domain: &crate::seams::DomainRef, event: crate::seams::Lifecycle) {
        self.lifecycle
            .lock()
            .unwrap()
            .push((event.kind(), lifecycle_detail(event)));
    }
}

/// Real QEMU (TCG): the event sink sees QMP events in order and one
/// lifecycle event per state change.
#[tokio::test(flavor = "multi_thread")]
async fn test_events_reach_the_sink_in_order() {
    use qvirt_proto::v1::DomainEventType as T;

    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let m = Manager::open(config(&dir), recorder.clone(), Arc::new(NoHooks), None)
        .await
        .unwrap();
    m.define(spec("name: ev\nmemory_mib: 64"), false)
        .await
        .unwrap();
    let d = m.start("ev", true).await.unwrap();
    assert_eq!(d.state(), DomainState::Paused);
    m.resume("ev").await.unwrap();
    m.suspend("ev").await.unwrap();
    let d = m.destroy("ev", false).await.unwrap();
    assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !recorder
        .lifecycle
        .lock()
        .unwrap()
        .iter()
        .any(|(k, _)| *k == T::Stopped)
    {
        assert!(std::time::Instant::now() < deadline, "no STOPPED event");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let lifecycle = recorder.lifecycle.lock().unwrap().clone();
    assert_eq!(
        lifecycle,
        [
            (T::Defined, 1),
            (T::Started, 1),
            (T::Suspended, 1),
            (T::Resumed, 1),
            (T::Suspended, 1),
            (T::Stopped, 2),
        ]
    );
    let monitor = recorder.monitor.lock().unwrap().clone();
    let resume = monitor.iter().position(|n| n == "RESUME").unwrap();
    let stop = monitor.iter().position(|n| n == "STOP").unwrap();
    assert!(resume < stop, "{monitor:?}");
    m.close().await;
}

#[test]
fn test_raw_request_keeps_numbers_and_drops_the_id() {
    let command = super::raw_request(
        r#"{"id":"mine","execute":"x","arguments":{"n":18446744073709551615,"f":1.0000000000000002,"m":-9223372036854775808}}"#,
    )
    .unwrap();
    let text = serde_json::Value::Object(command.request).to_string();
    assert!(!text.contains("mine"), "{text}");
    for n in [
        "18446744073709551615",
        "1.0000000000000002",
        "-9223372036854775808",
    ] {
        assert!(text.contains(n), "{n} in {text}");
    }
}

#[tokio::test]
async fn test_unreachable_monitor_leaves_the_domain_detached_not_killed() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: held"), false).await.unwrap();
    m.close().await;
    // The recorded process is alive and matches (it is this test), but its
    // monitor cannot be reached: it must not be signalled.
    let identity = ProcessIdentity::read(std::process::id()).await.unwrap();
    let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
    let status = Status {
        state: DomainState::Running as i32,
        reason: DomainStateReason::RunningBooted as i32,
        pid: identity.pid,
        identity: Some(identity),
        monitor_socket: dir.path().join("none.sock").display().to_string(),
        ..Status::default()
    };
    store.save_status("held", &status).unwrap();
    let m = open(&dir).await;
    let d = m.get("held").unwrap();
    assert_eq!(d.state(), DomainState::Running);
    assert!(matches!(
        m.suspend("held").await,
        Err(DomainError::Detached(_))
    ));
    assert!(matches!(
        m.destroy("held", false).await,
        Err(DomainError::Detached(_))
    ));
    assert!(matches!(
        m.undefine("held", false, None).await,
        Err(DomainError::WrongState { .. })
    ));
    assert!(matches!(
        m.start("held", false).await,
        Err(DomainError::WrongState { .. })
    ));
}

/// A QMP peer standing in for a running QEMU: greets, answers
/// `query-status` with "running" and anything else with `{}`, keeps the
/// connection open until dropped.
fn fake_monitor(path: &std::path::Path) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"fake\"}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let request: serde_json::Value = serde_json::from_str(&line).unwrap();
            let ret = match request["execute"].as_str() {
                Some("query-status") => serde_json::json!({"status": "running", "running": true}),
                _ => serde_json::json!({}),
            };
            let reply = serde_json::json!({"return": ret, "id": request["id"]});
            if write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// Hooks whose `reconnect` waits until every guest's reconnect hook has
/// been called: it can only finish when the reconnects run concurrently.
struct ReconnectBarrier(tokio::sync::Barrier);

impl crate::seams::Hooks for ReconnectBarrier {
    fn run<'a>(
        &'a self,
        _spec: &'a DomainSpec,
        op: crate::seams::HookOp,
    ) -> crate::seams::HookFuture<'a> {
        Box::pin(async move {
            if op == crate::seams::HookOp::Reconnect {
                self.0.wait().await;
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_guests_reconnect_concurrently_at_open() {
    const GUESTS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    for i in 0..GUESTS {
        m.define(spec(&format!("name: g{i}")), false).await.unwrap();
    }
    m.close().await;
    // Each recorded QEMU is "alive" (its identity is this test process)
    // with a reachable monitor.
    let identity = ProcessIdentity::read(std::process::id()).await.unwrap();
    let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
    let mut monitors = Vec::new();
    for i in 0..GUESTS {
        let socket = dir.path().join(format!("g{i}.sock"));
        monitors.push(fake_monitor(&socket));
        let status = Status {
            state: DomainState::Running as i32,
            reason: DomainStateReason::RunningBooted as i32,
            pid: identity.pid,
            identity: Some(identity.clone()),
            monitor_socket: socket.display().to_string(),
            ..Status::default()
        };
        store.save_status(&format!("g{i}"), &status).unwrap();
    }
    let hooks = Arc::new(ReconnectBarrier(tokio::sync::Barrier::new(GUESTS)));
    // One after another, the first reconnect hook would wait forever.
    let m = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        Manager::open(config(&dir), Arc::new(LogEvents), hooks, None),
    )
    .await
    .expect("reconnects did not run concurrently")
    .unwrap();
    for i in 0..GUESTS {
        let d = m.get(&format!("g{i}")).unwrap();
        assert_eq!(d.state(), DomainState::Running);
        // Re-attached, not detached: monitor commands reach the fake.
        let reply = m
            .monitor_command(&format!("g{i}"), r#"{"execute":"query-status"}"#)
            .await
            .unwrap();
        assert!(reply.contains("running"), "{reply}");
    }
    m.close().await;
    for monitor in monitors {
        monitor.abort();
    }
}

/// Bound on every wait in the monitor-lost tests.
const LOST_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The monitor session the domain's run holds now.
fn session(m: &Manager, name: &str) -> Arc<crate::qmp::QmpClient> {
    let entry = m.find(name).unwrap();
    let data = entry.data();
    Arc::clone(&data.run.as_ref().expect("running").qmp)
}

/// SIGKILLs on drop the QEMU a test started, if that pid still runs its
/// domain's UUID (so a failing test leaves no QEMU behind).
struct KillOnDrop {
    pid: u32,
    uuid: String,
}

impl KillOnDrop {
    fn of(m: &Manager, name: &str) -> KillOnDrop {
        let d = m.get(name).unwrap();
        KillOnDrop {
            pid: d.pid,
            uuid: d.spec.unwrap().uuid,
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let runs = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&self.uuid));
        if runs {
            let _ = crate::launch::signal_process(self.pid, libc::SIGKILL);
        }
    }
}

/// Wait until `pid` no longer runs the QEMU `identity` names.
async fn wait_identity_gone(identity: &ProcessIdentity) {
    tokio::time::timeout(LOST_WAIT, crate::launch::wait_gone(identity))
        .await
        .expect("QEMU gone after destroy");
}

/// Real QEMU (TCG): the supervisor's monitor session ends while QEMU runs.
/// The domain stays running (never SHUTOFF), a second start is refused, the
/// watcher reconnects and commands work again, destroy stops QEMU.
#[tokio::test(flavor = "multi_thread")]
async fn test_lost_monitor_is_reconnected_and_the_domain_stays_running() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: lost\nmemory_mib: 64"), false)
        .await
        .unwrap();
    let d = m.start("lost", false).await.unwrap();
    let _kill = KillOnDrop::of(&m, "lost");
    let identity = m
        .find("lost")
        .unwrap()
        .data()
        .status
        .identity
        .clone()
        .unwrap();
    assert_eq!(identity.pid, d.pid);
    let old = session(&m, "lost");
    old.close();
    let deadline = std::time::Instant::now() + LOST_WAIT;
    loop {
        let d = m.get("lost").unwrap();
        assert_eq!((d.state(), d.pid), (DomainState::Running, identity.pid));
        match m
            .monitor_command("lost", r#"{"execute":"query-status"}"#)
            .await
        {
            Ok(reply) => {
                assert!(reply.contains(r#""status":"running""#), "{reply}");
                break;
            }
            Err(DomainError::Monitor { .. } | DomainError::MonitorLost { .. }) => {}
            Err(other) => panic!("{other}"),
        }
        assert!(std::time::Instant::now() < deadline, "monitor not back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!Arc::ptr_eq(&old, &session(&m, "lost")), "a new session");
    assert!(matches!(
        m.start("lost", false).await,
        Err(DomainError::WrongState { .. })
    ));
    // Events flow on the new session: a suspend is followed to PAUSED.
    assert_eq!(
        m.suspend("lost").await.unwrap().state(),
        DomainState::Paused
    );
    let d = m.destroy("lost", false).await.unwrap();
    assert_eq!(
        (d.state(), d.reason()),
        (DomainState::Shutoff, DomainStateReason::ShutoffDestroyed)
    );
    wait_identity_gone(&identity).await;
    m.close().await;
}

/// The monitor is lost and cannot be reached again (its socket file moved
/// away): the domain stays as it is, its calls answer MonitorLost naming the
/// pid, start is refused, and destroy still stops QEMU by its pid.
async fn lost_for_good(m: &Manager, name: &str) {
    let (identity, socket) = {
        let entry = m.find(name).unwrap();
        let data = entry.data();
        (
            data.status.identity.clone().unwrap(),
            std::path::PathBuf::from(&data.status.monitor_socket),
        )
    };
    std::fs::rename(&socket, socket.with_extension("moved")).unwrap();
    session(m, name).close();
    let deadline = std::time::Instant::now() + LOST_WAIT;
    loop {
        let d = m.get(name).unwrap();
        assert_eq!((d.state(), d.pid), (DomainState::Running, identity.pid));
        match m.suspend(name).await {
            Err(DomainError::MonitorLost { pid, .. }) => {
                assert_eq!(pid, identity.pid);
                break;
            }
            Err(DomainError::Monitor { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "never marked lost");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = crate::status::to_status(&m.suspend(name).await.unwrap_err());
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("lost"), "{}", status.message());
    assert!(matches!(
        m.start(name, false).await,
        Err(DomainError::WrongState { .. })
    ));
    identity.verify().await.expect("QEMU still runs");
    let d = m.destroy(name, false).await.unwrap();
    assert_eq!(
        (d.state(), d.reason(), d.pid),
        (DomainState::Shutoff, DomainStateReason::ShutoffDestroyed, 0)
    );
    wait_identity_gone(&identity).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_monitor_lost_for_good_keeps_the_domain_and_destroy_kills_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: gone-mon\nmemory_mib: 64"), false)
        .await
        .unwrap();
    m.start("gone-mon", false).await.unwrap();
    let _kill = KillOnDrop::of(&m, "gone-mon");
    lost_for_good(&m, "gone-mon").await;
    m.close().await;
}

/// As above for a QEMU adopted after a supervisor restart (not our child:
/// its end is seen by its identity only).
#[tokio::test(flavor = "multi_thread")]
async fn test_adopted_qemu_with_monitor_lost_for_good_is_destroyed_by_pid() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    m.define(spec("name: adopted\nmemory_mib: 64"), false)
        .await
        .unwrap();
    let pid = m.start("adopted", false).await.unwrap().pid;
    let _kill = KillOnDrop::of(&m, "adopted");
    // The supervisor goes away (its monitor session closes with it); the
    // next one re-attaches.
    m.close().await;
    drop(m);
    let m = open(&dir).await;
    let d = m.get("adopted").unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Running, pid));
    assert!(matches!(
        m.find("adopted").unwrap().data().run.as_ref().unwrap().proc,
        super::Proc::Adopted(_)
    ));
    lost_for_good(&m, "adopted").await;
    m.close().await;
}

#[tokio::test]
async fn test_a_stored_uuid_shaped_name_never_shadows_another_domain() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    let b = m.define(spec("name: b"), false).await.unwrap();
    let b_uuid = b.spec.unwrap().uuid;
    // Refused at define.
    match m.define(spec(&format!("name: {b_uuid}")), false).await {
        Err(DomainError::Spec(e)) => assert_eq!(e.field, "name"),
        other => panic!("{other:?}"),
    }
    m.close().await;
    // A definition stored before the rule: named like b's UUID.
    let store = Store::new(&dir.path().join("state"), &dir.path().join("run"));
    let legacy = DomainSpec {
        name: b_uuid.clone(),
        uuid: "4b9f1a52-3c1e-4f0a-9a57-1d2b3c4d5e6f".into(),
        memory_mib: 128,
        vcpus: 1,
        machine: "q35".into(),
        accel: 2,
        ..DomainSpec::default()
    };
    store
        .save_spec(&legacy, std::time::SystemTime::now())
        .unwrap();
    let m = open(&dir).await;
    assert_eq!(m.list(&[]).len(), 2, "the legacy definition is kept");
    // The key is ambiguous: refused, and neither domain goes.
    match m.undefine(&b_uuid, false, None).await {
        Err(e @ DomainError::Ambiguous { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&legacy.uuid) && text.contains("\"b\""),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.list(&[]).len(), 2);
    // Each stays reachable without ambiguity.
    assert_eq!(m.get("b").unwrap().spec.unwrap().uuid, b_uuid);
    assert_eq!(m.get(&legacy.uuid).unwrap().spec.unwrap().name, b_uuid);
    m.undefine(&legacy.uuid, false, None).await.unwrap();
    assert_eq!(m.get(&b_uuid).unwrap().spec.unwrap().name, "b");
}

#[tokio::test]
async fn test_definitions_are_refused_past_the_list_budget() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    // Definitions near the per-definition bound (7 x 4 KiB arguments).
    let big = |name: &str| {
        let mut s = spec(&format!("name: {name}"));
        s.extra_args = vec!["y".repeat(super::spec::MAX_EXTRA_ARG_BYTES); 7];
        s
    };
    let mut defined = 0;
    let refused = loop {
        assert!(defined < 200, "no refusal after {defined} definitions");
        match m.define(big(&format!("d{defined}")), false).await {
            Ok(_) => defined += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, DomainError::ListFull { .. }), "{refused}");
    let answer = qvirt_proto::v1::ListDomainsResponse {
        domains: m.list(&[]),
        next_page_token: String::new(),
    };
    let size = prost::Message::encoded_len(&answer);
    assert!(size <= super::LIST_BUDGET_BYTES, "{size}");
    assert!(size > super::LIST_BUDGET_BYTES - 64 * 1024, "{size}");
    // An update of the same size still fits (it replaces its own record).
    m.define(big("d0"), true).await.unwrap();
}

#[tokio::test]
async fn test_memory_and_vcpus_are_checked_against_the_host_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_memory_mib: Some(1024),
        max_vcpus: Some(2),
        ..config(&dir)
    };
    let m = Manager::open(config, Arc::new(LogEvents), Arc::new(NoHooks), None)
        .await
        .unwrap();
    m.define(spec("name: a\nmemory_mib: 1024\nvcpus: 2"), false)
        .await
        .unwrap();
    for (yaml, field) in [
        ("name: b\nmemory_mib: 1025", "memory_mib"),
        ("name: b\nvcpus: 3", "vcpus"),
    ] {
        match m.define(spec(yaml), false).await {
            Err(DomainError::Spec(e)) => assert_eq!(e.field, field),
            other => panic!("{yaml}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn test_a_domain_that_never_ran_has_no_run_dir_and_reloads_shut_off_since_defined() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    let defined = m.define(spec("name: a"), false).await.unwrap();
    // Define writes the definition only: start makes the run dir.
    assert!(!dir.path().join("run/a").exists());
    m.close().await;
    let m = open(&dir).await;
    let d = m.get("a").unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffUnknown);
    assert!(defined.state_change_time.is_some());
    assert_eq!(d.state_change_time, defined.state_change_time);
    assert_eq!(d.state_change_time, d.create_time);
    m.close().await;
}

/// Counts lifecycle events.
#[derive(Default)]
struct CountEvents(std::sync::atomic::AtomicUsize);

impl crate::seams::EventSink for CountEvents {
    fn monitor_event(&self, _: &crate::seams::DomainRef, _: &crate::qmp::QmpEvent) {}
    fn lifecycle(&self, _: &crate::seams::DomainRef, _: crate::seams::Lifecycle) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn with_etag(etag: &str) -> super::DefineOptions {
    super::DefineOptions {
        etag: etag.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn test_etags_change_with_definition_and_state_and_guard_updates() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    let first = m.define(spec("name: a"), false).await.unwrap().etag;
    assert!(!first.is_empty());
    assert_eq!(m.get("a").unwrap().etag, first, "a read changes nothing");
    let second = m
        .define(spec("name: a\nmemory_mib: 256"), true)
        .await
        .unwrap()
        .etag;
    assert_ne!(second, first);
    // A stale etag is refused and names the current one.
    match m
        .define_with(spec("name: a\nvcpus: 2"), with_etag(&first))
        .await
    {
        Err(DomainError::EtagMismatch { current, .. }) => assert_eq!(current, second),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.get("a").unwrap().spec.unwrap().vcpus, 1);
    // The current one updates (allow_update implied).
    let third = m
        .define_with(spec("name: a\nvcpus: 2"), with_etag(&second))
        .await
        .unwrap();
    assert_eq!(third.spec.unwrap().vcpus, 2);
    assert_ne!(third.etag, second);
    // A state change changes it too.
    let entry = m.find("a").unwrap();
    Manager::set_state(&entry, DomainState::Paused, DomainStateReason::PausedUser);
    assert_ne!(m.get("a").unwrap().etag, third.etag);
    // An etag for a domain that does not exist.
    assert!(matches!(
        m.define_with(spec("name: nope"), with_etag(&second)).await,
        Err(DomainError::EtagMismatch { .. })
    ));
}

#[tokio::test]
async fn test_validate_only_checks_everything_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(CountEvents::default());
    let m = Manager::open(config(&dir), events.clone(), Arc::new(NoHooks), None)
        .await
        .unwrap();
    m.define(spec("name: a"), false).await.unwrap();
    let etag = m.get("a").unwrap().etag;
    let files = |dir: &tempfile::TempDir| {
        let mut all = Vec::new();
        for sub in ["state/domains", "run"] {
            let mut stack = vec![dir.path().join(sub)];
            while let Some(p) = stack.pop() {
                if p.is_dir() {
                    stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                } else {
                    all.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        all.sort();
        all
    };
    let before = files(&dir);
    let sent = events.0.load(std::sync::atomic::Ordering::SeqCst);
    let validate = |yaml: &str, allow_update: bool, etag: &str| {
        let options = super::DefineOptions {
            allow_update,
            etag: etag.to_owned(),
            validate_only: true,
            request: None,
        };
        (spec(yaml), options)
    };
    // A new domain: the record it would be, with generated fields.
    let (s, o) = validate("name: v", false, "");
    let would = m.define_with(s, o).await.unwrap();
    assert_eq!(would.state(), DomainState::Shutoff);
    assert_eq!(would.spec.unwrap().uuid.len(), 36);
    assert!(matches!(m.get("v"), Err(DomainError::NotFound(_))));
    // An update.
    let (s, o) = validate("name: a\nmemory_mib: 512", true, "");
    assert_eq!(
        m.define_with(s, o).await.unwrap().spec.unwrap().memory_mib,
        512
    );
    assert_eq!(m.get("a").unwrap().spec.unwrap().memory_mib, 128);
    // Every check still applies.
    let (s, o) = validate("name: a", false, "");
    assert!(matches!(
        m.define_with(s, o).await,
        Err(DomainError::AlreadyExists { .. })
    ));
    let (s, o) = validate("name: a", false, "stale");
    assert!(matches!(
        m.define_with(s, o).await,
        Err(DomainError::EtagMismatch { .. })
    ));
    let (s, o) = validate("name: b\nvcpus: 100000", false, "");
    assert!(matches!(
        m.define_with(s, o).await,
        Err(DomainError::Spec(_))
    ));
    assert_eq!(files(&dir), before, "validate_only wrote to disk");
    assert_eq!(events.0.load(std::sync::atomic::Ordering::SeqCst), sent);
    assert_eq!(m.get("a").unwrap().etag, etag);
}

#[tokio::test]
async fn test_pages_see_every_domain_once_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&dir).await;
    for i in (0..250).rev() {
        m.define(spec(&format!("name: d{i:03}")), false)
            .await
            .unwrap();
    }
    m.define(spec("name: other"), false).await.unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, more) = m.list_page(&[], "d", after.as_deref(), 100);
        pages += 1;
        assert!(page.len() <= 100);
        seen.extend(page.iter().map(|d| d.spec.clone().unwrap().name));
        after = seen.last().cloned();
        if !more {
            break;
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..250).map(|i| format!("d{i:03}")).collect();
    assert_eq!(seen, want);
    // A page token past the prefix run, or before it.
    assert!(m.list_page(&[], "d", Some("e"), 10).0.is_empty());
    assert_eq!(m.list_page(&[], "d", Some("a"), 1).0.len(), 1);
    // A state filter.
    let (page, more) = m.list_page(&[DomainState::Running as i32], "", None, 100);
    assert!(page.is_empty() && !more);
}
