//! The `qvirt-supervisor` config file (YAML; every field optional).

use std::path::PathBuf;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

/// The port `qvirt-supervisor` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50052;

/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/qvirt";
/// Default `run_dir`.
pub const DEFAULT_RUN_DIR: &str = "/run/qvirt";
/// Default `qemu_binary` (looked up on PATH).
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";
/// Default `qemu_user`: the system user `make deps` creates.
pub const DEFAULT_QEMU_USER: &str = "qvirt-qemu";
/// The image root used when `image_roots` is empty, under `state_dir`.
pub const DEFAULT_IMAGES_SUBDIR: &str = "images";

/// The accelerator a domain gets when its spec leaves `accel` unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAccel {
    /// TCG: works everywhere (and the only one that boots guests on the
    /// project's test machines, where /dev/kvm opens but guests hang).
    #[default]
    Tcg,
    /// KVM.
    Kvm,
    /// KVM when /dev/kvm is usable and `auto_uses_kvm` is set, else TCG.
    Auto,
}

/// What the hook scripts behind `hookexec` read on stdin for a domain
/// hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HookStdinFormat {
    /// The definition as YAML, as `qvirtctl define` reads it.
    #[default]
    Yaml,
    /// libvirt-style domain XML generated from the definition, for
    /// scripts written for libvirt's `/etc/libvirt/hooks/qemu`.
    LibvirtXml,
}

/// `qvirt-supervisor` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC: `IP:PORT` or `unix:PATH`.
    pub listen: ListenAddr,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Close a new connection that has not sent the HTTP/2 preface within
    /// this many milliseconds (100 to 600000).
    pub preface_timeout_ms: u64,
    /// Persistent state: `domains/NAME.yaml` definitions and
    /// `logs/NAME.log` QEMU logs.
    pub state_dir: PathBuf,
    /// Runtime state: `NAME/` per domain (mode 0700) with its status file,
    /// monitor and agent sockets.
    pub run_dir: PathBuf,
    /// The QEMU binary (a bare name is looked up on PATH).
    pub qemu_binary: PathBuf,
    /// The user QEMU runs as (when the supervisor runs as root). `root`
    /// is allowed but logged as a warning: QEMU then runs unconfined by
    /// user.
    pub qemu_user: String,
    /// The group QEMU runs as. Empty: `qemu_user`'s primary group.
    pub qemu_group: String,
    /// Start QEMU with its seccomp sandbox (`-sandbox on,obsolete=deny,
    /// elevateprivileges=deny,spawn=deny,resourcecontrol=deny`), as
    /// libvirt does.
    pub qemu_sandbox: bool,
    /// Where a definition's kernel, initrd and disks may be (absolute
    /// dirs; symlinks and `..` are resolved before the check). Empty:
    /// `STATE_DIR/images` alone.
    pub image_roots: Vec<PathBuf>,
    /// Dirs where a definition's `serial_log` may be besides the domain's
    /// own serial dir `STATE_DIR/serial/NAME/` (which is always allowed).
    /// Empty: the domain's own dir only.
    pub serial_log_roots: Vec<PathBuf>,
    /// This host's name in domain records and events. Empty: the hostname.
    pub node_name: String,
    /// Accelerator for specs that leave `accel` unset.
    pub default_accel: DefaultAccel,
    /// Whether `accel: auto` may pick KVM when /dev/kvm is usable. Off by
    /// default: on machines with nested "KVM" that opens but never runs a
    /// guest, `auto` must mean TCG.
    pub auto_uses_kvm: bool,
    /// Bound on QEMU's startup handshake (spawn to QMP ready), seconds.
    pub start_timeout_secs: u64,
    /// Bound on one QMP command issued by an RPC, seconds.
    pub command_timeout_secs: u64,
    /// DestroyDomain: SIGTERM, then SIGKILL after this many seconds.
    pub destroy_grace_secs: u64,
    /// Bound on SaveDomain's migration of the guest's state into its
    /// image, and on RestoreDomain's loading it back, seconds.
    pub save_timeout_secs: u64,
    /// The event bus to publish QMP and lifecycle events to, as a URL
    /// (`http://127.0.0.1:50053`, or `unix:PATH` for a bus listening on a
    /// unix socket; the same for `hookexec` and `agentd`). Absent: events
    /// are only logged (debug).
    pub eventbus: Option<String>,
    /// The hook executor to run libvirt-style hooks with, as a URL
    /// (`http://127.0.0.1:50054`). Absent: no hooks run.
    pub hookexec: Option<String>,
    /// Bound on one hook call (all the scripts of one hook point),
    /// seconds; past it the hook counts as not run (executor unavailable).
    pub hook_call_timeout_secs: u64,
    /// What the scripts of the hooks dir behind `hookexec` receive on
    /// stdin for a domain hook: `yaml` (the definition) or `libvirt-xml`
    /// (libvirt-style domain XML generated from it).
    pub hook_stdin_format: HookStdinFormat,
    /// The agent service (`qvirt-agentd`) for agent-mode shutdown and
    /// reboot, as a URL (`http://127.0.0.1:50055`). Absent: agent mode is
    /// refused (FAILED_PRECONDITION).
    pub agentd: Option<String>,
    /// Most memory one domain may ask for, MiB. Absent: the host's
    /// `MemTotal`. A larger `memory_mib` is refused at define.
    pub max_memory_mib: Option<u64>,
    /// Most vCPUs one domain may ask for. Absent: 8 per host CPU, at most
    /// 1024. A larger `vcpus` is refused at define.
    pub max_vcpus: Option<u32>,
    /// A file holding the internal plane's shared secret (at least 32
    /// bytes, not readable by every user). The supervisor presents it to
    /// the event bus, the hook executor and the agent service in
    /// `x-qvirt-internal-token`, and serves `qvirt.v1.Supervisor` only to
    /// callers that present it (the gateway, the agent service) or to
    /// `internal_uids` peers on a unix socket. Absent: those services
    /// refuse this supervisor's calls over TCP, and it refuses every TCP
    /// caller.
    pub internal_token_file: Option<PathBuf>,
    /// Unix-socket peers (by uid) served without the token, besides uid 0
    /// and the supervisor's own uid.
    pub internal_uids: Vec<u32>,
    /// Start QEMU through the launcher (`qvirt-vmm`) listening on this unix
    /// socket instead of as the supervisor's child, so that QEMU outlives
    /// the supervisor's container. The launcher must share the
    /// supervisor's pid namespace and run dir. Absent: QEMU is the
    /// supervisor's child (single-host installs).
    pub launcher_socket: Option<PathBuf>,
    /// Membership of a fleet: heartbeat and mirror this host's domains into
    /// the fleet registry (NATS JetStream KV). Absent: no NATS at all.
    pub fleet: Option<FleetConfig>,
}

