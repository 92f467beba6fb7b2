//! A whole qvirt stack behind a real gateway, as a user meets it: event
//! bus, supervisor (with agentd for agent-mode shutdown and an image root
//! QEMU can reach), agentd and a gateway with a read-write and a
//! read-only token (also in files) and both unix sockets; and the tiny
//! test guest (`scripts/build-test-guest.sh` with the static qvirt-ga).
//! For tests and benches that drive the stack from outside (qvirtctl,
//! `make run`, the gateway and libvirt benches), with the clients and the
//! private nginx the benches compare against.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qvirt_common::internal_auth::TokenInterceptor;
use tonic::metadata::{Ascii, MetadataValue};

use crate::{Service, free_port, start_supervisor, static_ga, write_internal_token};

pub use crate::{Token, token_new};

/// What a [`GatewayStack`] runs besides its defaults.
#[derive(Debug, Default, Clone)]
pub struct StackOptions {
    /// The bus's config file.
    pub bus_yaml: String,
    /// Lines under the gateway's `limits:` (each indented two spaces).
    pub gateway_limits_yaml: String,
    /// More supervisor flags.
    pub supervisor_args: Vec<String>,
}

/// The backends and a gateway in front of them, with its audit file on.
/// Dropped in field order: the gateway first, the bus last.
pub struct GatewayStack {
    /// The gateway.
    pub gw: Service,
    /// The agent service.
    pub agentd: Service,
    /// The supervisor.
    pub sup: Service,
    /// The event bus.
    pub bus: Service,
    /// The read-write token itself.
    pub rw_secret: String,
    /// A file holding the read-write token.
    pub rw_token: PathBuf,
    /// A file holding the read-only token.
    pub ro_token: PathBuf,
    /// The gateway's read-write unix socket.
    pub rw_sock: PathBuf,
    /// The gateway's read-only unix socket.
    pub ro_sock: PathBuf,
    /// The gateway's audit file.
    pub audit: PathBuf,
    /// The supervisor's image root (mode 0755: QEMU's user reads it).
    pub images: PathBuf,
    /// The supervisor's state dir.
    pub state: PathBuf,
    /// Holds all of the above.
    pub dir: tempfile::TempDir,
}

impl GatewayStack {
    /// Starts everything with the defaults and waits until the gateway
    /// serves every public service.
    pub async fn start() -> GatewayStack {
        Self::start_with(&StackOptions::default()).await
    }

    /// [`GatewayStack::start`] with `options`.
    pub async fn start_with(options: &StackOptions) -> GatewayStack {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(dir.path(), 0o755).unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        mode(&images, 0o755).unwrap();
        let mut bus = Service::start_with_config("qvirt-eventbus", &options.bus_yaml, &[]);
        bus.wait_serving("qvirt.v1.EventBus").await;
        let agentd_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let agentd_url = format!("http://{agentd_addr}");
        let state = dir.path().join("state");
        let bus_url = bus.url();
        let mut args: Vec<&str> = vec![
            "--eventbus",
            &bus_url,
            "--agentd",
            &agentd_url,
            "--image-root",
            images.to_str().unwrap(),
        ];
        args.extend(options.supervisor_args.iter().map(String::as_str));
        let sup = start_supervisor(&state, &dir.path().join("run"), None, &args).await;
        let mut agentd =
            Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
        agentd.wait_serving("qvirt.v1.GuestAgent").await;
        let rw = token_new("operator", "read-write");
        let ro = token_new("viewer", "read-only");
        let rw_token = dir.path().join("token-rw");
        let ro_token = dir.path().join("token-ro");
        std::fs::write(&rw_token, format!("{}\n", rw.token)).unwrap();
        std::fs::write(&ro_token, format!("{}\n", ro.token)).unwrap();
        let rw_sock = dir.path().join("gw.sock");
        let ro_sock = dir.path().join("gw-ro.sock");
        let audit = dir.path().join("audit.log");
        let limits = if options.gateway_limits_yaml.is_empty() {
            String::new()
        } else {
            format!("limits:\n{}", options.gateway_limits_yaml)
        };
        let yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: {}\ninternal_token_file: {}\n\
             health_poll_ms: 200\naudit_file: {}\nrw_socket:\n  path: {}\nro_socket:\n  path: {}\n\
             {}tokens:\n{}{}",
            sup.url(),
            bus.url(),
            agentd.url(),
            write_internal_token(dir.path()).display(),
            audit.display(),
            rw_sock.display(),
            ro_sock.display(),
            limits,
            rw.entry,
            ro.entry,
        );
        let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        for svc in [
            "",
            "qvirt.v1.Supervisor",
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
        ] {
            gw.wait_serving(svc).await;
        }
        GatewayStack {
            gw,
            agentd,
            sup,
            bus,
            rw_secret: rw.token,
            rw_token,
            ro_token,
            rw_sock,
            ro_sock,
            audit,
            images,
            state,
            dir,
        }
    }

    /// The `authorization` value for the read-write token.
    pub fn bearer(&self) -> MetadataValue<Ascii> {
        bearer_value(&self.rw_secret)
    }
}

