//! The `qvirt-gateway` config file (YAML; every field optional).

use qvirt_common::config::{ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

/// The port `qvirt-gateway` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50051;

/// `qvirt-gateway` settings. Unknown keys are an error.
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
        }
    }
}

qvirt_common::impl_service_config!(Config);
