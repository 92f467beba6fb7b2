//! The hub's settings, caps and refusals: what a [`super::Hub`] is built
//! with ([`HubConfig`], [`Caps`]), what a subscriber asks for
//! ([`SubscribeOptions`]), and why a subscription is refused
//! ([`SubscribeError`]).

use std::fmt;

/// How many events the replay ring holds by default.
pub const DEFAULT_RING_CAPACITY: usize = 4096;
/// How many events a subscriber's queue holds by default before it overflows.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// The largest per-subscriber queue a config may ask for.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// Default cap on concurrent subscriptions of one kind, bus-wide. With the
/// bus's default bound per subscription (~841 KiB,
/// `Config::subscription_bound`) the two kinds' 512 subscriptions and the
/// ring make at most ~436 MiB.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 256;
/// Default cap on concurrent subscriptions of one kind per principal.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL: usize = 32;
/// How many matching events a replaying subscriber takes from the ring per
/// lock.
pub const REPLAY_BATCH: usize = 64;
/// And at most this many bytes of them (by the hub's size function), or
/// one event if it alone is bigger: a replaying subscriber that stalls keeps
/// its batch alive after the ring has let it go.
pub const REPLAY_BATCH_BYTES: usize = 64 * 1024;
/// How many ring entries a replaying subscriber tests per lock at most.
pub(crate) const REPLAY_SCAN_LIMIT: usize = 1024;

/// Caps on concurrent subscriptions of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// At most this many in all.
    pub total: usize,
    /// At most this many per principal (exact duplicates count too).
    pub per_principal: usize,
    /// This many of `total` are kept for principals the gateway vouches for
    /// ([`SubscribeOptions::vouched`]): callers it does not vouch for hold
    /// at most `total - reserved` together, so they cannot take every slot.
    pub reserved: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            total: DEFAULT_MAX_SUBSCRIPTIONS,
            per_principal: DEFAULT_MAX_SUBSCRIPTIONS_PER_PRINCIPAL,
            reserved: 0,
        }
    }
}

/// Hub settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The replay ring keeps at most this many of the latest events (0: no
    /// replay).
    pub ring_capacity: usize,
    /// If set, the ring also keeps at most this many bytes of events, as
    /// measured by the size function given to [`Hub::with_size_fn`].
    pub ring_max_bytes: Option<usize>,
    /// Each subscriber's queue holds at most this many events.
    pub queue_capacity: usize,
    /// If set, each subscriber's queue also holds at most this many bytes
    /// of events, by the size function given to [`Hub::with_size_fn`];
    /// an empty queue takes one event of any size, so a queue holds at
    /// most the larger of this and one event.
    pub queue_max_bytes: Option<usize>,
    /// Caps on monitor-event subscriptions.
    pub monitor_caps: Caps,
    /// Caps on domain (lifecycle) event subscriptions.
    pub domain_caps: Caps,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            ring_capacity: DEFAULT_RING_CAPACITY,
            ring_max_bytes: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            queue_max_bytes: None,
            monitor_caps: Caps::default(),
            domain_caps: Caps::default(),
        }
    }
}

/// A [`HubConfig`] the hub cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubConfigError {
    /// `queue_capacity` is 0 or above [`MAX_QUEUE_CAPACITY`].
    #[error("queue_capacity {value} is out of range 1..={max}")]
    QueueCapacity {
        /// The refused value.
        value: usize,
        /// [`MAX_QUEUE_CAPACITY`].
        max: usize,
    },
}

impl HubConfig {
    /// Checks the values the hub cannot work with.
    pub fn validate(&self) -> Result<(), HubConfigError> {
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(HubConfigError::QueueCapacity {
                value: self.queue_capacity,
                max: MAX_QUEUE_CAPACITY,
            });
        }
        Ok(())
    }

    pub(super) fn caps(&self, kind: SubscriberKind) -> Caps {
        match kind {
            SubscriberKind::Monitor => self.monitor_caps,
            SubscriberKind::Domain => self.domain_caps,
        }
    }
}

/// What a subscription is for; each kind has its own [`Caps`] and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SubscriberKind {
    /// Raw QMP monitor events (`SubscribeMonitorEvents`).
    #[default]
    Monitor,
    /// Typed lifecycle events (`SubscribeDomainEvents`).
    Domain,
}

impl SubscriberKind {
    /// A short label, for messages and metrics (`monitor`, `domain`).
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberKind::Monitor => "monitor",
            SubscriberKind::Domain => "domain",
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            SubscriberKind::Monitor => 0,
            SubscriberKind::Domain => 1,
        }
    }
}

impl fmt::Display for SubscriberKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens when a subscriber's queue is full as an event arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OverflowPolicy {
    /// Drop the event; the subscriber receives [`SubscriptionItem::Lost`]
    /// with the number of events dropped in a row before its next event.
    #[default]
    MarkLost,
    /// Cut the subscriber off: it receives what its queue holds, then
    /// [`RecvError::CutOff`].
    CutOff,
}

/// What a subscriber asks for, besides its predicate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Who subscribes (the gateway's principal, or the peer); the key of the
    /// per-principal cap.
    pub principal: String,
    /// The gateway vouches for `principal`: it may take the slots
    /// [`Caps::reserved`] keeps.
    pub vouched: bool,
    /// Which caps and counters the subscription counts against.
    pub kind: SubscriberKind,
    /// Replay the events after this sequence number that the ring still
    /// holds; `None`: live events only.
    pub since: Option<u64>,
    /// What to do when the subscriber's queue overflows.
    pub policy: OverflowPolicy,
    /// The predicate can only accept events whose key (by the hub's key
    /// function, [`Hub::with_size_and_key_fn`]) is exactly this: the hub then offers
    /// the subscriber only those events, without testing it on the others.
    /// The predicate still decides among them. Ignored by a hub without a
    /// key function.
    pub key: Option<Box<str>>,
    /// With `key`: the key alone decides which live events the subscriber
    /// gets (the predicate accepts every event with that key), so the hub
    /// does not ask the predicate when it publishes. The replay, which
    /// looks at every event in the ring, still uses it.
    pub key_decides: bool,
}

/// Why [`Hub::subscribe`] refused (the service answers `RESOURCE_EXHAUSTED`
/// for the caps, `UNAVAILABLE` once closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The principal already holds as many subscriptions of this kind as the
    /// per-principal cap allows.
    #[error(
        "too many {kind}-event subscriptions for principal {principal:?}: per-principal cap of {limit} reached"
    )]
    PrincipalCap {
        /// The kind of subscription refused.
        kind: SubscriberKind,
        /// The principal at its cap.
        principal: String,
        /// The cap.
        limit: usize,
    },
    /// The bus holds as many subscriptions of this kind as the total cap
    /// allows.
    #[error("too many {kind}-event subscriptions on the bus: total cap of {limit} reached")]
    TotalCap {
        /// The kind of subscription refused.
        kind: SubscriberKind,
        /// The cap.
        limit: usize,
    },
    /// The bus holds as many subscriptions of this kind as direct callers
    /// (not vouched for by the gateway) may take: the rest of the total cap
    /// is kept for the gateway's principals.
    #[error(
        "too many {kind}-event subscriptions on the bus: {limit} reached, the rest of the total cap kept for callers through the gateway"
    )]
    DirectCap {
        /// The kind of subscription refused.
        kind: SubscriberKind,
        /// The total cap less the reserved slots.
        limit: usize,
    },
    /// The hub was closed ([`Hub::close`]).
    #[error("event bus is shutting down")]
    Closed,
}
