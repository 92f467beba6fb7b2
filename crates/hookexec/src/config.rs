//! The `qvirt-hookexec` config file (YAML; every field optional).

use std::path::PathBuf;
use std::time::Duration;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

/// The port `qvirt-hookexec` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50054;
/// Default `hooks_dir`: qvirt's own directory. Point it at
/// `/etc/libvirt/hooks` to run existing libvirt hooks unchanged.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/qvirt/hooks";
/// Default `timeout_secs` (libvirt has no timeout at all).
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Default `max_timeout_secs`.
pub const DEFAULT_MAX_TIMEOUT_SECS: u64 = 3600;
/// Default `max_output_bytes`: per script and per stream.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 256 << 10;
/// Upper bound of `max_output_bytes`: a filter document of this size
/// still fits a RunHook response under gRPC's default 4 MiB message limit.
pub const MAX_OUTPUT_BYTES_LIMIT: usize = 2 << 20;
/// Default `max_concurrent_runs`.
pub const DEFAULT_MAX_CONCURRENT_RUNS: usize = 64;

/// `qvirt-hookexec` settings. Unknown keys are an error.
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
    /// The hooks directory: `DRIVER` and `DRIVER.d/*` scripts. Absolute. A
    /// missing directory means no hooks.
    pub hooks_dir: PathBuf,
    /// Per-script timeout when a RunHook request sets none, seconds.
    pub timeout_secs: u64,
    /// The longest timeout a RunHook request may ask for, seconds.
    pub max_timeout_secs: u64,
    /// Bytes of stdout and of stderr kept per script; the rest is read and
    /// dropped (the response says `*_truncated`).
    pub max_output_bytes: usize,
    /// RunHook calls running at once; more wait for a slot until their
    /// deadline.
    pub max_concurrent_runs: usize,
    /// A file holding the internal plane's shared secret (at least 32
    /// bytes, not readable by every user): callers must present it in
    /// `x-qvirt-internal-token`. Absent (the default): every TCP caller is
    /// refused.
    pub internal_token_file: Option<PathBuf>,
    /// Unix-socket peers (by uid) accepted without the token, besides uid
    /// 0 and the executor's own uid.
    pub internal_uids: Vec<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            hooks_dir: PathBuf::from(DEFAULT_HOOKS_DIR),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            max_timeout_secs: DEFAULT_MAX_TIMEOUT_SECS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_concurrent_runs: DEFAULT_MAX_CONCURRENT_RUNS,
            internal_token_file: None,
            internal_uids: Vec::new(),
        }
    }
}

impl Config {
    /// The default per-script timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The longest per-script timeout a request may ask for.
    pub fn max_timeout(&self) -> Duration {
        Duration::from_secs(self.max_timeout_secs)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, value: String, reason: String| ConfigError::Invalid {
            field,
            value,
            reason,
        };
        if !self.hooks_dir.is_absolute() {
            return Err(invalid(
                "hooks_dir",
                self.hooks_dir.display().to_string(),
                "must be an absolute path".into(),
            ));
        }
        if self.max_timeout_secs == 0 {
            return Err(invalid(
                "max_timeout_secs",
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        if self.timeout_secs == 0 || self.timeout_secs > self.max_timeout_secs {
            return Err(invalid(
                "timeout_secs",
                self.timeout_secs.to_string(),
                format!(
                    "must be between 1 and max_timeout_secs ({})",
                    self.max_timeout_secs
                ),
            ));
        }
        if self.max_output_bytes == 0 || self.max_output_bytes > MAX_OUTPUT_BYTES_LIMIT {
            return Err(invalid(
                "max_output_bytes",
                self.max_output_bytes.to_string(),
                format!("must be between 1 and {MAX_OUTPUT_BYTES_LIMIT}"),
            ));
        }
        qvirt_common::internal_auth::InternalToken::load_optional(
            self.internal_token_file.as_ref(),
        )?;
        if self.max_concurrent_runs == 0 {
            return Err(invalid(
                "max_concurrent_runs",
                "0".into(),
                "must be at least 1".into(),
            ));
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
    fn test_defaults_are_valid() {
        let c = Config::default();
        assert_eq!(c.hooks_dir, Path::new("/etc/qvirt/hooks"));
        assert_eq!(c.timeout(), Duration::from_secs(60));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn test_yaml_sets_every_field_and_rejects_unknown_ones() {
        let c: Config = qvirt_common::config::parse(
            Path::new("h.yaml"),
            "hooks_dir: /etc/libvirt/hooks\ntimeout_secs: 5\nmax_timeout_secs: 10\nmax_output_bytes: 100\n",
        )
        .unwrap();
        assert_eq!(c.hooks_dir, Path::new("/etc/libvirt/hooks"));
        assert_eq!(c.timeout_secs, 5);
        assert_eq!(c.max_timeout_secs, 10);
        assert_eq!(c.max_output_bytes, 100);
        let err = qvirt_common::config::parse::<Config>(Path::new("h.yaml"), "hook_dir: /x\n")
            .unwrap_err();
        assert!(qvirt_common::error_chain(&err).contains("unknown field `hook_dir`"));
    }

    #[test]
    fn test_bad_values_name_the_field() {
        type Edit = fn(&mut Config);
        let cases: [(&str, Edit); 6] = [
            ("hooks_dir", |c| c.hooks_dir = "hooks".into()),
            ("timeout_secs", |c| c.timeout_secs = 0),
            ("timeout_secs", |c| c.timeout_secs = c.max_timeout_secs + 1),
            ("max_timeout_secs", |c| c.max_timeout_secs = 0),
            ("max_output_bytes", |c| c.max_output_bytes = 0),
            ("max_concurrent_runs", |c| c.max_concurrent_runs = 0),
        ];
        for (field, edit) in cases {
            let mut c = Config::default();
            edit(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid config: {field} = ")),
                "{err}"
            );
        }
    }
}
