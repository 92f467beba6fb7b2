//! Every service binary, as an operator meets it: it starts with no config,
//! reports SERVING, lists exactly its services over reflection, describes
//! its messages to grpcurl, stops on SIGTERM, and refuses bad config with
//! one clear line and exit code 2.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use qvirt_integration_tests::{COMMAND_TIMEOUT, ChildGuard, Service, bin_path, grpcurl, run, text};

/// Each service binary and the qvirt services it serves.
const SERVICES: [(&str, &[&str]); 5] = [
    ("qvirt-supervisor", &["qvirt.v1.Supervisor"]),
    (
        "qvirt-eventbus",
        &["qvirt.v1.EventBus", "qvirt.v1.EventIngest"],
    ),
    ("qvirt-hookexec", &["qvirt.v1.HookExecutor"]),
    ("qvirt-agentd", &["qvirt.v1.GuestAgent"]),
    (
        "qvirt-gateway",
        &[
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
            "qvirt.v1.Supervisor",
        ],
    ),
];

/// A service started with the flags that keep it inside `dir`: the
/// supervisor's state and run dirs there, instead of the system-wide
/// defaults.
fn start_local(bin: &str, dir: &tempfile::TempDir) -> Service {
    let (state, run) = (
        dir.path().join(bin).join("state"),
        dir.path().join(bin).join("run"),
    );
    match bin {
        "qvirt-supervisor" => Service::start(
            bin,
            &[
                "--state-dir",
                state.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
            ],
        ),
        _ => Service::start(bin, &[]),
    }
}

