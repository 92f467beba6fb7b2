//! Real NATS JetStream servers for the fleet tests: one node or a 3-node
//! cluster on loopback, each node on its own ports with its own config
//! file and store dir in a temp dir, stopped by pid.
//!
//! Like the fleet deployment's servers, every node asks clients for a
//! token ([`Nats::token_file`], [`Nats::client`]) and its routes for a
//! user and password, so every fleet test runs with NATS auth on.
//!
//! The server is the pinned `nats-server` that `make deps` puts in
//! `.tools/bin` ([`crate::tool_path`]). A node can be stopped (SIGTERM or
//! SIGKILL) and started again on the same ports and store, for broker
//! outages.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildGuard, InternalChannel, free_port, internal_channel, tool_path};

/// How long a node (or a cluster) may take to have JetStream ready: a
/// full-cluster restart on existing stores elects its meta leader in
/// about 5.5 s on the reference machine.
pub const NATS_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of the cluster the 3-node harness forms.
const CLUSTER_NAME: &str = "qvtest";

/// One nats-server node's settings and, while it runs, its process.
pub struct NatsNode {
    /// Its server name (`n1`, `n2`, ...), stable across restarts.
    pub name: String,
    /// The client port.
    pub port: u16,
    /// The monitoring (HTTP) port.
    pub http_port: u16,
    /// The cluster (route) port, for a clustered node.
    pub cluster_port: Option<u16>,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

impl NatsNode {
    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// Starts the node (again) with its config; does not wait.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut cmd = Command::new(tool_path("nats-server"));
        cmd.arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(ChildGuard::spawn(&mut cmd));
    }

    /// Stops the node with `signal` (SIGTERM: a clean stop; SIGKILL: a
    /// crash) and waits for it to exit.
    pub fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            child.signal(signal);
            assert!(
                child.wait_timeout(crate::STOP_GRACE).is_some(),
                "nats-server {} did not stop",
                self.name
            );
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `GET path` on the monitoring port: the status code and body, or
    /// `None` if the node does not answer.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let code = reply.split_whitespace().nth(1)?.parse().ok()?;
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((code, body))
    }

    /// Whether JetStream answers ready on this node (`/healthz`, which
    /// in a cluster also needs a meta leader).
    pub fn jetstream_ready(&self) -> bool {
        matches!(
            self.http_get("/healthz?js-enabled-only=true"),
            Some((200, _))
        ) && self
            .http_get("/jsz")
            .is_some_and(|(code, body)| code == 200 && meta_leader_known(&body))
    }
}

/// Whether a `/jsz` body names a meta leader (a single node is its own;
/// its `/jsz` has no `meta_cluster` section before 2.10 and an empty
/// leader field never).
fn meta_leader_known(body: &str) -> bool {
    match body.find("\"meta_cluster\"") {
        None => true,
        Some(at) => {
            let rest = &body[at..];
            match rest.find("\"leader\":") {
                Some(l) => !rest[l + 9..].trim_start().starts_with("\"\""),
                // A single node's section has no leader field.
                None => !rest.contains("\"cluster_size\": 3"),
            }
        }
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(child) = &self.child
        {
            eprintln!(
                "--- nats-server {} (pid {}) log ---\n{}",
                self.name,
                child.id(),
                self.log()
            );
        }
    }
}

/// A running single node or cluster, in its own temp dir.
pub struct Nats {
    /// The nodes.
    pub nodes: Vec<NatsNode>,
    token: String,
    token_file: PathBuf,
    ca_file: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// One JetStream node, ready.
    pub fn single() -> Nats {
        Self::start(1, false)
    }

    /// One JetStream node that speaks TLS only, with a certificate for
    /// 127.0.0.1 from a CA of its own ([`Nats::ca_file`]).
    pub fn single_tls() -> Nats {
        Self::start(1, true)
    }

    /// A 3-node JetStream cluster on loopback, ready (a meta leader known
    /// to every node).
    pub fn cluster3() -> Nats {
        Self::start(3, false)
    }

