//! What the benches measure with: percentiles of samples and the CPU time
//! of a process. (Resident memory: [`crate::rss_kib`]; a process stopped
//! by pid even on panic: [`crate::ChildGuard`].)

use std::time::Duration;

/// The `p` quantile (0.0..=1.0) of `sorted`, nearest rank; panics on an
/// empty slice.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}

/// Median and 99th percentile of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// How many samples.
    pub n: usize,
    /// The median.
    pub median: Duration,
    /// The 99th percentile.
    pub p99: Duration,
}

/// The unit a [`Spread`] is printed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Microseconds, one decimal.
    Micros,
    /// Milliseconds, two decimals.
    Millis,
}

impl Spread {
    /// One bench line: `NAME n=N median M UNIT  p99 P UNIT`, the name
    /// padded to `width`.
    pub fn line(&self, name: &str, width: usize, unit: Unit) -> String {
        let (scale, label, decimals) = match unit {
            Unit::Micros => (1e6, "µs", 1),
            Unit::Millis => (1e3, "ms", 2),
        };
        format!(
            "{name:<width$} n={} median {:>8.decimals$} {label}  p99 {:>8.decimals$} {label}",
            self.n,
            self.median.as_secs_f64() * scale,
            self.p99.as_secs_f64() * scale,
        )
    }

    /// Sorts `samples` and takes their median and p99; panics if empty.
    pub fn of(mut samples: Vec<Duration>) -> Spread {
        samples.sort();
        Spread {
            n: samples.len(),
            median: percentile(&samples, 0.5),
            p99: percentile(&samples, 0.99),
        }
    }
}

/// CPU time process `pid` has used so far, all its live threads, user and
/// system, in nanoseconds (`/proc/PID/task/*/schedstat`: nanosecond
/// resolution, where `/proc/PID/stat` counts clock ticks). Threads that
/// already ended are not counted: measure long-lived processes.
pub fn cpu_ns(pid: u32) -> u64 {
    schedstat_sum(pid, 0)
}

/// How many times the threads of process `pid` were put on a CPU so far
/// (the third field of `/proc/PID/task/*/schedstat`): a thread that sleeps
/// and is woken counts one more. Like [`cpu_ns`], for long-lived processes.
pub fn sched_runs(pid: u32) -> u64 {
    schedstat_sum(pid, 2)
}

/// Field `field` of `/proc/PID/task/*/schedstat`, summed over the threads.
fn schedstat_sum(pid: u32, field: usize) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("no /proc/{pid}/task: {e}"));
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(field)?.parse::<u64>().ok())
        .sum()
}

/// The machine's CPU time so far from `/proc/stat`: (stolen by the
/// hypervisor, total), in clock ticks. The share stolen between two readings
/// tells how much a run was disturbed by other guests on the same host.
pub fn steal_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total = fields.iter().take(8).sum();
    (fields.get(7).copied().unwrap_or(0), total)
}

/// The share of CPU time stolen between two [`steal_ticks`] readings, in
/// percent.
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1).max(1);
    after.0.saturating_sub(before.0) as f64 * 100.0 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percentiles_and_spread() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 1.0), 100);
        let s = Spread::of((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(s.n, 100);
        assert_eq!(s.median, Duration::from_micros(51));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(
            s.line("x", 3, Unit::Micros),
            "x   n=100 median     51.0 µs  p99     99.0 µs"
        );
        assert_eq!(
            s.line("x", 1, Unit::Millis),
            "x n=100 median     0.05 ms  p99     0.10 ms"
        );
    }

    #[test]
    fn test_steal_share_is_a_percentage() {
        let before = steal_ticks();
        assert!(before.1 > 0, "no cpu line in /proc/stat");
        std::thread::sleep(Duration::from_millis(20));
        let p = steal_percent(before, steal_ticks());
        assert!((0.0..=100.0).contains(&p), "{p}");
        assert_eq!(steal_percent((5, 100), (10, 200)), 5.0);
    }

    #[test]
    fn test_cpu_time_of_this_process_grows_with_work() {
        let me = std::process::id();
        let before = cpu_ns(me);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_ns(me) > before);
    }
}