/// The `fleet:` section: where the registry is and how this host is
/// reached (docs/FLEET.md, "Registry").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The NATS servers, `nats://HOST:PORT` (any one of a cluster is
    /// enough).
    pub urls: Vec<String>,
    /// Replicas of the registry's buckets when this supervisor creates
    /// them (1 to 5).
    pub replicas: usize,
    /// How gateways reach this supervisor, `http://HOST:PORT`. Required.
    pub supervisor_url: String,
    /// How gateways reach this host's agent service. Absent: none.
    pub agentd_url: Option<String>,
    /// The hosts bucket's `max_age` when this supervisor creates it; the
    /// heartbeat is put every third of it (3 to 3600).
    pub heartbeat_ttl_secs: u64,
    /// A file holding the token the NATS servers ask of clients (their
    /// `authorization { token }`). Absent: connect without one.
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) the NATS servers' certificates chain to: connect with
    /// TLS, trusting it alone. Absent: TLS only for a `tls://` URL or a
    /// server that asks for it, trusting the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// The most `fleet.urls`.
pub const MAX_FLEET_URLS: usize = 16;

/// The values `fleet.heartbeat_ttl_secs` may take.
pub const HEARTBEAT_TTL_SECS_RANGE: std::ops::RangeInclusive<u64> = 3..=3600;

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            urls: Vec::new(),
            replicas: 1,
            supervisor_url: String::new(),
            agentd_url: None,
            heartbeat_ttl_secs: qvirt_registry::DEFAULT_HEARTBEAT_TTL.as_secs(),
            token_file: None,
            ca_file: None,
        }
    }
}

