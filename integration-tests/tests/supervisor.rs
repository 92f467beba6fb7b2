//! `qvirt-supervisor` with real QEMU (TCG, no guest OS: QMP works without
//! one): define from YAML, start, state, suspend/resume, monitor commands,
//! destroy, a QEMU killed behind the supervisor's back, QEMU refusing to
//! start, a kill -9 of the supervisor itself, many guests at once, two
//! concurrent starts of one domain (one QEMU), starts queued behind an
//! Undefine (never a QEMU for an undefined domain), Define refusing
//! NUL in `cmdline` and socket paths too long for a unix socket, and a
//! monitor reply over 16 MiB failing only its command.
//!
//! Every QEMU a test starts is destroyed by the test or, if it fails
//! half-way, killed by pid on drop ([`Reaper`], which checks the pid still
//! runs that domain's UUID first). Every wait has a deadline.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    InternalChannel, Service, define_yaml, grpcurl_internal, internal_channel, kill_domain_qemu,
    start_supervisor, text, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, Domain, DomainState, DomainStateReason, GetDomainRequest,
    ListDomainsRequest, MonitorCommandRequest, RebootDomainRequest, ResetDomainRequest,
    ResumeDomainRequest, ShutdownDomainRequest, ShutdownMode, StartDomainRequest,
    SuspendDomainRequest, UndefineDomainRequest,
};
use tonic::Code;

/// Bound on waiting for a state the supervisor reports.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills, when the last clone is dropped, every QEMU a test started that
/// is still running.
#[derive(Clone, Default)]
struct Reaper(Arc<Tracked>);

/// The (pid, uuid) of every QEMU started.
#[derive(Default)]
struct Tracked(Mutex<Vec<(u32, String)>>);

impl Reaper {
    fn track(&self, d: &Domain) {
        let uuid = d.spec.as_ref().unwrap().uuid.clone();
        if d.pid != 0 {
            self.0.0.lock().unwrap().push((d.pid, uuid));
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        for (pid, uuid) in self.0.lock().unwrap().iter() {
            kill_domain_qemu(*pid, uuid);
        }
    }
}

/// A supervisor over state and run dirs that outlive it (for restarts).
struct Sup {
    svc: Service,
    client: SupervisorClient<InternalChannel>,
}

/// The dirs a test's supervisors share.
struct Dirs {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    run: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        // Fail loudly, naming `make deps`, when QEMU is missing.
        tool_path("qemu-system-x86_64");
        let tmp = tempfile::tempdir().unwrap();
        // QEMU runs as qvirt-qemu and opens images by path.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Dirs {
            state: tmp.path().join("state"),
            run: tmp.path().join("run"),
            _tmp: tmp,
        }
    }
}

impl Sup {
    async fn start(dirs: &Dirs) -> Sup {
        Self::start_with(dirs, None, &[]).await
    }

    /// As `start`, on `addr` when given, with `extra` flags.
    async fn start_with(dirs: &Dirs, addr: Option<SocketAddr>, extra: &[&str]) -> Sup {
        let mut args = vec![
            "--node-name",
            "it-node",
            // Many TCG guests start at once on 2 cores in some tests.
            "--start-timeout-secs",
            "60",
        ];
        args.extend_from_slice(extra);
        let svc = start_supervisor(&dirs.state, &dirs.run, addr, &args).await;
        let client = SupervisorClient::new(internal_channel(svc.url()).await);
        Sup { svc, client }
    }

    async fn define(&mut self, yaml: &str) -> Result<Domain, tonic::Status> {
        define_yaml(&mut self.client, yaml.to_owned()).await
    }

