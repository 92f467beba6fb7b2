//! The launcher and QMP client against real `qemu-system-x86_64` (TCG, no
//! guest OS: the guest stays paused or runs firmware, which is all QMP
//! needs). Without QEMU these tests fail: run `make deps`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use qvirt_supervisor::launch::{
    self, ExitWatch, IdentityError, LaunchConfig, LaunchError, ProcessIdentity, QemuProcess,
};
use qvirt_supervisor::qmp::{EventReceiver, QmpError, QmpEvent};
use serde_json::{Value, json};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

/// Find QEMU on PATH (or `QVIRT_QEMU`); fail loudly without it.
fn qemu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("QVIRT_QEMU") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("qemu-system-x86_64 not found on PATH (nor QVIRT_QEMU set): run `make deps`")
        })
}

/// The arguments every test guest gets (the launcher adds the monitor).
fn base_args() -> Vec<OsString> {
    [
        "-S",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "128",
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

fn config(dir: &Path, extra: &[&str]) -> LaunchConfig {
    let mut args = base_args();
    args.extend(extra.iter().map(OsString::from));
    LaunchConfig {
        binary: qemu_binary(),
        args,
        run_dir: dir.join("run/guest"),
        log_path: dir.join("guest.log"),
        handshake_timeout: WAIT,
        credentials: None,
        launcher: None,
    }
}

/// Kills a test's QEMU (its whole process group) when the test ends, however
/// it ends.
struct KillOnDrop {
    pid: u32,
    exit: ExitWatch,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Once reaped, the pid may be reused: only signal a live child.
        if self.exit.status().is_none() {
            let _ = launch::signal_process_group(self.pid, libc::SIGKILL);
        }
    }
}

/// A launched QEMU with its guard and events.
struct Guest {
    process: QemuProcess,
    events: EventReceiver,
    _guard: KillOnDrop,
    _dir: tempfile::TempDir,
}

async fn start(extra: &[&str]) -> Guest {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), extra);
    let mut process = within(launch::launch(&config, Vec::new()))
        .await
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    let guard = KillOnDrop {
        pid: process.pid(),
        exit: process.exit_watch(),
    };
    let events = process.take_events().expect("events");
    Guest {
        process,
        events,
        _guard: guard,
        _dir: dir,
    }
}

/// Launch a QEMU that must fail; its error.
async fn start_failing(extra: &[&str]) -> (LaunchError, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), extra);
    match within(launch::launch(&config, Vec::new())).await {
        Ok(process) => {
            let _guard = KillOnDrop {
                pid: process.pid(),
                exit: process.exit_watch(),
            };
            panic!("QEMU started although it should have failed");
        }
        Err(error) => (error, dir),
    }
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
}

/// The next event named `name`, skipping others.
async fn next_event(events: &mut EventReceiver, name: &str) -> QmpEvent {
    within(async {
        loop {
            let event = events.recv().await.expect("event stream ended");
            if event.name == name {
                return event;
            }
        }
    })
    .await
}

async fn status(guest: &Guest) -> Value {
    within(guest.process.qmp().execute("query-status", None))
        .await
        .expect("query-status")
}

#[tokio::test]
async fn test_launch_greets_and_reports_prelaunch() {
    let guest = start(&[]).await;
    let greeting = guest.process.greeting();
    assert!(greeting.version.major >= 7, "{greeting:?}");
    println!(
        "QEMU {}.{}.{}: spawn -> greeting {:?}",
        greeting.version.major,
        greeting.version.minor,
        greeting.version.micro,
        guest.process.spawn_to_greeting()
    );
    let status = status(&guest).await;
    assert_eq!(status["status"], "prelaunch");
    assert_eq!(status["running"], false);
    let mode = std::fs::metadata(guest.process.monitor_path().parent().expect("run dir"))
        .expect("run dir")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
}

#[tokio::test]
async fn test_cont_then_stop_emit_resume_and_stop() {
    let mut guest = start(&[]).await;
    within(guest.process.qmp().execute("cont", None))
        .await
        .expect("cont");
    let resume = next_event(&mut guest.events, "RESUME").await;
    assert!(resume.seconds > 0, "{resume:?}");
    assert!((0..1_000_000).contains(&resume.microseconds), "{resume:?}");
    assert_eq!(status(&guest).await["status"], "running");

    within(guest.process.qmp().execute("stop", None))
        .await
        .expect("stop");
    let stop = next_event(&mut guest.events, "STOP").await;
    assert_eq!(stop.data, "{}");
    assert_eq!(status(&guest).await["status"], "paused");
}

