//! The integration-test harness: runs the real qvirt binaries (and the real
//! tools beside them: grpcurl, QEMU, qemu-ga) the way an operator would.
//!
//! - [`bin_path`] finds a built binary (`QVIRT_BIN_DIR`, else the workspace's
//!   `target/debug`; `make test` builds them first).
//! - [`Service::start`] runs a service on an ephemeral loopback port in its
//!   own temp dir and process group, captures its logs, and
//!   [`Service::wait_serving`] polls its health check with a deadline.
//!   Dropping a [`Service`] stops it by pid (SIGTERM, then SIGKILL) and, if
//!   the test is failing, prints its logs.
//! - [`run`] runs any command with a timeout; [`grpcurl`] runs the real
//!   grpcurl.
//! - [`guest`] builds the test guest (kernel, initramfs, an agent inside)
//!   and boots it; [`stack`] runs the whole stack behind a gateway with
//!   read-write and read-only tokens.
//! - [`nats`] runs real nats-server nodes (one, or a 3-node JetStream
//!   cluster) on their own ports and store dirs, stopped by pid.
//! - [`scratch_guest`] runs a guest agent over a scratch `/etc`, `/home`
//!   and CPU and memory sysfs in a private mount namespace.
//! - The services of the internal plane (bus, hook executor, supervisor)
//!   get `--internal-token-file` with one random secret per test process
//!   ([`internal_token`]), so they trust each other as deployed;
//!   [`internal`] makes a request that presents it.
//!
//! A missing binary or tool fails the test loudly with the command that
//! installs it: nothing here silently skips.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod guest;
pub mod libvirtd;
pub mod measure;
pub mod nats;
pub mod pki;
pub mod reference;
pub mod scratch_guest;
pub mod stack;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a service may take to report SERVING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping service gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Default timeout for one external command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The services that serve or call internal methods: [`Service::start`]
/// hands each the shared internal token file, unless the test passes its
/// own `--internal-token-file`.
pub const INTERNAL_PLANE: [&str; 4] = [
    "qvirt-agentd",
    "qvirt-eventbus",
    "qvirt-hookexec",
    "qvirt-supervisor",
];

/// The internal plane's shared secret for this test process: 64 random
/// hex digits.
pub fn internal_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(random_secret)
}

/// 64 random hex digits.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `secret` and a newline to a new file `path` with mode 0600.
pub fn write_secret(path: &Path, secret: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).unwrap();
}

/// Writes [`internal_token`] to `dir/internal-token` with mode 0600 and
/// returns its path.
pub fn write_internal_token(dir: &Path) -> PathBuf {
    let path = dir.join("internal-token");
    write_secret(&path, internal_token());
    path
}

/// `message` as a request presenting the internal token (as the
/// supervisor's calls to the bus and the hook executor do).
pub fn internal<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-qvirt-internal-token", internal_token().parse().unwrap());
    request
}

/// A channel whose every call presents the internal token.
pub type InternalChannel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    qvirt_common::internal_auth::TokenInterceptor,
>;

/// The services' own client interceptor, presenting [`internal_token`].
pub fn internal_interceptor() -> qvirt_common::internal_auth::TokenInterceptor {
    qvirt_common::internal_auth::InternalToken::from_text(internal_token())
        .unwrap()
        .interceptor()
}

/// Connects to `url`; every call on the channel presents the internal
/// token, as a backend's internal callers (the gateway, the supervisor)
/// do (e.g. `SupervisorClient::new(internal_channel(url).await)`).
pub async fn internal_channel(url: String) -> InternalChannel {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    with_internal_token(channel)
}

/// `channel`, with the internal token presented on every call.
pub fn with_internal_token(channel: tonic::transport::Channel) -> InternalChannel {
    tonic::service::interceptor::InterceptedService::new(channel, internal_interceptor())
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The path of a built qvirt binary; panics with the build command if it
/// is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("QVIRT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with `make build-debug` \
         (`make test` does), or point QVIRT_BIN_DIR at them",
        path.display()
    );
    path
}

