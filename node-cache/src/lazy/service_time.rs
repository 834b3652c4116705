//! How long the page servers take to serve a fault: a histogram per kind of unit, lock-free
//! (one atomic add per bucket hit), so measuring costs the fault path next to nothing.
//!
//! A unit's service time runs from the moment its first fault was read from the VM's
//! userfaultfd until the `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`) that filled the faulting page
//! returned, which is when the kernel woke the waiting vCPU: everything the page server does
//! for that fault, fetching or reading the chunk and checking it included. For a unit being
//! fetched that is its last copy; a cached snapshot's unit fills the faulting page first and
//! the rest of the unit after (`server.rs`). Rendered as the Prometheus
//! histogram `thaw_lazy_fault_service_seconds{kind="data"|"zero"}`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, microseconds: fine where a locally held chunk lands
/// (a few to a few tens of µs), coarse where fetches over the network do.
const BUCKETS_MICROS: [u64; 34] = [
    1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 25, 30, 40, 50, 60, 80, 100, 125, 150, 200, 300, 500, 1_000,
    2_000, 5_000, 10_000, 50_000, 100_000, 1_000_000, 10_000_000, 60_000_000,
];

/// One histogram: a count per bucket (not cumulative; the last counts what exceeds every
/// bound) and the sum.
#[derive(Debug)]
struct Buckets {
    counts: [AtomicU64; BUCKETS_MICROS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Buckets {
    fn default() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0) }
    }
}

impl Buckets {
    fn record(&self, took: Duration) {
        let nanos = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKETS_MICROS.partition_point(|&le| le * 1000 < nanos);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, kind: &str) {
        let mut cumulative = 0;
        for (i, le) in BUCKETS_MICROS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ =
                writeln!(out, "{name}_bucket{{kind=\"{kind}\",le=\"{}\"}} {cumulative}", *le as f64 / 1e6);
        }
        cumulative += self.counts[BUCKETS_MICROS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{kind=\"{kind}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{kind=\"{kind}\"}} {cumulative}");
    }
}

/// Service times of data units (filled with bytes) and zero units (zero-filled).
#[derive(Debug, Default)]
pub(crate) struct ServiceTimes {
    data: Buckets,
    zero: Buckets,
}

impl ServiceTimes {
    pub(crate) fn record(&self, took: Duration, zero: bool) {
        if zero { &self.zero } else { &self.data }.record(took);
    }

    /// The histogram in the Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        let name = "thaw_lazy_fault_service_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from reading a unit's first fault until the unit was filled, by kind of unit.\n\
             # TYPE {name} histogram"
        );
        self.data.render(out, name, "data");
        self.zero.render(out, name, "zero");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_land_in_their_buckets_cumulatively() {
        let t = ServiceTimes::default();
        t.record(Duration::from_nanos(4_500), false); // le 5 µs
        t.record(Duration::from_micros(5), false); // le 5 µs (bounds are inclusive)
        t.record(Duration::from_micros(90), false); // le 100 µs
        t.record(Duration::from_secs(100), false); // past every bound
        t.record(Duration::from_micros(3), true);
        let mut out = String::new();
        t.render(&mut out);
        let line = |needle: &str| out.lines().find(|l| l.starts_with(needle)).unwrap().to_owned();
        assert!(line("thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"0.000004\"}").ends_with(" 0"));
        assert!(line("thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"0.000005\"}").ends_with(" 2"));
        assert!(line("thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"0.0001\"}").ends_with(" 3"));
        assert!(line("thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"60\"}").ends_with(" 3"));
        assert!(line("thaw_lazy_fault_service_seconds_bucket{kind=\"data\",le=\"+Inf\"}").ends_with(" 4"));
        assert!(line("thaw_lazy_fault_service_seconds_count{kind=\"zero\"}").ends_with(" 1"));
    }
}
