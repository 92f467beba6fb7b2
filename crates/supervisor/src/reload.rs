//! SIGHUP, as libvirtd handles it: first the daemon hook `- reload begin
//! SIGHUP` (the executor discovers the hooks again before running it),
//! then the config read again (the file, under the same flags). The
//! settings in [`RELOADED`] apply to what starts from then on; any other
//! changed setting is logged as needing a restart and keeps its running
//! value. A config that does not load changes nothing (and says why).

use std::sync::Arc;
use std::time::Duration;

use qvirt_common::config::ConfigError;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::domain::Manager;
use crate::hooks::ExecutorHooks;
use crate::seams::{DaemonHookOp, Hooks};

/// Loads the config again (file and flags) and checks it.
pub type Reloader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// The config keys a SIGHUP applies to a running supervisor.
pub const RELOADED: [&str; 4] = [
    "hook_call_timeout_secs",
    "hook_stdin_format",
    "max_memory_mib",
    "max_vcpus",
];

/// What a reload acts on.
pub(crate) struct Reload {
    /// The daemon hook.
    pub hooks: Arc<dyn Hooks>,
    /// The hook client whose settings reload (absent: no executor).
    pub executor: Option<ExecutorHooks>,
    /// The domain table, for the host limits.
    pub manager: Manager,
    /// The settings in force.
    pub running: Config,
    /// Absent: the config is not read again (only the hook runs).
    pub reloader: Option<Reloader>,
}

impl Reload {
    /// Handles every SIGHUP of `hup` until `shutdown`.
    pub fn spawn(mut self, mut hup: Signal, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => match got {
                        Some(()) => {}
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                }
                info!(signal = "SIGHUP", "reloading");
                self.hooks.daemon(DaemonHookOp::Reload).await;
                self.reread().await;
            }
        });
    }

    async fn reread(&mut self) {
        let Some(reloader) = self.reloader.clone() else {
            return;
        };
        let loaded = match tokio::task::spawn_blocking(move || reloader()).await {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(error = %e, "SIGHUP: the config reload task failed");
                return;
            }
        };
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                error!(
                    error = %qvirt_common::error_chain(&e),
                    "SIGHUP: the config does not load; the running settings stay"
                );
                return;
            }
        };
        let changed = changed_keys(&self.running, &new);
        let (applied, later): (Vec<&str>, Vec<&str>) = changed
            .iter()
            .map(String::as_str)
            .partition(|k| RELOADED.contains(k));
        self.running.hook_call_timeout_secs = new.hook_call_timeout_secs;
        self.running.hook_stdin_format = new.hook_stdin_format;
        self.running.max_memory_mib = new.max_memory_mib;
        self.running.max_vcpus = new.max_vcpus;
        if let Some(executor) = &self.executor {
            executor.reconfigure(
                Duration::from_secs(new.hook_call_timeout_secs),
                new.hook_stdin_format,
            );
        }
        self.manager.set_host_limits(&self.running);
        info!(applied = %applied.join(", "), "SIGHUP: config read again");
        if !later.is_empty() {
            warn!(
                settings = %later.join(", "),
                "SIGHUP: changed in the config but applied only by a restart; the running values stay"
            );
        }
    }
}

/// The top-level keys whose values differ between `old` and `new`, in
/// the config's order.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_yaml::Value::Mapping(old)), Ok(serde_yaml::Value::Mapping(new))) =
        (serde_yaml::to_value(old), serde_yaml::to_value(new))
    else {
        return Vec::new();
    };
    let gone = old.keys().filter(|k| !new.contains_key(*k));
    new.iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(gone)
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HookStdinFormat;

    #[test]
    fn test_changed_keys_names_each_changed_setting() {
        let old = Config::default();
        assert!(changed_keys(&old, &old.clone()).is_empty());
        let mut new = old.clone();
        new.hook_stdin_format = HookStdinFormat::LibvirtXml;
        new.max_vcpus = Some(3);
        new.qemu_binary = "/opt/qemu".into();
        assert_eq!(
            changed_keys(&old, &new),
            ["qemu_binary", "hook_stdin_format", "max_vcpus"]
        );
    }

    /// Every reloaded key is a config key.
    #[test]
    fn test_reloaded_keys_exist() {
        let Ok(serde_yaml::Value::Mapping(keys)) = serde_yaml::to_value(Config::default()) else {
            panic!("the config is not a mapping");
        };
        for key in RELOADED {
            assert!(keys.contains_key(key), "{key}");
        }
    }
}