/// The statically linked qvirt-ga, built as `make static-ga` builds it
/// (glibc with crt-static, in its own target dir target/static, so it
/// never waits on the workspace build); ~10 s the first time. `make test`
/// builds it first (`make static-ga`), so here it is usually a no-op.
pub fn static_ga() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let target_dir = repo.join("target/static");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(&repo)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--locked", "-p", "qvirt-ga"])
        .args(["--bin", "qvirt-ga", "--target", &triple, "--target-dir"])
        .arg(&target_dir);
    let out = run_command(&mut cargo, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "building the static qvirt-ga failed:\n{}",
        text(&out.stderr)
    );
    target_dir.join(triple).join("release/qvirt-ga")
}

/// The path of an external tool: the project's `.tools/bin` first, then
/// PATH; panics naming `make deps` if it is missing.
pub fn tool_path(name: &str) -> PathBuf {
    let local = workspace_root().join(".tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("{name} not found: run `make deps` to install it"))
}

/// A free TCP port on 127.0.0.1 for a service to bind.
///
/// Taken below the kernel's ephemeral range (where every outgoing
/// connection of every test gets its local port, so a port from there can
/// be taken between this check and the service's bind), at a random place
/// so that parallel tests rarely try the same one, and checked free by
/// binding it. Falls back to a kernel-chosen port when the ephemeral range
/// leaves no room below it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOWEST + 1_000 {
        let span = ephemeral_low - LOWEST;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let start = RandomState::new().hash_one((std::process::id(), nanos)) as u32;
        for i in 0..span.min(2_000) {
            let port = (LOWEST + (start.wrapping_add(i.wrapping_mul(7_919))) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `program args` with stdin closed, killing it after `timeout`.
pub fn run<S: AsRef<OsStr>>(program: &Path, args: &[S], timeout: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(&mut cmd, timeout)
}

/// Runs a prepared command with stdin closed, output captured, killing it
/// (by pid) after `timeout`.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// Runs the real grpcurl with `args` (e.g. `["-plaintext", addr, "list"]`).
pub fn grpcurl<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(&tool_path("grpcurl"), args, COMMAND_TIMEOUT)
}

/// The real grpcurl with `args`, presenting the internal token as a
/// backend's internal callers do (backends serve no one else).
pub fn grpcurl_internal<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let header = format!(
        "{}: {}",
        qvirt_common::internal_auth::TOKEN_METADATA,
        internal_token()
    );
    let mut all: Vec<&OsStr> = vec![OsStr::new("-H"), OsStr::new(&header)];
    all.extend(args.iter().map(AsRef::as_ref));
    grpcurl(&all)
}

/// Resident memory of process `pid` in KiB (`VmRSS`); panics if the
/// process is gone, so a dead service never reads as a small one.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("no /proc/{pid}/status: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Whether `pid` runs a QEMU started with `-uuid uuid` (pids get reused:
/// check before signalling a pid a test recorded earlier).
pub fn runs_domain(pid: u32, uuid: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(uuid))
        .unwrap_or(false)
}

/// SIGKILLs `pid` if it still runs domain `uuid`'s QEMU: the clean-up for a
/// test that stops before destroying its guest.
pub fn kill_domain_qemu(pid: u32, uuid: &str) {
    if pid != 0 && runs_domain(pid, uuid) {
        // SAFETY: kill(2) on a pid just checked to run this test's QEMU.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Kills a domain's QEMU by pid on drop, if that pid still runs the domain
/// (UUID): the supervisor starts QEMU in its own process group and leaves
/// it running when it stops, so a test that ends early must.
pub struct QemuGuard(pub u32, pub String);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        kill_domain_qemu(self.0, &self.1);
    }
}

/// Defines a domain from its YAML spec (not replacing one) and returns it.
pub async fn define_yaml<T>(
    client: &mut qvirt_proto::v1::supervisor_client::SupervisorClient<T>,
    yaml: String,
) -> Result<qvirt_proto::v1::Domain, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use qvirt_proto::v1::{DefineDomainRequest, define_domain_request};
    let reply = client
        .define_domain(DefineDomainRequest {
            source: Some(define_domain_request::Source::SpecYaml(yaml)),
            allow_update: false,
            ..Default::default()
        })
        .await?;
    reply
        .into_inner()
        .domain
        .ok_or_else(|| tonic::Status::internal("DefineDomain returned no domain"))
}

