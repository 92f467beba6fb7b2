//! The real `qvirt-agentd` against real guest agents in unix-listen mode:
//! Debian's qemu-ga 7.2 and our qvirt-ga, both required (a missing one is
//! a failure naming `make deps` or `make build-debug`). Every scenario runs
//! against each agent, each with its own statedir, socket and agentd.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qvirt_integration_tests::scratch_guest::ScratchGuest;
use qvirt_integration_tests::{
    ChildGuard, InternalChannel, Service, grpcurl_internal, internal_channel, run, text, tool_path,
};
use qvirt_proto::v1::guest_agent_client::GuestAgentClient;
use qvirt_proto::v1::{
    AddAuthorizedKeysRequest, CommandRequest, ExecRequest, FileWriteMode, FsFreezeState,
    GetAgentInfoRequest, GetAuthorizedKeysRequest, GetExecStatusRequest, GetFreezeStatusRequest,
    GetFsInfoRequest, GetGuestVcpusRequest, GetHostNameRequest, GetOsInfoRequest, GetTimeRequest,
    GetTimezoneRequest, GuestShutdownMode, GuestVcpuState, ListNetworkInterfacesRequest,
    ListUsersRequest, PingRequest, ReadFileRequest, RemoveAuthorizedKeysRequest,
    SetGuestVcpusRequest, SetUserPasswordRequest, ShutdownRequest, ThawFilesystemsRequest,
    WriteFileRequest, guest_exec_status,
};
use tonic::Code;

/// How long an agent may take to listen on its socket.
const AGENT_READY: Duration = Duration::from_secs(20);
/// Bound on every gRPC call of these tests.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

const UUID: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

/// A guest agent program that speaks unix-listen.
#[derive(Debug, Clone)]
struct AgentKind {
    name: &'static str,
    program: PathBuf,
}

/// The agents to run every scenario against: the real qemu-ga and
/// qvirt-ga, both required (a missing one fails the test naming the
/// command that provides it).
fn agents() -> Vec<AgentKind> {
    let qvirt_ga = qvirt_integration_tests::bin_path("qvirt-ga");
    let help = run(&qvirt_ga, &["--help"], Duration::from_secs(10));
    let help = format!("{}{}", text(&help.stdout), text(&help.stderr));
    assert!(
        help.contains("unix-listen"),
        "{} --help does not offer unix-listen:\n{help}",
        qvirt_ga.display()
    );
    vec![
        AgentKind {
            name: "qemu-ga",
            program: tool_path("qemu-ga"),
        },
        AgentKind {
            name: "qvirt-ga",
            program: qvirt_ga,
        },
    ]
}

/// One running agent in its own statedir.
struct Agent {
    kind: AgentKind,
    dir: PathBuf,
    guard: Option<ChildGuard>,
}

