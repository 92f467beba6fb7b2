//! The `qvirt-eventbus` config file (YAML; every field optional).

use std::path::PathBuf;

use qvirt_common::config::{ConfigError, ListenAddr, LogFormat};
use serde::{Deserialize, Serialize};

use crate::hub::{self, Caps, HubConfig, MAX_QUEUE_CAPACITY, OverflowPolicy, REPLAY_BATCH_BYTES};
use crate::inflight::SEND_BUFFER;
use crate::ingest::{DEFAULT_MAX_EVENT_BYTES, MAX_EVENT_BYTES_RANGE};
use crate::service::{BusEvent, WIRE_OVERHEAD};

/// The default `queue_max_bytes`: 256 events of a typical QMP event's
/// weight (~700 bytes with its wire form) fit well within it, so with
/// such events `queue_capacity` binds first.
pub const DEFAULT_QUEUE_MAX_BYTES: usize = 256 * 1024;

/// The values `queue_max_bytes` may take.
pub const QUEUE_MAX_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=1 << 30;

/// The bus's HTTP/2 connection receive window: what a client may have sent
/// that the bus has not read yet, on one connection (a Publish stream).
pub const CONNECTION_WINDOW_BYTES: u32 = 1 << 20;

/// The bus's HTTP/2 stream receive window (as hyper's default).
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;

/// What one connection may make the bus hold besides its subscriptions:
/// what the client sent and the bus has not read yet, up to
/// [`CONNECTION_WINDOW_BYTES`], and the connection's own buffers (h2's
/// read and write buffers, HPACK tables, the coalescing writer's at most
/// 8 KiB).
pub const CONNECTION_BYTES: usize = CONNECTION_WINDOW_BYTES as usize + 64 * 1024;

