//! What the hook executor adds to running a hook. Measured side by side in
//! one run, in alternating rounds so machine noise hits every variant
//! alike, all running the same small `/bin/sh` script that reads a 1 KiB
//! document from stdin:
//! - the reference: a bare `std::process::Command` spawn with piped stdio,
//!   input written, output collected (what any executor must do), and the
//!   same forced to fork instead of `posix_spawn` (diagnosis: the executor
//!   forks, to reset its child as libvirt does);
//! - `exec::run_script` in process (process group, cleared env, signal and
//!   fd reset, own execve, capped capture, timeout);
//! - a RunHook through the real `qvirt-hookexec` binary (release, as `make
//!   bench` builds it) on loopback, for
//!   one script and for main + 6 `.d` scripts (libvirt's own figure for a
//!   small sh hook, from research/hooks.md, is about 25 ms per invocation
//!   on another machine: context only, not measured here).
//!
//! Run with `cargo bench -p qvirt-hookexec --bench run`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qvirt_hookexec::exec::{Invocation, hook_env, run_script};
use qvirt_integration_tests::measure::{Spread, Unit};
use qvirt_integration_tests::{ChildGuard, internal, write_internal_token};
use qvirt_proto::v1::hook_executor_client::HookExecutorClient;
use qvirt_proto::v1::{HookDriver, HookOutcome, RunHookRequest};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const WARMUP: usize = 20;
const ROUNDS: usize = 20;
const PER_ROUND: usize = 10;

const SCRIPT: &str = "#!/bin/sh\ncat >/dev/null\nexit 0\n";

fn report(name: &str, samples: Vec<Duration>) -> Duration {
    let s = Spread::of(samples);
    println!("{}", s.line(name, 40, Unit::Millis));
    s.median
}

fn write_script(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, SCRIPT).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn bare(path: &Path, args: &[String; 4], input: &[u8], fork: bool) -> Duration {
    let start = Instant::now();
    let mut cmd = Command::new(path);
    if fork {
        // SAFETY: an empty closure; it only makes std fork instead of
        // posix_spawn, as the executor's own pre-exec step does.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || Ok(()));
        }
    }
    let mut child = cmd
        .args(args)
        .env_clear()
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    start.elapsed()
}

fn start_executor(hooks: &Path) -> (ChildGuard, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_qvirt-hookexec"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--hooks-dir")
            .arg(hooks)
            .arg("--internal-token-file")
            .arg(write_internal_token(hooks))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "qvirt-hookexec never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, addr)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    write_script(&one.join("qemu"));
    let seven = dir.path().join("seven");
    write_script(&seven.join("qemu"));
    for i in 0..6 {
        write_script(&seven.join(format!("qemu.d/{i:02}-hook")));
    }
    let script = one.join("qemu");
    let args = ["vm1", "prepare", "begin", "-"].map(String::from);
    let input = format!("<domain>{}</domain>\n", "x".repeat(1000)).into_bytes();
    let env: Vec<(String, OsString)> = hook_env(|k| std::env::var_os(k));

    let rt = Runtime::new().unwrap();
    let (_one_svc, one_addr) = start_executor(&one);
    let (_seven_svc, seven_addr) = start_executor(&seven);
    let mut one_client = rt
        .block_on(HookExecutorClient::connect(format!("http://{one_addr}")))
        .unwrap();
    let mut seven_client = rt
        .block_on(HookExecutorClient::connect(format!("http://{seven_addr}")))
        .unwrap();
    let req = RunHookRequest {
        driver: HookDriver::Qemu as i32,
        object: "vm1".into(),
        op: "prepare".into(),
        sub_op: "begin".into(),
        input: input.clone(),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let inv = Invocation {
        path: &script,
        args: &args,
        env: &env,
        input: &input,
        timeout: Duration::from_secs(30),
        max_output: 256 << 10,
        stdout_tail: Some(qvirt_hookexec::run::STDOUT_TAIL_BYTES),
    };

    let in_process = || {
        let start = Instant::now();
        let r = rt.block_on(run_script(&inv, &stop));
        assert!(r.success(), "{r:?}");
        start.elapsed()
    };
    let rpc = |client: &mut HookExecutorClient<_>, n: usize| {
        let start = Instant::now();
        let reply = rt
            .block_on(client.run_hook(internal(req.clone())))
            .unwrap()
            .into_inner();
        assert_eq!(reply.outcome(), HookOutcome::Success);
        assert_eq!(reply.results.len(), n);
        start.elapsed()
    };

    for _ in 0..WARMUP {
        bare(&script, &args, &input, false);
        bare(&script, &args, &input, true);
        in_process();
        rpc(&mut one_client, 1);
        rpc(&mut seven_client, 7);
    }
    let (mut b, mut f, mut e, mut r1, mut r7) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            b.push(bare(&script, &args, &input, false));
        }
        for _ in 0..PER_ROUND {
            f.push(bare(&script, &args, &input, true));
        }
        for _ in 0..PER_ROUND {
            e.push(in_process());
        }
        for _ in 0..PER_ROUND {
            r1.push(rpc(&mut one_client, 1));
        }
        for _ in 0..PER_ROUND {
            r7.push(rpc(&mut seven_client, 7));
        }
    }
    println!("hook executor: one /bin/sh hook reading 1 KiB of stdin");
    let bare_median = report("bare std::process spawn (reference)", b);
    report("bare spawn forced to fork (diagnosis)", f);
    let exec_median = report("exec::run_script in process", e);
    let one_median = report("RunHook over gRPC, 1 script", r1);
    let seven_median = report("RunHook over gRPC, main + 6 .d scripts", r7);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "added at the median: run_script {:+.2} ms, RunHook(1) {:+.2} ms; \
         RunHook(7) per script {:.2} ms",
        ms(exec_median) - ms(bare_median),
        ms(one_median) - ms(bare_median),
        ms(seven_median) / 7.0
    );
}
