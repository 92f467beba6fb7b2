//! The public path as a user meets it, for the benches: a real bus,
//! supervisor and (optionally) agentd behind a real `qvirt-gateway` with a
//! read-write bearer token and its audit file on, each process stopped by
//! pid when the [`Stack`] drops.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};

use crate::{Service, bin_path, free_port, run, start_supervisor, text, write_internal_token};

/// One token from `qvirt-gateway token new`: the token and its config entry.
pub struct Token {
    /// The secret, 64 hex digits.
    pub token: String,
    /// The YAML list entry (`- name: ...`) to put under `tokens:`.
    pub entry: String,
}

/// A fresh token from the real `qvirt-gateway token new`.
pub fn token_new(name: &str, role: &str) -> Token {
    let out = run(
        &bin_path("qvirt-gateway"),
        &["token", "new", "--name", name, "--role", role],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let token = lines.next().unwrap_or_default().to_owned();
    assert_eq!(token.len(), 64, "{stdout}");
    let entry: String = lines.map(|l| format!("{l}\n")).collect();
    Token { token, entry }
}

/// What a [`Stack`] runs.
#[derive(Debug, Default, Clone)]
pub struct StackOptions {
    /// The bus's config file.
    pub bus_yaml: String,
    /// Lines under the gateway's `limits:` (each indented two spaces).
    pub gateway_limits_yaml: String,
    /// More supervisor flags.
    pub supervisor_args: Vec<String>,
    /// Run a `qvirt-agentd` (the supervisor then gets `--agentd`).
    pub agentd: bool,
}

/// Bus, supervisor, agentd and the gateway, SERVING.
pub struct Stack {
    /// The gateway (dropped first: declared first).
    pub gw: Service,
    /// The agent service, if asked for.
    pub agentd: Option<Service>,
    /// The supervisor.
    pub sup: Service,
    /// The event bus.
    pub bus: Service,
    /// The read-write token's secret.
    pub rw_token: String,
    /// The gateway's audit file.
    pub audit: PathBuf,
    /// State dir, run dir, audit file, internal token.
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything and waits until the gateway reports each public
    /// service SERVING.
    pub async fn start(options: &StackOptions) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = Service::start_with_config("qvirt-eventbus", &options.bus_yaml, &[]);
        bus.wait_serving("qvirt.v1.EventBus").await;
        let agentd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let agentd_url = format!("http://{agentd_addr}");
        let bus_url = bus.url();
        let mut args: Vec<&str> = vec!["--eventbus", &bus_url];
        if options.agentd {
            args.extend(["--agentd", &agentd_url]);
        }
        args.extend(options.supervisor_args.iter().map(String::as_str));
        let sup = start_supervisor(
            &dir.path().join("state"),
            &dir.path().join("run"),
            None,
            &args,
        )
        .await;
        let agentd = if options.agentd {
            let mut a =
                Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
            a.wait_serving("qvirt.v1.GuestAgent").await;
            Some(a)
        } else {
            None
        };
        let operator = token_new("bench", "read-write");
        let audit = dir.path().join("audit.log");
        let token_file = write_internal_token(dir.path());
        // Without agentd the gateway still needs an endpoint for it: a
        // port nobody serves (GuestAgent is then NOT_SERVING, unused).
        let agentd_endpoint = agentd.as_ref().map_or(agentd_url.clone(), Service::url);
        let yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: {}\ninternal_token_file: {}\n\
             audit_file: {}\nlimits:\n{}tokens:\n{}",
            sup.url(),
            bus.url(),
            agentd_endpoint,
            token_file.display(),
            audit.display(),
            options.gateway_limits_yaml,
            operator.entry,
        );
        let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        gw.wait_serving("qvirt.v1.Supervisor").await;
        gw.wait_serving("qvirt.v1.EventBus").await;
        if options.agentd {
            gw.wait_serving("qvirt.v1.GuestAgent").await;
        }
        Stack {
            gw,
            agentd,
            sup,
            bus,
            rw_token: operator.token,
            audit,
            dir,
        }
    }

    /// The supervisor's state dir (definitions, QEMU logs).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The `authorization` value for the read-write token.
    pub fn bearer(&self) -> MetadataValue<Ascii> {
        bearer_value(&self.rw_token)
    }
}

/// `Bearer TOKEN` as a metadata value.
pub fn bearer_value(token: &str) -> MetadataValue<Ascii> {
    format!("Bearer {token}").parse().unwrap()
}

/// Adds `authorization` to every call when it holds a value; a client
/// type the same with and without a token, so one bench loop drives the
/// direct, proxied and gateway paths alike.
#[derive(Clone, Default)]
pub struct Bearer(pub Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry [`Bearer`].
pub type BearerChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Connects to `url` (its own HTTP/2 connection), presenting `token` if
/// given.
pub async fn bearer_channel(url: &str, token: Option<MetadataValue<Ascii>>) -> BearerChannel {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tonic::service::interceptor::InterceptedService::new(channel, Bearer(token))
}

/// A private nginx, started from a config written to its own temp prefix
/// (`nginx -p DIR -c DIR/nginx.conf -e DIR/error.log`, `daemon off`), on
/// its own loopback port, stopped by pid when dropped: the gRPC reverse
/// proxy an operator would otherwise put in front of the services.
pub struct Nginx {
    child: crate::ChildGuard,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its prefix (config, logs, temp dirs).
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx proxying every method of service `NAME` to `URL`
    /// (`http://HOST:PORT`) for each `(NAME, URL)` of `routes`, over
    /// kept-alive upstream connections, no access log; returns once it
    /// accepts connections.
    pub fn start(routes: &[(&str, String)]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let d = dir.path().display();
        let mut upstreams = String::new();
        let mut locations = String::new();
        for (i, (service, url)) in routes.iter().enumerate() {
            let hostport = url.trim_start_matches("http://");
            upstreams.push_str(&format!(
                "  upstream u{i} {{ server {hostport}; keepalive 16; }}\n"
            ));
            locations.push_str(&format!(
                "    location /{service}/ {{ grpc_pass grpc://u{i}; }}\n"
            ));
        }
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 http2_max_concurrent_streams 1024;\n  grpc_read_timeout 600s;\n  grpc_send_timeout 600s;\n\
             {upstreams}  server {{\n    listen {addr} http2;\n{locations}  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let nginx = nginx_path();
        let child = crate::ChildGuard::spawn(
            std::process::Command::new(&nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let mut n = Nginx { child, addr, dir };
        let deadline = std::time::Instant::now() + crate::READY_TIMEOUT;
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = n.child.try_wait() {
                panic!("nginx exited with {status}: {}", n.error_log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not listen on {addr}: {}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The master's pid and its workers'.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        pids.extend(children_of(master));
        pids
    }

    /// What nginx logged.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// nginx, from PATH or /usr/sbin; panics naming the install script.
pub fn nginx_path() -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
    {
        let p = dir.join("nginx");
        if p.is_file() {
            return p;
        }
    }
    panic!("nginx not found: run `bash scripts/bench-deps.sh` (`make bench` does)")
}

/// The pids whose parent is `pid` (from `/proc/*/stat`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}
