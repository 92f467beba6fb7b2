//! The `qvirt-eventbus` config file (YAML; every field optional).

use qvirt_common::config::{ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

/// The port `qvirt-eventbus` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50053;

/// `qvirt-eventbus` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC: `IP:PORT` or `unix:PATH`.
    pub listen: ListenAddr,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
        }
    }
}

qvirt_common::impl_service_config!(Config);