    /// [`Nats::cluster3`] speaking TLS only, to clients and on the routes
    /// between its nodes, as docs/FLEET.md configures it: each node
    /// presents a certificate from a CA of its own ([`Nats::ca_file`]) and
    /// checks its route peers' against the same CA.
    pub fn cluster3_tls() -> Nats {
        Self::start(3, true)
    }

    fn start(n: usize, tls: bool) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, tls_conf, route_tls) = if tls {
            let ca = crate::pki::Ca::new(dir.path(), "nats");
            let node = ca.peer("nats-server");
            let files = format!(
                "cert_file: \"{}\"\n    key_file: \"{}\"\n",
                node.cert.display(),
                node.key.display()
            );
            let conf = format!("tls {{\n    {files}}}\n");
            let route = format!(
                "  tls {{\n    {files}    ca_file: \"{}\"\n    verify: true\n  }}\n",
                ca.cert.display()
            );
            (Some(ca.cert.clone()), conf, route)
        } else {
            (None, String::new(), String::new())
        };
        let mut nodes: Vec<NatsNode> = (1..=n)
            .map(|i| NatsNode {
                name: format!("n{i}"),
                port: free_port(),
                http_port: free_port(),
                cluster_port: (n > 1).then(free_port),
                dir: dir.path().join(format!("n{i}")),
                child: None,
            })
            .collect();
        let token = crate::random_secret();
        let token_file = dir.path().join("nats-token");
        crate::write_secret(&token_file, &token);
        let route_password = crate::random_secret();
        let routes: Vec<String> = nodes
            .iter()
            .filter_map(|node| node.cluster_port)
            .map(|p| format!("nats://route:{route_password}@127.0.0.1:{p}"))
            .collect();
        for node in &nodes {
            std::fs::create_dir_all(node.dir.join("store")).unwrap();
            let mut conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  \
                 max_file_store: 1GB\n}}\nauthorization {{\n  token: \"{token}\"\n}}\n{tls_conf}",
                name = node.name,
                port = node.port,
                http = node.http_port,
                store = node.dir.join("store").display(),
            );
            if let Some(cluster) = node.cluster_port {
                let others: Vec<&String> = routes
                    .iter()
                    .filter(|r| !r.ends_with(&format!(":{cluster}")))
                    .collect();
                conf.push_str(&format!(
                    "cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{cluster}\n  \
                     authorization {{\n    user: route\n    password: \"{route_password}\"\n  }}\n  \
                     routes: [{}]\n{route_tls}}}\n",
                    others
                        .iter()
                        .map(|r| format!("\"{r}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            std::fs::write(node.dir.join("nats.conf"), conf).unwrap();
        }
        for node in &mut nodes {
            node.start();
        }
        let nats = Nats {
            nodes,
            token,
            token_file,
            ca_file,
            _dir: dir,
        };
        nats.wait_ready();
        nats
    }

    /// The file holding the token the nodes ask of clients (mode 0600),
    /// as the services' `token_file` takes it.
    pub fn token_file(&self) -> &std::path::Path {
        &self.token_file
    }

    /// The CA of a TLS node's certificate ([`Nats::single_tls`]).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// The lines a service's `nats:` or `fleet:` section needs to reach
    /// these nodes besides its `urls` (`token_file`, and `ca_file` for
    /// TLS), each indented two spaces.
    pub fn access_yaml(&self) -> String {
        let mut yaml = format!("  token_file: {}\n", self.token_file.display());
        if let Some(ca) = &self.ca_file {
            yaml.push_str(&format!("  ca_file: {}\n", ca.display()));
        }
        yaml
    }

    /// A client of every node, presenting the token (and trusting the CA
    /// of TLS nodes); waits for the first connection.
    pub async fn client(&self) -> async_nats::Client {
        self.client_to(&self.urls()).await
    }

    /// A client of node `index` alone, presenting the token.
    pub async fn client_of(&self, index: usize) -> async_nats::Client {
        self.client_to(&[self.nodes[index].url()]).await
    }

    async fn client_to(&self, urls: &[String]) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
        let mut options = async_nats::ConnectOptions::with_token(self.token.clone())
            .connection_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        options.connect(addrs).await.unwrap()
    }

    /// What node `index`'s route port says to a peer that connects in
    /// plaintext and waits: its `INFO` line, or nothing within 5 s (a
    /// port that waits for a TLS handshake first).
    pub fn route_greeting(&self, index: usize) -> String {
        use std::io::BufRead as _;
        let port = self.nodes[index].cluster_port.expect("a cluster node");
        let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(conn).read_line(&mut line);
        line
    }

    /// Every node's client URL, comma-separated (as the services'
    /// `nats.urls` take them, one per entry).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Waits until every running node has JetStream ready; panics after
    /// [`NATS_READY_TIMEOUT`].
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            let running: Vec<&NatsNode> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
            if running.iter().all(|n| n.jetstream_ready()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats JetStream not ready within {NATS_READY_TIMEOUT:?}: {}",
                running
                    .iter()
                    .map(|n| format!("{}: {:?}", n.name, n.http_get("/healthz")))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop(libc::SIGKILL);
        }
    }
}

/// Asserts that the NATS server at `addr` refuses a client that presents
/// no token (AuthorizationViolation at connect).
pub async fn assert_refused_without_token(addr: async_nats::ServerAddr) {
    let refused = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addr.clone())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "{addr:?}: {refused}"
    );
}

