//! Per-principal limits: concurrent streams (and, within them,
//! monitor-event subscriptions, the denial of service libvirt guards
//! against), calls per second (keyed GCRA from `governor`), and request
//! size (enforced where the request is read, in [`crate::proxy`]).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Limits;

/// A limit a call ran into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many streams open for the principal.
    #[error(
        "principal {principal:?} has {limit} streams open, the most limits.max_streams_per_principal allows"
    )]
    Streams {
        /// Who.
        principal: String,
        /// The limit.
        limit: u32,
    },
    /// Too many monitor-event subscriptions for the principal.
    #[error(
        "principal {principal:?} has {limit} monitor-event subscriptions open, the most limits.max_monitor_subscriptions_per_principal allows"
    )]
    MonitorSubscriptions {
        /// Who.
        principal: String,
        /// The limit.
        limit: u32,
    },
    /// Calls too fast.
    #[error(
        "principal {principal:?} is calling faster than limits.calls_per_second ({limit} per second)"
    )]
    Rate {
        /// Who.
        principal: String,
        /// The limit.
        limit: u32,
    },
    /// The request message is too big.
    #[error("the request is larger than limits.max_request_bytes ({limit} bytes)")]
    RequestSize {
        /// The limit.
        limit: u32,
    },
}

impl LimitError {
    /// The config key of the limit.
    pub fn key(&self) -> &'static str {
        match self {
            LimitError::Streams { .. } => "limits.max_streams_per_principal",
            LimitError::MonitorSubscriptions { .. } => {
                "limits.max_monitor_subscriptions_per_principal"
            }
            LimitError::Rate { .. } => "limits.calls_per_second",
            LimitError::RequestSize { .. } => "limits.max_request_bytes",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    streams: u32,
    monitor: u32,
}

type Counts = Arc<Mutex<HashMap<Arc<str>, Held>>>;

/// The per-principal counters.
pub struct Limiter {
    limits: Limits,
    counts: Counts,
    rate: DefaultKeyedRateLimiter<Arc<str>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A stream's place in its principal's counts, given back on drop.
#[derive(Debug)]
pub struct StreamPermit {
    counts: Counts,
    principal: Arc<str>,
    monitor: bool,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.principal) {
            held.streams = held.streams.saturating_sub(1);
            if self.monitor {
                held.monitor = held.monitor.saturating_sub(1);
            }
            if held.streams == 0 && held.monitor == 0 {
                counts.remove(&self.principal);
            }
        }
    }
}

impl Limiter {
    /// Counters enforcing `limits` (checked: every value at least 1).
    pub fn new(limits: Limits) -> Self {
        let per_second = NonZeroU32::new(limits.calls_per_second).unwrap_or(NonZeroU32::MIN);
        Limiter {
            rate: RateLimiter::keyed(Quota::per_second(per_second)),
            counts: Arc::default(),
            limits,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts one call of `principal` against its rate.
    pub fn check_rate(&self, principal: &Arc<str>) -> Result<(), LimitError> {
        self.rate
            .check_key(principal)
            .map_err(|_| LimitError::Rate {
                principal: principal.to_string(),
                limit: self.limits.calls_per_second,
            })
    }

    /// Forgets rate state of principals idle long enough to be full again.
    pub fn forget_idle(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }

    /// A place for one more stream of `principal` (`monitor`: a
    /// monitor-event subscription).
    pub fn open_stream(
        &self,
        principal: &Arc<str>,
        monitor: bool,
    ) -> Result<StreamPermit, LimitError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.entry(Arc::clone(principal)).or_default();
        if held.streams >= self.limits.max_streams_per_principal {
            return Err(LimitError::Streams {
                principal: principal.to_string(),
                limit: self.limits.max_streams_per_principal,
            });
        }
        if monitor && held.monitor >= self.limits.max_monitor_subscriptions_per_principal {
            return Err(LimitError::MonitorSubscriptions {
                principal: principal.to_string(),
                limit: self.limits.max_monitor_subscriptions_per_principal,
            });
        }
        held.streams += 1;
        if monitor {
            held.monitor += 1;
        }
        Ok(StreamPermit {
            counts: Arc::clone(&self.counts),
            principal: Arc::clone(principal),
            monitor,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(Limits {
            max_streams_per_principal: 3,
            max_monitor_subscriptions_per_principal: 2,
            calls_per_second: 5,
            max_request_bytes: 100,
        })
    }

    #[test]
    fn test_streams_are_capped_per_principal_and_given_back_on_drop() {
        let l = limiter();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let m1 = l.open_stream(&alice, true).unwrap();
        let _m2 = l.open_stream(&alice, true).unwrap();
        let err = l.open_stream(&alice, true).unwrap_err();
        assert_eq!(err.key(), "limits.max_monitor_subscriptions_per_principal");
        let _s3 = l.open_stream(&alice, false).unwrap();
        let err = l.open_stream(&alice, false).unwrap_err();
        assert_eq!(err.key(), "limits.max_streams_per_principal");
        let _b = l.open_stream(&bob, true).unwrap();
        drop(m1);
        let _m3 = l.open_stream(&alice, true).unwrap();
    }

    #[test]
    fn test_rate_is_per_principal() {
        let l = limiter();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let passed = (0..20).filter(|_| l.check_rate(&alice).is_ok()).count();
        assert!((5..20).contains(&passed), "{passed}");
        assert!(l.check_rate(&bob).is_ok());
    }
}
