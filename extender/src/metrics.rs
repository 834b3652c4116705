//! Counters for `GET /metrics` (Prometheus text format).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::scorer::ScorerSizes;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 11] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The verbs measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `/prioritize`.
    Prioritize,
    /// `/filter`.
    Filter,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Self::Prioritize => "prioritize",
            Self::Filter => "filter",
        }
    }
}

/// Why a `/prioritize` answered all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neutral {
    /// The pod names no snapshot.
    NoSnapshot,
    /// The snapshot is still being fetched.
    Pending,
    /// Its lookup failed.
    Failed,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The extender's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    prioritize: Histogram,
    filter: Histogram,
    neutral: [AtomicU64; 3],
    lookup_failures: AtomicU64,
    directory_ok: AtomicU64,
    directory_err: AtomicU64,
    directory_at: Mutex<Option<Instant>>,
}

impl Metrics {
    /// Records one request.
    pub fn observe(&self, verb: Verb, took: Duration) {
        match verb {
            Verb::Prioritize => self.prioritize.observe(took),
            Verb::Filter => self.filter.observe(took),
        }
    }

    /// Records a neutral answer.
    pub fn count_neutral(&self, why: Neutral) {
        self.neutral[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed snapshot lookup.
    pub fn count_lookup_failure(&self) {
        self.lookup_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a node directory read.
    pub fn directory_read(&self, ok: bool) {
        if ok {
            self.directory_ok.fetch_add(1, Ordering::Relaxed);
            *self.directory_at.lock().expect("metrics lock") = Some(Instant::now());
        } else {
            self.directory_err.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Seconds since the last good directory read.
    pub fn holdings_age(&self) -> Option<Duration> {
        self.directory_at.lock().expect("metrics lock").map(|t| t.elapsed())
    }

    /// The Prometheus text.
    pub fn render(&self, sizes: ScorerSizes) -> String {
        let mut out = String::new();
        out.push_str("# HELP thaw_extender_request_seconds Latency of extender verbs.\n");
        out.push_str("# TYPE thaw_extender_request_seconds histogram\n");
        for verb in [Verb::Prioritize, Verb::Filter] {
            let h = match verb {
                Verb::Prioritize => &self.prioritize,
                Verb::Filter => &self.filter,
            };
            let v = verb.name();
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                let n = h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "thaw_extender_request_seconds_bucket{{verb=\"{v}\",le=\"{b}\"}} {n}");
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "thaw_extender_request_seconds_bucket{{verb=\"{v}\",le=\"+Inf\"}} {count}");
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "thaw_extender_request_seconds_sum{{verb=\"{v}\"}} {sum}");
            let _ = writeln!(out, "thaw_extender_request_seconds_count{{verb=\"{v}\"}} {count}");
        }
        out.push_str("# TYPE thaw_extender_neutral_total counter\n");
        for (i, why) in ["no_snapshot", "pending", "failed"].iter().enumerate() {
            let n = self.neutral[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "thaw_extender_neutral_total{{reason=\"{why}\"}} {n}");
        }
        out.push_str("# TYPE thaw_extender_lookup_failures_total counter\n");
        let _ = writeln!(
            out,
            "thaw_extender_lookup_failures_total {}",
            self.lookup_failures.load(Ordering::Relaxed)
        );
        out.push_str("# TYPE thaw_extender_directory_reads_total counter\n");
        let _ = writeln!(
            out,
            "thaw_extender_directory_reads_total{{result=\"ok\"}} {}",
            self.directory_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "thaw_extender_directory_reads_total{{result=\"error\"}} {}",
            self.directory_err.load(Ordering::Relaxed)
        );
        if let Some(age) = self.holdings_age() {
            out.push_str("# TYPE thaw_extender_holdings_age_seconds gauge\n");
            let _ = writeln!(out, "thaw_extender_holdings_age_seconds {}", age.as_secs_f64());
        }
        out.push_str("# TYPE thaw_extender_cache_entries gauge\n");
        for (what, n) in [
            ("profiles", sizes.profiles),
            ("chunks", sizes.chunks),
            ("nodes", sizes.nodes),
            ("coverage_snapshots", sizes.coverage_snapshots),
            ("herd_snapshots", sizes.herd_snapshots),
        ] {
            let _ = writeln!(out, "thaw_extender_cache_entries{{cache=\"{what}\"}} {n}");
        }
        out
    }
}
