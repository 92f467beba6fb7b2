//! The supervisor starting QEMU through the launcher (`qvirt-vmm`), real
//! binaries and real QEMU (TCG) on the host: QEMU is the launcher's child,
//! not the supervisor's; it outlives the supervisor, the next supervisor
//! re-attaches and controls it; a QEMU that dies is reported through the
//! launcher; a launcher that is down makes a start UNAVAILABLE; and the
//! launcher starts only the binaries it allows.
//!
//! The container test of the same design (`docker-compose restart
//! supervisor`) is scripts/test-deploy.sh.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    ChildGuard, InternalChannel, QemuGuard, Service, bin_path, define_yaml, internal_channel,
    start_supervisor, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, DomainState, DomainStateReason, GetDomainRequest, MonitorCommandRequest,
    StartDomainRequest,
};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Dirs {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    run: PathBuf,
    socket: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        tool_path("qemu-system-x86_64");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Dirs {
            state: tmp.path().join("state"),
            run: tmp.path().join("run"),
            socket: tmp.path().join("vmm/vmm.sock"),
            _tmp: tmp,
        }
    }
}

/// A launcher on `socket`, ready (its socket exists) within the deadline.
fn start_launcher(socket: &Path, extra: &[&str]) -> ChildGuard {
    let mut command = Command::new(bin_path("qvirt-vmm"));
    command.arg("--socket").arg(socket).args(extra);
    let guard = ChildGuard::spawn(&mut command);
    let deadline = Instant::now() + TIMEOUT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qvirt-vmm never bound {socket:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    guard
}

async fn supervisor(dirs: &Dirs) -> (Service, SupervisorClient<InternalChannel>) {
    let socket = dirs.socket.to_str().unwrap();
    let svc = start_supervisor(
        &dirs.state,
        &dirs.run,
        None,
        &["--launcher-socket", socket, "--start-timeout-secs", "60"],
    )
    .await;
    let client = SupervisorClient::new(internal_channel(svc.url()).await);
    (svc, client)
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

async fn get(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
) -> qvirt_proto::v1::Domain {
    client
        .get_domain(GetDomainRequest {
            domain: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
}

async fn wait_state(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
    state: DomainState,
) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let d = get(client, name).await;
        if d.state() == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {:?}, not {state:?}",
            d.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
) -> Result<qvirt_proto::v1::Domain, tonic::Status> {
    client
        .start_domain(StartDomainRequest {
            domain: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().domain.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn test_guest_started_by_the_launcher_outlives_the_supervisor() {
    let dirs = Dirs::new();
    let launcher = start_launcher(&dirs.socket, &[]);
    let (svc, mut client) = supervisor(&dirs).await;
    let d = define_yaml(
        &mut client,
        "name: kept\nmemory_mib: 64\naccel: tcg\n".into(),
    )
    .await
    .unwrap();
    let uuid = d.spec.unwrap().uuid;
    let d = start(&mut client, "kept").await.unwrap();
    let _guard = QemuGuard(d.pid, uuid.clone());
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(
        parent_of(d.pid),
        launcher.id(),
        "QEMU must be the launcher's child"
    );

    // The supervisor and everything in its process group die; QEMU stays.
    svc.signal(libc::SIGKILL);
    // SAFETY: kill(2) on the process group of the supervisor this test started.
    unsafe { libc::kill(-(svc.pid() as i32), libc::SIGKILL) };
    drop(svc);
    assert!(alive(d.pid), "QEMU died with the supervisor");

    let (_svc, mut client) = supervisor(&dirs).await;
    let again = get(&mut client, "kept").await;
    assert_eq!((again.state(), again.pid), (DomainState::Running, d.pid));
    let reply = client
        .monitor_command(MonitorCommandRequest {
            domain: "kept".into(),
            command_json: r#"{"execute":"query-status"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .reply_json;
    assert!(reply.contains(r#""running":true"#), "{reply}");
    let d = client
        .destroy_domain(DestroyDomainRequest {
            domain: "kept".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    drop(launcher);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_crash_is_reported_and_a_down_launcher_is_unavailable() {
    let dirs = Dirs::new();
    let mut launcher = start_launcher(&dirs.socket, &[]);
    let (_svc, mut client) = supervisor(&dirs).await;
    let d = define_yaml(
        &mut client,
        "name: crash\nmemory_mib: 64\naccel: tcg\n".into(),
    )
    .await
    .unwrap();
    let uuid = d.spec.unwrap().uuid;
    let d = start(&mut client, "crash").await.unwrap();
    let _guard = QemuGuard(d.pid, uuid);
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(d.pid as i32, libc::SIGKILL) };
    wait_state(&mut client, "crash", DomainState::Shutoff).await;
    assert_eq!(
        get(&mut client, "crash").await.reason(),
        DomainStateReason::ShutoffCrashed
    );

    launcher.terminate();
    let status = start(&mut client, "crash").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("launcher"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_launcher_starts_only_allowed_binaries() {
    let dirs = Dirs::new();
    let _launcher = start_launcher(&dirs.socket, &["--allow-binary", "/bin/true"]);
    let (_svc, mut client) = supervisor(&dirs).await;
    define_yaml(&mut client, "name: no\nmemory_mib: 64\naccel: tcg\n".into())
        .await
        .unwrap();
    let status = start(&mut client, "no").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not allowed"),
        "{}",
        status.message()
    );
}

/// A program that fails at once through the launcher: its own exit status
/// and its stderr (the log descriptor the launcher passed on) come back,
/// not a guess.
#[tokio::test(flavor = "multi_thread")]
async fn test_startup_failure_reports_the_programs_status_and_output() {
    use qvirt_supervisor::launch::{LaunchConfig, LaunchError, launch};
    let dirs = Dirs::new();
    let _launcher = start_launcher(&dirs.socket, &["--allow-binary", "sh"]);
    let config = LaunchConfig {
        binary: PathBuf::from("sh"),
        // The monitor arguments land in $1.. and are ignored.
        args: ["-c", "echo 'fake qemu: no such machine' >&2; exit 3", "sh"]
            .into_iter()
            .map(Into::into)
            .collect(),
        run_dir: dirs.run.join("fails"),
        log_path: dirs.state.join("fails.log"),
        handshake_timeout: TIMEOUT,
        credentials: None,
        launcher: Some(dirs.socket.clone()),
    };
    std::fs::create_dir_all(&dirs.state).unwrap();
    match launch(&config, Vec::new()).await {
        Err(LaunchError::Exited { status, log_tail }) => {
            assert_eq!(status.code(), Some(3), "{status}");
            assert_eq!(log_tail, "fake qemu: no such machine");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}
