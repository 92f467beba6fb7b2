//! Counting lost events with a rate-limited warning: the running total is
//! logged on the first loss and then at most once per [`WARN_EVERY`]
//! while losses go on, so an outage neither floods the log nor hides how
//! much was lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Least time between two warnings of one counter.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A count of lost events and when it was last logged.
#[derive(Debug)]
pub struct LossCounter {
    total: AtomicU64,
    /// Milliseconds after `epoch` of the last warning, plus one (0: never).
    last_warn: AtomicU64,
    epoch: Instant,
}

impl Default for LossCounter {
    fn default() -> Self {
        LossCounter {
            total: AtomicU64::new(0),
            last_warn: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl LossCounter {
    /// Events lost so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Count `n` more lost events; the running total when a warning is due
    /// (the caller logs it, in its own words).
    pub fn add(&self, n: u64) -> Option<u64> {
        self.add_at(n, Instant::now())
    }

    fn add_at(&self, n: u64, now: Instant) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let total = self.total.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        let stamp = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || stamp.saturating_sub(last) >= every;
        // Only one of racing callers wins the warning.
        (due && self
            .last_warn
            .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then_some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_first_loss_warns_then_at_most_once_per_period_with_the_total() {
        let c = LossCounter::default();
        let t0 = c.epoch;
        assert_eq!(c.add_at(0, t0), None);
        assert_eq!(c.add_at(3, t0), Some(3));
        assert_eq!(c.add_at(1, t0 + Duration::from_secs(1)), None);
        assert_eq!(c.add_at(1, t0 + Duration::from_secs(9)), None);
        assert_eq!(c.add_at(2, t0 + WARN_EVERY), Some(7));
        assert_eq!(c.add_at(1, t0 + WARN_EVERY + Duration::from_secs(1)), None);
        assert_eq!(c.total(), 8);
    }
}
