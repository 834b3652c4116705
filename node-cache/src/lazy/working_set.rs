//! Working sets on the page server's side: recording the order in which VMs first touch the
//! chunks of a memory file being restored, and the counters of recording, publishing and
//! using working sets. Looking them up, checking and publishing them is the cache's part
//! (`crate::cache::working_set`); the blob format is `thaw_schema::working_set`.
//!
//! Recording sits on the fault path, so it takes no lock and allocates nothing: the page
//! server calls [`Recorder::record`] once per unit a VM touches for the first time, and
//! each recipe entry costs one `fetch_or` on a bitmap (recorded already?) and, the first
//! time, one `fetch_add` claiming its slot in a list sized for every entry up front.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A claimed slot whose index is not stored yet.
const UNSET: u32 = u32::MAX;

/// The first-touch order of one memory file's recipe entries.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// One bit per recipe entry: recorded already.
    seen: Vec<AtomicU64>,
    /// Entry indexes in first-touch order; every entry takes at most one slot.
    order: Vec<AtomicU32>,
    next: AtomicUsize,
    epoch: Instant,
    /// Milliseconds after `epoch` (at least 1) of the first and of the latest new entry;
    /// 0 before the first.
    first_ms: AtomicU64,
    last_ms: AtomicU64,
    frozen: AtomicBool,
}

impl Recorder {
    /// A recorder for a recipe of `entries` entries.
    pub(crate) fn new(entries: usize) -> Self {
        Self {
            seen: (0..entries.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            order: (0..entries).map(|_| AtomicU32::new(UNSET)).collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            first_ms: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
        }
    }

    /// Records the entries of a unit a VM touched for the first time (those recorded
    /// before are skipped). Does nothing once frozen.
    pub(crate) fn record(&self, entries: impl Iterator<Item = usize>) {
        if self.frozen.load(Ordering::Relaxed) {
            return;
        }
        let mut new = false;
        for i in entries {
            let bit = 1u64 << (i % 64);
            if self.seen[i / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                let slot = self.next.fetch_add(1, Ordering::Relaxed);
                self.order[slot].store(i as u32, Ordering::Release);
                new = true;
            }
        }
        if new {
            let now = (self.epoch.elapsed().as_millis() as u64).max(1);
            let _ = self.first_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            self.last_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Since the latest new entry, and since the first; `None` before any was recorded.
    pub(crate) fn quiet_and_age(&self) -> Option<(Duration, Duration)> {
        let first = self.first_ms.load(Ordering::Relaxed);
        if first == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let since = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        Some((since(self.last_ms.load(Ordering::Relaxed)), since(first)))
    }

    /// Stops recording; answers the entry indexes recorded, in first-touch order.
    pub(crate) fn freeze(&self) -> Vec<u32> {
        self.frozen.store(true, Ordering::SeqCst);
        let n = self.next.load(Ordering::SeqCst).min(self.order.len());
        // A slot claimed by a record still running is left out.
        self.order[..n].iter().map(|s| s.load(Ordering::Acquire)).filter(|&i| i != UNSET).collect()
    }
}

/// Counters of working sets, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct WorkingSetMetrics {
    pub(crate) published: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) used: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// A refused publish was logged already (it is logged once per process).
    pub(crate) refusal_logged: AtomicBool,
}

impl WorkingSetMetrics {
    /// The counters in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            ("published", "Working sets this node published to the registry.", &self.published),
            (
                "publish_refused",
                "Working sets the registry refused to take (401/403: no push right).",
                &self.refused,
            ),
            ("publish_failed", "Working sets not published for another reason.", &self.failed),
            ("used", "Lazy restores whose background fill fetched a working set first.", &self.used),
            (
                "rejected",
                "Working-set artifacts ignored as malformed, oversized or not fitting the recipe.",
                &self.rejected,
            ),
        ] {
            let name = format!("thaw_lazy_working_sets_{name}_total");
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touches_once_in_order_until_frozen() {
        let r = Recorder::new(130);
        assert!(r.quiet_and_age().is_none());
        r.record([129, 3].into_iter());
        r.record([3, 64, 0].into_iter());
        r.record(std::iter::empty());
        assert!(r.quiet_and_age().is_some());
        assert_eq!(r.freeze(), vec![129, 3, 64, 0]);
        r.record([5].into_iter());
        assert_eq!(r.freeze(), vec![129, 3, 64, 0], "nothing is recorded once frozen");
    }

    #[test]
    fn concurrent_recorders_claim_each_entry_once() {
        let r = std::sync::Arc::new(Recorder::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        r.record(std::iter::once((i * 7 + t * 13) % 1000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut order = r.freeze();
        assert_eq!(order.len(), 1000);
        order.sort_unstable();
        order.dedup();
        assert_eq!(order.len(), 1000, "an entry was recorded twice");
    }
}