/// The JSON lines of the gateway's audit file once `done` holds for them,
/// waiting up to 20 s: the gateway writes a call's line as the call ends,
/// from a task of its own, so it may land after the client has its answer.
pub async fn audit_lines_until(
    path: &Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if done(&lines) {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "audit file after 20 s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Text of an output stream, for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process started by a test, in its own process group: dropping it stops
/// it by pid (SIGTERM, then SIGKILL after [`STOP_GRACE`]) together with
/// anything left in its group.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        ChildGuard { child }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; at worst ESRCH.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `timeout` for the exit status.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and returns the exit status; panics if the process is
    /// still running [`STOP_GRACE`] later.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_timeout(STOP_GRACE).unwrap_or_else(|| {
            panic!(
                "pid {} still running {STOP_GRACE:?} after SIGTERM",
                self.id()
            )
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            let _ = self.wait_timeout(STOP_GRACE);
        }
        // Whatever is left of the process group goes too.
        // SAFETY: kill(2) on the process group this guard created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A real `qvirt-supervisor`, SERVING, with its state dir `state`, its
/// run dir `run` and `extra` flags (e.g. `--eventbus URL`), on `addr` when
/// given (a restart on the same address), else on a free port.
pub async fn start_supervisor(
    state: &Path,
    run: &Path,
    addr: Option<SocketAddr>,
    extra: &[&str],
) -> Service {
    let (state, run) = (state.to_str().unwrap(), run.to_str().unwrap());
    let mut args = vec!["--state-dir", state, "--run-dir", run];
    args.extend_from_slice(extra);
    let mut svc = match addr {
        Some(addr) => Service::start_at("qvirt-supervisor", addr, &args),
        None => Service::start("qvirt-supervisor", &args),
    };
    svc.wait_serving("qvirt.v1.Supervisor").await;
    svc
}

/// One token from `qvirt-gateway token new`: the token and its config entry.
pub struct Token {
    /// The bearer token.
    pub token: String,
    /// Its entry for the `tokens:` list (only its hash).
    pub entry: String,
}

/// A fresh token from the real `qvirt-gateway token new --name NAME
/// --role ROLE`.
pub fn token_new(name: &str, role: &str) -> Token {
    let out = run(
        &bin_path("qvirt-gateway"),
        &["token", "new", "--name", name, "--role", role],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let token = lines.next().unwrap().to_owned();
    assert_eq!(token.len(), 64, "{stdout}");
    let entry: String = lines.map(|l| format!("{l}\n")).collect();
    assert!(entry.contains(&format!("name: {name}")), "{entry}");
    assert!(
        !entry.contains(&token),
        "the config entry holds only the hash"
    );
    Token { token, entry }
}

/// grpcurl's error code line (`Code: PermissionDenied`), or "OK".
pub fn code_of(out: &Output) -> String {
    let stderr = text(&out.stderr);
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Code: "))
        .map(str::to_owned)
        .unwrap_or_else(|| "OK".to_owned())
}

/// How [`Service::start_in`] launches a service.
#[derive(Debug, Default, Clone)]
struct Launch {
    /// RLIMIT_NOFILE, soft and hard.
    nofile: Option<u64>,
    /// No shared internal token file.
    no_token: bool,
    /// Environment variables set for it.
    env: Vec<(String, String)>,
}

/// A qvirt service process started by a test.
pub struct Service {
    name: String,
    child: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its private temp dir (config, logs, sockets).
    pub dir: tempfile::TempDir,
}

impl Service {
    /// Starts binary `name` on a free loopback port with `extra` arguments,
    /// in a fresh temp dir and its own process group; stdout and stderr go
    /// to `stdout.log` and `stderr.log` there.
    pub fn start(name: &str, extra: &[&str]) -> Service {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_in(
            tempfile::tempdir().unwrap(),
            addr,
            name,
            extra,
            Launch::default(),
        )
    }

    /// As [`Service::start`], with its RLIMIT_NOFILE (soft and hard) set
    /// to `nofile`: a service that runs out of file descriptors.
    pub fn start_with_nofile(name: &str, extra: &[&str], nofile: u64) -> Service {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_in(
            tempfile::tempdir().unwrap(),
            addr,
            name,
            extra,
            Launch {
                nofile: Some(nofile),
                ..Launch::default()
            },
        )
    }

    /// As [`Service::start`], on a given address (e.g. to restart a
    /// service where its clients expect it).
    pub fn start_at(name: &str, addr: SocketAddr, extra: &[&str]) -> Service {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            addr,
            name,
            extra,
            Launch::default(),
        )
    }

    /// As [`Service::start`], with `yaml` written to `config.yaml` in the
    /// service's temp dir and passed with `--config`.
    pub fn start_with_config(name: &str, yaml: &str, extra: &[&str]) -> Service {
        Self::start_with_config_env(name, yaml, extra, &[])
    }

    /// As [`Service::start_with_config`], with environment variables
    /// `env` set for the service.
    pub fn start_with_config_env(
        name: &str,
        yaml: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let config = config.to_str().unwrap().to_owned();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let launch = Launch {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Launch::default()
        };
        Self::start_in(dir, addr, name, &args, launch)
    }

    /// As [`Service::start_with_config`], but without the shared internal
    /// token file: a service with no internal token configured.
    pub fn start_without_internal_token(name: &str, yaml: &str, extra: &[&str]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let config = config.to_str().unwrap().to_owned();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let launch = Launch {
            no_token: true,
            ..Launch::default()
        };
        Self::start_in(dir, addr, name, &args, launch)
    }

    fn start_in(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        name: &str,
        extra: &[&str],
        launch: Launch,
    ) -> Service {
        let mut cmd = Command::new(bin_path(name));
        cmd.arg("--listen").arg(addr.to_string());
        let own_token = extra.contains(&"--internal-token-file");
        if INTERNAL_PLANE.contains(&name) && !own_token && !launch.no_token {
            cmd.arg("--internal-token-file")
                .arg(write_internal_token(dir.path()));
        }
        if let Some(n) = launch.nofile {
            // SAFETY: setrlimit(2) is async-signal-safe and touches only
            // the limit value on this closure's stack.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(extra)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .envs(launch.env)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = ChildGuard::spawn(&mut cmd);
        Service {
            name: name.to_owned(),
            child,
            addr,
            dir,
        }
    }

    /// `http://ADDR`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the service has logged on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Sends signal `sig` to the service.
    pub fn signal(&self, sig: i32) {
        self.child.signal(sig);
    }

    /// Polls stderr until it contains `needle`; panics with the logs if
    /// the process exits or `timeout` passes first.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before logging {needle:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `grpc.health.v1.Health/Check` for `service` ("" = the whole
    /// server) until SERVING; panics with the logs if the process exits or
    /// [`READY_TIMEOUT`] passes.
    pub async fn wait_serving(&mut self, service: &str) {
        let endpoint = tonic::transport::Endpoint::from_shared(self.url()).unwrap();
        self.wait_serving_at(service, endpoint).await;
    }

    /// As [`Service::wait_serving`], asking through `endpoint` (e.g. a TLS
    /// one from [`pki::tls_endpoint`]).
    pub async fn wait_serving_at(&mut self, service: &str, endpoint: tonic::transport::Endpoint) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before serving; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            match health_at(endpoint.clone(), service).await {
                Ok(ServingStatus::Serving) => return,
                Ok(other) => last = format!("status {other:?}"),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{} not SERVING within {READY_TIMEOUT:?} ({last}); stderr:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// One health check of `service` ("" = the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, String> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(self.url()).map_err(|e| e.to_string())?;
        health_at(endpoint, service).await
    }

    /// Sends SIGTERM and waits (up to [`STOP_GRACE`]) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.child.signal(libc::SIGTERM);
        match self.child.wait_timeout(STOP_GRACE) {
            Some(status) => status,
            None => panic!(
                "{} still running {STOP_GRACE:?} after SIGTERM; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }
}

/// One health check of `service` through `endpoint`.
async fn health_at(
    endpoint: tonic::transport::Endpoint,
    service: &str,
) -> Result<ServingStatus, String> {
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| s.to_string())?;
    Ok(reply.into_inner().status())
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.stderr());
        }
        // The ChildGuard stops the process.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_free_port_is_bindable_and_below_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for _ in 0..20 {
            let port = free_port();
            assert!(port < low, "{port} is in the ephemeral range from {low}");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