impl FleetConfig {
    /// The token and CA it names, read and checked.
    pub fn access(&self) -> Result<qvirt_registry::NatsAccess, ConfigError> {
        qvirt_registry::NatsAccess::load(
            "fleet",
            self.token_file.as_deref(),
            self.ca_file.as_deref(),
        )
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, reason: String| ConfigError::Invalid {
            field,
            value: value.chars().take(200).collect(),
            reason,
        };
        if self.urls.is_empty() || self.urls.len() > MAX_FLEET_URLS {
            return Err(invalid(
                "fleet.urls",
                self.urls.len().to_string(),
                format!("must name 1 to {MAX_FLEET_URLS} servers"),
            ));
        }
        if let Some(url) = self.urls.iter().find(|u| !qvirt_registry::valid_url(u)) {
            return Err(invalid(
                "fleet.urls",
                url.clone(),
                "expected nats://HOST:PORT".into(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid(
                "fleet.replicas",
                self.replicas.to_string(),
                "must be 1 to 5".into(),
            ));
        }
        for (field, url) in [
            ("fleet.supervisor_url", Some(&self.supervisor_url)),
            ("fleet.agentd_url", self.agentd_url.as_ref()),
        ] {
            let Some(url) = url else { continue };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    field,
                    url.clone(),
                    "must be an http:// or https:// URL that gateways can reach".into(),
                ));
            }
            qvirt_common::config::check_endpoint(field, url)?;
        }
        if !HEARTBEAT_TTL_SECS_RANGE.contains(&self.heartbeat_ttl_secs) {
            return Err(invalid(
                "fleet.heartbeat_ttl_secs",
                self.heartbeat_ttl_secs.to_string(),
                format!(
                    "must be {} to {}",
                    HEARTBEAT_TTL_SECS_RANGE.start(),
                    HEARTBEAT_TTL_SECS_RANGE.end()
                ),
            ));
        }
        self.access()?;
        Ok(())
    }
}

/// vCPUs allowed per host CPU when `max_vcpus` is not set.
pub const VCPUS_PER_HOST_CPU: u32 = 8;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            qemu_binary: PathBuf::from(DEFAULT_QEMU_BINARY),
            qemu_user: DEFAULT_QEMU_USER.to_owned(),
            qemu_group: String::new(),
            qemu_sandbox: true,
            image_roots: Vec::new(),
            serial_log_roots: Vec::new(),
            node_name: String::new(),
            default_accel: DefaultAccel::Tcg,
            auto_uses_kvm: false,
            start_timeout_secs: 10,
            command_timeout_secs: 30,
            eventbus: None,
            destroy_grace_secs: 10,
            save_timeout_secs: 300,
            hookexec: None,
            hook_call_timeout_secs: 300,
            hook_stdin_format: HookStdinFormat::Yaml,
            agentd: None,
            max_memory_mib: None,
            max_vcpus: None,
            internal_token_file: None,
            internal_uids: Vec::new(),
            launcher_socket: None,
            fleet: None,
        }
    }
}

/// The host's `MemTotal` from `/proc/meminfo`, MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

