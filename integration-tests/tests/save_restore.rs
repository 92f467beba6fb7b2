//! SaveDomain and RestoreDomain with real QEMU (TCG), the real hook
//! executor running a `/bin/sh` qemu hook, and the real event bus.
//!
//! - A firmware-only guest: save gives SHUTOFF (SAVED), the image on disk,
//!   STOPPED (SAVED) and the stopped and release hooks; a restore with
//!   `paused` gives PAUSED with SUSPENDED (RESTORED) and resumes; a save
//!   that cannot write its image resumes the guest (SAVE_CANCELED); a
//!   restore without an image and a save of a shut-off domain are
//!   refused with their reasons.
//! - The test guest with its agent (Debian's kernel, busybox, qvirt-ga):
//!   a file written into its RAM (/tmp of the initramfs: no disk holds
//!   it) through the agent is read back after save, a supervisor restart
//!   and restore; a restore hook that changes the memory is refused in
//!   libvirt's words and starts nothing; one that edits only the metadata
//!   is applied.
//!
//! The hook script logs `OBJECT OP SUBOP EXTRA` to `calls`, keeps each
//! op's stdin, and for `restore` prints the file `restore-output` when it
//! exists (the filter's replacement definition).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qvirt_integration_tests::guest::{guest_image, guest_images, guest_yaml, serial};
use qvirt_integration_tests::{
    InternalChannel, QemuGuard, Service, define_yaml, free_port, internal_channel, runs_domain,
    start_supervisor, static_ga, tool_path,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::subscribe_domain_events_response::Kind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, Domain, DomainEventResumedDetail, DomainEventStartedDetail,
    DomainEventStoppedDetail, DomainEventSuspendedDetail, DomainEventType, DomainSpec, DomainState,
    DomainStateReason, GetDomainRequest, PingRequest, ReadFileRequest, RestoreDomainRequest,
    ResumeDomainRequest, SaveDomainRequest, StartDomainRequest, SubscribeDomainEventsRequest,
    SubscribeDomainEventsResponse, WriteFileRequest, domain_event,
};
use tonic::Code;

/// Bound on one RPC or event (saves and boots under TCG on 2 shared cores).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the guest's agent answering after a boot or a restore.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The hook executor over a hooks dir whose `qemu` script is described in
/// the module docs.
struct Hooks {
    dir: tempfile::TempDir,
    exec: Service,
}

impl Hooks {
    async fn start() -> Hooks {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let hooks = dir.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        let script = format!(
            "#!/bin/sh\n\
             printf '%s %s %s %s\\n' \"$1\" \"$2\" \"$3\" \"$4\" >> '{d}/calls'\n\
             cat > '{d}/stdin-'\"$2\"\n\
             if [ \"$2\" = restore ] && [ -e '{d}/restore-output' ]; then cat '{d}/restore-output'; fi\n\
             exit 0\n"
        );
        let path = hooks.join("qemu");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut exec = Service::start(
            "qvirt-hookexec",
            &[
                "--hooks-dir",
                hooks.to_str().unwrap(),
                "--timeout-secs",
                "60",
            ],
        );
        exec.wait_serving("").await;
        Hooks { dir, exec }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The calls logged since the last [`Hooks::take_calls`].
    fn take_calls(&self) -> Vec<String> {
        let calls = std::fs::read_to_string(self.path("calls")).unwrap_or_default();
        let _ = std::fs::remove_file(self.path("calls"));
        calls.lines().map(str::to_owned).collect()
    }

    /// The restore hook prints `spec` (or nothing, with `None`).
    fn restore_output(&self, spec: Option<&DomainSpec>) {
        match spec {
            Some(spec) => {
                std::fs::write(self.path("restore-output"), spec.to_yaml().unwrap()).unwrap()
            }
            None => {
                let _ = std::fs::remove_file(self.path("restore-output"));
            }
        }
    }
}

/// `f`, or a panic naming `what` after [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

async fn get(client: &mut SupervisorClient<InternalChannel>, name: &str) -> Domain {
    let request = GetDomainRequest {
        domain: name.into(),
        ..Default::default()
    };
    bounded("GetDomain", client.get_domain(request))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
}

async fn save(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
) -> Result<Domain, tonic::Status> {
    let request = SaveDomainRequest {
        domain: name.into(),
        ..Default::default()
    };
    bounded("SaveDomain", client.save_domain(request))
        .await
        .map(|r| r.into_inner().domain.unwrap())
}

async fn restore(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
    paused: bool,
) -> Result<Domain, tonic::Status> {
    let request = RestoreDomainRequest {
        domain: name.into(),
        paused,
        ..Default::default()
    };
    bounded("RestoreDomain", client.restore_domain(request))
        .await
        .map(|r| r.into_inner().domain.unwrap())
}

/// The status's message, after checking its code and ErrorInfo reason.
fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    reason: &str,
) -> String {
    match result {
        Err(status) if status.code() == code => {
            let got = qvirt_common::rpc::reason_of(&status);
            assert_eq!(got.as_deref(), Some(reason), "{status:?}");
            status.message().to_owned()
        }
        other => panic!("expected {code:?} {reason}, got {other:?}"),
    }
}