/// The test guest's kernel and initramfs.
pub use crate::guest::Image as GuestImage;

/// Builds (or reuses, in target/test-guest) the test guest with the
/// static qvirt-ga inside, or says why Debian's packages cannot be
/// fetched here; any other failure panics.
pub fn test_guest() -> Result<GuestImage, String> {
    crate::guest::guest_image(&static_ga())
}

/// Copies the guest's files into `root` (world-readable), returning
/// (vmlinux, initramfs) there.
pub fn install_guest(image: &GuestImage, root: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let copy = |from: &Path| {
        let to = root.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        to
    };
    (copy(&image.vmlinux), copy(&image.initramfs))
}

/// `Bearer TOKEN` as a metadata value.
pub fn bearer_value(token: &str) -> MetadataValue<Ascii> {
    format!("Bearer {token}").parse().unwrap()
}

/// Adds `authorization` (a client of the gateway) or the internal token
/// (an internal caller of a backend) to every call when it holds one; a
/// client type the same either way, so one bench loop drives the direct,
/// proxied and gateway paths alike.
#[derive(Clone)]
pub struct Bearer {
    authorization: Option<MetadataValue<Ascii>>,
    internal: TokenInterceptor,
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        self.internal.call(request)
    }
}

/// A channel whose calls carry [`Bearer`].
pub type BearerChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Connects to `url` (its own HTTP/2 connection), presenting `token` if
/// given.
pub async fn bearer_channel(url: &str, token: Option<MetadataValue<Ascii>>) -> BearerChannel {
    let bearer = Bearer {
        authorization: token,
        internal: TokenInterceptor::new(None),
    };
    connect_with(url, bearer).await
}

/// Connects to backend `url` as an internal caller (the internal token on
/// every call), with the same client type as [`bearer_channel`]: the
/// benches' direct and nginx paths, which reach a backend without the
/// gateway.
pub async fn backend_channel(url: &str) -> BearerChannel {
    let bearer = Bearer {
        authorization: None,
        internal: crate::internal_interceptor(),
    };
    connect_with(url, bearer).await
}

async fn connect_with(url: &str, bearer: Bearer) -> BearerChannel {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tonic::service::interceptor::InterceptedService::new(channel, bearer)
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
    /// kept-alive upstream connections, no access log, no cap on the
    /// requests of a client connection (nginx's default closes one after
    /// 1,000, which a client calling in a loop sees as a failed call);
    /// returns once it accepts connections.
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
             \x20 http2_max_concurrent_streams 1024;\n  keepalive_requests 1000000;\n  grpc_read_timeout 600s;\n  grpc_send_timeout 600s;\n\
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
