//! The flags every service binary shares, and how a service config takes
//! them.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use crate::config::{self, ConfigError, ListenAddr, LogFormat};

/// What the shared machinery needs from a service's `Config`: where to
/// listen, how to log, and a final check. Implement it with
/// [`impl_service_config!`](crate::impl_service_config) for a struct that has
/// `listen: ListenAddr` and `log_format: LogFormat` fields.
pub trait ServiceConfig: DeserializeOwned + Default {
    /// The address the service serves on.
    fn listen(&self) -> &ListenAddr;
    /// Replaces the listen address (from `--listen`).
    fn set_listen(&mut self, addr: ListenAddr);
    /// The log format on stderr.
    fn log_format(&self) -> LogFormat;
    /// Replaces the log format (from `--log-format`).
    fn set_log_format(&mut self, format: LogFormat);
    /// How long a new connection may take to send the HTTP/2 preface, ms.
    fn preface_timeout_ms(&self) -> u64;
    /// Replaces the preface timeout (from `--preface-timeout-ms`).
    fn set_preface_timeout_ms(&mut self, ms: u64);
    /// How the server treats connections: the defaults with this config's
    /// preface timeout (a service may override more before serving).
    fn serve_options(&self) -> crate::serve::ServeOptions {
        crate::serve::ServeOptions {
            preface_timeout: std::time::Duration::from_millis(self.preface_timeout_ms()),
            ..crate::serve::ServeOptions::default()
        }
    }
    /// Checks what the types alone cannot, after every override.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Runtime threads: 0 = one worker per core (tokio's multi-thread
    /// runtime), 1 = everything on the main thread (no cross-thread
    /// wake-ups: the lowest latency for a service that mostly waits on
    /// sockets), N = N workers.
    fn worker_threads(&self) -> usize {
        0
    }
}

/// Implements [`ServiceConfig`] for a config struct with `listen`,
/// `log_format` and `preface_timeout_ms` fields, with an optional `validate` body and an optional
/// `worker_threads` field (`workers = field`).
#[macro_export]
macro_rules! impl_service_config {
    ($ty:ty) => {
        $crate::impl_service_config!($ty, |_c| Ok(()));
    };
    ($ty:ty, $validate:expr, workers = $field:ident) => {
        $crate::impl_service_config!(@impl $ty, $validate,
            fn worker_threads(&self) -> usize {
                self.$field
            }
        );
    };
    ($ty:ty, $validate:expr) => {
        $crate::impl_service_config!(@impl $ty, $validate,);
    };
    (@impl $ty:ty, $validate:expr, $($extra:item)*) => {
        impl $crate::cli::ServiceConfig for $ty {
            fn listen(&self) -> &$crate::config::ListenAddr {
                &self.listen
            }
            fn set_listen(&mut self, addr: $crate::config::ListenAddr) {
                self.listen = addr;
            }
            fn log_format(&self) -> $crate::config::LogFormat {
                self.log_format
            }
            fn set_log_format(&mut self, format: $crate::config::LogFormat) {
                self.log_format = format;
            }
            fn preface_timeout_ms(&self) -> u64 {
                self.preface_timeout_ms
            }
            fn set_preface_timeout_ms(&mut self, ms: u64) {
                self.preface_timeout_ms = ms;
            }
            fn validate(&self) -> Result<(), $crate::config::ConfigError> {
                $crate::serve::check_preface_timeout_ms(self.preface_timeout_ms)?;
                let check: fn(&$ty) -> Result<(), $crate::config::ConfigError> = $validate;
                check(self)
            }
            $($extra)*
        }
    };
}

/// Flags shared by every qvirt service (`#[command(flatten)]` them into the
/// binary's own `clap::Parser`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// YAML config file. Without one, built-in defaults apply; flags
    /// override the file.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on: IP:PORT (e.g. 127.0.0.1:50052) or
    /// unix:PATH. Overrides `listen` in the file.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<ListenAddr>,
    /// Log format on stderr. Overrides `log_format` in the file. Log levels
    /// come from RUST_LOG (default: info).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Close a new connection that has not sent the HTTP/2 preface within
    /// this many milliseconds. Overrides `preface_timeout_ms` in the file.
    #[arg(long, value_name = "MS")]
    pub preface_timeout_ms: Option<u64>,
}

impl CommonArgs {
    /// Loads the config file (or defaults) and applies the shared flags.
    /// The service applies its own flags to the result, then calls
    /// [`ServiceConfig::validate`].
    pub fn load<C: ServiceConfig>(&self) -> Result<C, ConfigError> {
        let mut config: C = config::load(self.config.as_deref())?;
        if let Some(addr) = &self.listen {
            config.set_listen(addr.clone());
        }
        if let Some(format) = self.log_format {
            config.set_log_format(format);
        }
        if let Some(ms) = self.preface_timeout_ms {
            config.set_preface_timeout_ms(ms);
        }
        Ok(config)
    }
}

/// Replaces `target` with `flag` when the flag was given: the one rule for
/// every service-specific override.
pub fn override_with<T>(target: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *target = v;
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        listen: ListenAddr,
        log_format: LogFormat,
        preface_timeout_ms: u64,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                listen: ListenAddr::loopback(50099),
                log_format: LogFormat::Text,
                preface_timeout_ms: 10_000,
            }
        }
    }

    crate::impl_service_config!(Demo, |c| match c.listen {
        ListenAddr::Tcp(a) if a.port() == 1 => Err(ConfigError::Invalid {
            field: "listen",
            value: a.to_string(),
            reason: "port 1 is reserved in this test".into(),
        }),
        _ => Ok(()),
    });

    #[test]
    fn test_flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("demo.yaml");
        std::fs::write(&file, "listen: 127.0.0.1:7000\nlog_format: json\n").unwrap();

        let from_file: Demo = CommonArgs {
            config: Some(file.clone()),
            ..Default::default()
        }
        .load()
        .unwrap();
        assert_eq!(from_file.listen, ListenAddr::loopback(7000));
        assert_eq!(from_file.log_format, LogFormat::Json);

        let flagged: Demo = CommonArgs {
            config: Some(file),
            listen: Some(ListenAddr::loopback(7001)),
            log_format: Some(LogFormat::Text),
            preface_timeout_ms: Some(500),
        }
        .load()
        .unwrap();
        assert_eq!(flagged.listen, ListenAddr::loopback(7001));
        assert_eq!(flagged.log_format, LogFormat::Text);
        assert_eq!(
            flagged.serve_options().preface_timeout,
            std::time::Duration::from_millis(500)
        );

        let defaults: Demo = CommonArgs::default().load().unwrap();
        assert_eq!(defaults.listen, ListenAddr::loopback(50099));
    }

    #[test]
    fn test_validate_runs_the_service_check() {
        let mut c = Demo::default();
        assert!(c.validate().is_ok());
        c.set_listen(ListenAddr::loopback(1));
        assert!(c.validate().is_err());
        let mut c = Demo::default();
        c.set_preface_timeout_ms(0);
        assert!(c.validate().is_err());
    }
}