/// Lifecycle events of `domain` from the bus at `url`.
async fn lifecycle(url: String, domain: &str) -> tonic::Streaming<SubscribeDomainEventsResponse> {
    let mut bus = EventBusClient::new(internal_channel(url).await);
    let request = SubscribeDomainEventsRequest {
        domain: domain.into(),
        ..Default::default()
    };
    bus.subscribe_domain_events(request)
        .await
        .unwrap()
        .into_inner()
}

/// Read events from `stream` until (type, detail) `want` came; returns
/// every one read, in order.
async fn events_until(
    stream: &mut tonic::Streaming<SubscribeDomainEventsResponse>,
    want: (DomainEventType, domain_event::Detail),
) -> Vec<(DomainEventType, Option<domain_event::Detail>)> {
    let mut seen = Vec::new();
    loop {
        let msg = bounded("lifecycle event", stream.message())
            .await
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(e)) = msg.kind {
            seen.push((e.r#type(), e.detail));
            if (e.r#type(), e.detail) == (want.0, Some(want.1)) {
                return seen;
            }
        }
    }
}

fn stopped(detail: DomainEventStoppedDetail) -> (DomainEventType, domain_event::Detail) {
    (
        DomainEventType::Stopped,
        domain_event::Detail::Stopped(detail as i32),
    )
}

fn started(detail: DomainEventStartedDetail) -> (DomainEventType, domain_event::Detail) {
    (
        DomainEventType::Started,
        domain_event::Detail::Started(detail as i32),
    )
}

fn suspended(detail: DomainEventSuspendedDetail) -> (DomainEventType, domain_event::Detail) {
    (
        DomainEventType::Suspended,
        domain_event::Detail::Suspended(detail as i32),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn test_save_and_paused_restore_of_a_firmware_guest() {
    tool_path("qemu-system-x86_64");
    let hooks = Hooks::start().await;
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let dir = tempfile::tempdir().unwrap();
    let (hook_url, bus_url) = (hooks.exec.url(), bus.url());
    let extra = [
        "--start-timeout-secs",
        "60",
        "--hookexec",
        &hook_url,
        "--eventbus",
        &bus_url,
    ];
    let sup = start_supervisor(
        &dir.path().join("state"),
        &dir.path().join("run"),
        None,
        &extra,
    )
    .await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let mut events = lifecycle(bus.url(), "fw").await;

    let defined = define_yaml(&mut client, "name: fw\nmemory_mib: 64\naccel: tcg\n".into())
        .await
        .unwrap();
    let uuid = defined.spec.unwrap().uuid;
    // Nothing saved yet, nothing running.
    let message = refused(
        restore(&mut client, "fw", false).await,
        Code::FailedPrecondition,
        "NO_SAVED_IMAGE",
    );
    assert!(message.contains("no saved image"), "{message}");
    refused(
        save(&mut client, "fw").await,
        Code::FailedPrecondition,
        "DOMAIN_NOT_RUNNING",
    );

    let request = StartDomainRequest {
        domain: "fw".into(),
        ..Default::default()
    };
    let running = bounded("StartDomain", client.start_domain(request))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _qemu = QemuGuard(running.pid, uuid.clone());
    hooks.take_calls();

    // A save that cannot write its image (the save dir is a file here)
    // fails, and the guest it paused runs again (RUNNING, SAVE_CANCELED),
    // with no stop hook run and no image left.
    let save_dir = dir.path().join("state/save");
    std::fs::write(&save_dir, "").unwrap();
    // A storage failure is INTERNAL, its detail in the supervisor's log.
    refused(save(&mut client, "fw").await, Code::Internal, "INTERNAL");
    let kept = get(&mut client, "fw").await;
    assert_eq!(
        (kept.state(), kept.reason()),
        (DomainState::Running, DomainStateReason::RunningSaveCanceled)
    );
    assert_eq!(kept.pid, running.pid);
    assert!(kept.saved_image.is_empty(), "{kept:?}");
    assert!(hooks.take_calls().is_empty());
    events_until(
        &mut events,
        (
            DomainEventType::Resumed,
            domain_event::Detail::Resumed(DomainEventResumedDetail::Unpaused as i32),
        ),
    )
    .await;
    std::fs::remove_file(&save_dir).unwrap();

    let saved = save(&mut client, "fw").await.unwrap();
    assert_eq!(
        (saved.state(), saved.reason()),
        (DomainState::Shutoff, DomainStateReason::ShutoffSaved)
    );
    assert_eq!(saved.pid, 0);
    assert!(
        !runs_domain(running.pid, &uuid),
        "QEMU still runs after the save"
    );
    let image = Path::new(&saved.saved_image);
    assert_eq!(image, dir.path().join("state/save/fw.save"));
    // QEMU's migration stream (its magic "QEVM"), private to the supervisor.
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(&bytes[..4], b"QEVM");
    let mode = std::fs::metadata(image).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Save returns after its stop hooks, as Destroy.
    assert_eq!(
        hooks.take_calls(),
        ["fw stopped end -", "fw release end saved"]
    );
    let seen = events_until(&mut events, stopped(DomainEventStoppedDetail::Saved)).await;
    assert!(
        seen.contains(&(
            DomainEventType::Suspended,
            Some(domain_event::Detail::Suspended(
                DomainEventSuspendedDetail::Paused as i32
            ))
        )),
        "{seen:?}"
    );

    let restored = restore(&mut client, "fw", true).await.unwrap();
    let _qemu = QemuGuard(restored.pid, uuid.clone());
    assert_eq!(
        (restored.state(), restored.reason()),
        (DomainState::Paused, DomainStateReason::PausedUser)
    );
    assert_eq!(restored.saved_image, saved.saved_image, "the image is kept");
    assert_eq!(
        hooks.take_calls(),
        [
            "fw restore begin -",
            "fw prepare begin -",
            "fw start begin -",
            "fw started begin -"
        ]
    );
    events_until(&mut events, started(DomainEventStartedDetail::Restored)).await;
    events_until(&mut events, suspended(DomainEventSuspendedDetail::Restored)).await;
    let request = ResumeDomainRequest {
        domain: "fw".into(),
        ..Default::default()
    };
    let resumed = bounded("ResumeDomain", client.resume_domain(request))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(resumed.state(), DomainState::Running);
    let request = DestroyDomainRequest {
        domain: "fw".into(),
        ..Default::default()
    };
    bounded("DestroyDomain", client.destroy_domain(request))
        .await
        .unwrap();
}

/// Ping the guest's agent until it answers.
async fn wait_agent(agent: &mut GuestAgentClient<InternalChannel>, serial_log: &Path) {
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        let ping = agent.ping(PingRequest {
            domain: "guest".into(),
            timeout: seconds(Duration::from_secs(2)),
            ..Default::default()
        });
        match bounded("Ping", ping).await {
            Ok(_) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the guest's agent never answered ({e}); serial console:\n{}",
                serial(serial_log)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn seconds(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_restored_guest_keeps_its_memory_and_the_restore_hook_filters() {
    let image = match guest_image(&static_ga()) {
        Ok(image) => image,
        Err(why) => {
            eprintln!("skipped: the guest's packages cannot be fetched here: {why}");
            return;
        }
    };
    let hooks = Hooks::start().await;
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let dir = tempfile::tempdir().unwrap();
    let images = guest_images(dir.path(), &image);
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let sup_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agentd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (hook_url, bus_url) = (hooks.exec.url(), bus.url());
    let agentd_url = format!("http://{agentd_addr}");
    let image_root = images.root.to_str().unwrap();
    let extra = [
        "--start-timeout-secs",
        "60",
        "--hookexec",
        &hook_url,
        "--eventbus",
        &bus_url,
        "--agentd",
        &agentd_url,
        "--image-root",
        image_root,
    ];
    let mut sup = start_supervisor(&state, &run, Some(sup_addr), &extra).await;
    let mut agentd = Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let mut agent = GuestAgentClient::new(internal_channel(agentd.url()).await);
    let mut events = lifecycle(bus.url(), "guest").await;

    let serial_log = state.join("serial/guest/console.log");
    let defined = bounded(
        "DefineDomain",
        define_yaml(&mut client, guest_yaml("guest", &images, &serial_log)),
    )
    .await
    .unwrap();
    let uuid = defined.spec.clone().unwrap().uuid;
    let request = StartDomainRequest {
        domain: "guest".into(),
        ..Default::default()
    };
    let running = bounded("StartDomain", client.start_domain(request))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _qemu = QemuGuard(running.pid, uuid.clone());
    wait_agent(&mut agent, &serial_log).await;

    // Only the guest's RAM holds this file: its root is the initramfs.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let timeout = seconds(Duration::from_secs(30));
    let write = agent.write_file(WriteFileRequest {
        domain: "guest".into(),
        timeout,
        path: "/tmp/in-ram".into(),
        data: data.clone(),
        ..Default::default()
    });
    bounded("WriteFile", write).await.unwrap();

    let saved = save(&mut client, "guest").await.unwrap();
    assert_eq!(
        (saved.state(), saved.reason()),
        (DomainState::Shutoff, DomainStateReason::ShutoffSaved)
    );
    assert!(
        !runs_domain(running.pid, &uuid),
        "QEMU still runs after the save"
    );
    events_until(&mut events, stopped(DomainEventStoppedDetail::Saved)).await;

    // The saved state survives a supervisor restart.
    drop(client);
    sup.terminate();
    drop(sup);
    let _sup = start_supervisor(&state, &run, Some(sup_addr), &extra).await;
    let mut client = SupervisorClient::new(internal_channel(format!("http://{sup_addr}")).await);
    let found = get(&mut client, "guest").await;
    assert_eq!(
        (found.state(), found.reason(), found.saved_image.as_str()),
        (
            DomainState::Shutoff,
            DomainStateReason::ShutoffSaved,
            saved.saved_image.as_str()
        )
    );
    hooks.take_calls();

    // A restore hook that changes the memory: refused in libvirt's words,
    // nothing started, no stop hooks.
    let spec = found.spec.clone().unwrap();
    let bigger = DomainSpec {
        memory_mib: 256,
        ..spec.clone()
    };
    hooks.restore_output(Some(&bigger));
    let message = refused(
        restore(&mut client, "guest", false).await,
        Code::FailedPrecondition,
        "DEFINITION_INCOMPATIBLE",
    );
    assert!(
        message.contains("Target domain max memory 262144 does not match source 131072"),
        "{message}"
    );
    assert_eq!(hooks.take_calls(), ["guest restore begin -"]);
    assert_eq!(
        get(&mut client, "guest").await.state(),
        DomainState::Shutoff
    );
    // The hook read the definition as YAML on its stdin.
    let stdin = std::fs::read_to_string(hooks.path("stdin-restore")).unwrap();
    assert_eq!(DomainSpec::from_yaml(&stdin).unwrap(), spec);

    // One that edits only the metadata: applied.
    let mut tagged = spec.clone();
    tagged.metadata.insert("restored-by".into(), "hook".into());
    hooks.restore_output(Some(&tagged));
    let restored = restore(&mut client, "guest", false).await.unwrap();
    let _qemu = QemuGuard(restored.pid, uuid.clone());
    assert_eq!(
        (restored.state(), restored.reason()),
        (DomainState::Running, DomainStateReason::RunningRestored)
    );
    assert_eq!(
        restored
            .spec
            .unwrap()
            .metadata
            .get("restored-by")
            .map(String::as_str),
        Some("hook")
    );
    events_until(&mut events, started(DomainEventStartedDetail::Restored)).await;

    // The guest goes on where it was: the file is still in its RAM.
    wait_agent(&mut agent, &serial_log).await;
    let read = agent.read_file(ReadFileRequest {
        domain: "guest".into(),
        timeout,
        path: "/tmp/in-ram".into(),
        ..Default::default()
    });
    let back = bounded("ReadFile", read).await.unwrap().into_inner();
    assert!(
        back.data == data,
        "the file read back after the restore differs"
    );
}
