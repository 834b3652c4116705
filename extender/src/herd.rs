//! Damping herds: a burst of pods of one snapshot should spread over the nodes that hold it,
//! not all land on the single best node before its holdings change.
//!
//! The extender sees no bind, so the signal is its own answers: each `/prioritize` that gives
//! some node a positive score records the top node of that answer (after penalties; the first
//! in request order among ties) for that snapshot. A node's score for the snapshot is then
//! lowered by `penalty` points per such pick in the last `window`, at most `max_penalty`
//! points, never below 0. Time is passed in, so tests drive it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use thaw_schema::Sha256Digest;

/// Herd damping settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HerdConfig {
    /// How long a pick counts.
    pub window: Duration,
    /// Points taken per recent pick.
    pub penalty: i64,
    /// Most points taken from one node.
    pub max_penalty: i64,
}

impl Default for HerdConfig {
    fn default() -> Self {
        Self { window: Duration::from_secs(10), penalty: 1, max_penalty: 3 }
    }
}

impl HerdConfig {
    /// No damping.
    pub const OFF: Self = Self { window: Duration::ZERO, penalty: 0, max_penalty: 0 };
}

#[derive(Debug, Default)]
struct Picks {
    order: VecDeque<(Instant, String)>,
    counts: HashMap<String, u32>,
}

impl Picks {
    fn prune(&mut self, now: Instant, window: Duration) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < window {
                break;
            }
            let (_, node) = self.order.pop_front().expect("front exists");
            if let Some(c) = self.counts.get_mut(&node) {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(&node);
                }
            }
        }
    }
}

/// Recent top picks per snapshot.
#[derive(Debug, Default)]
pub struct Herd {
    config: HerdConfig,
    by_snapshot: HashMap<Sha256Digest, Picks>,
}

impl Herd {
    /// A tracker with these settings.
    pub fn new(config: HerdConfig) -> Self {
        Self { config, by_snapshot: HashMap::new() }
    }

    /// The settings.
    pub fn config(&self) -> HerdConfig {
        self.config
    }

    /// Applies the penalties to `scores` (one per node in `nodes`, in the same order) and
    /// records this answer's top node. Returns the damped scores.
    pub fn damp(&mut self, snapshot: &Sha256Digest, nodes: &[String], scores: &mut [i64], now: Instant) {
        let HerdConfig { window, penalty, max_penalty } = self.config;
        if window.is_zero() || penalty == 0 || max_penalty == 0 {
            return;
        }
        let picks = self.by_snapshot.entry(*snapshot).or_default();
        picks.prune(now, window);
        if !picks.counts.is_empty() {
            for (node, score) in nodes.iter().zip(scores.iter_mut()) {
                if let Some(&n) = picks.counts.get(node) {
                    *score = (*score - (penalty * i64::from(n)).min(max_penalty)).max(0);
                }
            }
        }
        let mut top: Option<usize> = None;
        for (i, &s) in scores.iter().enumerate() {
            if s > 0 && top.is_none_or(|t| s > scores[t]) {
                top = Some(i);
            }
        }
        if let Some(t) = top {
            picks.order.push_back((now, nodes[t].clone()));
            *picks.counts.entry(nodes[t].clone()).or_default() += 1;
        }
        if picks.order.is_empty() {
            self.by_snapshot.remove(snapshot);
        }
    }

    /// Drops every pick older than the window (bounded memory between bursts).
    pub fn prune_all(&mut self, now: Instant) {
        let window = self.config.window;
        self.by_snapshot.retain(|_, p| {
            p.prune(now, window);
            !p.order.is_empty()
        });
    }

    /// Snapshots with recent picks.
    pub fn tracked(&self) -> usize {
        self.by_snapshot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn a_burst_round_robins_over_the_holders_then_forgets() {
        let mut herd = Herd::new(HerdConfig { window: Duration::from_secs(10), penalty: 1, max_penalty: 3 });
        let s = Sha256Digest::of(b"rev-1");
        let nodes = names(4);
        let t0 = Instant::now();
        let mut tops = Vec::new();
        for i in 0..6 {
            let mut scores = vec![10, 10, 10, 0];
            herd.damp(&s, &nodes, &mut scores, t0 + Duration::from_millis(i));
            let best = *scores.iter().max().unwrap();
            tops.push(scores.iter().position(|&x| x == best).unwrap());
            assert_eq!(scores[3], 0, "a cold node is never raised");
        }
        assert_eq!(tops, vec![0, 1, 2, 0, 1, 2]);
        // The penalty is capped: a holder never drops below 10 - 3.
        for _ in 0..20 {
            let mut scores = vec![10, 10, 10, 0];
            herd.damp(&s, &nodes, &mut scores, t0 + Duration::from_millis(10));
            assert!(scores[..3].iter().all(|&x| x >= 7), "{scores:?}");
        }
        // After the window, full scores again.
        let mut scores = vec![10, 10, 10, 0];
        herd.damp(&s, &nodes, &mut scores, t0 + Duration::from_secs(11));
        assert_eq!(scores, vec![10, 10, 10, 0]);
        herd.prune_all(t0 + Duration::from_secs(30));
        assert_eq!(herd.tracked(), 0);
    }

    #[test]
    fn other_snapshots_and_neutral_answers_are_not_damped() {
        let mut herd = Herd::new(HerdConfig::default());
        let nodes = names(2);
        let now = Instant::now();
        let mut a = vec![10, 5];
        herd.damp(&Sha256Digest::of(b"a"), &nodes, &mut a, now);
        let mut b = vec![10, 5];
        herd.damp(&Sha256Digest::of(b"b"), &nodes, &mut b, now);
        assert_eq!(b, vec![10, 5]);
        let mut zeros = vec![0, 0];
        herd.damp(&Sha256Digest::of(b"c"), &nodes, &mut zeros, now);
        let mut zeros = vec![0, 0];
        herd.damp(&Sha256Digest::of(b"c"), &nodes, &mut zeros, now);
        assert_eq!(zeros, vec![0, 0]);
        let mut off = Herd::new(HerdConfig::OFF);
        for _ in 0..5 {
            let mut s = vec![10, 5];
            off.damp(&Sha256Digest::of(b"a"), &nodes, &mut s, now);
            assert_eq!(s, vec![10, 5]);
        }
    }
}