    async fn get(&mut self, name: &str) -> Result<Domain, tonic::Status> {
        self.client
            .get_domain(GetDomainRequest {
                domain: name.to_owned(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().domain.unwrap())
    }

    async fn start_domain(
        &mut self,
        name: &str,
        paused: bool,
        reaper: &Reaper,
    ) -> Result<Domain, tonic::Status> {
        let d = self
            .client
            .start_domain(StartDomainRequest {
                domain: name.to_owned(),
                paused,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().domain.unwrap())?;
        reaper.track(&d);
        Ok(d)
    }

    async fn destroy(&mut self, name: &str) -> Domain {
        self.client
            .destroy_domain(DestroyDomainRequest {
                domain: name.to_owned(),
                graceful: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
    }

    async fn monitor(&mut self, name: &str, json: &str) -> String {
        self.client
            .monitor_command(MonitorCommandRequest {
                domain: name.to_owned(),
                command_json: json.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .reply_json
    }

    /// Poll GetDomain until `state`, with a deadline.
    async fn wait_state(&mut self, name: &str, state: DomainState) -> Domain {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let d = self.get(name).await.unwrap();
            if d.state() == state {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not {state:?} within {STATE_TIMEOUT:?}: {:?}/{:?}; stderr:\n{}",
                d.state(),
                d.reason(),
                self.svc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn yaml(name: &str) -> String {
    format!("name: {name}\nmemory_mib: 64\naccel: tcg\n")
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Wait (with a deadline) until `pid` is gone.
async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_define_start_suspend_resume_monitor_destroy_undefine() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;

    let spec_yaml = "name: vm1\nuuid: 3f0c4a8e-1b2d-4c5e-8f90-a1b2c3d4e5f6\nmemory_mib: 64\naccel: tcg\nagent: true\n";
    let d = sup.define(spec_yaml).await.unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.host, "it-node");
    assert_eq!(d.spec.as_ref().unwrap().machine, "q35");
    assert!(dirs.state.join("domains/vm1.yaml").is_file());

    // Duplicates: same name; same UUID under another name.
    let err = sup.define(&yaml("vm1")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = sup
        .define("name: vm2\nuuid: 3F0C4A8E-1B2D-4C5E-8F90-A1B2C3D4E5F6\n")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("uuid"), "{}", err.message());
    // An unknown field names itself, its line and column.
    let err = sup.define("name: vm3\nmemroy_mib: 5\n").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown field `memroy_mib`") && err.message().contains("line 2"),
        "{}",
        err.message()
    );
    let err = sup.define("nmae: vm3\n").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown field `nmae`") && err.message().contains("line 1 column 1"),
        "{}",
        err.message()
    );
    let err = sup.define("name: \"a/b\"\n").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("name"), "{}", err.message());

    let d = sup.start_domain("vm1", false, &reaper).await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(d.reason(), DomainStateReason::RunningBooted);
    assert!(d.pid > 0 && pid_alive(d.pid));
    assert!(
        d.agent_socket.ends_with("vm1/agent.sock"),
        "{}",
        d.agent_socket
    );
    assert!(Path::new(&d.agent_socket).exists());
    let pid = d.pid;
    // By UUID too.
    let by_uuid = sup
        .get("3f0c4a8e-1b2d-4c5e-8f90-a1b2c3d4e5f6")
        .await
        .unwrap();
    assert_eq!(by_uuid.pid, pid);
    let err = sup.start_domain("vm1", false, &reaper).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let d = sup
        .client
        .suspend_domain(SuspendDomainRequest {
            domain: "vm1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(d.state(), DomainState::Paused);
    assert_eq!(d.reason(), DomainStateReason::PausedUser);
    let reply = sup.monitor("vm1", r#"{"execute":"query-status"}"#).await;
    assert!(reply.contains(r#""status":"paused""#), "{reply}");

    let d = sup
        .client
        .resume_domain(ResumeDomainRequest {
            domain: "vm1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(d.reason(), DomainStateReason::RunningUnpaused);

    // Reset and (ACPI) reboot are delivered; QEMU keeps running.
    let d = sup
        .client
        .reset_domain(ResetDomainRequest {
            domain: "vm1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Running, pid));
    let d = sup
        .client
        .reboot_domain(RebootDomainRequest {
            domain: "vm1".into(),
            mode: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Running, pid));

    // The raw monitor command through grpcurl, as an operator would.
    let addr = sup.svc.addr.to_string();
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"domain":"vm1","command_json":"{\"execute\":\"query-status\",\"id\":\"mine\"}"}"#,
        &addr,
        "qvirt.v1.Supervisor/MonitorCommand",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let body = text(&out.stdout);
    assert!(body.contains(r#"\"status\":\"running\""#), "{body}");
    assert!(
        !body.contains("mine"),
        "the caller's id is not echoed: {body}"
    );
    // A QMP error is a reply, not a failed call; bad JSON is INVALID_ARGUMENT.
    let reply = sup.monitor("vm1", r#"{"execute":"no-such-command"}"#).await;
    assert!(reply.contains("CommandNotFound"), "{reply}");
    let err = sup
        .client
        .monitor_command(MonitorCommandRequest {
            domain: "vm1".into(),
            command_json: "[1]".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A shutdown request a guest without an OS ignores: DEADLINE_EXCEEDED,
    // and the guest is left running.
    let out = grpcurl_internal(&[
        "-plaintext",
        "-d",
        r#"{"domain":"vm1","timeout":"0.3s"}"#,
        &addr,
        "qvirt.v1.Supervisor/ShutdownDomain",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("DeadlineExceeded"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(sup.get("vm1").await.unwrap().state(), DomainState::Running);
    assert!(pid_alive(pid));

    let err = sup
        .client
        .undefine_domain(UndefineDomainRequest {
            domain: "vm1".into(),
            destroy: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let d = sup.destroy("vm1").await;
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    assert_eq!(d.pid, 0);
    wait_gone(pid).await;

    sup.client
        .undefine_domain(UndefineDomainRequest {
            domain: "vm1".into(),
            destroy: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sup.get("vm1").await.unwrap_err().code(), Code::NotFound);
    assert!(!dirs.state.join("domains/vm1.yaml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_qemu_killed_behind_our_back_is_shutoff_crashed() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    sup.define(&yaml("victim")).await.unwrap();
    let d = sup.start_domain("victim", true, &reaper).await.unwrap();
    assert_eq!(d.state(), DomainState::Paused);
    assert_eq!(d.reason(), DomainStateReason::PausedStartingUp);
    // SAFETY: kill(2) on the QEMU this test just started.
    unsafe { libc::kill(d.pid as i32, libc::SIGKILL) };
    let d = sup.wait_state("victim", DomainState::Shutoff).await;
    assert_eq!(d.reason(), DomainStateReason::ShutoffCrashed);
    assert_eq!(d.pid, 0);
    // It starts again.
    let d = sup.start_domain("victim", false, &reaper).await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    let pid = d.pid;
    // Undefine with destroy stops it.
    sup.client
        .undefine_domain(UndefineDomainRequest {
            domain: "victim".into(),
            destroy: true,
            ..Default::default()
        })
        .await
        .unwrap();
    wait_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_qemu_start_failures_carry_qemu_message() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;

    // In the default image root (STATE_DIR/images), but missing.
    let missing = dirs.state.join("images/qvirt-test-missing.img");
    sup.define(&format!(
        "name: nodisk\nmemory_mib: 64\ndisks: [{{path: {}}}]\n",
        missing.display()
    ))
    .await
    .unwrap();
    let err = sup
        .start_domain("nodisk", false, &reaper)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&missing.display().to_string())
            && err.message().contains("No such file or directory")
            && err.message().contains("exit status: 1"),
        "{}",
        err.message()
    );
    let d = sup.get("nodisk").await.unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffFailed);

    sup.define("name: badarg\nmemory_mib: 64\nextra_args: [\"-bogus-option\"]\n")
        .await
        .unwrap();
    let err = sup
        .start_domain("badarg", false, &reaper)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("-bogus-option: invalid option"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_kill9_and_restart_loses_no_guest() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    for name in [
        "keep-running",
        "keep-paused",
        "dies-meanwhile",
        "never-started",
    ] {
        sup.define(&yaml(name)).await.unwrap();
    }
    let running = sup
        .start_domain("keep-running", false, &reaper)
        .await
        .unwrap();
    let paused = sup
        .start_domain("keep-paused", true, &reaper)
        .await
        .unwrap();
    let dies = sup
        .start_domain("dies-meanwhile", false, &reaper)
        .await
        .unwrap();

    // kill -9 the supervisor, then one QEMU while nobody watches.
    let sup_pid = sup.svc.pid();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup_pid as i32, libc::SIGKILL) };
    wait_gone(sup_pid).await;
    drop(sup);
    // SAFETY: kill(2) on a QEMU this test started.
    unsafe { libc::kill(dies.pid as i32, libc::SIGKILL) };
    wait_gone(dies.pid).await;
    assert!(pid_alive(running.pid) && pid_alive(paused.pid));

    let mut sup = Sup::start(&dirs).await;
    let d = sup.get("keep-running").await.unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Running, running.pid));
    assert_eq!(d.reason(), DomainStateReason::RunningBooted);
    let d = sup.get("keep-paused").await.unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Paused, paused.pid));
    let d = sup.get("dies-meanwhile").await.unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffCrashed);
    let d = sup.get("never-started").await.unwrap();
    assert_eq!(d.state(), DomainState::Shutoff);
    let all = sup
        .client
        .list_domains(ListDomainsRequest {
            states: vec![DomainState::Running as i32, DomainState::Paused as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domains;
    let names: Vec<_> = all
        .iter()
        .map(|d| d.spec.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["keep-paused", "keep-running"]);

    // Still controllable: suspend/resume, monitor, and its events followed.
    sup.client
        .resume_domain(ResumeDomainRequest {
            domain: "keep-paused".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let reply = sup
        .monitor("keep-paused", r#"{"execute":"query-status"}"#)
        .await;
    assert!(reply.contains(r#""running":true"#), "{reply}");
    // A `stop` behind the supervisor's back shows up through the STOP event.
    sup.monitor("keep-running", r#"{"execute":"stop"}"#).await;
    let d = sup.wait_state("keep-running", DomainState::Paused).await;
    assert_eq!(d.reason(), DomainStateReason::PausedUnknown);

    // An adopted QEMU killed behind our back is noticed (monitor EOF).
    // SAFETY: kill(2) on a QEMU this test started.
    unsafe { libc::kill(paused.pid as i32, libc::SIGKILL) };
    let d = sup.wait_state("keep-paused", DomainState::Shutoff).await;
    assert_eq!(d.reason(), DomainStateReason::ShutoffCrashed);

    // Destroying an adopted QEMU.
    let d = sup.destroy("keep-running").await;
    assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    wait_gone(running.pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_twenty_guests_at_once() {
    const GUESTS: usize = 20;
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    let names: Vec<String> = (0..GUESTS).map(|i| format!("many-{i:02}")).collect();
    for name in &names {
        sup.define(&yaml(name)).await.unwrap();
    }
    let starts = names.iter().enumerate().map(|(i, name)| {
        let mut client = sup.client.clone();
        let name = name.clone();
        let reaper = reaper.clone();
        tokio::spawn(async move {
            let d = client
                .start_domain(StartDomainRequest {
                    domain: name,
                    paused: i % 2 == 0,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .domain
                .unwrap();
            reaper.track(&d);
            d
        })
    });
    let started: Vec<Domain> = futures_join(starts).await;
    let mut pids: Vec<u32> = started.iter().map(|d| d.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), GUESTS);
    for (i, d) in started.iter().enumerate() {
        let want = if i % 2 == 0 {
            DomainState::Paused
        } else {
            DomainState::Running
        };
        assert_eq!(d.state(), want, "{}", d.spec.as_ref().unwrap().name);
    }
    let destroys = names.iter().map(|name| {
        let mut client = sup.client.clone();
        let name = name.clone();
        tokio::spawn(async move {
            client
                .destroy_domain(DestroyDomainRequest {
                    domain: name,
                    graceful: false,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .domain
                .unwrap()
        })
    });
    for d in futures_join(destroys).await {
        assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    }
    for pid in pids {
        wait_gone(pid).await;
    }
}

/// Join spawned tasks in order.
async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let handles: Vec<_> = tasks.collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sigterm_leaves_guests_running_for_the_next_supervisor() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    sup.define(&yaml("survivor")).await.unwrap();
    let d = sup.start_domain("survivor", false, &reaper).await.unwrap();
    let status = sup.svc.terminate();
    assert!(status.success(), "{status}");
    drop(sup);
    assert!(pid_alive(d.pid));
    let mut sup = Sup::start(&dirs).await;
    let again = sup.get("survivor").await.unwrap();
    assert_eq!((again.state(), again.pid), (DomainState::Running, d.pid));
    let reply = sup
        .monitor("survivor", r#"{"execute":"query-status"}"#)
        .await;
    assert!(reply.contains(r#""running":true"#), "{reply}");
    // A graceful destroy (SIGTERM only) of the adopted QEMU.
    let gone = sup
        .client
        .destroy_domain(DestroyDomainRequest {
            domain: "survivor".into(),
            graceful: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(gone.state(), DomainState::Shutoff);
    assert_eq!(gone.reason(), DomainStateReason::ShutoffDestroyed);
    wait_gone(d.pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_concurrent_calls_on_one_domain_are_serialised() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    sup.define(&yaml("busy")).await.unwrap();
    let d = sup.start_domain("busy", false, &reaper).await.unwrap();
    // Interleaved suspends and resumes: each one either does its work or
    // finds the domain already in the other state (FAILED_PRECONDITION for
    // a resume of a running domain), never an error from QEMU.
    let calls = (0..30).map(|i| {
        let mut client = sup.client.clone();
        tokio::spawn(async move {
            if i % 2 == 0 {
                client
                    .suspend_domain(SuspendDomainRequest {
                        domain: "busy".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            } else {
                client
                    .resume_domain(ResumeDomainRequest {
                        domain: "busy".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
        })
    });
    for result in futures_join(calls).await {
        if let Err(status) = result {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    // The recorded state is QEMU's.
    let state = sup.get("busy").await.unwrap().state();
    let reply = sup.monitor("busy", r#"{"execute":"query-status"}"#).await;
    let running = reply.contains(r#""running":true"#);
    assert_eq!(
        state == DomainState::Running,
        running,
        "{state:?} vs {reply}"
    );
    assert_eq!(sup.destroy("busy").await.state(), DomainState::Shutoff);
    wait_gone(d.pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_qmp_quit_is_shutoff_shutdown() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let mut sup = Sup::start(&dirs).await;
    sup.define(&yaml("quitter")).await.unwrap();
    let d = sup.start_domain("quitter", false, &reaper).await.unwrap();
    // QEMU may close the monitor before its reply is read: UNAVAILABLE.
    let sent = sup
        .client
        .monitor_command(MonitorCommandRequest {
            domain: "quitter".into(),
            command_json: r#"{"execute":"quit"}"#.into(),
            ..Default::default()
        })
        .await;
    if let Err(status) = &sent {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let after = sup.wait_state("quitter", DomainState::Shutoff).await;
    assert_eq!(after.reason(), DomainStateReason::ShutoffShutdown);
    wait_gone(d.pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_second_supervisor_on_the_same_dirs_exits_naming_the_lock_holder() {
    let dirs = Dirs::new();
    let first = Sup::start(&dirs).await;
    let port = qvirt_integration_tests::free_port().to_string();
    let out = qvirt_integration_tests::run(
        &qvirt_integration_tests::bin_path("qvirt-supervisor"),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            dirs.state.to_str().unwrap(),
            "--run-dir",
            dirs.run.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let lock = dirs.state.join("supervisor.lock");
    assert_eq!(
        lines,
        [format!(
            "qvirt-supervisor: state dir {} is in use by another qvirt-supervisor (pid {}, lock {})",
            dirs.state.display(),
            first.svc.pid(),
            lock.display()
        )],
        "{stderr}"
    );
    // Released with the process, even by kill -9: the next one starts.
    let pid = first.svc.pid();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid).await;
    drop(first);
    let _second = Sup::start(&dirs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_agent_mode_shutdown_and_reboot_need_an_agent_and_pass_its_failure_on() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    // The agent service asks this supervisor for agent sockets; the
    // supervisor asks it for guest-shutdown.
    let sup_addr = SocketAddr::from(([127, 0, 0, 1], qvirt_integration_tests::free_port()));
    let mut agentd = Service::start(
        "qvirt-agentd",
        &[
            "--supervisor",
            &format!("http://{sup_addr}"),
            "--sync-timeout-ms",
            "500",
            "--command-timeout-ms",
            "2000",
        ],
    );
    agentd.wait_serving("").await;
    let mut sup = Sup::start_with(&dirs, Some(sup_addr), &["--agentd", &agentd.url()]).await;
    sup.define(&yaml("plain")).await.unwrap();
    sup.define("name: with-agent\nmemory_mib: 64\naccel: tcg\nagent: true\n")
        .await
        .unwrap();
    sup.start_domain("plain", false, &reaper).await.unwrap();
    sup.start_domain("with-agent", false, &reaper)
        .await
        .unwrap();

    let shutdown = |domain: &str| ShutdownDomainRequest {
        domain: domain.into(),
        mode: ShutdownMode::Agent as i32,
        timeout: None,
        ..Default::default()
    };
    let reboot = |domain: &str| RebootDomainRequest {
        domain: domain.into(),
        mode: ShutdownMode::Agent as i32,
        ..Default::default()
    };
    let err = sup
        .client
        .shutdown_domain(shutdown("plain"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("has no guest agent"),
        "{}",
        err.message()
    );
    let err = sup.client.reboot_domain(reboot("plain")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // No OS, so no agent answers in the guest: agentd's UNAVAILABLE comes
    // through and the guest keeps running (never killed).
    let err = sup
        .client
        .shutdown_domain(shutdown("with-agent"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("with-agent"), "{}", err.message());
    let err = sup
        .client
        .reboot_domain(reboot("with-agent"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let d = sup.get("with-agent").await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    sup.destroy("with-agent").await;
    sup.destroy("plain").await;

    // Without an agent service configured, agent mode is refused.
    drop(sup);
    let mut sup = Sup::start(&dirs).await;
    let d = sup
        .start_domain("with-agent", false, &reaper)
        .await
        .unwrap();
    let err = sup
        .client
        .shutdown_domain(shutdown("with-agent"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no agent service"),
        "{}",
        err.message()
    );
    sup.destroy("with-agent").await;
    wait_gone(d.pid).await;
}

/// The pids of the live QEMUs whose command line holds `uuid`.
fn qemu_pids(uuid: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if pid_alive(pid) && qvirt_integration_tests::runs_domain(pid, uuid) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs on drop every QEMU still running one of the UUIDs (for QEMUs
/// the supervisor may have launched without answering with their pid).
#[derive(Default)]
struct UuidReaper(Mutex<Vec<String>>);

impl UuidReaper {
    fn track(&self, uuid: &str) {
        self.0.lock().unwrap().push(uuid.to_owned());
    }
}

impl Drop for UuidReaper {
    fn drop(&mut self) {
        for uuid in self.0.lock().unwrap().iter() {
            for pid in qemu_pids(uuid) {
                kill_domain_qemu(pid, uuid);
            }
        }
    }
}

/// Wait (with a deadline) until no QEMU runs `uuid`.
async fn wait_no_qemu(uuid: &str) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let pids = qemu_pids(uuid);
        if pids.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU {pids:?} of {uuid} still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_start_queued_behind_undefine_never_launches_qemu() {
    // Undefine(destroy) holds the domain's lock while it destroys; a Start
    // sent meanwhile found the domain before it was removed and waits for
    // the lock. It must answer NOT_FOUND (or FAILED_PRECONDITION when it
    // came first), never launch QEMU for a domain that no longer exists.
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let uuids = UuidReaper::default();
    let mut sup = Sup::start(&dirs).await;
    for round in 0..6 {
        let d = sup.define(&yaml("doomed")).await.unwrap();
        let uuid = d.spec.unwrap().uuid;
        uuids.track(&uuid);
        sup.start_domain("doomed", false, &reaper).await.unwrap();
        let mut undefine_client = sup.client.clone();
        let undefine = tokio::spawn(async move {
            undefine_client
                .undefine_domain(UndefineDomainRequest {
                    domain: "doomed".into(),
                    destroy: true,
                    ..Default::default()
                })
                .await
        });
        // Several Starts, so that some arrive while the destroy runs.
        let starts: Vec<_> = (0..4)
            .map(|i| {
                let mut client = sup.client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2 * i)).await;
                    client
                        .start_domain(StartDomainRequest {
                            domain: "doomed".into(),
                            paused: false,
                            ..Default::default()
                        })
                        .await
                })
            })
            .collect();
        undefine.await.unwrap().unwrap();
        for start in futures_join(starts.into_iter()).await {
            match start {
                Ok(r) => panic!(
                    "round {round}: a start of an undefined domain succeeded: {:?}",
                    r.into_inner().domain
                ),
                Err(status) => assert!(
                    matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
                    "round {round}: {status:?}"
                ),
            }
        }
        assert_eq!(
            sup.get("doomed").await.unwrap_err().code(),
            Code::NotFound,
            "round {round}"
        );
        wait_no_qemu(&uuid).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_two_concurrent_starts_launch_one_qemu() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let uuids = UuidReaper::default();
    let mut sup = Sup::start(&dirs).await;
    let uuid = sup.define(&yaml("twice")).await.unwrap().spec.unwrap().uuid;
    uuids.track(&uuid);
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let mut client = sup.client.clone();
            tokio::spawn(async move {
                client
                    .start_domain(StartDomainRequest {
                        domain: "twice".into(),
                        paused: false,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().domain.unwrap())
            })
        })
        .collect();
    let results = futures_join(starts.into_iter()).await;
    let ok: Vec<&Domain> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    reaper.track(ok[0]);
    assert_eq!(refused.len(), 1, "{results:?}");
    assert_eq!(refused[0].code(), Code::FailedPrecondition, "{results:?}");
    assert_eq!(qemu_pids(&uuid), [ok[0].pid]);
    assert_eq!(sup.destroy("twice").await.state(), DomainState::Shutoff);
    wait_no_qemu(&uuid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_define_refuses_nul_in_cmdline_and_socket_paths_too_long() {
    let tmp = tempfile::tempdir().unwrap();
    // A run dir deep enough that a 60-byte name's socket path passes the
    // 107 bytes a unix socket address holds.
    let run = tmp.path().join("r".repeat(40));
    let dirs = Dirs {
        state: tmp.path().join("state"),
        run,
        _tmp: tmp,
    };
    let mut sup = Sup::start(&dirs).await;
    let err = sup
        .define("name: nul\nkernel: /boot/vmlinuz\ncmdline: \"console=ttyS0\\0x\"\n")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("cmdline"), "{}", err.message());
    assert!(err.message().contains("NUL"), "{}", err.message());

    let long = "l".repeat(60);
    let err = sup.define(&yaml(&long)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("unix socket") && err.message().contains("monitor.sock"),
        "{}",
        err.message()
    );
    assert_eq!(sup.get(&long).await.unwrap_err().code(), Code::NotFound);
    // A short name under the same run dir is fine.
    sup.define(&yaml("short")).await.unwrap();
}

/// A MonitorCommand whose reply is over the 16 MiB QMP line limit (`xp` of
/// 3,000,000 bytes prints about 23 MB) fails with RESOURCE_EXHAUSTED; the
/// monitor stays up: the next command works, the domain stays RUNNING,
/// a second Start is refused (one QEMU per UUID), Destroy stops QEMU. The
/// calls are grpcurl's, as an operator makes them.
#[tokio::test(flavor = "multi_thread")]
async fn test_monitor_reply_over_16_mib_fails_only_that_command() {
    let dirs = Dirs::new();
    let reaper = Reaper::default();
    let uuids = UuidReaper::default();
    let mut sup = Sup::start(&dirs).await;
    let addr = sup.svc.addr.to_string();
    let call = |method: &str, body: &str| {
        grpcurl_internal(&[
            "-plaintext",
            "-d",
            body,
            &addr,
            &format!("qvirt.v1.Supervisor/{method}"),
        ])
    };
    let out = call("DefineDomain", r#"{"spec":{"name":"h","memory_mib":64}}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    uuids.track(&sup.get("h").await.unwrap().spec.unwrap().uuid);
    let out = call("StartDomain", r#"{"domain":"h"}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d = sup.get("h").await.unwrap();
    reaper.track(&d);
    assert_eq!(d.state(), DomainState::Running);
    let (pid, uuid) = (d.pid, d.spec.unwrap().uuid);

    let out = call(
        "MonitorCommand",
        r#"{"domain":"h","command_json":"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"xp /3000000xb 0\"}}"}"#,
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Code: ResourceExhausted")
            && stderr.contains("QMP reply longer than 16777216 bytes"),
        "{stderr}"
    );

    let out = call(
        "MonitorCommand",
        r#"{"domain":"h","command_json":"{\"execute\":\"query-status\"}"}"#,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r#"\"status\":\"running\""#),
        "{}",
        text(&out.stdout)
    );
    let d = sup.get("h").await.unwrap();
    assert_eq!((d.state(), d.pid), (DomainState::Running, pid));

    let out = call("StartDomain", r#"{"domain":"h"}"#);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Code: FailedPrecondition"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(qemu_pids(&uuid), [pid]);

    let out = call("DestroyDomain", r#"{"domain":"h"}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sup.get("h").await.unwrap().state(), DomainState::Shutoff);
    wait_gone(pid).await;
    wait_no_qemu(&uuid).await;
    // The monitor was never lost on the way.
    assert!(
        !sup.svc.stderr().contains("monitor lost"),
        "{}",
        sup.svc.stderr()
    );
}