impl Config {
    /// The node name, or the machine's hostname when `node_name` is empty.
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        qvirt_common::config::host_name()
    }

    /// The dirs a definition's images may be in: `image_roots`, or
    /// `STATE_DIR/images` when it is empty.
    pub fn image_roots(&self) -> Vec<PathBuf> {
        if self.image_roots.is_empty() {
            vec![self.state_dir.join(DEFAULT_IMAGES_SUBDIR)]
        } else {
            self.image_roots.clone()
        }
    }

    /// `max_memory_mib`, or the host's memory when unset (unbounded if
    /// `/proc/meminfo` cannot be read).
    pub fn max_memory_mib(&self) -> u64 {
        self.max_memory_mib
            .or_else(host_memory_mib)
            .unwrap_or(u64::MAX)
    }

    /// `max_vcpus`, or [`VCPUS_PER_HOST_CPU`] per host CPU (at most
    /// [`MAX_VCPUS`](crate::domain::spec::MAX_VCPUS)) when unset.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
            cpus.saturating_mul(VCPUS_PER_HOST_CPU)
                .min(crate::domain::spec::MAX_VCPUS)
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, reason: &str| ConfigError::Invalid {
            field,
            value,
            reason: reason.to_owned(),
        };
        if let Some(url) = &self.eventbus {
            qvirt_common::config::check_endpoint("eventbus", url)?;
        }
        if let Some(url) = &self.hookexec {
            qvirt_common::config::check_endpoint("hookexec", url)?;
        }
        if let Some(url) = &self.agentd {
            qvirt_common::config::check_endpoint("agentd", url)?;
        }
        if let Some(fleet) = &self.fleet {
            fleet.check()?;
        }
        qvirt_common::internal_auth::InternalToken::load_optional(
            self.internal_token_file.as_ref(),
        )?;
        for (field, dir) in [("state_dir", &self.state_dir), ("run_dir", &self.run_dir)] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    dir.display().to_string(),
                    "must be an absolute path",
                ));
            }
        }
        for (field, dirs) in [
            ("image_roots", &self.image_roots),
            ("serial_log_roots", &self.serial_log_roots),
        ] {
            if let Some(dir) = dirs.iter().find(|d| !d.is_absolute()) {
                return Err(invalid(
                    field,
                    dir.display().to_string(),
                    "must be an absolute path",
                ));
            }
        }
        if let Some(socket) = self.launcher_socket.as_ref().filter(|s| !s.is_absolute()) {
            return Err(invalid(
                "launcher_socket",
                socket.display().to_string(),
                "must be an absolute path",
            ));
        }
        if self.qemu_user.is_empty() {
            return Err(invalid("qemu_user", String::new(), "must not be empty"));
        }
        if self.max_memory_mib == Some(0) {
            return Err(invalid("max_memory_mib", "0".into(), "must be at least 1"));
        }
        if let Some(n) = self.max_vcpus
            && !(1..=crate::domain::spec::MAX_VCPUS).contains(&n)
        {
            return Err(invalid(
                "max_vcpus",
                n.to_string(),
                "must be 1-1024 (the most vCPUs a domain may have)",
            ));
        }
        if self.qemu_binary.as_os_str().is_empty() {
            return Err(invalid("qemu_binary", String::new(), "must not be empty"));
        }
        for (field, value) in [
            ("start_timeout_secs", self.start_timeout_secs),
            ("command_timeout_secs", self.command_timeout_secs),
            ("hook_call_timeout_secs", self.hook_call_timeout_secs),
            ("save_timeout_secs", self.save_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(field, "0".into(), "must be at least 1"));
            }
        }
        Ok(())
    }
}

