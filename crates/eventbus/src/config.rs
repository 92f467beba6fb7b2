//! The `qvirt-eventbus` config file (YAML; every field optional).

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

use crate::hub::{self, Caps, HubConfig, MAX_QUEUE_CAPACITY, OverflowPolicy};

/// The port `qvirt-eventbus` listens on by default, on loopback.
pub const DEFAULT_PORT: u16 = 50053;

/// What happens to a subscriber whose queue overflows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Drop events for it and tell it how many (an EventsLost message).
    #[default]
    MarkLost,
    /// End its stream with RESOURCE_EXHAUSTED.
    CutOff,
}

/// `qvirt-eventbus` settings. Unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC: `IP:PORT` or `unix:PATH`.
    pub listen: ListenAddr,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// How many of the latest events the replay ring keeps (0: no replay).
    pub ring_capacity: usize,
    /// Upper bound on the bytes of events the ring keeps.
    pub ring_max_bytes: usize,
    /// Events queued per subscriber before it counts as slow.
    pub queue_capacity: usize,
    /// `mark-lost` or `cut-off`: what happens to a slow subscriber.
    pub slow_consumer: SlowConsumer,
    /// Concurrent monitor-event subscriptions, in all.
    pub max_monitor_subscriptions: usize,
    /// Concurrent monitor-event subscriptions per principal (exact
    /// duplicates count).
    pub max_monitor_subscriptions_per_principal: usize,
    /// Concurrent domain-event subscriptions, in all.
    pub max_domain_subscriptions: usize,
    /// Concurrent domain-event subscriptions per principal.
    pub max_domain_subscriptions_per_principal: usize,
    /// Where to serve Prometheus metrics over HTTP (`IP:PORT`, path
    /// `/metrics`). Absent: no metrics endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Secret shared with the gateway: a caller whose `x-qvirt-gateway-token`
    /// metadata equals it is the gateway, and its `x-qvirt-principal` is the
    /// principal counted by the per-principal caps. Absent (the default):
    /// `x-qvirt-principal` is ignored and every caller counts as its peer
    /// address.
    pub gateway_token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            ring_capacity: hub::DEFAULT_RING_CAPACITY,
            ring_max_bytes: 16 << 20,
            queue_capacity: hub::DEFAULT_QUEUE_CAPACITY,
            slow_consumer: SlowConsumer::default(),
            max_monitor_subscriptions: 1024,
            max_monitor_subscriptions_per_principal: 64,
            max_domain_subscriptions: hub::DEFAULT_MAX_SUBSCRIPTIONS,
            max_domain_subscriptions_per_principal: hub::DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
            metrics_listen: None,
            gateway_token: None,
        }
    }
}

impl Config {
    /// The hub settings this config asks for.
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            ring_capacity: self.ring_capacity,
            ring_max_bytes: Some(self.ring_max_bytes),
            queue_capacity: self.queue_capacity,
            monitor_caps: Caps {
                total: self.max_monitor_subscriptions,
                per_principal: self.max_monitor_subscriptions_per_principal,
            },
            domain_caps: Caps {
                total: self.max_domain_subscriptions,
                per_principal: self.max_domain_subscriptions_per_principal,
            },
        }
    }

    /// The overflow policy for subscribers.
    pub fn policy(&self) -> OverflowPolicy {
        match self.slow_consumer {
            SlowConsumer::MarkLost => OverflowPolicy::MarkLost,
            SlowConsumer::CutOff => OverflowPolicy::CutOff,
        }
    }
}

qvirt_common::impl_service_config!(Config, |c: &Config| {
    if c.queue_capacity == 0 || c.queue_capacity > MAX_QUEUE_CAPACITY {
        return Err(ConfigError::Invalid {
            field: "queue_capacity",
            value: c.queue_capacity.to_string(),
            reason: format!("must be between 1 and {MAX_QUEUE_CAPACITY}"),
        });
    }
    Ok(())
});