/// What every server lists besides its own services.
const INFRA: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[tokio::test(flavor = "multi_thread")]
async fn test_every_service_serves_health_and_lists_exactly_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let mut running: Vec<(Service, &str, &[&str])> = SERVICES
        .iter()
        .map(|(bin, names)| (start_local(bin, &dir), *bin, *names))
        .collect();
    for (svc, bin, names) in &mut running {
        svc.wait_serving("").await;
        // The gateway's services follow their backends (none run here).
        for name in names.iter().filter(|_| *bin != "qvirt-gateway") {
            svc.wait_serving(name).await;
        }
        let out = grpcurl(&["-plaintext", &svc.addr.to_string(), "list"]);
        assert!(out.status.success(), "grpcurl list: {}", text(&out.stderr));
        let mut listed: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
        listed.sort();
        let mut want: Vec<String> = names
            .iter()
            .chain(INFRA.iter())
            .map(|s| s.to_string())
            .collect();
        want.sort();
        assert_eq!(listed, want, "services listed by {}", svc.addr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unknown_service_health_is_not_found() {
    let mut svc = Service::start("qvirt-eventbus", &[]);
    svc.wait_serving("").await;
    let err = svc.health("qvirt.v1.NoSuchService").await.unwrap_err();
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn test_grpcurl_describes_services_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = start_local("qvirt-supervisor", &dir);
    svc.wait_serving("").await;
    let addr = svc.addr.to_string();

    let out = grpcurl(&["-plaintext", &addr, "describe", "qvirt.v1.Supervisor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let described = text(&out.stdout);
    for rpc in ["DefineDomain", "StartDomain", "MonitorCommand"] {
        assert!(described.contains(&format!("rpc {rpc}")), "{described}");
    }

    let out = grpcurl(&["-plaintext", &addr, "describe", "qvirt.v1.DomainSpec"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let described = text(&out.stdout);
    assert!(described.contains("message DomainSpec"), "{described}");
    assert!(described.contains("name ="), "{described}");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_gateway_does_not_expose_internal_services() {
    let mut gw = Service::start("qvirt-gateway", &[]);
    gw.wait_serving("").await;
    let out = grpcurl(&[
        "-plaintext",
        &gw.addr.to_string(),
        "describe",
        "qvirt.v1.HookExecutor",
    ]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Symbol not found") || stderr.contains("not found"),
        "{stderr}"
    );
    // The public services are there to describe.
    let out = grpcurl(&[
        "-plaintext",
        &gw.addr.to_string(),
        "describe",
        "qvirt.v1.Supervisor",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sigterm_stops_every_service_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, _) in SERVICES {
        let mut svc = start_local(bin, &dir);
        svc.wait_serving("").await;
        let status = svc.terminate();
        assert!(status.success(), "{bin} exited with {status} after SIGTERM");
    }
}

/// SIGHUP's default action ends a process; libvirtd reloads on it, and no
/// qvirt service may die of it: each logs it and keeps serving (what it
/// reloads is tested per service).
#[tokio::test(flavor = "multi_thread")]
async fn test_sighup_never_stops_a_service() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, _) in SERVICES {
        let mut svc = start_local(bin, &dir);
        svc.wait_serving("").await;
        for _ in 0..2 {
            svc.signal(libc::SIGHUP);
        }
        svc.wait_log("SIGHUP", Duration::from_secs(20)).await;
        svc.wait_serving("").await;
        let status = svc.terminate();
        assert!(
            status.success(),
            "{bin} exited with {status} after SIGHUP, SIGTERM"
        );
    }
}

/// Text logs written to a file (not a terminal) carry no colour codes.
#[tokio::test(flavor = "multi_thread")]
async fn test_text_logs_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, _) in SERVICES {
        let mut svc = start_local(bin, &dir);
        svc.wait_serving("").await;
        let log = svc.stderr();
        assert!(log.contains("serving"), "{bin}: {log}");
        assert!(!log.contains('\u{1b}'), "{bin} wrote escape codes: {log:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus.sock");
    let mut child = ChildGuard::spawn(
        std::process::Command::new(bin_path("qvirt-eventbus"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(std::process::Stdio::null()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on {}",
            sock.display()
        );
        assert!(child.try_wait().is_none(), "qvirt-eventbus exited");
        if sock.exists() {
            // Over a unix socket grpcurl must be told a valid :authority; by
            // default it sends the path, which HTTP/2 servers reject.
            let out = grpcurl(&[
                "-plaintext",
                "-unix",
                "-authority",
                "localhost",
                sock.to_str().unwrap(),
                "list",
            ]);
            if out.status.success() {
                break text(&out.stdout);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = child.terminate();
    assert!(listed.lines().any(|l| l == "qvirt.v1.EventBus"), "{listed}");
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket file left behind after a clean stop");
}

/// Runs `bin args` and checks the exit code 2 and the one-line error.
fn assert_config_error(bin: &str, args: &[&str], needle: &str) {
    let out = run(&bin_path(bin), args, COMMAND_TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.starts_with(&format!("{bin}: ")), "{stderr}");
    assert!(stderr.contains(needle), "want {needle:?} in: {stderr}");
}

#[test]
fn test_bad_config_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let malformed = write("malformed.yaml", "listen: [127.0.0.1:1\n");
    let unknown = write(
        "unknown.yaml",
        "log_format: json\nlisten_addr: 127.0.0.1:1\n",
    );
    let bad_addr = write("badaddr.yaml", "listen: somewhere\n");
    let bad_format = write("badfmt.yaml", "log_format: xml\n");
    let missing = dir.path().join("absent.yaml");
    let missing = missing.to_str().unwrap();

    for (bin, _) in SERVICES {
        assert_config_error(bin, &["--config", &malformed], "invalid config file");
        assert_config_error(bin, &["--config", &unknown], "unknown field `listen_addr`");
        assert_config_error(bin, &["--config", &unknown], "line 2 column 1");
        assert_config_error(
            bin,
            &["--config", &bad_addr],
            "invalid listen address \"somewhere\"",
        );
        assert_config_error(bin, &["--config", &bad_format], "unknown variant `xml`");
        assert_config_error(bin, &["--config", missing], "cannot read config file");
        assert_config_error(bin, &["--config", missing], "absent.yaml");
        assert_config_error(
            bin,
            &["--preface-timeout-ms", "0"],
            "preface_timeout_ms = \"0\": must be between 100 and 600000",
        );
    }
}

#[test]
fn test_unusable_internal_token_files_exit_2_with_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let secret = "0123456789abcdef0123456789abcdef\n";
    let open_to_all = write("open", secret, 0o644);
    let short = write("short", "s3cret\n", 0o600);
    for bin in ["qvirt-eventbus", "qvirt-hookexec", "qvirt-supervisor"] {
        let flag = "--internal-token-file";
        assert_config_error(
            bin,
            &[flag, &open_to_all],
            "invalid config: internal_token_file = ",
        );
        assert_config_error(
            bin,
            &[flag, &open_to_all],
            "readable or writable by every user (mode 0644)",
        );
        assert_config_error(bin, &[flag, &short], "at least 32 are needed");
        assert_config_error(bin, &[flag, "/nonexistent/token"], "cannot open");
    }
}

#[test]
fn test_bad_flags_exit_2_naming_the_flag() {
    for (bin, _) in SERVICES {
        let out = run(&bin_path(bin), &["--listen", "nowhere"], COMMAND_TIMEOUT);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--listen"), "{stderr}");
        assert!(stderr.contains("invalid listen address"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_port_in_use_exits_1_with_one_line() {
    let mut first = Service::start("qvirt-hookexec", &[]);
    first.wait_serving("").await;
    let addr = first.addr.to_string();
    let out = run(
        &bin_path("qvirt-hookexec"),
        &["--listen", &addr],
        COMMAND_TIMEOUT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("qvirt-hookexec: cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn test_help_and_version() {
    for (bin, _) in SERVICES {
        let out = run(&bin_path(bin), &["--version"], COMMAND_TIMEOUT);
        assert!(out.status.success());
        assert_eq!(
            text(&out.stdout).trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION"))
        );
        let out = run(&bin_path(bin), &["--help"], COMMAND_TIMEOUT);
        assert!(out.status.success());
        let help = text(&out.stdout);
        for flag in ["--config", "--listen", "--log-format"] {
            assert!(help.contains(flag), "{bin} --help lacks {flag}: {help}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_json_logs_are_json_lines() {
    let mut svc = Service::start("qvirt-agentd", &["--log-format", "json"]);
    svc.wait_serving("").await;
    svc.terminate();
    let logs = svc.stderr();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON line: {line}"
        );
    }
    assert!(logs.contains("\"message\":\"serving\""), "{logs}");
}
