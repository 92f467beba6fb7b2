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
    /// The event bus to publish QMP and lifecycle events to, as a URL
    /// (`http://127.0.0.1:50053`). Absent: events are only logged (debug).
    pub eventbus: Option<String>,
    /// The hook executor to run libvirt-style hooks with, as a URL
    /// (`http://127.0.0.1:50054`). Absent: no hooks run.
    pub hookexec: Option<String>,
    /// Bound on one hook call (all the scripts of one hook point),
    /// seconds; past it the hook counts as not run (executor unavailable).
    pub hook_call_timeout_secs: u64,
    /// The agent service (`qvirt-agentd`) for agent-mode shutdown and
    /// reboot, as a URL (`http://127.0.0.1:50055`). Absent: agent mode is
    /// refused (FAILED_PRECONDITION).
    pub agentd: Option<String>,
    /// A file holding the internal plane's shared secret (at least 32
    /// bytes, not readable by every user), presented to the event bus and
    /// the hook executor in `x-qvirt-internal-token`. Absent: they refuse
    /// this supervisor's calls over TCP.
    pub internal_token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            qemu_binary: PathBuf::from(DEFAULT_QEMU_BINARY),
            node_name: String::new(),
            default_accel: DefaultAccel::Tcg,
            auto_uses_kvm: false,
            start_timeout_secs: 10,
            command_timeout_secs: 30,
            eventbus: None,
            destroy_grace_secs: 10,
            hookexec: None,
            hook_call_timeout_secs: 300,
            agentd: None,
            internal_token_file: None,
        }
    }
}

impl Config {
    /// The node name, or the machine's hostname when `node_name` is empty.
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
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
        if self.qemu_binary.as_os_str().is_empty() {
            return Err(invalid("qemu_binary", String::new(), "must not be empty"));
        }
        for (field, value) in [
            ("start_timeout_secs", self.start_timeout_secs),
            ("command_timeout_secs", self.command_timeout_secs),
            ("hook_call_timeout_secs", self.hook_call_timeout_secs),
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
    fn test_relative_dirs_are_refused() {
        let c = Config {
            run_dir: PathBuf::from("run"),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("run_dir"), "{err}");
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