impl Agent {
    /// Starts `kind` with its socket and statedir in `dir`.
    fn start(kind: &AgentKind, dir: &Path, extra: &[&str]) -> Agent {
        let mut agent = Agent {
            kind: kind.clone(),
            dir: dir.to_owned(),
            guard: None,
        };
        agent.spawn(extra);
        agent
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(&self.kind.program);
        cmd.arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(self.sock())
            .arg("-t")
            .arg(&self.dir)
            .args(extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut guard = ChildGuard::spawn(&mut cmd);
        let deadline = Instant::now() + AGENT_READY;
        loop {
            if std::os::unix::net::UnixStream::connect(self.sock()).is_ok() {
                break;
            }
            if let Some(status) = guard.try_wait() {
                panic!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.kind.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not listening on {} within {AGENT_READY:?}; log:\n{}",
                self.kind.name,
                self.sock().display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.guard = Some(guard);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL (a frozen agent ignores SIGTERM) and reap, by pid.
    fn kill(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.signal(libc::SIGKILL);
            assert!(
                g.wait_timeout(Duration::from_secs(10)).is_some(),
                "{} survived SIGKILL",
                self.kind.name
            );
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(g) = &self.guard {
            g.signal(sig);
        }
    }
}

/// An agent, and an agentd whose static map points `vm` and [`UUID`] at
/// its socket.
struct Setup {
    agent: Agent,
    agentd: Service,
    client: GuestAgentClient<InternalChannel>,
    _dir: tempfile::TempDir,
}

async fn setup(kind: &AgentKind, agent_args: &[&str], before: impl FnOnce(&Path)) -> Setup {
    setup_with(kind, agent_args, before, "").await
}

/// [`setup`] with more lines for agentd's config.
async fn setup_with(
    kind: &AgentKind,
    agent_args: &[&str],
    before: impl FnOnce(&Path),
    extra_yaml: &str,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    before(dir.path());
    let agent = Agent::start(kind, dir.path(), agent_args);
    let sock = agent.sock();
    let yaml = format!(
        "agents:\n  vm: {s}\n  {UUID}: {s}\ncommand_timeout_ms: 10000\nsync_timeout_ms: 3000\n\
         file_chunk_bytes: 65536\nexec_poll_max_ms: 50\n{extra_yaml}",
        s = sock.display()
    );
    let mut agentd = Service::start_with_config("qvirt-agentd", &yaml, &[]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let client = GuestAgentClient::new(internal_channel(agentd.url()).await);
    Setup {
        agent,
        agentd,
        client,
        _dir: dir,
    }
}

/// Awaits a call with [`CALL_TIMEOUT`].
async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
        .map(tonic::Response::into_inner)
}

/// A request for domain `vm` with every other field at its default.
macro_rules! vm {
    ($req:ident) => {
        $req {
            domain: "vm".into(),
            ..Default::default()
        }
    };
}

fn ping(domain: &str) -> PingRequest {
    PingRequest {
        domain: domain.into(),
        ..Default::default()
    }
}

/// The message of an error status with `code` and ErrorInfo `reason`.
fn expect_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: Code,
    reason: &str,
    what: &str,
) -> String {
    match r {
        Err(s) if s.code() == code => {
            let got = qvirt_common::rpc::reason_of(&s);
            assert_eq!(got.as_deref(), Some(reason), "{what}: {s:?}");
            s.message().to_owned()
        }
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

fn proc_text(path: &str) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn test_read_only_rpcs() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;
        call(who, c.ping(ping("vm"))).await.unwrap();
        call(who, c.ping(ping(&UUID.to_uppercase()))).await.unwrap();

        let info = call(who, c.get_agent_info(vm!(GetAgentInfoRequest)))
            .await
            .unwrap();
        assert!(info.version.starts_with("7.2"), "{who}: {}", info.version);
        if who == "qemu-ga" {
            assert_eq!(info.version, "7.2.22");
        }
        let ping_info = info
            .supported_commands
            .iter()
            .find(|c| c.name == "guest-ping")
            .unwrap();
        assert!(ping_info.enabled && ping_info.success_response, "{who}");
        let shutdown = info
            .supported_commands
            .iter()
            .find(|c| c.name == "guest-shutdown")
            .unwrap();
        assert!(!shutdown.success_response, "{who}");

        let t = call(who, c.get_time(vm!(GetTimeRequest)))
            .await
            .unwrap()
            .time
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (t.seconds - now).abs() < 60,
            "{who}: {} vs {now}",
            t.seconds
        );

        let host = call(who, c.get_host_name(vm!(GetHostNameRequest)))
            .await
            .unwrap();
        assert_eq!(
            host.host_name,
            proc_text("/proc/sys/kernel/hostname"),
            "{who}"
        );

        let os = call(who, c.get_os_info(vm!(GetOsInfoRequest)))
            .await
            .unwrap();
        assert_eq!(
            os.kernel_release,
            proc_text("/proc/sys/kernel/osrelease"),
            "{who}"
        );
        assert_eq!(os.machine, std::env::consts::ARCH, "{who}");

        call(who, c.get_timezone(vm!(GetTimezoneRequest)))
            .await
            .unwrap();
        call(who, c.list_users(vm!(ListUsersRequest)))
            .await
            .unwrap();
        let ifs = call(
            who,
            c.list_network_interfaces(vm!(ListNetworkInterfacesRequest)),
        )
        .await
        .unwrap();
        assert!(
            ifs.interfaces.iter().any(|i| i.name == "lo"),
            "{who}: {ifs:?}"
        );
        // qemu-ga answers "not currently supported" where it cannot read
        // the block devices (containers): UNIMPLEMENTED.
        let fs = call(who, c.get_fs_info(vm!(GetFsInfoRequest))).await;
        if let Err(e) = fs {
            assert_eq!(e.code(), Code::Unimplemented, "{who}: {e:?}");
            assert_eq!(
                qvirt_common::rpc::reason_of(&e).as_deref(),
                Some("AGENT_COMMAND_NOT_SUPPORTED")
            );
            assert!(
                e.message().contains("not currently supported"),
                "{who}: {e:?}"
            );
        }
        let st = call(who, c.get_freeze_status(vm!(GetFreezeStatusRequest)))
            .await
            .unwrap();
        assert_eq!(st.state(), FsFreezeState::Thawed, "{who}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_exec_wait_and_status() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;
        let r = call(
            who,
            c.exec(ExecRequest {
                domain: "vm".into(),
                path: "/bin/echo".into(),
                args: vec!["hi".into()],
                capture_output: true,
                wait: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert!(r.pid > 0, "{who}");
        let st = r.status.unwrap();
        assert!(st.exited, "{who}");
        assert_eq!(
            st.termination,
            Some(guest_exec_status::Termination::ExitCode(0))
        );
        assert_eq!(st.stdout, b"hi\n", "{who}");

        // Without wait, with stdin: poll ExecStatus ourselves.
        let r = call(
            who,
            c.exec(ExecRequest {
                domain: "vm".into(),
                path: "cat".into(),
                input: b"from stdin".to_vec(),
                capture_output: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert!(r.status.is_none());
        let deadline = Instant::now() + CALL_TIMEOUT;
        let st = loop {
            let st = call(
                who,
                c.get_exec_status(GetExecStatusRequest {
                    domain: "vm".into(),
                    pid: r.pid,
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .status
            .unwrap();
            if st.exited {
                break st;
            }
            assert!(Instant::now() < deadline, "{who}: cat never exited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(st.stdout, b"from stdin", "{who}");
        // The agent forgets a pid after reporting its exit.
        let r2 = call(
            who,
            c.get_exec_status(GetExecStatusRequest {
                domain: "vm".into(),
                pid: r.pid,
                ..Default::default()
            }),
        )
        .await;
        expect_code(r2, Code::InvalidArgument, "AGENT_INVALID_ARGUMENT", who);

        let missing = call(
            who,
            c.exec(ExecRequest {
                domain: "vm".into(),
                path: "/bin/invalid-cmd42".into(),
                ..Default::default()
            }),
        )
        .await;
        let msg = expect_code(missing, Code::FailedPrecondition, "AGENT_ERROR", who);
        assert!(msg.contains("invalid-cmd42"), "{who}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_file_write_then_read_round_trip() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let who = kind.name;
        let path = s.agent.dir.join("data.bin");
        let path_s = path.to_str().unwrap().to_owned();
        // 200 KiB: several 64 KiB chunks each way.
        let data: Vec<u8> = (0..200 * 1024u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let c = &mut s.client;
        let w = call(
            who,
            c.write_file(WriteFileRequest {
                domain: "vm".into(),
                path: path_s.clone(),
                data: data.clone(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(w.written_bytes, data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data, "{who}: bytes on disk");

        let r = call(
            who,
            c.read_file(ReadFileRequest {
                domain: "vm".into(),
                path: path_s.clone(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert!(r.eof);
        assert_eq!(r.data, data, "{who}: read back");

        let r = call(
            who,
            c.read_file(ReadFileRequest {
                domain: "vm".into(),
                path: path_s.clone(),
                offset: 70_000,
                length: 100_000,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(r.data, &data[70_000..170_000], "{who}: range");

        call(
            who,
            c.write_file(WriteFileRequest {
                domain: "vm".into(),
                path: path_s.clone(),
                data: b"tail".to_vec(),
                mode: FileWriteMode::Append as i32,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), data.len() + 4, "{who}");

        let missing = call(
            who,
            c.read_file(ReadFileRequest {
                domain: "vm".into(),
                path: s.agent.dir.join("nope").to_str().unwrap().into(),
                ..Default::default()
            }),
        )
        .await;
        expect_code(missing, Code::NotFound, "GUEST_FILE_NOT_FOUND", who);
        // Every handle was closed: the channel still works and nothing
        // is left open in the agent's process.
        call(who, c.ping(ping("vm"))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_raw_command_keeps_big_integers_and_returns_agent_errors() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;
        let raw = |json: &str| CommandRequest {
            domain: "vm".into(),
            command_json: json.into(),
            ..Default::default()
        };
        let r = call(
            who,
            c.command(raw(
                r#"{"execute":"guest-sync","arguments":{"id":9223372036854775807},"id":"mine"}"#,
            )),
        )
        .await
        .unwrap();
        assert_eq!(r.reply_json, r#"{"return":9223372036854775807}"#, "{who}");

        let r = call(who, c.command(raw(r#"{"execute":"guest-nope"}"#)))
            .await
            .unwrap();
        assert!(
            r.reply_json.contains("CommandNotFound"),
            "{who}: {}",
            r.reply_json
        );
        assert!(
            r.reply_json.contains("has not been found"),
            "{who}: {}",
            r.reply_json
        );

        for bad in ["not json", "[1]", r#"{"arguments":{}}"#] {
            let r = call(who, c.command(raw(bad))).await;
            expect_code(r, Code::InvalidArgument, "INVALID_ARGUMENT", who);
        }
        call(who, c.ping(ping("vm"))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_request_the_agent_cannot_parse_fails_at_once_and_the_channel_stays_usable() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;
        // U+FFFF is valid in a protobuf string but QEMU's JSON parser
        // refuses it: the agent answers with an error that has no id.
        // Before: the call waited out its 10 s timeout (DEADLINE_EXCEEDED)
        // with the guest's channel held.
        let r = call(
            who,
            c.exec(ExecRequest {
                domain: "vm".into(),
                path: "/bin/true\u{ffff}".into(),
                ..Default::default()
            }),
        )
        .await;
        let msg = expect_code(r, Code::InvalidArgument, "AGENT_INVALID_ARGUMENT", who);
        assert!(msg.contains("JSON parse error"), "{who}: {msg}");
        call(who, c.ping(ping("vm"))).await.unwrap();
        let r = call(
            who,
            c.command(CommandRequest {
                domain: "vm".into(),
                command_json: r#"{"execute":"guest-sync","arguments":{"id":78}}"#.into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(r.reply_json, r#"{"return":78}"#, "{who}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_a_reply_larger_than_max_file_bytes_still_reaches_the_caller() {
    for kind in agents() {
        // Responses used to be capped at max_file_bytes + 64 KiB: a bigger
        // agent reply (ExecStatus output, a raw command's) was lost with
        // OUT_OF_RANGE although max_reply_bytes let it in.
        let mut s = setup_with(&kind, &[], |_| {}, "max_file_bytes: 65536\n").await;
        let who = kind.name;
        let path = s.agent.dir.join("big.bin");
        std::fs::write(&path, vec![b'q'; 300_000]).unwrap();
        let c = &mut s.client;
        let raw = |json: String| CommandRequest {
            domain: "vm".into(),
            command_json: json,
            ..Default::default()
        };
        let open = format!(
            r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"r"}}}}"#,
            path.display()
        );
        let r = call(who, c.command(raw(open))).await.unwrap();
        let handle: i64 = r
            .reply_json
            .trim_start_matches(r#"{"return":"#)
            .trim_end_matches('}')
            .parse()
            .unwrap_or_else(|e| panic!("{who}: {}: {e}", r.reply_json));
        let read = format!(
            r#"{{"execute":"guest-file-read","arguments":{{"handle":{handle},"count":300000}}}}"#
        );
        let r = call(who, c.command(raw(read))).await.unwrap();
        assert!(
            r.reply_json.len() > 400_000,
            "{who}: {} bytes",
            r.reply_json.len()
        );
        assert!(r.reply_json.contains(r#""count":300000"#), "{who}");
        let close =
            format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#);
        call(who, c.command(raw(close))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_blocked_commands_are_failed_precondition() {
    for kind in agents() {
        let mut s = setup(&kind, &["-b", "guest-ping,guest-shutdown"], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;
        let msg = expect_code(
            call(who, c.ping(ping("vm"))).await,
            Code::FailedPrecondition,
            "AGENT_COMMAND_DISABLED",
            who,
        );
        assert!(
            msg.contains("Command guest-ping has been disabled"),
            "{who}: {msg}"
        );
        // Blocked, so safe to ask: the agent refuses before running it.
        let r = call(
            who,
            c.shutdown(ShutdownRequest {
                domain: "vm".into(),
                mode: GuestShutdownMode::Reboot as i32,
                ..Default::default()
            }),
        )
        .await;
        expect_code(r, Code::FailedPrecondition, "AGENT_COMMAND_DISABLED", who);
        call(who, c.get_agent_info(vm!(GetAgentInfoRequest)))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_frozen_agent_refuses_with_failed_precondition() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |dir| {
            std::fs::write(dir.join("qga.state.isfrozen"), b"").unwrap();
        })
        .await;
        let c = &mut s.client;
        let who = kind.name;
        let r = call(who, c.get_time(vm!(GetTimeRequest))).await;
        let msg = expect_code(r, Code::FailedPrecondition, "AGENT_COMMAND_DISABLED", who);
        assert!(msg.contains("frozen state"), "{who}: {msg}");
        let st = call(who, c.get_freeze_status(vm!(GetFreezeStatusRequest)))
            .await
            .unwrap();
        assert_eq!(st.state(), FsFreezeState::Frozen, "{who}");
        call(who, c.ping(ping("vm"))).await.unwrap();
        // Nothing was really frozen: FITHAW on the mounted filesystems
        // fails harmlessly (qga.md §4), and the agent leaves frozen mode.
        call(who, c.thaw_filesystems(vm!(ThawFilesystemsRequest)))
            .await
            .unwrap();
        let st = call(who, c.get_freeze_status(vm!(GetFreezeStatusRequest)))
            .await
            .unwrap();
        assert_eq!(st.state(), FsFreezeState::Thawed, "{who}");
        call(who, c.get_time(vm!(GetTimeRequest))).await.unwrap();
        // Had the thaw failed, a frozen agent would ignore SIGTERM.
        s.agent.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_agent_killed_is_unavailable_then_recovers_after_restart() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let who = kind.name;
        call(who, s.client.ping(ping("vm"))).await.unwrap();
        s.agent.kill();
        let r = call(who, s.client.ping(ping("vm"))).await;
        expect_code(r, Code::Unavailable, "AGENT_NOT_CONNECTED", who);
        s.agent.spawn(&[]);
        call(who, s.client.ping(ping("vm"))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_stopped_agent_times_out_then_the_channel_resyncs() {
    for kind in agents() {
        let mut s = setup(&kind, &[], |_| {}).await;
        let who = kind.name;
        call(who, s.client.ping(ping("vm"))).await.unwrap();
        s.agent.signal(libc::SIGSTOP);
        let mut req = ping("vm");
        req.timeout = Some(Default::default());
        if let Some(t) = req.timeout.as_mut() {
            t.nanos = 300_000_000;
        }
        let r = call(who, s.client.ping(req)).await;
        let msg = expect_code(r, Code::DeadlineExceeded, "AGENT_TIMEOUT", who);
        assert!(msg.contains("guest-ping"), "{who}: {msg}");
        s.agent.signal(libc::SIGCONT);
        // The late reply to the timed-out ping is still in the socket: the
        // resync must skip it.
        for _ in 0..3 {
            call(who, s.client.ping(ping("vm"))).await.unwrap();
        }
        let r = call(
            who,
            s.client.command(CommandRequest {
                domain: "vm".into(),
                command_json: r#"{"execute":"guest-sync","arguments":{"id":77}}"#.into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(r.reply_json, r#"{"return":77}"#, "{who}");
        assert!(s.agentd.stderr().len() < 1 << 20);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn test_unknown_domain_and_missing_socket() {
    let kind = agents().remove(0);
    let mut s = setup(&kind, &[], |_| {}).await;
    let r = call("unknown", s.client.ping(ping("no-such-vm"))).await;
    let msg = expect_code(r, Code::NotFound, "DOMAIN_NOT_FOUND", "unknown domain");
    assert!(msg.contains("no-such-vm"), "{msg}");
    let r = call("empty", s.client.ping(ping(""))).await;
    expect_code(r, Code::InvalidArgument, "INVALID_ARGUMENT", "empty domain");
    // The agent never came back: its socket refuses.
    s.agent.kill();
    std::fs::remove_file(s.agent.sock()).unwrap();
    let r = call("gone", s.client.ping(ping("vm"))).await;
    expect_code(
        r,
        Code::Unavailable,
        "AGENT_NOT_CONNECTED",
        "missing socket",
    );
}

/// The ErrorInfo (and BadRequest) of a failed grpcurl call, as grpcurl
/// prints the status with `-format-error`: `(code, reason, metadata,
/// violated fields)`.
fn grpcurl_error(out: &std::process::Output) -> (String, String, serde_json::Value, Vec<String>) {
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let status: serde_json::Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|e| panic!("grpcurl's status is not JSON ({e}): {printed}"));
    let details = status["details"].as_array().cloned().unwrap_or_default();
    let of_type = |t: &str| {
        details
            .iter()
            .find(|d| d["@type"] == format!("type.googleapis.com/google.rpc.{t}"))
            .cloned()
    };
    let info = of_type("ErrorInfo").unwrap_or_else(|| panic!("no ErrorInfo: {printed}"));
    assert_eq!(info["domain"], "qvirt.dev", "{printed}");
    let fields = of_type("BadRequest")
        .and_then(|b| b["fieldViolations"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["field"].as_str().map(str::to_owned))
        .collect();
    (
        status["code"].to_string(),
        info["reason"].as_str().unwrap_or_default().to_owned(),
        info["metadata"].clone(),
        fields,
    )
}

/// What a program sees through grpcurl, with agentd asking a real
/// supervisor where domains are: each error has a stable reason in its
/// ErrorInfo, the domain in its metadata, and a bad field named in a
/// BadRequest.
#[tokio::test(flavor = "multi_thread")]
async fn test_error_reasons_through_grpcurl_with_a_real_supervisor() {
    use qvirt_proto::v1::GetDomainRequest;
    use qvirt_proto::v1::supervisor_client::SupervisorClient;

    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let sup = qvirt_integration_tests::start_supervisor(&state, &run, None, &[]).await;
    let mut supervisor = SupervisorClient::new(internal_channel(sup.url()).await);
    for yaml in [
        "name: off\nmemory_mib: 64\nagent: true\n",
        "name: bare\nmemory_mib: 64\n",
    ] {
        qvirt_integration_tests::define_yaml(&mut supervisor, yaml.into())
            .await
            .unwrap();
    }
    let host = supervisor
        .get_domain(GetDomainRequest {
            domain: "off".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .host;
    assert!(!host.is_empty());
    let mut agentd = Service::start("qvirt-agentd", &["--supervisor", &sup.url()]);
    agentd.wait_serving("qvirt.v1.GuestAgent").await;
    let addr = agentd.addr.to_string();

    let cases = [
        (
            r#"{"domain": "off"}"#.to_owned(),
            "9",
            "DOMAIN_NOT_RUNNING",
            "off",
            None,
        ),
        (
            format!(r#"{{"domain": "off", "host": "{host}"}}"#),
            "9",
            "DOMAIN_NOT_RUNNING",
            "off",
            None,
        ),
        (
            r#"{"domain": "ghost"}"#.to_owned(),
            "5",
            "DOMAIN_NOT_FOUND",
            "ghost",
            None,
        ),
        (
            format!(r#"{{"domain": "off", "host": "not-{host}"}}"#),
            "5",
            "HOST_NOT_FOUND",
            "off",
            None,
        ),
        (
            r#"{"domain": "bare"}"#.to_owned(),
            "9",
            "AGENT_NOT_CONFIGURED",
            "bare",
            None,
        ),
        (
            r#"{"domain": "off", "timeout": "-1s"}"#.to_owned(),
            "3",
            "INVALID_ARGUMENT",
            "off",
            Some("timeout"),
        ),
    ];
    for (body, code, reason, domain, field) in cases {
        let out = grpcurl_internal(&[
            "-plaintext",
            "-format-error",
            "-d",
            &body,
            &addr,
            "qvirt.v1.GuestAgent/GetOsInfo",
        ]);
        let (got_code, got_reason, metadata, fields) = grpcurl_error(&out);
        assert_eq!(
            (got_code.as_str(), got_reason.as_str()),
            (code, reason),
            "{body}"
        );
        assert_eq!(metadata["domain"], domain, "{body}");
        assert_eq!(fields, field.into_iter().collect::<Vec<_>>(), "{body}");
    }
}

/// The guest administration RPCs (virsh guestvcpus, set-user-password,
/// get-user-sshkeys, set-user-sshkeys) against each agent running over
/// its own scratch guest (fake CPU sysfs, a copy of `/etc` with a user
/// `alice`, the real chpasswd): the same answers from both agents, and
/// the scratch guest changed as asked.
#[tokio::test(flavor = "multi_thread")]
async fn test_guest_admin_rpcs() {
    for kind in agents() {
        let guest = ScratchGuest::new();
        let wrapped = AgentKind {
            name: kind.name,
            program: guest.wrapper_script(&kind.program),
        };
        let mut s = setup(&wrapped, &[], |_| {}).await;
        let c = &mut s.client;
        let who = kind.name;

        let vcpus = call(who, c.get_guest_vcpus(vm!(GetGuestVcpusRequest)))
            .await
            .unwrap()
            .vcpus;
        let mut seen: Vec<_> = vcpus
            .iter()
            .map(|v| (v.logical_id, v.online, v.can_offline))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [(0, true, false), (1, true, true), (2, false, true)],
            "{who}: {vcpus:?}"
        );
        let set = |changes: &[(i64, bool)]| SetGuestVcpusRequest {
            domain: "vm".into(),
            vcpus: changes
                .iter()
                .map(|&(logical_id, online)| GuestVcpuState { logical_id, online })
                .collect(),
            ..Default::default()
        };
        // Applied in order up to the first failure (cpu0 cannot go
        // offline): two processed, cpu1 left offline.
        let r = call(
            who,
            c.set_guest_vcpus(set(&[(1, false), (2, true), (0, false), (1, true)])),
        )
        .await
        .unwrap();
        assert_eq!(r.processed, 2, "{who}");
        assert_eq!(
            std::fs::read_to_string(guest.path("cpu/cpu1/online")).unwrap(),
            "0\n"
        );
        assert_eq!(
            std::fs::read_to_string(guest.path("cpu/cpu2/online")).unwrap(),
            "1\n"
        );
        let msg = expect_code(
            call(who, c.set_guest_vcpus(set(&[(0, false)]))).await,
            Code::FailedPrecondition,
            "AGENT_ERROR",
            who,
        );
        assert!(
            msg.contains("logical processor #0 can't be offlined"),
            "{who}: {msg}"
        );
        expect_code(
            call(who, c.set_guest_vcpus(set(&[]))).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            who,
        );
        expect_code(
            call(who, c.set_guest_vcpus(set(&[(-1, true)]))).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            who,
        );

        let keys = |user: &str, keys: &[&str], reset: bool| AddAuthorizedKeysRequest {
            domain: "vm".into(),
            user: user.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            reset,
            ..Default::default()
        };
        let get = |user: &str| GetAuthorizedKeysRequest {
            domain: "vm".into(),
            user: user.into(),
            ..Default::default()
        };
        let key1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne one@host";
        let key2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITwo two@host";
        let msg = expect_code(
            call(who, c.get_authorized_keys(get("alice"))).await,
            Code::FailedPrecondition,
            "AGENT_ERROR",
            who,
        );
        assert!(msg.contains("No such file or directory"), "{who}: {msg}");
        call(
            who,
            c.add_authorized_keys(keys("alice", &[key1, key2, key1], false)),
        )
        .await
        .unwrap();
        let got = call(who, c.get_authorized_keys(get("alice")))
            .await
            .unwrap();
        // qemu-ga 7.2 lists the file's keys last line first.
        assert_eq!(got.keys, [key2, key1], "{who}");
        {
            use std::os::unix::fs::MetadataExt;
            let ssh = std::fs::metadata(guest.path("home/alice/.ssh")).unwrap();
            assert_eq!(
                (ssh.mode() & 0o777, ssh.uid(), ssh.gid()),
                (0o700, 4242, 4243),
                "{who}"
            );
            let f = std::fs::metadata(guest.path("home/alice/.ssh/authorized_keys")).unwrap();
            assert_eq!(
                (f.mode() & 0o777, f.uid(), f.gid()),
                (0o600, 4242, 4243),
                "{who}"
            );
        }
        call(who, c.add_authorized_keys(keys("alice", &[key2], true)))
            .await
            .unwrap();
        let got = call(who, c.get_authorized_keys(get("alice")))
            .await
            .unwrap();
        assert_eq!(got.keys, [key2], "{who}");
        call(
            who,
            c.remove_authorized_keys(RemoveAuthorizedKeysRequest {
                domain: "vm".into(),
                user: "alice".into(),
                keys: vec![key2.into()],
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        let got = call(who, c.get_authorized_keys(get("alice")))
            .await
            .unwrap();
        assert!(got.keys.is_empty(), "{who}: {got:?}");
        let msg = expect_code(
            call(who, c.get_authorized_keys(get("nosuchuser"))).await,
            Code::NotFound,
            "GUEST_USER_NOT_FOUND",
            who,
        );
        assert!(
            msg.contains("failed to lookup user 'nosuchuser'"),
            "{who}: {msg}"
        );
        expect_code(
            call(
                who,
                c.add_authorized_keys(keys("alice", &["# a comment"], false)),
            )
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            who,
        );
        expect_code(
            call(who, c.add_authorized_keys(keys("", &[key1], false))).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            who,
        );

        let password = |user: &str, password: &str, crypted: bool| SetUserPasswordRequest {
            domain: "vm".into(),
            user: user.into(),
            password: password.into(),
            crypted,
            ..Default::default()
        };
        call(
            who,
            c.set_user_password(password("alice", "$6$salt$hash", true)),
        )
        .await
        .unwrap();
        assert_eq!(guest.shadow_hash("alice"), "$6$salt$hash", "{who}");
        call(
            who,
            c.set_user_password(password("alice", "correct horse", false)),
        )
        .await
        .unwrap();
        let hash = guest.shadow_hash("alice");
        assert!(
            hash.starts_with('$') && hash != "$6$salt$hash",
            "{who}: {hash}"
        );
        let msg = expect_code(
            call(who, c.set_user_password(password("nosuchuser", "x", false))).await,
            Code::FailedPrecondition,
            "AGENT_ERROR",
            who,
        );
        assert!(msg.contains("failed to set user password"), "{who}: {msg}");
        for bad in [
            password("a:b", "x", false),
            password("alice", "a\nb", false),
        ] {
            expect_code(
                call(who, c.set_user_password(bad)).await,
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
                who,
            );
        }
    }
}
