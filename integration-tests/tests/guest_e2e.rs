//! A real guest end to end: the supervisor boots a tiny Linux guest under
//! TCG (Debian's kernel, a busybox initramfs from
//! `scripts/build-test-guest.sh`) whose only agent is the statically
//! linked qvirt-ga (as `make static-ga` builds it) on the virtio-serial
//! port `org.qemu.guest_agent.0`; agentd finds the guest's agent socket
//! through the supervisor. Covers what no unix-listen test can: the static
//! binary running inside a minimal guest, virtio-serial through QEMU, and
//! the supervisor's agent-mode shutdown, which, waiting, returns only
//! after the stop path's hooks (a slow release hook) have run.
//!
//! Needs `apt-get download` to reach Debian's mirrors for the kernel and
//! busybox (kept in target/test-guest/cache); where the packages cannot be
//! fetched (the script exits 77), the test says it skipped and why; any
//! other failure of the script fails the test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use qvirt_integration_tests::guest::{guest_image, guest_images, guest_yaml, serial};
use qvirt_integration_tests::{
    QemuGuard, Service, define_yaml, free_port, internal_channel, start_supervisor, static_ga, text,
};
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DomainState, ExecRequest, GetAgentInfoRequest, GetOsInfoRequest, PingRequest, ReadFileRequest,
    ShutdownDomainRequest, ShutdownMode, StartDomainRequest, WriteFileRequest, guest_exec_status,
};

/// Booting under TCG takes ~3 s alone; tests share 2 cores.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Per agent command once the guest is up (agentd's own deadline).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Per RPC, on the client's side: above every server-side deadline here.
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// `f`, or a panic naming `what` after [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

fn seconds(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn test_static_qvirt_ga_in_a_real_guest_through_supervisor_and_agentd() {
    let ga = static_ga();
    let image = match guest_image(&ga) {
        Ok(image) => image,
        Err(why) => {
            eprintln!(
                "test_static_qvirt_ga_in_a_real_guest skipped: the guest's packages cannot be fetched here: {why}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    // QEMU runs as qvirt-qemu and reads kernel and initrd by path: they go
    // in an image root it can reach (the repo's target dir may not be).
    let images = guest_images(dir.path(), &image);
    let agentd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agentd_url = format!("http://{agentd_addr}");
    let image_root = images.root.to_str().unwrap();
    // A qemu hook logging its argv, its release call a second late.
    let hooks = dir.path().join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    let calls = dir.path().join("calls");
    std::fs::write(
        hooks.join("qemu"),
        format!(
            "#!/bin/sh\ncat > /dev/null\nif [ \"$2\" = release ]; then sleep 1; fi\n\
             printf '%s %s %s %s\\n' \"$1\" \"$2\" \"$3\" \"$4\" >> '{}'\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        hooks.join("qemu"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut hookexec = Service::start("qvirt-hookexec", &["--hooks-dir", hooks.to_str().unwrap()]);
    hookexec.wait_serving("").await;
    let sup = start_supervisor(
        &state,
        &run,
        None,
        &[
            "--agentd",
            &agentd_url,
            "--image-root",
            image_root,
            "--hookexec",
            &hookexec.url(),
        ],
    )
    .await;
    let mut agentd = Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let mut supervisor = SupervisorClient::new(internal_channel(sup.url()).await);
    let mut agent = GuestAgentClient::new(internal_channel(agentd.url()).await);

    // The domain's own serial dir.
    let serial_log = state.join("serial/guest/console.log");
    let spec = guest_yaml("guest", &images, &serial_log);
    let defined = bounded("DefineDomain", define_yaml(&mut supervisor, spec))
        .await
        .unwrap();
    let uuid = defined.spec.unwrap().uuid;
    let started = Instant::now();
    let running = bounded(
        "StartDomain",
        supervisor.start_domain(StartDomainRequest {
            domain: "guest".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .domain
    .unwrap();
    // Declared after the services: dropped (QEMU killed) before them.
    let _qemu = QemuGuard(running.pid, uuid);

    // Until the guest's agent answers: agentd resynchronises each time.
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        let ping = bounded(
            "Ping",
            agent.ping(PingRequest {
                domain: "guest".into(),
                timeout: seconds(Duration::from_secs(2)),
                ..Default::default()
            }),
        )
        .await;
        match ping {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the guest's agent never answered ({e}); serial console:\n{}",
                serial(&serial_log)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("agent answered {:?} after the start", started.elapsed());
    let timeout = seconds(COMMAND_TIMEOUT);

    // qemu-ga's identity, from qvirt-ga inside the guest.
    let info = bounded(
        "GetAgentInfo",
        agent.get_agent_info(GetAgentInfoRequest {
            domain: "guest".into(),
            timeout,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(info.version, "7.2.22");
    assert!(
        info.supported_commands
            .iter()
            .any(|c| c.name == "guest-exec" && c.enabled)
    );
    // The guest's kernel, not the host's; asked of the host the supervisor
    // reports the domain on.
    let os = bounded(
        "GetOsInfo",
        agent.get_os_info(GetOsInfoRequest {
            domain: "guest".into(),
            host: running.host.clone(),
            timeout,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        Some(os.kernel_release.as_str()),
        image.kernel_package.strip_prefix("linux-image-")
    );
    assert_eq!(os.machine, "x86_64");

    // A command run in the guest, waited for, output captured.
    let exec = bounded(
        "Exec",
        agent.exec(ExecRequest {
            domain: "guest".into(),
            timeout,
            path: "/bin/busybox".into(),
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo hello from $(uname -m); exit 3".into(),
            ],
            capture_output: true,
            wait: true,
            wait_timeout: timeout,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let status = exec.status.unwrap();
    assert!(status.exited);
    assert_eq!(
        status.termination,
        Some(guest_exec_status::Termination::ExitCode(3))
    );
    assert_eq!(text(&status.stdout), "hello from x86_64\n");

    // A file written into the guest and read back, bytes exact.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    bounded(
        "WriteFile",
        agent.write_file(WriteFileRequest {
            domain: "guest".into(),
            timeout,
            path: "/tmp/qvirt-e2e".into(),
            data: data.clone(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let back = bounded(
        "ReadFile",
        agent.read_file(ReadFileRequest {
            domain: "guest".into(),
            timeout,
            path: "/tmp/qvirt-e2e".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(back.data == data, "the file read back differs");

    // Shutdown through the agent: guest-shutdown runs the guest's
    // /sbin/shutdown, the guest powers off, the supervisor sees it.
    let down = bounded(
        "ShutdownDomain",
        supervisor.shutdown_domain(ShutdownDomainRequest {
            domain: "guest".into(),
            mode: ShutdownMode::Agent as i32,
            timeout: seconds(Duration::from_secs(60)),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "agent shutdown: {e}; serial console:\n{}",
            serial(&serial_log)
        )
    })
    .into_inner();
    assert_eq!(down.domain.unwrap().state, DomainState::Shutoff as i32);
    // Already there when the call returned: no waiting here.
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(
        calls.ends_with("guest stopped end -\nguest release end shutdown\n"),
        "{calls}"
    );
}