/// What one subscription costs besides the events and bytes it buffers:
/// its hub entry and filter (at most ~1.5 KiB), its HTTP/2 stream and
/// hyper task (10,000 idle subscriptions measured ~3.4 KiB each).
pub const SUBSCRIPTION_FIXED_BYTES: usize = 8 * 1024;

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
    /// Close a new connection that has not sent the HTTP/2 preface within
    /// this many milliseconds (100 to 600000).
    pub preface_timeout_ms: u64,
    /// How many of the latest events the replay ring keeps (0: no replay).
    pub ring_capacity: usize,
    /// Upper bound on the bytes of events the ring keeps.
    pub ring_max_bytes: usize,
    /// Events queued per subscriber before it counts as slow.
    pub queue_capacity: usize,
    /// And bytes of events queued per subscriber (each event weighed as
    /// [`BusEvent::weight`]: its strings twice, once as sent, plus ~500
    /// bytes); an empty queue takes one event of any size.
    pub queue_max_bytes: usize,
    /// The largest event Publish accepts, in encoded bytes; a bigger one
    /// ends the Publish call with INVALID_ARGUMENT.
    pub max_event_bytes: usize,
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
    /// A file holding the internal plane's shared secret (at least 32
    /// bytes, not readable by every user). The bus serves `EventBus` and
    /// `EventIngest` only to callers that present it in
    /// `x-qvirt-internal-token` (the gateway, the supervisor) or to
    /// `internal_uids` peers on a unix socket; such a caller names the
    /// principal counted by the per-principal caps in `x-qvirt-principal`.
    /// Absent (the default): every TCP caller is refused. When set, half
    /// of each total subscription cap is kept for the principals an
    /// internal caller (the gateway) names; subscriptions naming none take
    /// only the other half.
    pub internal_token_file: Option<PathBuf>,
    /// Unix-socket peers (by uid) accepted as internal callers without the
    /// token, besides uid 0 and the bus's own uid.
    pub internal_uids: Vec<u32>,
    /// Runtime threads. 0 (the default): one worker per core. 1: the whole
    /// bus on one thread: less CPU per delivery (no cross-core traffic;
    /// the bench measured ~15% less when saturated), but a worse tail
    /// latency when busy, since one thread cannot spread a burst's
    /// deliveries over the cores. N: N workers.
    pub worker_threads: usize,
    /// A host in a fleet: forward every stored event to the fleet's NATS
    /// JetStream stream (docs/FLEET.md). Absent (the default): no NATS.
    pub nats: Option<crate::nats::NatsConfig>,
    /// A gateway's bus in a fleet: serve subscriptions from the fleet's
    /// stream (every host's events) instead of this bus's own hub; its
    /// EventIngest then refuses publishers. Not with `nats`.
    pub fleet: Option<crate::nats::FleetConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::loopback(DEFAULT_PORT),
            log_format: LogFormat::default(),
            preface_timeout_ms: qvirt_common::serve::DEFAULT_PREFACE_TIMEOUT_MS,
            ring_capacity: hub::DEFAULT_RING_CAPACITY,
            ring_max_bytes: 16 << 20,
            queue_capacity: hub::DEFAULT_QUEUE_CAPACITY,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            slow_consumer: SlowConsumer::default(),
            max_monitor_subscriptions: hub::DEFAULT_MAX_SUBSCRIPTIONS,
            max_monitor_subscriptions_per_principal: hub::DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
            max_domain_subscriptions: hub::DEFAULT_MAX_SUBSCRIPTIONS,
            max_domain_subscriptions_per_principal: hub::DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
            metrics_listen: None,
            internal_token_file: None,
            internal_uids: Vec::new(),
            worker_threads: 0,
            nats: None,
            fleet: None,
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
            queue_max_bytes: Some(self.queue_max_bytes),
            monitor_caps: Caps {
                total: self.max_monitor_subscriptions,
                per_principal: self.max_monitor_subscriptions_per_principal,
                reserved: self.reserved(self.max_monitor_subscriptions),
            },
            domain_caps: Caps {
                total: self.max_domain_subscriptions,
                per_principal: self.max_domain_subscriptions_per_principal,
                reserved: self.reserved(self.max_domain_subscriptions),
            },
        }
    }

    /// The most one subscription can make the bus hold, in bytes, whatever
    /// its client does (docs/OPERATIONS.md, event bus, gives the
    /// formula): its queue, a replay batch, one event held behind a loss
    /// marker, what hyper and h2 hold of its stream (twice: the encoder's
    /// buffer grows by doubling, and a chunk keeps its whole allocation),
    /// and its fixed cost.
    pub fn subscription_bound(&self) -> usize {
        let event = BusEvent::max_weight(self.max_event_bytes);
        // A chunk of the response: what tonic encodes before it yields,
        // plus the message that crossed the threshold (with gRPC's 5-byte
        // frame header).
        let chunk = qvirt_proto::codec::YIELD_THRESHOLD + self.max_event_bytes + WIRE_OVERHEAD + 5;
        self.queue_max_bytes.max(event)
            + REPLAY_BATCH_BYTES.max(event)
            + event
            + 2 * (SEND_BUFFER + chunk)
            + SUBSCRIPTION_FIXED_BYTES
    }

    /// The most the bus can hold for its subscriptions and its ring, in
    /// bytes: every subscription the total caps allow at
    /// [`Config::subscription_bound`], plus the ring. Per connection come
    /// its HTTP/2 and socket buffers (see docs/OPERATIONS.md).
    pub fn memory_bound(&self) -> usize {
        let subscriptions = self.max_monitor_subscriptions + self.max_domain_subscriptions;
        let ring = self.ring_max_bytes.min(
            self.ring_capacity
                .saturating_mul(BusEvent::max_weight(self.max_event_bytes)),
        );
        subscriptions
            .saturating_mul(self.subscription_bound())
            .saturating_add(ring)
    }

    /// The slots of a total cap kept for the principals internal callers
    /// (the gateway) vouch for: half of it when an `internal_token_file` is
    /// set (callers nobody vouches for may take only the other half), none
    /// otherwise.
    fn reserved(&self, total: usize) -> usize {
        if self.internal_token_file.is_some() {
            total / 2
        } else {
            0
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

/// The largest `worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(ConfigError::Invalid {
                field: "queue_capacity",
                value: self.queue_capacity.to_string(),
                reason: format!("must be between 1 and {MAX_QUEUE_CAPACITY}"),
            });
        }
        if !QUEUE_MAX_BYTES_RANGE.contains(&self.queue_max_bytes) {
            return Err(ConfigError::Invalid {
                field: "queue_max_bytes",
                value: self.queue_max_bytes.to_string(),
                reason: format!(
                    "must be between {} and {}",
                    QUEUE_MAX_BYTES_RANGE.start(),
                    QUEUE_MAX_BYTES_RANGE.end()
                ),
            });
        }
        if !MAX_EVENT_BYTES_RANGE.contains(&self.max_event_bytes) {
            return Err(ConfigError::Invalid {
                field: "max_event_bytes",
                value: self.max_event_bytes.to_string(),
                reason: format!(
                    "must be between {} and {}",
                    MAX_EVENT_BYTES_RANGE.start(),
                    MAX_EVENT_BYTES_RANGE.end()
                ),
            });
        }
        qvirt_common::internal_auth::InternalToken::load_optional(
            self.internal_token_file.as_ref(),
        )?;
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::Invalid {
                field: "worker_threads",
                value: self.worker_threads.to_string(),
                reason: format!("must be at most {MAX_WORKER_THREADS}"),
            });
        }
        if let Some(nats) = &self.nats {
            nats.check()?;
        }
        if let Some(fleet) = &self.fleet {
            if self.nats.is_some() {
                return Err(ConfigError::Invalid {
                    field: "fleet",
                    value: "set".into(),
                    reason:
                        "a bus either forwards to the fleet (nats) or serves it (fleet), not both"
                            .into(),
                });
            }
            fleet.check()?;
        }
        Ok(())
    }
}

qvirt_common::impl_service_config!(Config, Config::check, workers = worker_threads);

