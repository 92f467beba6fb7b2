//! The real `qvirt-hookexec` running real shell scripts from a temp hooks
//! directory, checked through its gRPC API: argv and stdin as the scripts
//! saw them, the cleared environment, run order, skipped entries, failure
//! semantics and libvirt's error text, timeouts that kill the whole process
//! group, output caps, filter chaining, discovery and reload (RPC, SIGHUP,
//! daemon reload), bad requests, replies kept under the 4 MiB message
//! limit, the call's deadline, and waiting for a run slot.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qvirt_common::rpc::{reason_of, violated_fields};
use qvirt_integration_tests::{
    InternalChannel, Service, grpcurl, internal_channel, internal_token, text,
};
use qvirt_proto::v1::hook_executor_client::HookExecutorClient;
use qvirt_proto::v1::hook_script_result::Termination;
use qvirt_proto::v1::{
    HookDriver, HookOutcome, HookScriptResult, ListHooksRequest, ReloadHooksRequest,
    RunHookRequest, RunHookResponse,
};

/// Bound on every poll for a condition.
const POLL_TIMEOUT: Duration = Duration::from_secs(20);

/// A hooks directory and a directory the scripts report into.
struct Hooks {
    root: tempfile::TempDir,
}

impl Hooks {
    fn new() -> Hooks {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("hooks")).unwrap();
        fs::create_dir(root.path().join("out")).unwrap();
        Hooks { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("hooks")
    }

    fn out(&self) -> PathBuf {
        self.root.path().join("out")
    }

    /// Writes script `rel` (under the hooks dir) with `body` after a
    /// `#!/bin/sh` line and `OUT=<report dir>`, mode `mode`.
    fn script_mode(&self, rel: &str, body: &str, mode: u32) -> PathBuf {
        let path = self.dir().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text = format!("#!/bin/sh\nOUT='{}'\n{body}", self.out().display());
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn script(&self, rel: &str, body: &str) -> PathBuf {
        self.script_mode(rel, body, 0o755)
    }

    /// A script that records its argv, stdin and environment as
    /// `OUT/<tag>.{argv,stdin,env}`, appends `<tag>` to `OUT/order`, and
    /// then runs `tail`.
    fn recorder(&self, rel: &str, tag: &str, tail: &str) -> PathBuf {
        // The signal state is read first and by shell builtins only: a
        // child the shell forks (grep) gets a mask the shell has reset.
        let body = format!(
            "T='{tag}'\n\
             while IFS= read -r l; do case \"$l\" in SigBlk:*|SigIgn:*) echo \"$l\";; esac; done < /proc/$$/status > \"$OUT/$T.sig\"\n\
             {{ echo \"argc=$#\"; echo \"0=$0\"; for a in \"$@\"; do echo \"arg=$a\"; done; }} > \"$OUT/$T.argv\"\n\
             cat > \"$OUT/$T.stdin\"\n\
             tr '\\0' '\\n' < /proc/$$/environ > \"$OUT/$T.env\"\n\
             ls /proc/self/fd | tr '\\n' ' ' > \"$OUT/$T.fds\"\n\
             echo \"$T\" >> \"$OUT/order\"\n\
             {tail}\n"
        );
        self.script(rel, &body)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.out().join(name))
            .unwrap_or_else(|e| panic!("{name} not written by a script: {e}"))
    }

    fn exists(&self, name: &str) -> bool {
        self.out().join(name).exists()
    }

    fn order(&self) -> Vec<String> {
        if !self.exists("order") {
            return Vec::new();
        }
        self.read("order").lines().map(str::to_owned).collect()
    }
}

/// Runs `f` with SIGUSR2 blocked in this thread, so that a process it
/// spawns starts with it blocked (a blocked signal survives fork and exec).
fn with_sigusr2_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: all-zero sigset_t values are valid; they are initialised
    // below.
    let (mut block, mut old) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: sigset_t values we own, initialised by sigemptyset and
    // sigaddset; pthread_sigmask changes this thread's mask only.
    unsafe {
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGUSR2);
        assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old), 0);
    }
    let result = f();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// A hook executor over `hooks`, started with SIGUSR2 blocked (libvirt's
/// hooks start with an empty mask whatever the daemon's).
async fn executor(
    hooks: &Hooks,
    extra_yaml: &str,
) -> (Service, HookExecutorClient<InternalChannel>) {
    let yaml = format!("hooks_dir: {}\n{extra_yaml}", hooks.dir().display());
    let mut svc = with_sigusr2_blocked(|| Service::start_with_config("qvirt-hookexec", &yaml, &[]));
    svc.wait_serving("qvirt.v1.HookExecutor").await;
    let client = HookExecutorClient::new(internal_channel(svc.url()).await);
    (svc, client)
}

