//! Prometheus metrics of the node cache, rendered in the text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use thaw_schema::cache_api::BytesBySource;

/// Upper bounds (seconds) of the ensure latency histogram's buckets.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters and gauges.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    bytes_local: AtomicU64,
    bytes_peers: AtomicU64,
    bytes_registry: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    used: AtomicU64,
    capacity: AtomicU64,
    snapshots: AtomicU64,
    leases: AtomicU64,
    latency: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub(crate) fn record_ensure(&self, hit: bool, seconds: f64, bytes: &BytesBySource) {
        if hit { &self.hits } else { &self.misses }.fetch_add(1, Ordering::Relaxed);
        self.bytes_local.fetch_add(bytes.local, Ordering::Relaxed);
        self.bytes_peers.fetch_add(bytes.peers, Ordering::Relaxed);
        self.bytes_registry.fetch_add(bytes.registry, Ordering::Relaxed);
        self.observe(seconds);
    }

    pub(crate) fn record_ensure_error(&self, seconds: f64) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.observe(seconds);
    }

    fn observe(&self, seconds: f64) {
        let mut h = self.latency.lock().expect("histogram lock");
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    pub(crate) fn set_gauges(&self, used: u64, capacity: u64, snapshots: u64, leases: u64) {
        self.used.store(used, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
        self.snapshots.store(snapshots, Ordering::Relaxed);
        self.leases.store(leases, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        family(
            "thaw_cache_ensure_total",
            "counter",
            "ensure calls by result",
            &[
                ("{result=\"hit\"}", get(&self.hits)),
                ("{result=\"miss\"}", get(&self.misses)),
                ("{result=\"error\"}", get(&self.errors)),
            ],
        );
        family(
            "thaw_cache_bytes_total",
            "counter",
            "snapshot bytes materialized, by source (zero chunks count nowhere)",
            &[
                ("{source=\"local\"}", get(&self.bytes_local)),
                ("{source=\"peers\"}", get(&self.bytes_peers)),
                ("{source=\"registry\"}", get(&self.bytes_registry)),
            ],
        );
        family(
            "thaw_cache_evictions_total",
            "counter",
            "snapshots evicted to make room",
            &[("", get(&self.evictions))],
        );
        family(
            "thaw_cache_corrupt_total",
            "counter",
            "cached snapshots found damaged and dropped",
            &[("", get(&self.corrupt))],
        );
        family("thaw_cache_used_bytes", "gauge", "allocated bytes in use", &[("", get(&self.used))]);
        family(
            "thaw_cache_capacity_bytes",
            "gauge",
            "capacity in allocated bytes",
            &[("", get(&self.capacity))],
        );
        family("thaw_cache_snapshots", "gauge", "cached snapshots", &[("", get(&self.snapshots))]);
        family("thaw_cache_leases", "gauge", "leases held", &[("", get(&self.leases))]);
        let h = self.latency.lock().expect("histogram lock");
        let _ = writeln!(
            out,
            "# HELP thaw_cache_ensure_seconds ensure latency\n# TYPE thaw_cache_ensure_seconds histogram"
        );
        for (le, n) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "thaw_cache_ensure_seconds_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "thaw_cache_ensure_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "thaw_cache_ensure_seconds_sum {}", h.sum);
        let _ = writeln!(out, "thaw_cache_ensure_seconds_count {}", h.count);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record_ensure(true, 0.0007, &BytesBySource::default());
        m.record_ensure(false, 0.3, &BytesBySource { local: 5, peers: 0, registry: 7 });
        let text = m.render();
        assert!(text.contains("thaw_cache_ensure_seconds_bucket{le=\"0.0005\"} 0\n"), "{text}");
        assert!(text.contains("thaw_cache_ensure_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("thaw_cache_ensure_seconds_bucket{le=\"0.5\"} 2\n"), "{text}");
        assert!(text.contains("thaw_cache_ensure_seconds_count 2\n"), "{text}");
        assert!(text.contains("thaw_cache_bytes_total{source=\"registry\"} 7\n"), "{text}");
        assert!(text.contains("thaw_cache_ensure_total{result=\"miss\"} 1\n"), "{text}");
    }
}