/// A host's `qvirt-eventbus` forwarding to `nats` as host `host` (stream
/// replicas: one per node), its outbox in `outbox`; waits until it serves.
pub async fn host_bus(nats: &Nats, host: &str, outbox: &std::path::Path) -> crate::Service {
    let config = format!(
        "nats:\n  urls: [{}]\n{}  host: {host}\n  replicas: {}\n  outbox_dir: {}\n",
        nats.urls().join(", "),
        nats.access_yaml(),
        nats.nodes.len(),
        outbox.display()
    );
    let mut svc = crate::Service::start_with_config("qvirt-eventbus", &config, &[]);
    svc.wait_serving("qvirt.v1.EventBus").await;
    svc
}

/// A `qvirt-supervisor` as fleet host `id` of `nats`: its config, state
/// and run dirs under `dir` (`ID.yaml`, `ID-state`, `ID-run`), its
/// `fleet:` section advertising its own loopback address, plus
/// `fleet_extra` (more keys of that section, each line indented two
/// spaces). Waits until it serves.
pub async fn fleet_supervisor(
    nats: &Nats,
    dir: &std::path::Path,
    id: &str,
    fleet_extra: &str,
) -> crate::Service {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.join(format!("{id}.yaml"));
    std::fs::write(
        &config,
        format!(
            "node_name: {id}\nfleet:\n  urls: [{}]\n{}  supervisor_url: http://{addr}\n\
             {fleet_extra}",
            nats.urls().join(", "),
            nats.access_yaml()
        ),
    )
    .unwrap();
    let state = dir.join(format!("{id}-state"));
    let run = dir.join(format!("{id}-run"));
    let mut sup = crate::Service::start_at(
        "qvirt-supervisor",
        addr,
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
    );
    sup.wait_serving("qvirt.v1.Supervisor").await;
    sup
}

/// A gateway-side `qvirt-eventbus` (`fleet:`) on node `url_index` of
/// `nats`, and a client of it. Waits for the server only: its EventBus
/// waits for the stream.
pub async fn fleet_bus(
    nats: &Nats,
    url_index: usize,
) -> (
    crate::Service,
    qvirt_proto::v1::event_bus_client::EventBusClient<InternalChannel>,
) {
    let config = format!(
        "fleet:\n  urls: [{}]\n{}",
        nats.urls()[url_index],
        nats.access_yaml()
    );
    let mut svc = crate::Service::start_with_config("qvirt-eventbus", &config, &[]);
    svc.wait_serving("").await;
    let client =
        qvirt_proto::v1::event_bus_client::EventBusClient::new(internal_channel(svc.url()).await);
    (svc, client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_meta_leader_known() {
        assert!(meta_leader_known(r#"{"config":{}}"#));
        assert!(meta_leader_known(
            r#"{"meta_cluster":{"name":"q","leader":"n2","cluster_size": 3}}"#
        ));
        assert!(!meta_leader_known(
            r#"{"meta_cluster":{"name":"q","leader":"","cluster_size": 3}}"#
        ));
    }
}
