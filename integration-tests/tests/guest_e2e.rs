//! A real guest end to end: the supervisor boots a tiny Linux guest under
//! TCG (Debian's kernel, a busybox initramfs from
//! `scripts/build-test-guest.sh`) whose only agent is the statically
//! linked qvirt-ga (built here as `make static-ga` builds it) on the
//! virtio-serial port `org.qemu.guest_agent.0`; agentd finds the guest's
//! agent socket through the supervisor. Covers what no unix-listen test
//! can: the static binary running inside a minimal guest, virtio-serial
//! framing through QEMU, and the supervisor's agent-mode shutdown.
//!
//! Needs `apt-get download` to reach Debian's mirrors for the kernel and
//! busybox (cached in target/test-guest); without them the test says it
//! skipped and why.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qvirt_integration_tests::{Service, free_port, start_supervisor, static_ga};
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DefineDomainRequest, DestroyDomainRequest, DomainState, ExecRequest, FileReadRequest,
    FileWriteRequest, InfoRequest, OsInfoRequest, PingRequest, ShutdownDomainRequest, ShutdownMode,
    StartDomainRequest, define_domain_request, guest_exec_status,
};

/// Booting under TCG takes ~2 s alone; tests share 2 cores.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Per agent command once the guest is up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kernel and initramfs with `agent` inside, or why they cannot be built
/// here.
fn guest_image(agent: &Path) -> Result<(PathBuf, PathBuf), String> {
    let out = repo().join("target/test-guest");
    let result = Command::new("bash")
        .arg(repo().join("scripts/build-test-guest.sh"))
        .arg(&out)
        .arg(agent)
        .output()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).trim().to_owned());
    }
    Ok((out.join("vmlinux"), out.join("initramfs")))
}

fn serial(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no serial log: {e})"))
}

#[tokio::test(flavor = "multi_thread")]
async fn test_static_qvirt_ga_in_a_real_guest_through_supervisor_and_agentd() {
    let ga = static_ga();
    let (vmlinux, initramfs) = match guest_image(&ga) {
        Ok(image) => image,
        Err(why) => {
            eprintln!("test_static_qvirt_ga_in_a_real_guest skipped: no guest image: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let agentd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agentd_url = format!("http://{agentd_addr}");
    let sup = start_supervisor(&state, &run, None, &["--agentd", &agentd_url]).await;
    let mut agentd = Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let mut supervisor = SupervisorClient::connect(sup.url()).await.unwrap();
    let mut agent = GuestAgentClient::connect(agentd.url()).await.unwrap();

    let serial_log = dir.path().join("serial.log");
    let spec = format!(
        "name: guest\nmemory_mib: 128\nvcpus: 1\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {}\ncmdline: console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check\nagent: true\nserial_log: {}\n",
        vmlinux.display(),
        initramfs.display(),
        serial_log.display()
    );
    supervisor
        .define_domain(DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(spec)),
            allow_update: false,
        })
        .await
        .unwrap();
    let started = Instant::now();
    supervisor
        .start_domain(StartDomainRequest {
            domain: "guest".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A guard that kills QEMU by pid if the test fails before shutdown.
    let destroy = scopeguard(sup.url());

    // Until the guest's agent answers: agentd resynchronises each time.
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        let ping = agent
            .ping(PingRequest {
                domain: "guest".into(),
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
            })
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
    let timeout = Some(prost_types::Duration {
        seconds: COMMAND_TIMEOUT.as_secs() as i64,
        nanos: 0,
    });

    // qemu-ga's identity, from qvirt-ga inside the guest.
    let info = agent
        .info(InfoRequest {
            domain: "guest".into(),
            timeout,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, "7.2.22");
    assert!(
        info.supported_commands
            .iter()
            .any(|c| c.name == "guest-exec" && c.enabled)
    );
    // The guest's kernel, not the host's.
    let os = agent
        .os_info(OsInfoRequest {
            domain: "guest".into(),
            timeout,
        })
        .await
        .unwrap()
        .into_inner();
    let cache = std::fs::read_dir(repo().join("target/test-guest/cache"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| {
            Some(
                n.strip_suffix(".done")?
                    .strip_prefix("linux-image-")?
                    .to_owned(),
            )
        })
        .unwrap();
    assert_eq!(os.kernel_release, cache);
    assert_eq!(os.machine, "x86_64");

    // A command run in the guest, waited for, output captured.
    let exec = agent
        .exec(ExecRequest {
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
        })
        .await
        .unwrap()
        .into_inner();
    let status = exec.status.unwrap();
    assert!(status.exited);
    assert_eq!(
        status.termination,
        Some(guest_exec_status::Termination::ExitCode(3))
    );
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "hello from x86_64\n"
    );

    // A file written into the guest and read back, bytes exact.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    agent
        .file_write(FileWriteRequest {
            domain: "guest".into(),
            timeout,
            path: "/tmp/qvirt-e2e".into(),
            data: data.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let back = agent
        .file_read(FileReadRequest {
            domain: "guest".into(),
            timeout,
            path: "/tmp/qvirt-e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(back.data == data, "the file read back differs");

    // Shutdown through the agent: guest-shutdown runs the guest's
    // /sbin/shutdown, the guest powers off, the supervisor sees it.
    let down = supervisor
        .shutdown_domain(ShutdownDomainRequest {
            domain: "guest".into(),
            mode: ShutdownMode::Agent as i32,
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "agent shutdown: {e}; serial console:\n{}",
                serial(&serial_log)
            )
        })
        .into_inner();
    assert_eq!(down.domain.unwrap().state, DomainState::Shutoff as i32);
    drop(destroy);
}

/// Destroys domain "guest" when dropped (a no-op once it is shut off), so
/// a failed assertion leaves no QEMU behind.
fn scopeguard(url: String) -> impl Drop {
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let url = self.0.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut c) = SupervisorClient::connect(url).await {
                        let _ = c
                            .destroy_domain(DestroyDomainRequest {
                                domain: "guest".into(),
                                ..Default::default()
                            })
                            .await;
                    }
                });
            })
            .join();
        }
    }
    Guard(url)
}
