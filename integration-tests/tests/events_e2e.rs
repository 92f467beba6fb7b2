//! The supervisor and the event bus together, with real QEMU: a subscriber
//! of the bus sees what the guest does, as `virsh qemu-monitor-event` and
//! `virsh event --event lifecycle` would: suspend and resume produce QMP
//! STOP and RESUME monitor events and SUSPENDED and RESUMED lifecycle
//! events, in order, with QEMU's timestamps; a failed start is STOPPED
//! (FAILED) and a monitor `quit` is SHUTDOWN (HOST) then STOPPED (SHUTDOWN).
//! A subscriber resuming with a cursor of a bus that restarted since is
//! told so (`BUS_RESTARTED`) and then gets the supervisor's new events.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use qvirt_integration_tests::{
    InternalChannel, QemuGuard, Service, define_yaml, internal_channel, start_supervisor, tool_path,
};
use qvirt_proto::v1::event_bus_client::EventBusClient;
use qvirt_proto::v1::subscribe_domain_events_response::Kind as DomainKind;
use qvirt_proto::v1::subscribe_monitor_events_response::Kind as MonitorKind;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, DomainEventDefinedDetail, DomainEventShutdownDetail,
    DomainEventStartedDetail, DomainEventStoppedDetail, DomainEventType, EventsLostReason,
    MonitorCommandRequest, ResumeDomainRequest, StartDomainRequest, SubscribeDomainEventsRequest,
    SubscribeMonitorEventsRequest, SuspendDomainRequest, define_domain_request, domain_event,
};

const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A supervisor publishing to the bus at `bus_url`, its state in `dir`.
async fn supervisor(dir: &std::path::Path, bus_url: &str) -> Service {
    let extra = ["--node-name", "e2e-node", "--eventbus", bus_url];
    start_supervisor(&dir.join("state"), &dir.join("run"), None, &extra).await
}