fn call(driver: HookDriver, object: &str, op: &str, sub_op: &str, extra: &str) -> RunHookRequest {
    RunHookRequest {
        driver: driver as i32,
        object: object.into(),
        op: op.into(),
        sub_op: sub_op.into(),
        extra: extra.into(),
        ..Default::default()
    }
}

async fn run(
    client: &mut HookExecutorClient<InternalChannel>,
    req: RunHookRequest,
) -> RunHookResponse {
    client.run_hook(req).await.unwrap().into_inner()
}

fn names(results: &[HookScriptResult], base: &Path) -> Vec<String> {
    results
        .iter()
        .map(|r| {
            Path::new(&r.path)
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn strings(paths: &[String], base: &Path) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            Path::new(p)
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Sets `req.timeout` to `secs` seconds (prost's Duration, built without
/// naming its crate).
fn set_timeout(req: &mut RunHookRequest, secs: i64) {
    let mut t = req.timeout.take().unwrap_or_default();
    t.seconds = secs;
    t.nanos = 0;
    req.timeout = Some(t);
}

const XML: &str = "<domain type='kvm'>\n  <name>vm1</name>\n</domain>\n";

#[tokio::test(flavor = "multi_thread")]
async fn test_argv_stdin_env_and_order_as_the_scripts_saw_them() {
    let hooks = Hooks::new();
    hooks.recorder("qemu", "main", "exit 0");
    for name in ["a-lower", "10-a", "B-upper", "9-b", ".hidden"] {
        hooks.recorder(&format!("qemu.d/{name}"), name, "exit 0");
    }
    let (_svc, mut client) = executor(&hooks, "").await;

    let mut req = call(HookDriver::Qemu, "vm1", "release", "end", "from snapshot");
    req.input = XML.into();
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    assert!(reply.error.is_empty());
    assert!(reply.output.is_empty(), "not a filter: no output");

    let order = ["main", ".hidden", "10-a", "9-b", "B-upper", "a-lower"];
    assert_eq!(hooks.order(), order);
    assert_eq!(
        names(&reply.results, &hooks.dir()),
        [
            "qemu",
            "qemu.d/.hidden",
            "qemu.d/10-a",
            "qemu.d/9-b",
            "qemu.d/B-upper",
            "qemu.d/a-lower"
        ]
    );
    for r in &reply.results {
        assert!(r.success && !r.timed_out, "{r:?}");
        assert_eq!(r.termination, Some(Termination::ExitCode(0)));
        assert!(r.duration.is_some());
    }

    // argv: exactly four arguments, the last one with its space intact.
    let main = hooks.dir().join("qemu");
    assert_eq!(
        hooks.read("main.argv"),
        format!(
            "argc=4\n0={}\narg=vm1\narg=release\narg=end\narg=from snapshot\n",
            main.display()
        )
    );
    // Every script of a non-filter operation gets the same document.
    for tag in order {
        assert_eq!(hooks.read(&format!("{tag}.stdin")), XML, "{tag}");
    }

    // The environment: LC_ALL=C first, then only libvirt's pass-through
    // variables in its order (RUST_LOG is set for the executor and must not
    // leak).
    let env = hooks.read("main.env");
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(lines[0], "LC_ALL=C", "{env}");
    let allowed = [
        "LC_ALL",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "DYLD_INSERT_LIBRARIES",
        "DYLD_FORCE_FLAT_NAMESPACE",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
    ];
    for line in &lines {
        let key = line.split('=').next().unwrap();
        assert!(
            allowed.contains(&key),
            "{key} leaked into the hook env:\n{env}"
        );
    }
    assert!(!env.contains("RUST_LOG"), "{env}");
    if let Ok(path) = std::env::var("PATH") {
        assert!(lines.contains(&format!("PATH={path}").as_str()), "{env}");
    }

    // Signals as a fresh process (none blocked or ignored, although the
    // executor runs with SIGUSR2 blocked and SIGPIPE ignored), and only
    // stdin/stdout/stderr inherited (3 is `ls` reading the directory).
    assert_eq!(
        hooks.read("main.sig"),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    assert_eq!(hooks.read("main.fds"), "0 1 2 3 ");

    // Empty fields are "-" and no input is /dev/null (the daemon hook).
    hooks.recorder("daemon", "daemon", "exit 0");
    client.reload_hooks(ReloadHooksRequest {}).await.unwrap();
    let reply = run(
        &mut client,
        call(HookDriver::Daemon, "", "start", "", "start"),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    assert_eq!(
        hooks.read("daemon.argv"),
        format!(
            "argc=4\n0={}\narg=-\narg=start\narg=-\narg=start\n",
            hooks.dir().join("daemon").display()
        )
    );
    assert_eq!(hooks.read("daemon.stdin"), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_failures_run_every_script_and_report_the_last_one() {
    let hooks = Hooks::new();
    hooks.recorder("qemu", "main", "exit 0");
    hooks.recorder(
        "qemu.d/10-a",
        "10-a",
        "echo 'not in the message'; echo 'refusing prepare' >&2; exit 3",
    );
    hooks.recorder("qemu.d/20-ok", "20-ok", "exit 0");
    hooks.recorder(
        "qemu.d/30-last",
        "30-last",
        "echo 'second refusal' >&2; exit 4",
    );
    hooks.recorder("qemu.d/40-ok", "40-ok", "exit 0");
    hooks.script("qemu.d/50-bad-interpreter", "");
    // Rewrite with a missing interpreter: exec fails, as libvirt's 127.
    let bad = hooks.dir().join("qemu.d/50-bad-interpreter");
    fs::write(&bad, "#!/nonexistent/interpreter\n").unwrap();
    let (_svc, mut client) = executor(&hooks, "").await;

    let mut req = call(HookDriver::Qemu, "vm1", "prepare", "begin", "");
    req.input = XML.into();
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert_eq!(hooks.order(), ["main", "10-a", "20-ok", "30-last", "40-ok"]);
    let codes: Vec<_> = reply.results.iter().map(|r| r.termination).collect();
    assert_eq!(
        codes,
        [0, 3, 0, 4, 0, 127].map(|c| Some(Termination::ExitCode(c)))
    );
    let ok: Vec<bool> = reply.results.iter().map(|r| r.success).collect();
    assert_eq!(ok, [true, false, true, false, true, false]);
    assert_eq!(reply.results[1].stdout, b"not in the message\n");
    assert_eq!(reply.results[1].stderr, b"refusing prepare\n");
    // The last failure is the exec failure.
    assert!(
        reply
            .error
            .starts_with("Hook script execution failed: internal error: Child process (LC_ALL=C "),
        "{}",
        reply.error
    );
    assert!(
        reply.error.ends_with(&format!(
            "{} vm1 prepare begin -) unexpected exit status 127: cannot execute binary {}: \
             No such file or directory\n",
            bad.display(),
            bad.display()
        )),
        "{}",
        reply.error
    );

    // Without it, the last failing script is 30-last, stderr verbatim and
    // stdout never in the message.
    fs::remove_file(&bad).unwrap();
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "prepare", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Failed);
    let last = hooks.dir().join("qemu.d/30-last");
    assert!(
        reply.error.ends_with(&format!(
            "{} vm1 prepare begin -) unexpected exit status 4: second refusal\n",
            last.display()
        )),
        "{}",
        reply.error
    );
    assert!(!reply.error.contains("not in the message"));

    // Death by a signal, and no stderr: no ": ..." tail.
    fs::remove_dir_all(hooks.dir().join("qemu.d")).unwrap();
    hooks.script("qemu", "kill -TERM $$\n");
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "started", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Failed);
    assert_eq!(reply.results[0].termination, Some(Termination::Signal(15)));
    assert!(
        reply.error.ends_with(&format!(
            "{} vm1 started begin -) unexpected fatal signal 15",
            hooks.dir().join("qemu").display()
        )),
        "{}",
        reply.error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_skipped_entries_are_listed_and_not_run() {
    let hooks = Hooks::new();
    hooks.recorder("qemu.d/run-me", "run-me", "exit 0");
    hooks.script_mode("qemu", "echo main >> \"$OUT/order\"\n", 0o644);
    hooks.script_mode(
        "qemu.d/not-exec",
        "echo not-exec >> \"$OUT/order\"\n",
        0o644,
    );
    hooks.recorder("qemu.d/sub/inner", "inner", "exit 0");
    std::os::unix::fs::symlink(
        hooks.dir().join("qemu.d/run-me"),
        hooks.dir().join("qemu.d/link"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        hooks.dir().join("qemu.d/absent"),
        hooks.dir().join("qemu.d/dangling"),
    )
    .unwrap();
    // A DRIVER.d that is no directory cannot be read: listed as skipped
    // (and calls of that driver fail: test_unopenable_dot_d_fails_the_call).
    hooks.recorder("lxc", "lxc", "exit 0");
    fs::write(hooks.dir().join("lxc.d"), "").unwrap();
    let (_svc, mut client) = executor(&hooks, "").await;

    let listed = client
        .list_hooks(ListHooksRequest {
            driver: HookDriver::Qemu as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.hooks_dir, hooks.dir().to_string_lossy());
    assert!(listed.discovered_at.is_some());
    assert_eq!(listed.drivers.len(), 1);
    let qemu = &listed.drivers[0];
    assert!(qemu.active);
    assert_eq!(
        strings(&qemu.scripts, &hooks.dir()),
        ["qemu.d/link", "qemu.d/run-me"]
    );
    assert_eq!(
        strings(&qemu.skipped, &hooks.dir()),
        ["qemu", "qemu.d/dangling", "qemu.d/not-exec", "qemu.d/sub"]
    );

    // Every driver, in HookDriver order, when none is named.
    let all = client
        .list_hooks(ListHooksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let drivers: Vec<HookDriver> = all.drivers.iter().map(|d| d.driver()).collect();
    let lxc = &all.drivers[3];
    assert_eq!(strings(&lxc.scripts, &hooks.dir()), ["lxc"]);
    assert_eq!(strings(&lxc.skipped, &hooks.dir()), ["lxc.d"]);
    assert_eq!(
        drivers,
        [
            HookDriver::Daemon,
            HookDriver::Qemu,
            HookDriver::Network,
            HookDriver::Lxc,
            HookDriver::Libxl
        ]
    );

    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    // The symlink runs the same script (recording under the same tag).
    assert_eq!(hooks.order(), ["run-me", "run-me"]);
    assert!(
        !hooks.exists("inner.argv"),
        "no recursion into sub-directories"
    );
}

/// The process `pid` is gone (or a zombie waiting for its reaper).
fn gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Whether `pid` still runs `sleep <secs>` (the test's own sleeper).
fn runs_sleeper(pid: u32, secs: &str) -> bool {
    !gone(pid)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c == format!("sleep\0{secs}\0").as_bytes())
            .unwrap_or(false)
}

/// Kills the test's sleeper `pid` if it still runs (clean-up on failure).
struct Sleeper(u32, &'static str);

impl Drop for Sleeper {
    fn drop(&mut self) {
        if runs_sleeper(self.0, self.1) {
            // SAFETY: kill(2) on a pid just checked to run our sleeper.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + POLL_TIMEOUT;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pid_in(hooks: &Hooks, name: &str) -> u32 {
    hooks.read(name).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_timeout_kills_the_whole_process_group() {
    let hooks = Hooks::new();
    // Still running at the timeout, with a background child.
    hooks.script(
        "qemu",
        "sleep 611 &\necho $! > \"$OUT/bg.pid\"\necho $$ > \"$OUT/script.pid\"\n\
         echo 'about to hang'\nwait\n",
    );
    hooks.recorder("qemu.d/after", "after", "exit 0");
    let (_svc, mut client) = executor(&hooks, "").await;

    let mut req = call(HookDriver::Qemu, "vm1", "prepare", "begin", "");
    set_timeout(&mut req, 2);
    let reply = run(&mut client, req).await;
    let bg = Sleeper(pid_in(&hooks, "bg.pid"), "611");
    let script = pid_in(&hooks, "script.pid");
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    let r = &reply.results[0];
    assert!(r.timed_out && !r.success, "{r:?}");
    assert_eq!(r.termination, Some(Termination::Signal(libc::SIGKILL)));
    assert_eq!(r.stdout, b"about to hang\n");
    assert!(
        reply
            .error
            .contains(" vm1 prepare begin -) timed out after 2s"),
        "{}",
        reply.error
    );
    // The next script still ran, and the sleeper died with the script.
    assert_eq!(hooks.order(), ["after"]);
    assert!(reply.results[1].success);
    assert!(wait_gone(bg.0), "background sleeper {} survived", bg.0);
    assert!(wait_gone(script), "script {script} survived");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_shutdown_kills_running_hooks_and_answers_unavailable() {
    let hooks = Hooks::new();
    hooks.script(
        "qemu",
        "sleep 614 &\necho $! > \"$OUT/bg.pid.tmp\"\nmv \"$OUT/bg.pid.tmp\" \"$OUT/bg.pid\"\nwait\n",
    );
    hooks.recorder("qemu.d/never", "never", "exit 0");
    let (mut svc, client) = executor(&hooks, "").await;
    let mut c = client.clone();
    let call = tokio::spawn(async move {
        c.run_hook(call(HookDriver::Qemu, "vm1", "prepare", "begin", ""))
            .await
    });
    let deadline = Instant::now() + POLL_TIMEOUT;
    while !hooks.exists("bg.pid") {
        assert!(Instant::now() < deadline, "the hook never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bg = Sleeper(pid_in(&hooks, "bg.pid"), "614");
    assert!(svc.terminate().success());
    let status = tokio::time::timeout(POLL_TIMEOUT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("SHUTTING_DOWN"));
    assert!(
        status
            .message()
            .contains("shutting down: 1 of 2 scripts ran"),
        "{}",
        status.message()
    );
    assert!(wait_gone(bg.0), "sleeper {} survived the executor", bg.0);
    assert!(!hooks.exists("never.argv"));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_background_children_holding_output_time_out_and_detached_ones_survive() {
    let hooks = Hooks::new();
    // Exits at once, but its child keeps stdout open: libvirt would wait
    // for EOF; we wait until the timeout, then kill the group.
    hooks.script(
        "qemu",
        "sleep 612 &\necho $! > \"$OUT/holder.pid\"\nexit 0\n",
    );
    // A properly detached helper (output redirected) is left alone.
    hooks.script(
        "lxc",
        "sleep 613 >/dev/null 2>&1 </dev/null &\necho $! > \"$OUT/daemon.pid\"\nexit 0\n",
    );
    let (_svc, mut client) = executor(&hooks, "").await;

    let mut req = call(HookDriver::Qemu, "vm1", "started", "begin", "");
    set_timeout(&mut req, 2);
    let reply = run(&mut client, req).await;
    let holder = Sleeper(pid_in(&hooks, "holder.pid"), "612");
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert!(reply.results[0].timed_out);
    assert_eq!(reply.results[0].termination, Some(Termination::ExitCode(0)));
    assert!(wait_gone(holder.0), "output holder {} survived", holder.0);

    let reply = run(
        &mut client,
        call(HookDriver::Lxc, "c1", "started", "begin", ""),
    )
    .await;
    let helper = Sleeper(pid_in(&hooks, "daemon.pid"), "613");
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    assert!(runs_sleeper(helper.0, "613"), "detached helper was killed");
    drop(helper);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_output_is_capped_and_unread_input_does_not_fail() {
    let hooks = Hooks::new();
    hooks.script(
        "qemu",
        "head -c 5000 /dev/zero | tr '\\0' o\nhead -c 3000 /dev/zero | tr '\\0' e >&2\nexit 0\n",
    );
    let (_svc, mut client) = executor(&hooks, "max_output_bytes: 1000\n").await;
    let mut req = call(HookDriver::Qemu, "vm1", "start", "begin", "");
    // Far more than a pipe holds, never read by the script.
    req.input = vec![b'x'; 2 << 20];
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    let r = &reply.results[0];
    assert_eq!(r.stdout, vec![b'o'; 1000]);
    assert_eq!(r.stderr, vec![b'e'; 1000]);
    assert!(r.stdout_truncated && r.stderr_truncated);

    // A filter whose document was cut fails rather than pass half of it on.
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "migrate", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert!(!reply.results[0].success);
    assert!(reply.error.contains("capture cap"), "{}", reply.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_filter_output_chains_through_the_scripts() {
    let hooks = Hooks::new();
    // $4 (extra) selects what the test wants of 20-fail.
    hooks.recorder("qemu", "main", "printf '<domain>main</domain>'");
    hooks.recorder("qemu.d/10-blank", "10-blank", "printf '  \\n\\n'");
    hooks.recorder(
        "qemu.d/20-fail",
        "20-fail",
        "if [ \"$4\" = fail ]; then echo '<bad/>'; exit 1; fi",
    );
    hooks.recorder(
        "qemu.d/30-edit",
        "30-edit",
        "printf '<domain>edited</domain>'",
    );
    hooks.recorder("qemu.d/40-last", "40-last", "exit 0");
    let (_svc, mut client) = executor(&hooks, "").await;

    let mut req = call(HookDriver::Qemu, "vm1", "migrate", "begin", "");
    req.input = XML.into();
    let reply = run(&mut client, req.clone()).await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
    assert_eq!(hooks.read("main.stdin"), XML);
    assert_eq!(hooks.read("10-blank.stdin"), "<domain>main</domain>");
    // Blank output keeps the document.
    assert_eq!(hooks.read("20-fail.stdin"), "<domain>main</domain>");
    assert_eq!(hooks.read("30-edit.stdin"), "<domain>main</domain>");
    assert_eq!(hooks.read("40-last.stdin"), "<domain>edited</domain>");
    assert_eq!(reply.output, b"<domain>edited</domain>");
    // The document is returned once, in `output`, not per script.
    assert!(
        reply.results.iter().all(|r| r.stdout.is_empty()),
        "{reply:?}"
    );

    // After a failure, later scripts get the original document again.
    req.extra = "fail".into();
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert_eq!(hooks.read("20-fail.stdin"), "<domain>main</domain>");
    assert_eq!(hooks.read("30-edit.stdin"), XML);
    assert_eq!(hooks.read("40-last.stdin"), XML);

    // Not a filter operation: everybody gets the input, no output.
    let mut req = call(HookDriver::Qemu, "vm1", "prepare", "begin", "");
    req.input = XML.into();
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Success);
    assert!(reply.output.is_empty());
    assert_eq!(hooks.read("40-last.stdin"), XML);
    assert_eq!(hooks.read("10-blank.stdin"), XML);

    // Every script blank or silent: empty output (keep the input).
    fs::remove_file(hooks.dir().join("qemu.d/30-edit")).unwrap();
    hooks.recorder("qemu", "main", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "restore", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success);
    assert!(reply.output.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn test_discovery_is_cached_until_reload_sighup_or_daemon_reload() {
    let hooks = Hooks::new();
    hooks.recorder("qemu", "qemu", "exit 0");
    let (svc, mut client) = executor(&hooks, "").await;

    // A driver with no hooks runs nothing.
    let reply = run(
        &mut client,
        call(HookDriver::Network, "net0", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
    assert!(reply.results.is_empty());

    // Added without a discovery: not run (libvirt's cache).
    hooks.recorder("lxc.d/10-new", "lxc-new", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Lxc, "c1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
    assert!(!hooks.exists("lxc-new.argv"));
    // But an already active driver sees new scripts at once.
    hooks.recorder("qemu.d/10-new", "qemu-new", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.results.len(), 2);
    assert!(hooks.exists("qemu-new.argv"));

    // ReloadHooks picks the lxc script up (and runs nothing itself).
    let reloaded = client
        .reload_hooks(ReloadHooksRequest {})
        .await
        .unwrap()
        .into_inner();
    let lxc = reloaded
        .drivers
        .iter()
        .find(|d| d.driver() == HookDriver::Lxc)
        .unwrap();
    assert!(lxc.active);
    assert_eq!(strings(&lxc.scripts, &hooks.dir()), ["lxc.d/10-new"]);
    assert!(!hooks.exists("lxc-new.argv"));
    let reply = run(
        &mut client,
        call(HookDriver::Lxc, "c1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success);
    assert!(hooks.exists("lxc-new.argv"));

    // SIGHUP: the libxl script is found.
    hooks.recorder("libxl", "libxl", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Libxl, "x1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
    // SAFETY: kill(2) on the executor this test started.
    unsafe { libc::kill(svc.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        let listed = client
            .list_hooks(ListHooksRequest {
                driver: HookDriver::Libxl as i32,
            })
            .await
            .unwrap()
            .into_inner();
        if listed.drivers[0].active {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not rediscover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = run(
        &mut client,
        call(HookDriver::Libxl, "x1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success);
    assert!(hooks.exists("libxl.argv"));

    // The daemon hook's reload discovers too, before running.
    hooks.recorder("network", "network", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Daemon, "", "reload", "begin", "SIGHUP"),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
    let reply = run(
        &mut client,
        call(HookDriver::Network, "net0", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success);

    // Everything removed from an active driver: nothing runs, a success.
    fs::remove_file(hooks.dir().join("network")).unwrap();
    let reply = run(
        &mut client,
        call(HookDriver::Network, "net0", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
}

/// Shell: wait (bounded, ~20 s) until `$OUT/<name>` exists, else exit 9.
fn wait_file(name: &str) -> String {
    format!(
        "n=0; while [ ! -e \"$OUT/{name}\" ]; do n=$((n+1)); \
         [ $n -gt 400 ] && exit 9; sleep 0.05; done\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn test_calls_run_in_parallel_up_to_the_cap() {
    let hooks = Hooks::new();
    // Each of `a` and `b` waits for the other: only parallel runs succeed.
    // `hold` waits for the test's `release` file.
    hooks.script(
        "qemu",
        &format!(
            "touch \"$OUT/$1.started\"\ncase \"$1\" in\n\
             a) {}\n;;\nb) {}\n;;\nhold*) {}\n;;\nesac\nexit 0\n",
            wait_file("b.started"),
            wait_file("a.started"),
            wait_file("release")
        ),
    );
    let (_svc, client) = executor(&hooks, "max_concurrent_runs: 2\n").await;

    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        c1.run_hook(call(HookDriver::Qemu, "a", "start", "begin", "")),
        c2.run_hook(call(HookDriver::Qemu, "b", "start", "begin", "")),
    );
    assert_eq!(a.unwrap().into_inner().outcome(), HookOutcome::Success);
    assert_eq!(b.unwrap().into_inner().outcome(), HookOutcome::Success);

    // Two calls in progress: a third waits for a slot until its deadline,
    // then is refused, nothing run.
    let held: Vec<_> = ["hold1", "hold2"]
        .into_iter()
        .map(|name| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.run_hook(call(HookDriver::Qemu, name, "start", "begin", ""))
                    .await
            })
        })
        .collect();
    let deadline = Instant::now() + POLL_TIMEOUT;
    while !(hooks.exists("hold1.started") && hooks.exists("hold2.started")) {
        assert!(Instant::now() < deadline, "the held calls never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = client.clone();
    let mut third = tonic::Request::new(call(HookDriver::Qemu, "third", "start", "begin", ""));
    third.set_timeout(Duration::from_secs(2));
    let status = c.run_hook(third).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("HOOK_EXECUTOR_BUSY"));
    assert!(
        status.message().contains("max_concurrent_runs"),
        "{}",
        status.message()
    );
    assert!(!hooks.exists("third.started"));
    // A call without a deadline (a stopped hook, say) waits for a slot
    // and runs once one frees up.
    let mut c4 = client.clone();
    let waiting = tokio::spawn(async move {
        c4.run_hook(call(HookDriver::Qemu, "waiter", "stopped", "end", ""))
            .await
    });
    // It is waiting, not refused, while both slots stay taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the waiting call was answered");
    assert!(!hooks.exists("waiter.started"));
    fs::write(hooks.out().join("release"), "").unwrap();
    let reply = tokio::time::timeout(POLL_TIMEOUT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_inner().outcome(), HookOutcome::Success);
    assert!(hooks.exists("waiter.started"));
    for h in held {
        let reply = tokio::time::timeout(POLL_TIMEOUT, h)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_inner().outcome(), HookOutcome::Success);
    }
    let reply = run(
        &mut c,
        call(HookDriver::Qemu, "hold3", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success);
}

#[tokio::test(flavor = "multi_thread")]
async fn test_bad_requests_are_invalid_argument() {
    let hooks = Hooks::new();
    hooks.recorder("qemu", "qemu", "exit 0");
    let (svc, mut client) = executor(&hooks, "max_timeout_secs: 100\ntimeout_secs: 10\n").await;

    let mut nul_op = call(HookDriver::Qemu, "vm1", "sta\0rt", "begin", "");
    nul_op.op = "sta\0rt".into();
    let mut long = call(HookDriver::Qemu, "vm1", "start", "begin", "");
    set_timeout(&mut long, 101);
    let mut zero = call(HookDriver::Qemu, "vm1", "start", "begin", "");
    set_timeout(&mut zero, 0);
    let mut unknown = call(HookDriver::Qemu, "vm1", "start", "begin", "");
    unknown.driver = 99;
    let cases = [
        (
            call(HookDriver::Unspecified, "vm1", "start", "begin", ""),
            "driver: required",
        ),
        (unknown, "driver: unknown value 99"),
        (
            call(HookDriver::Qemu, "vm1", "", "begin", ""),
            "op: required",
        ),
        (nul_op, "op: must not contain a NUL byte"),
        (
            call(HookDriver::Qemu, "v\0m", "start", "begin", ""),
            "object: must not contain a NUL byte",
        ),
        (long, "timeout: 101s is more than the maximum of 100s"),
        (zero, "timeout: must be more than 0"),
    ];
    for (req, want) in cases {
        let status = client.run_hook(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(reason_of(&status).as_deref(), Some("INVALID_ARGUMENT"));
        // The BadRequest names the field the message starts with.
        let field = want.split(':').next().unwrap();
        assert_eq!(violated_fields(&status), [field], "{status:?}");
        assert!(
            status.message().starts_with(want),
            "{} vs {want}",
            status.message()
        );
    }
    assert!(!hooks.exists("qemu.argv"), "a refused request ran a hook");
    let status = client
        .list_hooks(ListHooksRequest { driver: 77 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // The same through grpcurl and reflection, as an operator would call it.
    let addr = svc.addr.to_string();
    let header = format!("x-qvirt-internal-token: {}", internal_token());
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"driver": "HOOK_DRIVER_QEMU", "object": "vm1", "op": "prepare", "sub_op": "begin"}"#,
        &addr,
        "qvirt.v1.HookExecutor/RunHook",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json = text(&out.stdout);
    assert!(json.contains("HOOK_OUTCOME_SUCCESS"), "{json}");
    assert!(hooks.read("qemu.argv").contains("arg=prepare\n"));
    let out = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"op": "start"}"#,
        &addr,
        "qvirt.v1.HookExecutor/RunHook",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("InvalidArgument"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_missing_hooks_dir_means_no_hooks_and_bad_config_exits_2() {
    let hooks = Hooks::new();
    fs::remove_dir(hooks.dir()).unwrap();
    let (_svc, mut client) = executor(&hooks, "").await;
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "start", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::NoHooks);
    let listed = client
        .list_hooks(ListHooksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .drivers
            .iter()
            .all(|d| !d.active && d.scripts.is_empty())
    );

    let out = qvirt_integration_tests::run(
        &qvirt_integration_tests::bin_path("qvirt-hookexec"),
        &["--hooks-dir", "relative/hooks"],
        qvirt_integration_tests::COMMAND_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("qvirt-hookexec: invalid config: hooks_dir = \"relative/hooks\": "),
        "{stderr}"
    );
}

/// Nine scripts each writing 400 KB to stdout and to stderr: a non-filter
/// reply keeps only a short stdout tail and cuts stderr to fit, so a client
/// with gRPC's default 4 MiB limit still gets the answer (it was ~7 MB).
#[tokio::test(flavor = "multi_thread")]
async fn test_chatty_scripts_reply_under_the_message_limit() {
    let hooks = Hooks::new();
    let chatty = "head -c 400000 /dev/zero | tr '\\0' o\nprintf 'last line'\n\
                  printf 'why: ' >&2\nhead -c 400000 /dev/zero | tr '\\0' e >&2\n\
                  echo \"$0\" >> \"$OUT/order\"\nexit 0\n";
    hooks.script("qemu", chatty);
    for i in 1..=8 {
        hooks.script(&format!("qemu.d/{i}"), chatty);
    }
    let (_svc, mut client) = executor(&hooks, "max_output_bytes: 524288\n").await;
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "prepare", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{}", reply.error);
    assert_eq!(reply.results.len(), 9);
    assert_eq!(hooks.order().len(), 9);
    // (The default 4 MiB client limit above took it; the captures fit 3 MiB.)
    let size: usize = reply
        .results
        .iter()
        .map(|r| r.stdout.len() + r.stderr.len())
        .sum();
    assert!(size <= 3 << 20, "{size} bytes of output");
    for r in &reply.results {
        assert!(r.success);
        // stdout: a short tail, ending where the script's output ended.
        assert!(r.stdout.len() <= 4096 && r.stdout.ends_with(b"olast line"));
        assert!(r.stdout_truncated);
        // stderr: its start, cut to a share of the budget.
        assert!(r.stderr.starts_with(b"why: eee"), "{:?}", &r.stderr[..10]);
        assert!(r.stderr_truncated && r.stderr.len() > 200_000 && r.stderr.len() < 400_000);
    }
}

/// The gRPC deadline bounds the whole call: the running script's process
/// group is killed before it, the next script never starts, the answer
/// is DEADLINE_EXCEEDED (not tonic's CANCELLED after the fact).
#[tokio::test(flavor = "multi_thread")]
async fn test_deadline_kills_the_running_script_and_starts_no_more() {
    let hooks = Hooks::new();
    hooks.script(
        "qemu",
        "sleep 615 &\necho $! > \"$OUT/bg.pid.tmp\"\nmv \"$OUT/bg.pid.tmp\" \"$OUT/bg.pid\"\nwait\n",
    );
    hooks.recorder("qemu.d/never", "never", "exit 0");
    // Per-script timeout far beyond the call's deadline.
    let (_svc, mut client) = executor(&hooks, "timeout_secs: 600\n").await;
    let mut req = tonic::Request::new(call(HookDriver::Qemu, "vm1", "prepare", "begin", ""));
    req.set_timeout(Duration::from_secs(3));
    let status = tokio::time::timeout(POLL_TIMEOUT, client.run_hook(req))
        .await
        .unwrap()
        .unwrap_err();
    let bg = Sleeper(pid_in(&hooks, "bg.pid"), "615");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("HOOK_DEADLINE_EXCEEDED")
    );
    assert!(
        status.message().contains("1 of 2 scripts started"),
        "{}",
        status.message()
    );
    assert!(
        wait_gone(bg.0),
        "the script's child {} survived the deadline",
        bg.0
    );
    assert!(
        !hooks.exists("never.argv"),
        "a script started after the deadline"
    );
}

/// The input is bytes: a document that is not UTF-8 reaches the script
/// unchanged, and a filter's output comes back unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn test_non_utf8_input_passes_through() {
    let hooks = Hooks::new();
    hooks.script("qemu", "tee \"$OUT/stdin\"\n");
    let (_svc, mut client) = executor(&hooks, "").await;
    let doc = b"<domain>\xff\xfe\x00 caf\xe9</domain>".to_vec();
    let mut req = call(HookDriver::Qemu, "vm1", "restore", "begin", "");
    req.input = doc.clone();
    let reply = run(&mut client, req).await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{}", reply.error);
    assert_eq!(fs::read(hooks.out().join("stdin")).unwrap(), doc);
    assert_eq!(reply.output, doc);
}

/// A DRIVER.d that exists but cannot be opened fails the call after the
/// main script, with libvirt's text naming the path (libvirt's
/// `virDirOpenIfExists` ignores only ENOENT).
#[tokio::test(flavor = "multi_thread")]
async fn test_unopenable_dot_d_fails_the_call_after_the_main_script() {
    let hooks = Hooks::new();
    hooks.recorder("qemu", "main", "exit 0");
    fs::write(hooks.dir().join("qemu.d"), "").unwrap();
    let (_svc, mut client) = executor(&hooks, "").await;

    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "prepare", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert_eq!(
        reply.error,
        format!(
            "cannot open directory '{}': Not a directory",
            hooks.dir().join("qemu.d").display()
        )
    );
    // The main script ran first, as in libvirt, and succeeded.
    assert_eq!(hooks.order(), ["main"]);
    assert_eq!(reply.results.len(), 1);
    assert!(reply.results[0].success, "{reply:?}");

    // Without a main script the call fails all the same.
    fs::remove_file(hooks.dir().join("qemu")).unwrap();
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "prepare", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Failed, "{reply:?}");
    assert!(reply.results.is_empty(), "{reply:?}");
    assert!(
        reply.error.starts_with("cannot open directory"),
        "{reply:?}"
    );

    // Once DRIVER.d is a directory again, the call succeeds.
    fs::remove_file(hooks.dir().join("qemu.d")).unwrap();
    hooks.recorder("qemu.d/10-a", "a", "exit 0");
    let reply = run(
        &mut client,
        call(HookDriver::Qemu, "vm1", "prepare", "begin", ""),
    )
    .await;
    assert_eq!(reply.outcome(), HookOutcome::Success, "{reply:?}");
}
