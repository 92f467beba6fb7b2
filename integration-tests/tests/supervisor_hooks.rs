//! `qvirt-supervisor` running libvirt-style hooks through the real
//! `qvirt-hookexec`, with real `/bin/sh` hook scripts and real QEMU (TCG):
//! a refusing prepare or started hook aborts the start with the script's
//! message; scripts see libvirt's argv and the definition on stdin; stopped
//! and release run after a destroy, a kill -9 of QEMU and a failed start;
//! the reconnect hook runs after a kill -9 of the supervisor, and a
//! refusing one destroys the guest; an unreachable executor refuses starts;
//! the daemon hook sees the supervisor start and stop; SIGHUP runs the
//! daemon reload hook and reads the config again where safe; chatty scripts do
//! not make a hook answer too large; a hook past the supervisor's call
//! timeout is killed before the stop path's hooks run; a start whose client
//! gave up (deadline) still completes with exactly one QEMU; a domain
//! hanging in its prepare hook does not hold up another's start; a guest
//! that died while the supervisor was down gets its stopped and release
//! hooks at the next start-up.
//!
//! The scripts log `OBJECT OP SUBOP EXTRA` lines to `calls`, save their
//! stdin per op, and fail (exit 3, a message on stderr) when a file
//! `fail-OBJECT-OP` exists, so one discovery serves every case. Every QEMU
//! a test starts is killed on drop ([`QemuReaper`], by scanning for its
//! domain UUID). Every wait has a deadline.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    InternalChannel, Service, define_yaml, free_port, internal_channel, start_supervisor, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, Domain, DomainSpec, DomainState, DomainStateReason, GetDomainRequest,
    StartDomainRequest,
};
use tonic::Code;

/// Bound on waiting for a state or a hook call.
const WAIT: Duration = Duration::from_secs(30);

/// The pids of the QEMUs whose command line holds `uuid`.
fn qemu_pids(uuid: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        if running && qvirt_integration_tests::runs_domain(pid, uuid) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs on drop every QEMU still running one of the UUIDs.
#[derive(Default)]
struct QemuReaper(std::sync::Mutex<Vec<String>>);

impl QemuReaper {
    fn track(&self, uuid: &str) {
        self.0.lock().unwrap().push(uuid.to_owned());
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for uuid in self.0.lock().unwrap().iter() {
            for pid in qemu_pids(uuid) {
                qvirt_integration_tests::kill_domain_qemu(pid, uuid);
            }
        }
    }
}

/// A hooks dir with logging scripts, a running hook executor over it, and
/// state/run dirs for supervisors.
struct World {
    tmp: tempfile::TempDir,
    hookexec: Service,
    reaper: QemuReaper,
}

/// The hook script: logs `hung hook still running` to `calls` if the
/// process in `hang.pid` still runs, takes a second first when
/// `slow-OBJECT-OP` exists, logs its argv to `calls`, keeps its stdin in
/// `stdin-OBJECT-OP`, hangs (a `sleep 616` child, its pid in `hang.pid`)
/// when `hang-OBJECT-OP` exists, fails when `fail-OBJECT-OP` exists.
fn script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "#!/bin/sh\n\
         if [ -e '{d}/hang.pid' ]; then\n\
         \x20 st=$(cut -d' ' -f3 /proc/$(cat '{d}/hang.pid')/stat 2>/dev/null)\n\
         \x20 case \"$st\" in ''|Z|X) ;; *) echo 'hung hook still running' >> '{d}/calls';; esac\n\
         fi\n\
         if [ -e '{d}/slow-'\"$1-$2\" ]; then sleep 1; fi\n\
         printf '%s %s %s %s\\n' \"$1\" \"$2\" \"$3\" \"$4\" >> '{d}/calls'\n\
         cat > '{d}/stdin-'\"$1-$2\"\n\
         if [ -e '{d}/hang-'\"$1-$2\" ]; then\n\
         \x20 sleep 616 &\n\
         \x20 echo $! > '{d}/hang.pid'\n\
         \x20 wait\n\
         fi\n\
         if [ -e '{d}/fail-'\"$1-$2\" ]; then\n\
         \x20 echo \"policy refuses $2 of $1\" >&2\n\
         \x20 exit 3\n\
         fi\n\
         exit 0\n"
    )
}