/// Defines domain `name` (TCG, no OS) and starts it running; returns its
/// UUID and the guard that kills its QEMU if the test stops half-way.
async fn define_and_start(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
) -> (String, QemuGuard) {
    let yaml = format!("name: {name}\nmemory_mib: 128\naccel: tcg\n");
    let defined = define_yaml(client, yaml).await.unwrap();
    let uuid = defined.spec.unwrap().uuid;
    let started = client
        .start_domain(StartDomainRequest {
            domain: name.into(),
            paused: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    (uuid.clone(), QemuGuard(started.pid, uuid))
}

#[tokio::test(flavor = "multi_thread")]
async fn test_suspend_and_resume_reach_bus_subscribers() {
    tool_path("qemu-system-x86_64");
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let dirs = tempfile::tempdir().unwrap();
    let sup = supervisor(dirs.path(), &bus.url()).await;

    let mut events = EventBusClient::new(internal_channel(bus.url()).await);
    let mut monitor = events
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            domain: "e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut lifecycle = events
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for first in [
        monitor.message().await.unwrap().unwrap().kind,
        lifecycle
            .message()
            .await
            .unwrap()
            .unwrap()
            .kind
            .map(|k| match k {
                DomainKind::Established(e) => MonitorKind::Established(e),
                other => panic!("{other:?}"),
            }),
    ] {
        assert!(matches!(first, Some(MonitorKind::Established(_))));
    }

    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let (uuid, _guard) = define_and_start(&mut client, "e2e").await;
    client
        .suspend_domain(SuspendDomainRequest {
            domain: "e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .resume_domain(ResumeDomainRequest {
            domain: "e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Monitor events: the cont of the start, then STOP, then RESUME.
    let mut names = Vec::new();
    while !names.ends_with(&["STOP".to_owned(), "RESUME".to_owned()]) {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, monitor.message())
            .await
            .expect("monitor event in time")
            .unwrap()
            .unwrap();
        match msg.kind {
            Some(MonitorKind::Event(e)) => {
                assert_eq!(
                    (e.domain_name.as_str(), e.domain_uuid.as_str()),
                    ("e2e", uuid.as_str())
                );
                assert_eq!(e.host, "e2e-node");
                assert!(e.timestamp_seconds > 1_600_000_000, "QEMU's own timestamp");
                names.push(e.event);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Lifecycle events: ... SUSPENDED then RESUMED.
    let mut kinds = Vec::new();
    let want = [
        DomainEventType::Suspended as i32,
        DomainEventType::Resumed as i32,
    ];
    while !kinds.ends_with(&want) {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, lifecycle.message())
            .await
            .expect("lifecycle event in time")
            .unwrap()
            .unwrap();
        match msg.kind {
            Some(DomainKind::Event(e)) => {
                assert_eq!(e.domain_uuid, uuid);
                assert_eq!(
                    (e.host.as_str(), e.domain_name.as_str()),
                    ("e2e-node", "e2e")
                );
                kinds.push(e.r#type);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        kinds.contains(&(DomainEventType::Started as i32)),
        "a STARTED event precedes: {kinds:?}"
    );

    client
        .destroy_domain(DestroyDomainRequest {
            domain: "e2e".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_republishes_to_a_restarted_bus() {
    tool_path("qemu-system-x86_64");
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let bus_addr = bus.addr;
    let dirs = tempfile::tempdir().unwrap();
    let sup = supervisor(dirs.path(), &bus.url()).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let (_, _guard) = define_and_start(&mut client, "again").await;

    // Where a subscriber got to on the first bus: after the start's events.
    let (first_epoch, cursor) = {
        let mut c = EventBusClient::new(internal_channel(bus.url()).await);
        let mut s = c
            .subscribe_monitor_events(SubscribeMonitorEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        match s.message().await.unwrap().unwrap().kind {
            Some(MonitorKind::Established(e)) => {
                assert!(e.last_sequence > 0, "the start published events");
                (e.epoch, e.last_cursor)
            }
            other => panic!("{other:?}"),
        }
    };

    // The bus goes away and comes back on the same address, empty.
    assert!(bus.terminate().success());
    drop(bus);
    let mut bus = Service::start_at("qvirt-eventbus", bus_addr, &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let mut events = EventBusClient::new(internal_channel(bus.url()).await);
    // Resuming after the first bus's cursor: the new bus says plainly
    // that the history it named is gone.
    let mut monitor = events
        .subscribe_monitor_events(SubscribeMonitorEventsRequest {
            domain: "again".into(),
            event: "STOP".into(),
            resume_after: cursor,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match monitor.message().await.unwrap().unwrap().kind {
        Some(MonitorKind::Established(e)) => {
            assert_ne!(
                e.epoch, first_epoch,
                "a restarted bus is a new sequence space"
            );
        }
        other => panic!("{other:?}"),
    }
    match monitor.message().await.unwrap().unwrap().kind {
        Some(MonitorKind::Lost(lost)) => {
            assert_eq!(lost.reason(), EventsLostReason::BusRestarted, "{lost:?}");
        }
        other => panic!("expected BUS_RESTARTED, got {other:?}"),
    }

    client
        .suspend_domain(SuspendDomainRequest {
            domain: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let msg = tokio::time::timeout(MESSAGE_TIMEOUT, monitor.message())
        .await
        .expect("the supervisor reconnects and publishes to the new bus")
        .unwrap()
        .unwrap();
    match msg.kind {
        Some(MonitorKind::Event(e)) => assert_eq!(e.event, "STOP"),
        other => panic!("{other:?}"),
    }
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "again".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The next lifecycle event (type, detail) of `stream`, with a deadline.
async fn next_lifecycle(
    stream: &mut tonic::Streaming<qvirt_proto::v1::SubscribeDomainEventsResponse>,
) -> (DomainEventType, Option<domain_event::Detail>) {
    loop {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, stream.message())
            .await
            .expect("lifecycle event in time")
            .unwrap()
            .unwrap();
        match msg.kind {
            Some(DomainKind::Event(e)) => return (e.r#type(), e.detail),
            Some(DomainKind::Established(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_failed_start_is_stopped_failed_and_a_host_quit_is_shutdown_host() {
    tool_path("qemu-system-x86_64");
    let mut bus = Service::start("qvirt-eventbus", &[]);
    bus.wait_serving("qvirt.v1.EventBus").await;
    let dirs = tempfile::tempdir().unwrap();
    let sup = supervisor(dirs.path(), &bus.url()).await;
    let mut events = EventBusClient::new(internal_channel(bus.url()).await);
    let mut lifecycle = events
        .subscribe_domain_events(SubscribeDomainEventsRequest {
            domain: "ev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);

    // QEMU refuses an option: the start fails, STOPPED (FAILED) follows.
    let define = |extra: &str, update: bool| DefineDomainRequest {
        source: Some(define_domain_request::Source::SpecYaml(format!(
            "name: ev\nmemory_mib: 64\naccel: tcg\n{extra}"
        ))),
        allow_update: update,
        ..Default::default()
    };
    client
        .define_domain(define("extra_args: [-bogus-option]\n", false))
        .await
        .unwrap();
    let err = client
        .start_domain(StartDomainRequest {
            domain: "ev".into(),
            paused: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        next_lifecycle(&mut lifecycle).await.0,
        DomainEventType::Defined
    );
    assert_eq!(
        next_lifecycle(&mut lifecycle).await,
        (
            DomainEventType::Stopped,
            Some(domain_event::Detail::Stopped(
                DomainEventStoppedDetail::Failed as i32
            ))
        )
    );

    // A `quit` over the monitor is a host-initiated SHUTDOWN (QMP
    // `guest: false`): SHUTDOWN (HOST), then STOPPED (SHUTDOWN).
    client.define_domain(define("", true)).await.unwrap();
    let started = client
        .start_domain(StartDomainRequest {
            domain: "ev".into(),
            paused: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    let _guard = QemuGuard(started.pid, started.spec.unwrap().uuid);
    // QEMU may close the monitor before its reply is read: the answer
    // does not matter, the events do.
    let _ = client
        .monitor_command(MonitorCommandRequest {
            domain: "ev".into(),
            command_json: r#"{"execute":"quit"}"#.into(),
            ..Default::default()
        })
        .await;
    let mut seen = Vec::new();
    loop {
        let event = next_lifecycle(&mut lifecycle).await;
        let done = event.0 == DomainEventType::Stopped;
        seen.push(event);
        if done {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            (
                DomainEventType::Defined,
                Some(domain_event::Detail::Defined(
                    DomainEventDefinedDetail::Updated as i32
                ))
            ),
            (
                DomainEventType::Started,
                Some(domain_event::Detail::Started(
                    DomainEventStartedDetail::Booted as i32
                ))
            ),
            (
                DomainEventType::Shutdown,
                Some(domain_event::Detail::Shutdown(
                    DomainEventShutdownDetail::Host as i32
                ))
            ),
            (
                DomainEventType::Stopped,
                Some(domain_event::Detail::Stopped(
                    DomainEventStoppedDetail::Shutdown as i32
                ))
            ),
        ]
    );
}