#[tokio::test]
async fn test_monitor_command_raw_round_trip() {
    let guest = start(&[]).await;
    let qmp = guest.process.qmp();
    let reply = within(qmp.execute_raw(raw(r#"{"execute":"query-status"}"#)))
        .await
        .expect("raw");
    let reply: Value = serde_json::from_str(&reply).expect("reply is JSON");
    assert_eq!(reply["return"]["status"], "prelaunch");
    assert!(reply.get("id").is_none(), "{reply}");

    let reply = within(qmp.execute_raw(raw(r#"{"execute":"query-name","id":"caller-7"}"#)))
        .await
        .expect("raw with id");
    let reply: Value = serde_json::from_str(&reply).expect("reply is JSON");
    // The caller's id never reaches QEMU, and the reply carries none.
    assert!(reply.get("id").is_none(), "{reply}");
    assert!(reply["return"].is_object(), "{reply}");

    let reply = within(qmp.execute_raw(raw(r#"{"execute":"no-such-command"}"#)))
        .await
        .expect("error reply is text");
    let reply: Value = serde_json::from_str(&reply).expect("reply is JSON");
    assert_eq!(reply["error"]["class"], "CommandNotFound");

    let typed = within(qmp.execute("no-such-command", None)).await;
    match typed {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
}

#[tokio::test]
async fn test_monitor_command_keeps_64_bit_numbers() {
    // The CPU's ucode-rev property is a uint64 QEMU echoes back via qom-get.
    let guest = start(&["-cpu", "qemu64,ucode-rev=9223372036854775807"]).await;
    let qmp = guest.process.qmp();
    let cpus = within(qmp.execute("query-cpus-fast", None))
        .await
        .expect("query-cpus-fast");
    let path = cpus[0]["qom-path"].as_str().expect("qom-path").to_owned();
    let request = json!({
        "execute": "qom-get",
        "arguments": {"path": path, "property": "ucode-rev"},
    });
    let raw = within(qmp.execute_raw(raw(&request.to_string())))
        .await
        .expect("raw qom-get");
    assert_eq!(raw, r#"{"return":9223372036854775807}"#);
    let typed = within(qmp.execute("qom-get", Some(request["arguments"].clone())))
        .await
        .expect("typed qom-get");
    assert_eq!(typed.as_i64(), Some(i64::MAX));
    assert_eq!(typed.to_string(), "9223372036854775807");
}

#[tokio::test]
async fn test_commands_in_flight_at_once_get_their_own_replies() {
    let guest = start(&[]).await;
    let qmp = guest.process.qmp();
    let mut calls = Vec::new();
    for i in 0..16 {
        let qmp = std::sync::Arc::clone(qmp);
        calls.push(tokio::spawn(async move {
            let command = if i % 2 == 0 {
                "query-status"
            } else {
                "query-version"
            };
            (command, qmp.execute(command, None).await)
        }));
    }
    for call in calls {
        let (command, reply) = within(call).await.expect("task");
        let reply = reply.expect("reply");
        match command {
            "query-status" => assert_eq!(reply["status"], "prelaunch", "{reply}"),
            _ => assert!(reply["qemu"]["major"].as_u64().is_some(), "{reply}"),
        }
    }
}

fn assert_exit_code(status: ExitStatus, code: i32) {
    assert_eq!(status.code(), Some(code), "{status}");
}

#[tokio::test]
async fn test_bad_argument_reports_stderr_and_exit_status() {
    let (error, _dir) = start_failing(&["-bogus-option"]).await;
    let message = error.to_string();
    match error {
        LaunchError::Exited { status, log_tail } => {
            assert_exit_code(status, 1);
            assert!(
                log_tail.contains("-bogus-option: invalid option"),
                "{log_tail}"
            );
            assert!(!log_tail.contains("qvirt: "), "header leaked: {log_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(message.contains("exit status: 1"), "{message}");
    assert!(
        message.contains("-bogus-option: invalid option"),
        "{message}"
    );
}

#[tokio::test]
async fn test_missing_kernel_file_is_a_clear_error() {
    let (error, _dir) = start_failing(&["-kernel", "/nonexistent/qvirt-test-vmlinux"]).await;
    println!("missing kernel: {error}");
    match error {
        LaunchError::Exited { status, log_tail } => {
            assert_exit_code(status, 1);
            assert!(
                log_tail.contains("could not open kernel file '/nonexistent/qvirt-test-vmlinux'"),
                "{log_tail}"
            );
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

#[tokio::test]
async fn test_kill_9_is_noticed_by_exit_watch_and_qmp() {
    let mut guest = start(&[]).await;
    let mut exit = guest.process.exit_watch();
    launch::signal_process(guest.process.pid(), libc::SIGKILL).expect("kill -9");
    let status = within(exit.wait()).await.expect("exit status");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    within(guest.process.qmp().closed()).await;
    assert!(within(guest.events.recv()).await.is_none(), "events end");
    assert!(matches!(
        guest.process.qmp().execute("query-status", None).await,
        Err(QmpError::MonitorClosed)
    ));
    assert!(matches!(
        guest.process.identity().verify().await,
        Err(IdentityError::NotRunning { .. })
    ));
    // After a restart, a dead QEMU's leftover socket refuses connections.
    match launch::connect_existing(guest.process.monitor_path(), WAIT).await {
        Err(QmpError::Connect { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a refused connect, got {other:?}"),
    }
    // kill() of an exited QEMU just reports its status.
    let again = within(guest.process.kill(Duration::from_secs(1)))
        .await
        .expect("kill after exit");
    assert_eq!(again, status);
}

#[tokio::test]
async fn test_kill_sends_sigterm_and_qemu_exits() {
    let mut guest = start(&[]).await;
    let status = within(guest.process.kill(Duration::from_secs(10)))
        .await
        .expect("kill");
    // QEMU handles SIGTERM as a host-requested shutdown and exits 0.
    assert!(status.success(), "{status}");
    let shutdown = next_event(&mut guest.events, "SHUTDOWN").await;
    assert!(shutdown.data.contains("host-signal"), "{}", shutdown.data);
}

#[tokio::test]
async fn test_drop_and_reconnect_to_the_same_monitor_socket() {
    let guest = start(&[]).await;
    let socket = guest.process.monitor_path().to_owned();

    // While the first client is attached, a second one waits in the listen
    // backlog: connect() succeeds but no greeting comes.
    let mut waiting = Box::pin(launch::connect_existing(&socket, WAIT));
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(
        early.is_err(),
        "a second client was greeted while the first was attached"
    );

    // Closing the first client lets QEMU accept the waiting one.
    guest.process.qmp().close();
    let mut second = within(&mut waiting).await.expect("greeting after close");
    let reply = within(second.client.execute("query-status", None))
        .await
        .expect("query-status on the new connection");
    assert_eq!(reply["status"], "prelaunch");
    within(second.client.execute("cont", None))
        .await
        .expect("cont");
    next_event(&mut second.events, "RESUME").await;

    // And again: drop, then a fresh connect.
    drop(second);
    let third = within(launch::connect_existing(&socket, WAIT))
        .await
        .expect("third connection");
    let reply = within(third.client.execute("query-status", None))
        .await
        .expect("query-status");
    assert_eq!(reply["status"], "running");
    assert!(guest.process.qmp().is_closed());
}

#[tokio::test]
async fn test_identity_check_rejects_a_different_process() {
    let guest = start(&[]).await;
    let recorded = guest.process.identity().clone();
    assert_eq!(recorded.pid, guest.process.pid());
    assert!(
        recorded.cmdline.iter().any(|arg| arg.contains("fd=")),
        "{:?}",
        recorded.cmdline
    );
    recorded.verify().await.expect("same QEMU");
    let json = serde_json::to_string(&recorded).expect("serialise");
    let restored: ProcessIdentity = serde_json::from_str(&json).expect("deserialise");
    restored
        .verify()
        .await
        .expect("same QEMU after a round trip");

    // The same record pointed at another live process (this test).
    let other = ProcessIdentity {
        pid: std::process::id(),
        ..recorded.clone()
    };
    assert!(other.verify().await.is_err());
    // The pid reused by a process started at another time.
    let reused = ProcessIdentity {
        start_time: recorded.start_time.saturating_sub(1),
        ..recorded.clone()
    };
    assert!(matches!(
        reused.verify().await,
        Err(IdentityError::StartTimeMismatch { .. })
    ));
}

/// Not a benchmark (tests run in parallel): prints spawn -> greeting for a
/// few sequential launches, and checks the launcher adds no sleep or retry.
#[tokio::test]
async fn test_spawn_to_greeting_is_prompt() {
    let mut times = Vec::new();
    for _ in 0..5 {
        let guest = start(&[]).await;
        times.push(guest.process.spawn_to_greeting());
        within(guest.process.kill(Duration::from_secs(5)))
            .await
            .expect("kill");
    }
    times.sort();
    println!("spawn -> greeting over 5 launches: {times:?}");
    assert!(times[2] < Duration::from_secs(5), "{times:?}");
}

/// After a supervisor restart: the recorded identity still matches, a new
/// monitor session works, and the adopted QEMU can be stopped by its
/// checked pid, with no monitor session at all (a lost monitor never keeps
/// a guest from being destroyed).
#[tokio::test]
async fn test_adopted_qemu_is_terminated_after_identity_check() {
    let guest = start(&[]).await;
    let recorded = guest.process.identity().clone();
    // The "old supervisor" goes away: its monitor connection closes.
    guest.process.qmp().close();
    recorded.verify().await.expect("still the same QEMU");
    let session = within(launch::connect_existing(guest.process.monitor_path(), WAIT))
        .await
        .expect("reconnect");
    // A stale record (pid reused) is refused before any signal is sent.
    let stale = ProcessIdentity {
        start_time: recorded.start_time + 1,
        ..recorded.clone()
    };
    assert!(matches!(
        launch::terminate_adopted(&stale, Duration::from_secs(5)).await,
        Err(LaunchError::Identity { .. })
    ));
    assert!(!session.client.is_closed());
    session.client.close();
    within(launch::terminate_adopted(
        &recorded,
        Duration::from_secs(10),
    ))
    .await
    .expect("terminate without a monitor");
    let status = within(guest.process.exit_watch().wait())
        .await
        .expect("exit status");
    assert!(
        status.success(),
        "SIGTERM is a clean QEMU shutdown: {status}"
    );
}

#[tokio::test]
async fn test_quit_is_noticed_with_shutdown_event_and_clean_exit() {
    let mut guest = start(&[]).await;
    let mut exit = guest.process.exit_watch();
    // QEMU may close the socket right after (or instead of) its reply.
    match within(guest.process.qmp().execute("quit", None)).await {
        Ok(_) | Err(QmpError::MonitorClosed) => {}
        Err(other) => panic!("quit: {other}"),
    }
    let shutdown = next_event(&mut guest.events, "SHUTDOWN").await;
    assert!(shutdown.data.contains("host-qmp-quit"), "{}", shutdown.data);
    assert!(within(guest.events.recv()).await.is_none(), "events end");
    within(guest.process.qmp().closed()).await;
    let status = within(exit.wait()).await.expect("exit status");
    assert!(status.success(), "{status}");
    // On a clean quit QEMU removes the socket file it was told about.
    assert!(!guest.process.monitor_path().exists());
}

/// The `socket:[inode]` link of the monitor listener QEMU was given.
async fn monitor_listener_inode(process: &QemuProcess) -> String {
    let fd = process
        .identity()
        .cmdline
        .iter()
        .find_map(|arg| arg.strip_prefix("socket,id=mon,fd="))
        .and_then(|rest| rest.split(',').next())
        .expect("monitor fd on the command line")
        .to_owned();
    let link = tokio::fs::read_link(format!("/proc/{}/fd/{fd}", process.pid()))
        .await
        .expect("monitor fd link");
    link.to_string_lossy().into_owned()
}

/// Every `socket:[inode]` link in a process's fd table.
async fn socket_inodes(pid: u32) -> Vec<String> {
    let mut dir = tokio::fs::read_dir(format!("/proc/{pid}/fd"))
        .await
        .expect("fd dir");
    let mut links = Vec::new();
    while let Some(entry) = dir.next_entry().await.expect("fd entry") {
        if let Ok(link) = tokio::fs::read_link(entry.path()).await {
            let link = link.to_string_lossy().into_owned();
            if link.starts_with("socket:") {
                links.push(link);
            }
        }
    }
    links
}

/// Twenty QEMUs started at once (each with its own run dir and socket):
/// no fd leaks between them, every one answers its own monitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_twenty_launches_at_once() {
    let starts: Vec<_> = (0..20).map(|_| tokio::spawn(start(&[]))).collect();
    let mut guests = Vec::new();
    for started in starts {
        guests.push(within(started).await.expect("launch task"));
    }
    let mut slowest = Duration::ZERO;
    let mut listeners = Vec::new();
    for guest in &guests {
        slowest = slowest.max(guest.process.spawn_to_greeting());
        assert_eq!(status(guest).await["status"], "prelaunch");
        listeners.push(monitor_listener_inode(&guest.process).await);
    }
    // The launcher kept no copy of any listener (a kept copy turns a QEMU
    // startup failure into a read blocked forever)...
    let own = socket_inodes(std::process::id()).await;
    assert!(
        listeners.iter().all(|l| !own.contains(l)),
        "parent kept a listener"
    );
    // ...and no QEMU inherited another one's listener.
    for guest in &guests {
        let held = socket_inodes(guest.process.pid()).await;
        let foreign = listeners.iter().filter(|l| held.contains(*l)).count();
        assert_eq!(
            foreign,
            1,
            "pid {} holds {foreign} monitor listeners",
            guest.process.pid()
        );
    }
    println!("20 concurrent launches: slowest spawn -> greeting {slowest:?}");
    let kills: Vec<_> = guests
        .iter()
        .map(|guest| guest.process.kill(Duration::from_secs(10)))
        .collect();
    for kill in kills {
        within(kill).await.expect("kill");
    }
}

/// A caller's command, checked as MonitorCommand checks it.
fn raw(text: &str) -> qvirt_common::qapi::Command {
    qvirt_common::qapi::parse_command(text).expect("a command")
}