#[cfg(test)]
mod tests {
    use qvirt_common::cli::ServiceConfig;

    use super::*;

    #[test]
    fn test_max_event_bytes_default_and_range() {
        assert_eq!(Config::default().max_event_bytes, 64 * 1024);
        for ok in [1024, 64 * 1024, 1 << 20] {
            let c = Config {
                max_event_bytes: ok,
                ..Config::default()
            };
            assert!(c.validate().is_ok(), "{ok}");
        }
        for bad in [0, 1023, (1 << 20) + 1] {
            let c = Config {
                max_event_bytes: bad,
                ..Config::default()
            };
            assert!(
                matches!(
                    c.validate(),
                    Err(ConfigError::Invalid {
                        field: "max_event_bytes",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_worker_threads_default_and_bound() {
        let c = Config::default();
        assert_eq!(c.worker_threads(), 0);
        assert!(c.validate().is_ok());
        let c = Config {
            worker_threads: MAX_WORKER_THREADS + 1,
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                field: "worker_threads",
                ..
            })
        ));
    }

    #[test]
    fn test_default_memory_bound_is_well_under_a_gib() {
        let c = Config::default();
        // 512 subscriptions of ~841 KiB each and the 16 MiB ring.
        assert_eq!(
            c.max_monitor_subscriptions + c.max_domain_subscriptions,
            512
        );
        let bound = c.memory_bound();
        assert!(bound < 448 << 20, "{bound}");
        assert_eq!(bound, 512 * c.subscription_bound() + c.ring_max_bytes);
        // The byte bound, not the event count, is what scales it.
        let bigger = Config {
            queue_max_bytes: 2 * c.queue_max_bytes,
            ..c.clone()
        };
        assert_eq!(
            bigger.subscription_bound() - c.subscription_bound(),
            c.queue_max_bytes
        );
    }

    #[test]
    fn test_queue_max_bytes_range() {
        for (value, ok) in [
            (1023, false),
            (1024, true),
            (1 << 30, true),
            ((1 << 30) + 1, false),
        ] {
            let c = Config {
                queue_max_bytes: value,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{value}");
        }
    }

    fn parsed(yaml: &str) -> Result<Config, ConfigError> {
        let c: Config = qvirt_common::config::parse(std::path::Path::new("bus.yaml"), yaml)?;
        c.validate().map(|()| c)
    }

    fn field_of(r: Result<Config, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { field, .. }) => field.to_owned(),
            Err(other) => format!("other: {other}"),
            Ok(_) => "ok".to_owned(),
        }
    }

    #[test]
    fn test_nats_and_fleet_sections() {
        let c = parsed("nats:\n  outbox_dir: /tmp/o\n  host: h1\n  replicas: 3\n").unwrap();
        let nats = c.nats.unwrap();
        assert_eq!((nats.replicas, nats.stream.as_str()), (3, "QVIRT_EVENTS"));
        assert_eq!(nats.urls, ["nats://127.0.0.1:4222"]);
        assert_eq!(nats.host_id(), "h1");
        let c = parsed("fleet: {}\n").unwrap();
        assert_eq!(c.fleet.unwrap().broker().stream, "QVIRT_EVENTS");
        for (yaml, field) in [
            ("nats: {}\n", "nats.outbox_dir"),
            ("nats: {outbox_dir: /o, replicas: 0}\n", "nats.replicas"),
            ("nats: {outbox_dir: /o, replicas: 6}\n", "nats.replicas"),
            ("nats: {outbox_dir: /o, urls: []}\n", "nats.urls"),
            ("nats: {outbox_dir: /o, urls: ['http://[x']}\n", "nats.urls"),
            ("nats: {outbox_dir: /o, stream: 'a.b'}\n", "nats.stream"),
            (
                "nats: {outbox_dir: /o, outbox_max_bytes: 1000}\n",
                "nats.outbox_max_bytes",
            ),
            ("nats: {outbox_dir: /o, host: \"a\\nb\"}\n", "nats.host"),
            ("fleet: {stream: 'x y'}\n", "fleet.stream"),
            ("nats: {outbox_dir: /o}\nfleet: {}\n", "fleet"),
            (
                "nats: {outbox_dir: /o, token_file: /nonexistent/t}\n",
                "nats.token_file",
            ),
            ("fleet: {token_file: /nonexistent/t}\n", "fleet.token_file"),
            ("fleet: {ca_file: /nonexistent/c}\n", "fleet.ca_file"),
            (
                "nats: {outbox_dir: /o, ca_file: /nonexistent/c}\n",
                "nats.ca_file",
            ),
        ] {
            assert_eq!(field_of(parsed(yaml)), field, "{yaml}");
        }
        // Unknown keys inside the sections are refused too.
        assert!(matches!(
            parsed("nats: {outbox_dir: /o, replica: 3}\n"),
            Err(ConfigError::Parse { .. })
        ));
    }
}