impl World {
    async fn new() -> World {
        World::with_script(script).await
    }

    /// A world whose hook scripts are `script(dir)`, `dir` the world's
    /// temp dir.
    async fn with_script(script: impl Fn(&Path) -> String) -> World {
        tool_path("qemu-system-x86_64");
        let tmp = tempfile::tempdir().unwrap();
        let hooks = tmp.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        for driver in ["qemu", "daemon"] {
            let path = hooks.join(driver);
            std::fs::write(&path, script(tmp.path())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut hookexec = Service::start(
            "qvirt-hookexec",
            &[
                "--hooks-dir",
                hooks.to_str().unwrap(),
                "--timeout-secs",
                "30",
            ],
        );
        hookexec.wait_serving("").await;
        World {
            tmp,
            hookexec,
            reaper: QemuReaper::default(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Make hook `op` fail for `object` (or succeed again).
    fn set_failing(&self, object: &str, op: &str, failing: bool) {
        let path = self.path(&format!("fail-{object}-{op}"));
        if failing {
            std::fs::write(path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The hook calls logged so far, one `OBJECT OP SUBOP EXTRA` each.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Forget the calls logged so far.
    fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.path("calls"));
    }

    /// The hook calls logged so far for `object`.
    fn calls_of(&self, object: &str) -> Vec<String> {
        let prefix = format!("{object} ");
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(&prefix))
            .collect()
    }

    /// Wait until the calls for `object` (hooks of different domains may
    /// interleave) are exactly `want`.
    async fn wait_calls_of(&self, object: &str, want: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let calls = self.calls_of(object);
            if calls == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hook calls for {object} {calls:?}, not {want:?} within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn supervisor(&self, hookexec_url: &str) -> Sup {
        self.supervisor_with(hookexec_url, &[]).await
    }

    async fn supervisor_with(&self, hookexec_url: &str, extra: &[&str]) -> Sup {
        let mut args = vec!["--start-timeout-secs", "60", "--hookexec", hookexec_url];
        args.extend_from_slice(extra);
        let svc = start_supervisor(&self.path("state"), &self.path("run"), None, &args).await;
        let client = SupervisorClient::new(internal_channel(svc.url()).await);
        Sup { svc, client }
    }
}

struct Sup {
    svc: Service,
    client: SupervisorClient<InternalChannel>,
}

impl Sup {
    async fn define(&mut self, world: &World, name: &str) -> Domain {
        let yaml = format!("name: {name}\nmemory_mib: 64\naccel: tcg\n");
        let d = define_yaml(&mut self.client, yaml).await.unwrap();
        world.reaper.track(&d.spec.as_ref().unwrap().uuid);
        d
    }

    async fn start(&mut self, name: &str) -> Result<Domain, tonic::Status> {
        self.client
            .start_domain(StartDomainRequest {
                domain: name.to_owned(),
                paused: false,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().domain.unwrap())
    }

    /// Destroys `name` (not graceful); the call must succeed.
    async fn destroy(&mut self, name: &str) {
        self.client
            .destroy_domain(DestroyDomainRequest {
                domain: name.to_owned(),
                graceful: false,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn get(&mut self, name: &str) -> Domain {
        self.client
            .get_domain(GetDomainRequest {
                domain: name.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
    }

    async fn wait_state(&mut self, name: &str, state: DomainState) -> Domain {
        let deadline = Instant::now() + WAIT;
        loop {
            let d = self.get(name).await;
            if d.state() == state {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not {state:?} within {WAIT:?}: {:?}; stderr:\n{}",
                d.state(),
                self.svc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_no_qemu(uuid: &str) {
    let deadline = Instant::now() + WAIT;
    while !qemu_pids(uuid).is_empty() {
        assert!(Instant::now() < deadline, "QEMU of {uuid} still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_failing_prepare_hook_aborts_start_with_its_message() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let d = sup.define(&world, "vm").await;
    let uuid = d.spec.unwrap().uuid;
    world.clear_calls();
    world.set_failing("vm", "prepare", true);

    let err = sup.start("vm").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("policy refuses prepare of vm"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("prepare begin"), "{}", err.message());
    let d = sup.get("vm").await;
    assert_eq!(d.state(), DomainState::Shutoff);
    assert_eq!(d.reason(), DomainStateReason::ShutoffFailed);
    assert!(qemu_pids(&uuid).is_empty(), "QEMU spawned after a refusal");
    // As libvirt: no start, but the stop path's hooks run.
    assert_eq!(
        world.calls(),
        [
            "vm prepare begin -",
            "vm stopped end -",
            "vm release end failed"
        ]
    );

    // A refusing start hook: still no QEMU (the hook runs right before
    // the spawn), stopped and release follow.
    world.set_failing("vm", "prepare", false);
    world.set_failing("vm", "start", true);
    world.clear_calls();
    let err = sup.start("vm").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("policy refuses start of vm"),
        "{}",
        err.message()
    );
    assert!(qemu_pids(&uuid).is_empty(), "QEMU spawned after a refusal");
    assert!(!world.path("state/logs/vm.log").exists());
    assert_eq!(
        world.calls(),
        [
            "vm prepare begin -",
            "vm start begin -",
            "vm stopped end -",
            "vm release end failed"
        ]
    );

    // The policy lifted, the same domain starts.
    world.set_failing("vm", "start", false);
    let d = sup.start("vm").await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    sup.destroy("vm").await;
    wait_no_qemu(&uuid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_failing_started_hook_kills_the_spawned_qemu() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    world.clear_calls();
    world.set_failing("vm", "started", true);
    let err = sup.start("vm").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("policy refuses started of vm"),
        "{}",
        err.message()
    );
    // QEMU did run (the QEMU log has this start) and was killed.
    let log = std::fs::read_to_string(world.path("state/logs/vm.log")).unwrap();
    assert!(log.contains(&uuid), "{log}");
    assert!(qemu_pids(&uuid).is_empty(), "QEMU left running");
    let d = sup.get("vm").await;
    assert_eq!(
        (d.state(), d.reason(), d.pid),
        (DomainState::Shutoff, DomainStateReason::ShutoffFailed, 0)
    );
    assert_eq!(
        world.calls(),
        [
            "vm prepare begin -",
            "vm start begin -",
            "vm started begin -",
            "vm stopped end -",
            "vm release end failed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_hooks_see_argv_and_definition_and_stop_hooks_follow_destroy_and_kill9() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let defined = sup.define(&world, "vm").await.spec.unwrap();
    world.clear_calls();

    let d = sup.start("vm").await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(
        world.calls(),
        [
            "vm prepare begin -",
            "vm start begin -",
            "vm started begin -"
        ]
    );
    // stdin: the definition as YAML, the same document for every hook.
    let stdin = std::fs::read_to_string(world.path("stdin-vm-prepare")).unwrap();
    let spec = DomainSpec::from_yaml(&stdin).unwrap();
    assert_eq!(spec, defined);
    for op in ["start", "started"] {
        let other = std::fs::read_to_string(world.path(&format!("stdin-vm-{op}"))).unwrap();
        assert_eq!(other, stdin, "{op}");
    }

    // Destroy: stopped and release, in that order; a start right after
    // it waits for them (a slow release hook is not overtaken).
    world.clear_calls();
    std::fs::write(world.path("slow-vm-release"), "").unwrap();
    sup.destroy("vm").await;
    let d = sup.start("vm").await.unwrap();
    assert_eq!(
        world.calls_of("vm"),
        [
            "vm stopped end -",
            "vm release end destroyed",
            "vm prepare begin -",
            "vm start begin -",
            "vm started begin -"
        ]
    );
    std::fs::remove_file(world.path("slow-vm-release")).unwrap();

    // kill -9 of QEMU behind the supervisor's back: stopped and release.
    world.clear_calls();
    qvirt_integration_tests::kill_domain_qemu(d.pid, &defined.uuid);
    let d = sup.wait_state("vm", DomainState::Shutoff).await;
    assert_eq!(d.reason(), DomainStateReason::ShutoffCrashed);
    world
        .wait_calls_of("vm", &["vm stopped end -", "vm release end crashed"])
        .await;
}

/// DestroyDomain returns after the stopped and release hooks have run, as
/// libvirt's destroy does: a client that destroys and then cleans up can
/// rely on them having finished (a slow release hook is waited for).
#[tokio::test(flavor = "multi_thread")]
async fn test_destroy_returns_after_its_stop_hooks() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    sup.define(&world, "vm").await;
    sup.start("vm").await.unwrap();
    world.clear_calls();
    std::fs::write(world.path("slow-vm-release"), "").unwrap();
    sup.destroy("vm").await;
    // No waiting: the hooks' lines are there when the call returns.
    assert_eq!(
        world.calls_of("vm"),
        ["vm stopped end -", "vm release end destroyed"]
    );
}

/// The supervisor is killed while a start waits in its started hook (QEMU
/// spawned, not yet reported): the next supervisor finds that QEMU and
/// re-attaches to it, so the domain is not SHUTOFF with an orphan QEMU
/// holding its disks, and a second Start cannot spawn another one.
#[tokio::test(flavor = "multi_thread")]
async fn test_supervisor_killed_during_the_started_hook_reattaches_its_qemu() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    world.clear_calls();
    std::fs::write(world.path("hang-vm-started"), "").unwrap();
    let mut client = sup.client.clone();
    let start = tokio::spawn(async move {
        client
            .start_domain(StartDomainRequest {
                domain: "vm".to_owned(),
                paused: false,
                ..Default::default()
            })
            .await
    });
    world
        .wait_calls_of(
            "vm",
            &[
                "vm prepare begin -",
                "vm start begin -",
                "vm started begin -",
            ],
        )
        .await;
    let pids = qemu_pids(&uuid);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup.svc.pid() as i32, libc::SIGKILL) };
    let _ = start.await;
    drop(sup);
    std::fs::remove_file(world.path("hang-vm-started")).unwrap();

    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let d = sup.get("vm").await;
    assert_ne!(d.state(), DomainState::Shutoff, "{d:?}");
    assert_eq!(d.pid, pids[0]);
    let refused = sup.start("vm").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert_eq!(qemu_pids(&uuid), pids);
    sup.destroy("vm").await;
    assert!(qemu_pids(&uuid).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_reconnect_hook_after_supervisor_kill9_and_a_refusing_one_destroys() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    sup.define(&world, "kept").await;
    let doomed_uuid = sup.define(&world, "doomed").await.spec.unwrap().uuid;
    let kept = sup.start("kept").await.unwrap();
    let doomed = sup.start("doomed").await.unwrap();
    assert_eq!(qemu_pids(&doomed_uuid), [doomed.pid]);

    let sup_pid = sup.svc.pid();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup_pid as i32, libc::SIGKILL) };
    drop(sup);
    world.clear_calls();
    world.set_failing("doomed", "reconnect", true);

    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let d = sup.get("kept").await;
    assert_eq!((d.state(), d.pid), (DomainState::Running, kept.pid));
    let d = sup.wait_state("doomed", DomainState::Shutoff).await;
    assert_eq!(d.reason(), DomainStateReason::ShutoffDestroyed);
    wait_no_qemu(&doomed_uuid).await;
    world
        .wait_calls_of(
            "doomed",
            &[
                "doomed reconnect begin -",
                "doomed stopped end -",
                "doomed release end destroyed",
            ],
        )
        .await;
    assert_eq!(world.calls_of("kept"), ["kept reconnect begin -"]);
    // The kept guest is still controllable.
    sup.destroy("kept").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unreachable_executor_refuses_start_unavailable() {
    let world = World::new().await;
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let mut sup = world.supervisor(&nobody).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    let err = sup.start("vm").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("hook executor unavailable"),
        "{}",
        err.message()
    );
    let d = sup.get("vm").await;
    assert_eq!(
        (d.state(), d.reason()),
        (DomainState::Shutoff, DomainStateReason::ShutoffFailed)
    );
    assert!(qemu_pids(&uuid).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_daemon_hook_sees_start_and_shutdown() {
    let world = World::new().await;
    world.clear_calls();
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    assert_eq!(world.calls(), ["- start - start"]);
    let status = sup.svc.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(world.calls(), ["- start - start", "- shutdown - shutdown"]);
    // The daemon hook gets nothing on stdin.
    let stdin = std::fs::read(world.path("stdin---start")).unwrap();
    assert!(stdin.is_empty());
}

/// SIGHUP: the supervisor runs the daemon hook `- reload begin SIGHUP`,
/// as libvirtd, and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn test_sighup_runs_the_daemon_reload_hook() {
    let world = World::new().await;
    world.clear_calls();
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    sup.svc.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.calls().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no reload hook: {:?}",
            world.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(world.calls(), ["- start - start", "- reload begin SIGHUP"]);
    sup.svc.wait_serving("qvirt.v1.Supervisor").await;
    let status = sup.svc.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(
        world.calls(),
        [
            "- start - start",
            "- reload begin SIGHUP",
            "- shutdown - shutdown"
        ]
    );
}

/// SIGHUP reads the supervisor's config file again: `hook_stdin_format`
/// and `max_vcpus` take effect for the next start and define (the daemon
/// reload hook ran first); a changed `qemu_binary` is named as needing a
/// restart and keeps its running value (the next start still works); a
/// file that no longer loads changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn test_sighup_reads_the_config_again_where_safe() {
    let world = World::new().await;
    let config = world.path("supervisor.yaml");
    std::fs::write(&config, "hook_stdin_format: yaml\nmax_vcpus: 1\n").unwrap();
    let mut sup = world
        .supervisor_with(
            &world.hookexec.url(),
            &["--config", config.to_str().unwrap()],
        )
        .await;
    sup.define(&world, "vm").await;
    sup.start("vm").await.unwrap();
    let stdin = std::fs::read_to_string(world.path("stdin-vm-prepare")).unwrap();
    assert!(stdin.contains("name: vm"), "{stdin}");
    sup.destroy("vm").await;
    let two = "name: two\nmemory_mib: 64\nvcpus: 2\naccel: tcg\n".to_owned();
    let refused = define_yaml(&mut sup.client, two.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    std::fs::write(
        &config,
        "hook_stdin_format: libvirt-xml\nmax_vcpus: 2\nqemu_binary: /nonexistent/qemu\n",
    )
    .unwrap();
    world.clear_calls();
    sup.svc.signal(libc::SIGHUP);
    sup.svc.wait_log("SIGHUP: config read again", WAIT).await;
    assert_eq!(world.calls(), ["- reload begin SIGHUP"]);
    let log = sup.svc.stderr();
    let restart = log
        .lines()
        .find(|l| l.contains("applied only by a restart"))
        .unwrap_or_else(|| panic!("no restart warning:\n{log}"));
    assert!(
        restart.contains("qemu_binary") && !restart.contains("max_vcpus"),
        "{restart}"
    );
    let d = define_yaml(&mut sup.client, two).await.unwrap();
    world.reaper.track(&d.spec.unwrap().uuid);
    sup.start("vm").await.unwrap();
    let stdin = std::fs::read_to_string(world.path("stdin-vm-prepare")).unwrap();
    assert!(stdin.starts_with("<domain type=\"qemu\">"), "{stdin}");
    sup.destroy("vm").await;

    std::fs::write(&config, "hook_stdin_format: [\n").unwrap();
    sup.svc.signal(libc::SIGHUP);
    sup.svc.wait_log("the config does not load", WAIT).await;
    std::fs::remove_file(world.path("stdin-vm-prepare")).unwrap();
    sup.start("vm").await.unwrap();
    let stdin = std::fs::read_to_string(world.path("stdin-vm-prepare")).unwrap();
    assert!(stdin.starts_with("<domain"), "{stdin}");
    sup.destroy("vm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_executor_down_at_reconnect_keeps_the_guest() {
    let mut world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    let d = sup.start("vm").await.unwrap();
    let sup_pid = sup.svc.pid();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup_pid as i32, libc::SIGKILL) };
    drop(sup);
    let url = world.hookexec.url();
    let status = world.hookexec.terminate();
    assert!(status.success(), "{status}");

    // The reconnect hook cannot run: not a verdict on the guest.
    let mut sup = world.supervisor(&url).await;
    let again = sup.get("vm").await;
    assert_eq!((again.state(), again.pid), (DomainState::Running, d.pid));
    assert_eq!(qemu_pids(&uuid), [d.pid]);
    assert!(
        sup.svc.stderr().contains("reconnect hook not run"),
        "{}",
        sup.svc.stderr()
    );
    sup.destroy("vm").await;
    wait_no_qemu(&uuid).await;
}

/// Nine hook scripts each printing 300 KB on stdout and on stderr: the
/// executor's answer stays under the message limit (it was 4.7 MB, which
/// the supervisor took as "executor unavailable" and refused the start),
/// so the start proceeds, and stopped and release run after a destroy.
#[tokio::test(flavor = "multi_thread")]
async fn test_chatty_hooks_do_not_refuse_the_start() {
    let world = World::new().await;
    let dot_d = world.path("hooks/qemu.d");
    std::fs::create_dir(&dot_d).unwrap();
    for i in 1..=8 {
        let path = dot_d.join(format!("{i}-chatty"));
        std::fs::write(
            &path,
            "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' o\n\
             head -c 300000 /dev/zero | tr '\\0' e >&2\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The main script is chatty too.
    let main = world.path("hooks/qemu");
    let mut body = std::fs::read_to_string(&main).unwrap();
    body = body.replacen(
        "#!/bin/sh\n",
        "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' o\n\
         head -c 300000 /dev/zero | tr '\\0' e >&2\n",
        1,
    );
    std::fs::write(&main, body).unwrap();

    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    world.clear_calls();
    let d = sup.start("vm").await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    assert_eq!(
        world.calls(),
        [
            "vm prepare begin -",
            "vm start begin -",
            "vm started begin -"
        ]
    );
    world.clear_calls();
    sup.destroy("vm").await;
    wait_no_qemu(&uuid).await;
    world
        .wait_calls_of("vm", &["vm stopped end -", "vm release end destroyed"])
        .await;
    assert!(
        !sup.svc.stderr().contains("hook executor unavailable"),
        "{}",
        sup.svc.stderr()
    );
}

/// A prepare hook still running at the supervisor's hook call timeout:
/// the executor kills it (its process group) before answering, so the
/// start is refused and the stopped and release hooks run only after it
/// is gone (they log `hung hook still running` otherwise).
#[tokio::test(flavor = "multi_thread")]
async fn test_hook_past_the_call_timeout_is_killed_before_the_stop_hooks() {
    let world = World::new().await;
    let mut sup = world
        .supervisor_with(&world.hookexec.url(), &["--hook-call-timeout-secs", "3"])
        .await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    world.clear_calls();
    std::fs::write(world.path("hang-vm-prepare"), "").unwrap();
    let err = sup.start("vm").await.unwrap_err();
    // Clean-up first: the sleeper, if it survived, by pid.
    let hung: i32 = std::fs::read_to_string(world.path("hang.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let hung_cmdline = std::fs::read(format!("/proc/{hung}/cmdline")).unwrap_or_default();
    if hung_cmdline == b"sleep\x00616\x00" {
        // SAFETY: kill(2) on the sleeper this test's hook started.
        unsafe { libc::kill(hung, libc::SIGKILL) };
    }
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("DeadlineExceeded"),
        "{}",
        err.message()
    );
    assert!(qemu_pids(&uuid).is_empty());
    world
        .wait_calls_of(
            "vm",
            &[
                "vm prepare begin -",
                "vm stopped end -",
                "vm release end failed",
            ],
        )
        .await;
    assert!(
        !world.calls().iter().any(|c| c.contains("hung hook")),
        "{:?}",
        world.calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_start_outliving_the_clients_deadline_completes_with_one_qemu() {
    // Decision: a Start the client gave up on (deadline, hang-up) runs to
    // its end on the supervisor, as a libvirt API call does; only the
    // answer is lost. The `started` hook takes a second, the client's
    // deadline is 200 ms.
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "vm").await.spec.unwrap().uuid;
    world.clear_calls();
    std::fs::write(world.path("slow-vm-started"), "").unwrap();
    let mut request = tonic::Request::new(StartDomainRequest {
        domain: "vm".into(),
        paused: false,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let err = sup.client.start_domain(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let d = sup.wait_state("vm", DomainState::Running).await;
    assert_eq!(qemu_pids(&uuid), [d.pid], "not exactly the recorded QEMU");
    world
        .wait_calls_of(
            "vm",
            &[
                "vm prepare begin -",
                "vm start begin -",
                "vm started begin -",
            ],
        )
        .await;
    // A second start sees it running: no second QEMU.
    let err = sup.start("vm").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(qemu_pids(&uuid), [d.pid]);
    sup.destroy("vm").await;
    wait_no_qemu(&uuid).await;
    world
        .wait_calls_of(
            "vm",
            &[
                "vm prepare begin -",
                "vm start begin -",
                "vm started begin -",
                "vm stopped end -",
                "vm release end destroyed",
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_domain_hanging_in_its_prepare_hook_does_not_hold_up_another() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let a = sup.define(&world, "a").await.spec.unwrap().uuid;
    let b = sup.define(&world, "b").await.spec.unwrap().uuid;
    world.clear_calls();
    std::fs::write(world.path("hang-a-prepare"), "").unwrap();
    let mut client = sup.client.clone();
    let start_a = tokio::spawn(async move {
        client
            .start_domain(StartDomainRequest {
                domain: "a".into(),
                paused: false,
                ..Default::default()
            })
            .await
    });
    world.wait_calls_of("a", &["a prepare begin -"]).await;
    let d = sup.start("b").await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    // A's prepare hook still hangs (until the executor's 30 s timeout or
    // the kill below), so its start has not answered.
    assert!(
        !start_a.is_finished(),
        "A's start ended while its hook hung"
    );
    assert_eq!(world.calls_of("a"), ["a prepare begin -"]);
    // Release A's hook: its start goes on.
    std::fs::remove_file(world.path("hang-a-prepare")).unwrap();
    let deadline = Instant::now() + WAIT;
    let pid: i32 = loop {
        let hang = std::fs::read_to_string(world.path("hang.pid")).unwrap_or_default();
        if let Ok(pid) = hang.trim().parse() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no hang.pid within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // SAFETY: kill(2) on the hook's `sleep` child, whose pid it wrote.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let a_started = tokio::time::timeout(WAIT, start_a)
        .await
        .expect("A's start did not end")
        .unwrap()
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert_eq!(a_started.state(), DomainState::Running);
    for name in ["a", "b"] {
        sup.destroy(name).await;
    }
    wait_no_qemu(&a).await;
    wait_no_qemu(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn test_guest_that_died_while_the_supervisor_was_down_gets_its_stop_hooks() {
    let world = World::new().await;
    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let uuid = sup.define(&world, "gone").await.spec.unwrap().uuid;
    let d = sup.start("gone").await.unwrap();
    let sup_pid = sup.svc.pid();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup_pid as i32, libc::SIGKILL) };
    drop(sup);
    qvirt_integration_tests::kill_domain_qemu(d.pid, &uuid);
    wait_no_qemu(&uuid).await;
    world.clear_calls();

    let mut sup = world.supervisor(&world.hookexec.url()).await;
    let d = sup.get("gone").await;
    assert_eq!(
        (d.state(), d.reason(), d.pid),
        (DomainState::Shutoff, DomainStateReason::ShutoffCrashed, 0)
    );
    // As libvirt: the stop path's hooks, not the reconnect hook.
    world
        .wait_calls_of("gone", &["gone stopped end -", "gone release end crashed"])
        .await;
    // It starts again, its prepare hook after the release hook.
    let d = sup.start("gone").await.unwrap();
    assert_eq!(qemu_pids(&uuid), [d.pid]);
    assert_eq!(
        world.calls_of("gone")[..3],
        [
            "gone stopped end -",
            "gone release end crashed",
            "gone prepare begin -"
        ]
    );
    sup.destroy("gone").await;
    wait_no_qemu(&uuid).await;
}

/// A hook script as a libvirt user writes one for
/// `/etc/libvirt/hooks/qemu`: on `prepare begin` it reads the domain XML
/// from stdin, takes the name with `xmllint --xpath` and the UUID, memory,
/// first disk's source and a metadata entry with python3's
/// `xml.etree.ElementTree`, and writes them to files; any other call only
/// logs its argv and drains stdin (the daemon hook too).
fn libvirt_user_script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"#!/bin/sh
set -e
printf '%s %s %s %s\n' "$1" "$2" "$3" "$4" >> '{d}/calls'
if [ "$2" = prepare ]; then
  xml=$(cat)
  printf '%s' "$xml" | xmllint --xpath 'string(/domain/name)' - > '{d}/xml-name'
  printf '%s' "$xml" | python3 -c '
import sys
import xml.etree.ElementTree as ET
ns = {{"qvirt": "https://qvirt.dev/xmlns/metadata/1"}}
root = ET.fromstring(sys.stdin.read())
mem = root.find("memory")
owner = root.find("metadata/qvirt:metadata/qvirt:entry[@key=\"owner\"]", ns)
disk = root.find("devices/disk")
print(root.findtext("uuid"))
print(mem.text + " " + mem.get("unit"))
print(disk.find("source").get("file") + " " + disk.find("driver").get("type") + " " + disk.find("target").get("dev"))
print(owner.text)
' > '{d}/xml-fields'
else
  cat > /dev/null
fi
"#
    )
}

/// With `hook_stdin_format: libvirt-xml`, a start hands hook scripts
/// libvirt-style domain XML that xmllint and python's ElementTree read as
/// they read libvirt's: name, UUID, memory in KiB, disk source, metadata.
#[tokio::test(flavor = "multi_thread")]
async fn test_libvirt_xml_on_stdin_serves_scripts_written_for_libvirt() {
    tool_path("xmllint");
    let world = World::with_script(libvirt_user_script).await;
    // QEMU's user opens the disk by path: the temp dir must be traversable.
    std::fs::set_permissions(world.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut sup = world
        .supervisor_with(
            &world.hookexec.url(),
            &["--hook-stdin-format", "libvirt-xml"],
        )
        .await;
    let disk = world.path("state/images/root.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let yaml = format!(
        "name: web<1>&'\"\nmemory_mib: 64\naccel: tcg\ndisks: [{{path: {}}}]\n\
         metadata: {{owner: \"ops & <dev>\", tier: web}}\n",
        disk.display()
    );
    let defined = define_yaml(&mut sup.client, yaml).await.unwrap();
    let spec = defined.spec.unwrap();
    world.reaper.track(&spec.uuid);
    let name = "web<1>&'\"";
    assert_eq!(spec.name, name);

    let d = sup.start(name).await.unwrap();
    assert_eq!(d.state(), DomainState::Running);
    let xml_name = std::fs::read_to_string(world.path("xml-name")).unwrap();
    // xmllint ends its answer with a newline.
    assert_eq!(xml_name.strip_suffix('\n').unwrap_or(&xml_name), name);
    let fields = std::fs::read_to_string(world.path("xml-fields")).unwrap();
    assert_eq!(
        fields.lines().collect::<Vec<_>>(),
        [
            spec.uuid.as_str(),
            "65536 KiB",
            &format!("{} raw vda", disk.display()),
            "ops & <dev>",
        ]
    );
    sup.destroy(name).await;
    wait_no_qemu(&spec.uuid).await;
}
