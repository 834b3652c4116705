//! Shared by the lazy-restore tests (`lazy.rs`, `working_sets.rs`): the lazy `ensure`, access
//! traces, touching pages through the Firecracker stand-in and checking them, metrics.
//! Included with `#[path]` next to `support` and `firecracker_stand_in`.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::firecracker_stand_in::{FirecrackerStandIn, PAGE};
use crate::support::common::Rng;
use crate::support::NodeCache;

/// Longest a test waits for a set of pages before it fails.
pub const PAGES_DEADLINE: Duration = Duration::from_secs(120);

pub async fn ensure_lazy(node: &NodeCache, reference: &str) -> Value {
    let (status, body) =
        node.post("/v1/snapshots/ensure", json!({ "reference": reference, "memory": "uffd" })).await;
    assert_eq!(status, 200, "lazy ensure {reference}: {body}");
    body
}

/// A replayed access pattern: what a function touches first (a few runs of neighbouring
/// pages here and there, as a process's stack, heap and code pages are), seeded.
pub fn access_trace(pages: usize, seed: u64) -> Vec<usize> {
    access_runs(pages, seed, 40, 12)
}

/// [`access_trace`] with `runs` runs of 1 to `longest` pages.
pub fn access_runs(pages: usize, seed: u64, runs: usize, longest: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut trace = Vec::new();
    for _ in 0..runs {
        let start = rng.below(pages as u64) as usize;
        let run = 1 + rng.below(longest) as usize;
        trace.extend((start..(start + run).min(pages)).map(|p| p * PAGE));
    }
    trace
}

/// Reads `offsets` from `threads` threads at once and checks every page against `memory`.
/// Panics if a page differs, or if they are not all read within `deadline` (the threads
/// are then left blocked; the test process ends with the panic).
pub fn touch_and_check(
    vm: &Arc<FirecrackerStandIn>,
    memory: &Arc<Vec<u8>>,
    offsets: Vec<usize>,
    threads: usize,
    deadline: Duration,
) {
    let touched = vm.touch(memory, &offsets, threads, deadline).unwrap_or_else(|e| panic!("{e}"));
    assert!(touched.wrong.is_empty(), "pages at offsets {:?} differ from the memory file", touched.wrong);
}

pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

pub async fn metrics(node: &NodeCache) -> String {
    reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap()
}

/// Polls until the node lists `digest` as cached (its background fill recorded it).
pub async fn wait_cached(node: &NodeCache, digest: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !node.cached().await.iter().any(|d| d == digest) {
        assert!(Instant::now() < deadline, "the lazily restored snapshot was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