qvirt_common::impl_service_config!(Config, Config::check);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use qvirt_common::cli::ServiceConfig;

    use super::*;

    #[test]
    fn test_defaults_are_tcg_and_system_dirs() {
        let c = Config::default();
        assert_eq!(c.default_accel, DefaultAccel::Tcg);
        assert!(!c.auto_uses_kvm);
        assert_eq!(c.state_dir, Path::new("/var/lib/qvirt"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn test_yaml_fields_and_unknown_key() {
        let c: Config = qvirt_common::config::parse(
            Path::new("s.yaml"),
            "state_dir: /tmp/s\nrun_dir: /tmp/r\ndefault_accel: auto\nnode_name: n1\n",
        )
        .unwrap();
        assert_eq!(c.default_accel, DefaultAccel::Auto);
        assert_eq!(c.node_name(), "n1");
        let err = qvirt_common::config::parse::<Config>(
            Path::new("s.yaml"),
            "run_dir: /r\nstate_dri: /x\n",
        )
        .unwrap_err();
        let line = qvirt_common::error_chain(&err);
        assert!(line.contains("unknown field `state_dri`"), "{line}");
        assert!(line.contains("line 2 column 1"), "{line}");
    }

    #[test]
    fn test_host_limits_default_to_the_host_and_are_checked() {
        let c = Config::default();
        let mem = c.max_memory_mib();
        assert!(mem > 0 && mem < u64::MAX, "{mem}");
        assert!(c.max_vcpus() >= VCPUS_PER_HOST_CPU);
        let c: Config =
            qvirt_common::config::parse(Path::new("s.yaml"), "max_memory_mib: 512\nmax_vcpus: 2\n")
                .unwrap();
        assert_eq!((c.max_memory_mib(), c.max_vcpus()), (512, 2));
        for bad in [
            Config {
                max_memory_mib: Some(0),
                ..Config::default()
            },
            Config {
                max_vcpus: Some(2000),
                ..Config::default()
            },
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains("max_"), "{err}");
        }
    }

    #[test]
    fn test_hook_stdin_format() {
        assert_eq!(Config::default().hook_stdin_format, HookStdinFormat::Yaml);
        let c: Config =
            qvirt_common::config::parse(Path::new("s.yaml"), "hook_stdin_format: libvirt-xml\n")
                .unwrap();
        assert_eq!(c.hook_stdin_format, HookStdinFormat::LibvirtXml);
        let err =
            qvirt_common::config::parse::<Config>(Path::new("s.yaml"), "hook_stdin_format: xml\n")
                .unwrap_err();
        let line = qvirt_common::error_chain(&err);
        assert!(line.contains("expected `yaml` or `libvirt-xml`"), "{line}");
    }

    #[test]
    fn test_relative_dirs_are_refused() {
        let c = Config {
            run_dir: PathBuf::from("run"),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("run_dir"), "{err}");
    }

    #[test]
    fn test_confinement_defaults_and_relative_roots() {
        let c = Config::default();
        assert_eq!(c.qemu_user, "qvirt-qemu");
        assert!(c.qemu_sandbox);
        assert_eq!(c.image_roots(), [Path::new("/var/lib/qvirt/images")]);
        let c = Config {
            image_roots: vec![PathBuf::from("/srv/img"), PathBuf::from("img")],
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("image_roots") && err.contains("img"), "{err}");
        let c = Config {
            qemu_user: String::new(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("qemu_user"));
    }

    #[test]
    fn test_fleet_section_is_checked() {
        let c: Config = qvirt_common::config::parse(
            Path::new("s.yaml"),
            "fleet:\n  urls: [nats://n1:4222]\n  supervisor_url: http://h1:50052\n",
        )
        .unwrap();
        let fleet = c.fleet.clone().unwrap();
        assert_eq!((fleet.replicas, fleet.heartbeat_ttl_secs), (1, 15));
        assert!(c.validate().is_ok());
        for (yaml, field) in [
            ("fleet:\n  supervisor_url: http://h1:1\n", "fleet.urls"),
            ("fleet:\n  urls: [nats://a:1]\n", "fleet.supervisor_url"),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: unix:/s\n",
                "fleet.supervisor_url",
            ),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: http://h:1\n  replicas: 7\n",
                "fleet.replicas",
            ),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: http://h:1\n  heartbeat_ttl_secs: 1\n",
                "fleet.heartbeat_ttl_secs",
            ),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: http://h:1\n  agentd_url: h:2\n",
                "fleet.agentd_url",
            ),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: http://h:1\n  token_file: /nonexistent/t\n",
                "fleet.token_file",
            ),
            (
                "fleet:\n  urls: [nats://a:1]\n  supervisor_url: http://h:1\n  ca_file: /nonexistent/c\n",
                "fleet.ca_file",
            ),
        ] {
            let c: Config = qvirt_common::config::parse(Path::new("s.yaml"), yaml).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
        let err = qvirt_common::config::parse::<Config>(
            Path::new("s.yaml"),
            "fleet:\n  urls: [nats://a:1]\n  ttl: 3\n",
        )
        .unwrap_err();
        assert!(qvirt_common::error_chain(&err).contains("unknown field `ttl`"));
    }

    #[test]
    fn test_hookexec_must_be_an_endpoint_url() {
        let c = Config {
            hookexec: Some("127.0.0.1:50054".into()),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("hookexec"), "{err}");
        let c = Config {
            hookexec: Some("http://127.0.0.1:50054".into()),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
    }
}
