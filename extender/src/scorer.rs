//! Coverage scoring, in memory and synchronous: what the request path runs.
//!
//! A snapshot's *profile* is the set of its distinct non-zero chunks (over all its files)
//! with their lengths, chunk ids interned to `u32` and sorted. A node's coverage of a pod's
//! snapshot S is the bytes of S's profile found in the profile of any snapshot the node
//! holds; its score is `round(10 × covered / total)`, and 10 when it holds S itself.
//! Coverage is cached per (S, node) and recomputed only when that node's holdings change or
//! a profile it lacked arrives, so a warm `/prioritize` is one hash lookup per node.
//!
//! Computing it (cold) uses an inverted index: chunk → the snapshots containing it, and
//! snapshot → the nodes holding it. One pass over S's chunks credits each node once per
//! chunk it holds, for every node at once: the cost is the number of (chunk of S, held
//! snapshot containing it, node holding that) triples, not nodes × held × chunks as merging
//! sorted chunk lists node by node would be. A few stale nodes (one node's holdings changed)
//! are recomputed by merging instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use thaw_schema::holdings::NodeHoldings;
use thaw_schema::{ChunkId, Recipe, Sha256Digest};

use crate::herd::{Herd, HerdConfig};
use crate::wire::MAX_EXTENDER_PRIORITY;

/// Pod snapshots whose per-node coverage is kept; the least recently asked is dropped past it.
pub const COVERAGE_SNAPSHOTS: usize = 512;

/// Hasher for ids that are already uniform hashes (BLAKE3, SHA-256): their first 8 bytes.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Derived `Hash` for `[u8; 32]` writes a length prefix first; fold everything.
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(w);
        }
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// One snapshot's distinct non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    ids: Box<[u32]>,
    lens: Box<[u32]>,
    total: u64,
}

impl Profile {
    /// Non-zero bytes (each distinct chunk once).
    pub fn total(&self) -> u64 {
        self.total
    }
    /// Distinct chunks.
    pub fn chunks(&self) -> usize {
        self.ids.len()
    }
}

/// A snapshot's chunks as read from its recipes (or whole layers for a layer without one).
#[derive(Debug, Clone, Default)]
pub struct SnapshotChunks {
    /// `(chunk id, length)`, in any order, duplicates allowed.
    pub chunks: Vec<(ChunkId, u32)>,
}

impl SnapshotChunks {
    /// Adds a recipe's data chunks (zero runs are never fetched, so never count).
    pub fn add_recipe(&mut self, recipe: &Recipe) {
        for e in &recipe.entries {
            if let Some(id) = e.chunk_id() {
                self.chunks.push((*id, e.byte_len()));
            }
        }
    }

    /// Adds a layer the registry has no recipe for, as opaque pieces keyed by its digest: it
    /// counts only for nodes holding that exact blob.
    pub fn add_opaque(&mut self, digest: &Sha256Digest, size: u64) {
        let mut left = size;
        let mut i = 0u64;
        while left > 0 {
            let len = left.min(1 << 30);
            let mut key = digest.as_bytes().to_vec();
            key.extend_from_slice(&i.to_le_bytes());
            self.chunks.push((ChunkId::of(&key), len as u32));
            left -= len;
            i += 1;
        }
    }
}

/// Below this many stale nodes, coverage is recomputed node by node (merging sorted lists).
const MERGE_BELOW: usize = 16;

#[derive(Debug)]
struct NodeEntry {
    /// Dense index for this holdings read.
    idx: u32,
    held: Vec<Sha256Digest>,
    generation: u64,
}

#[derive(Debug, Default)]
struct Index {
    interner: IdMap<ChunkId, u32>,
    profiles: IdMap<Sha256Digest, Arc<Profile>>,
    /// Bumped whenever a profile is added.
    profiles_generation: u64,
    /// Chunk index → snapshot indexes (of `profiles`' `snapshot` field) containing it.
    containing: Vec<Vec<u32>>,
    /// Snapshot index → dense indexes of the nodes holding it.
    holders: Vec<Vec<u32>>,
    /// Snapshot index → digest.
    snapshots: Vec<Sha256Digest>,
    nodes: HashMap<String, NodeEntry>,
    /// Snapshot digest → dense indexes of the nodes holding it (also those without profile).
    held_by: IdMap<Sha256Digest, Vec<u32>>,
    next_generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Coverage {
    node_generation: u64,
    /// `None` when every held snapshot had a profile; else the profiles generation it saw.
    incomplete_at: Option<u64>,
    covered: u64,
    exact: bool,
}

#[derive(Debug, Default)]
struct CoverageCache {
    by_snapshot: IdMap<Sha256Digest, (u64, HashMap<String, Coverage>)>,
    clock: u64,
}

/// Sizes, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScorerSizes {
    /// Snapshot profiles cached.
    pub profiles: usize,
    /// Distinct chunk ids interned.
    pub chunks: usize,
    /// Nodes with holdings.
    pub nodes: usize,
    /// Pod snapshots with cached coverage.
    pub coverage_snapshots: usize,
    /// Snapshots with recent herd picks.
    pub herd_snapshots: usize,
}

/// The in-memory scorer: profiles, holdings, coverage cache and herd damping.
#[derive(Debug)]
pub struct Scorer {
    index: RwLock<Index>,
    coverage: Mutex<CoverageCache>,
    herd: Mutex<Herd>,
}

impl Scorer {
    /// An empty scorer.
    pub fn new(herd: HerdConfig) -> Self {
        Self {
            index: RwLock::new(Index::default()),
            coverage: Mutex::new(CoverageCache::default()),
            herd: Mutex::new(Herd::new(herd)),
        }
    }

    /// True when the profile of `digest` is cached.
    pub fn has_profile(&self, digest: &Sha256Digest) -> bool {
        self.index.read().expect("index lock").profiles.contains_key(digest)
    }

    /// The cached profile of `digest`.
    pub fn profile(&self, digest: &Sha256Digest) -> Option<Arc<Profile>> {
        self.index.read().expect("index lock").profiles.get(digest).cloned()
    }

    /// Caches the profile of snapshot `digest` (immutable: a second insert is ignored).
    pub fn insert_profile(&self, digest: Sha256Digest, chunks: &SnapshotChunks) {
        let mut index = self.index.write().expect("index lock");
        if index.profiles.contains_key(&digest) {
            return;
        }
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(chunks.chunks.len());
        for (id, len) in &chunks.chunks {
            let next = index.interner.len() as u32;
            let n = *index.interner.entry(*id).or_insert(next);
            pairs.push((n, *len));
        }
        pairs.sort_unstable();
        pairs.dedup_by_key(|p| p.0);
        let total = pairs.iter().map(|p| u64::from(p.1)).sum();
        let snapshot = index.snapshots.len() as u32;
        index.snapshots.push(digest);
        let holders = index.held_by.get(&digest).cloned().unwrap_or_default();
        index.holders.push(holders);
        let chunks_known = index.interner.len();
        index.containing.resize_with(chunks_known, Vec::new);
        for &(c, _) in &pairs {
            index.containing[c as usize].push(snapshot);
        }
        let profile = Profile {
            ids: pairs.iter().map(|p| p.0).collect(),
            lens: pairs.iter().map(|p| p.1).collect(),
            total,
        };
        index.profiles.insert(digest, Arc::new(profile));
        index.profiles_generation += 1;
    }

    /// Replaces every node's holdings with `nodes` (a full directory read). A node whose set
    /// of held snapshots did not change keeps its cached coverage.
    pub fn set_holdings(&self, nodes: &[NodeHoldings]) {
        let mut index = self.index.write().expect("index lock");
        let mut fresh = HashMap::with_capacity(nodes.len());
        let mut held_by: IdMap<Sha256Digest, Vec<u32>> = IdMap::default();
        for n in nodes {
            if fresh.contains_key(&n.node) {
                continue;
            }
            let idx = fresh.len() as u32;
            // A snapshot still being materialized (swarming's announcement) covers nothing yet.
            let mut held: Vec<Sha256Digest> =
                n.snapshots.iter().filter(|s| !s.is_in_progress()).map(|s| s.digest).collect();
            held.sort_unstable();
            held.dedup();
            for d in &held {
                held_by.entry(*d).or_default().push(idx);
            }
            // Dense indexes change between reads; cached coverage is per name and generation.
            let generation = match index.nodes.remove(&n.node) {
                Some(old) if old.held == held => old.generation,
                _ => {
                    index.next_generation += 1;
                    index.next_generation
                }
            };
            fresh.insert(n.node.clone(), NodeEntry { idx, held, generation });
        }
        let holders: Vec<Vec<u32>> =
            index.snapshots.iter().map(|d| held_by.get(d).cloned().unwrap_or_default()).collect();
        index.nodes = fresh;
        index.held_by = held_by;
        index.holders = holders;
    }

    /// Every snapshot some node holds, with the reference it was ensured by.
    pub fn held_snapshots(nodes: &[NodeHoldings]) -> Vec<(Sha256Digest, String)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for n in nodes {
            for s in &n.snapshots {
                if seen.insert(s.digest) {
                    out.push((s.digest, s.reference.clone()));
                }
            }
        }
        out
    }

    /// Scores `nodes` for a pod needing snapshot `digest`, herd damping applied at `now`.
    /// All 0 when the snapshot's profile is not cached.
    pub fn prioritize(&self, digest: &Sha256Digest, nodes: &[String], now: Instant) -> Vec<i64> {
        let mut scores = self.coverage_scores(digest, nodes);
        self.herd.lock().expect("herd lock").damp(digest, nodes, &mut scores, now);
        scores
    }

    /// Scores before herd damping.
    pub fn coverage_scores(&self, digest: &Sha256Digest, nodes: &[String]) -> Vec<i64> {
        let index = self.index.read().expect("index lock");
        let Some(profile) = index.profiles.get(digest).cloned() else {
            return vec![0; nodes.len()];
        };
        let mut cache = self.coverage.lock().expect("coverage lock");
        cache.clock += 1;
        let clock = cache.clock;
        if !cache.by_snapshot.contains_key(digest) && cache.by_snapshot.len() >= COVERAGE_SNAPSHOTS {
            let oldest = cache.by_snapshot.iter().min_by_key(|(_, (used, _))| *used).map(|(d, _)| *d);
            if let Some(d) = oldest {
                cache.by_snapshot.remove(&d);
            }
        }
        let (used, per_node) = cache.by_snapshot.entry(*digest).or_default();
        *used = clock;
        let fresh = |name: &String, node: &NodeEntry| {
            per_node.get(name).copied().filter(|c| {
                c.node_generation == node.generation
                    && c.incomplete_at.is_none_or(|g| g == index.profiles_generation)
            })
        };
        let stale: Vec<(&String, &NodeEntry)> = nodes
            .iter()
            .filter_map(|name| index.nodes.get_key_value(name))
            .filter(|(name, node)| fresh(name, node).is_none())
            .collect();
        if stale.len() >= MERGE_BELOW {
            let covered = covered_everywhere(&index, &profile);
            for (name, node) in stale {
                let c = coverage_of(&index, node, digest, &profile, Some(covered[node.idx as usize]));
                per_node.insert(name.clone(), c);
            }
        } else {
            for (name, node) in stale {
                let c = coverage_of(&index, node, digest, &profile, None);
                per_node.insert(name.clone(), c);
            }
        }
        nodes
            .iter()
            .map(|name| match (index.nodes.get(name), per_node.get(name)) {
                (Some(_), Some(c)) => score(*c, profile.total),
                _ => 0,
            })
            .collect()
    }

    /// Herd settings.
    pub fn herd_config(&self) -> HerdConfig {
        self.herd.lock().expect("herd lock").config()
    }

    /// Drops expired herd picks.
    pub fn prune_herd(&self, now: Instant) {
        self.herd.lock().expect("herd lock").prune_all(now);
    }

    /// Cache sizes.
    pub fn sizes(&self) -> ScorerSizes {
        let (profiles, chunks, nodes) = {
            let i = self.index.read().expect("index lock");
            (i.profiles.len(), i.interner.len(), i.nodes.len())
        };
        ScorerSizes {
            profiles,
            chunks,
            nodes,
            coverage_snapshots: self.coverage.lock().expect("coverage lock").by_snapshot.len(),
            herd_snapshots: self.herd.lock().expect("herd lock").tracked(),
        }
    }
}

fn score(c: Coverage, total: u64) -> i64 {
    if c.exact {
        return MAX_EXTENDER_PRIORITY;
    }
    if total == 0 {
        return 0;
    }
    let max = MAX_EXTENDER_PRIORITY as u128;
    ((u128::from(c.covered) * max * 2 + u128::from(total)) / (u128::from(total) * 2)) as i64
}

/// Bytes of `target` held by each node (by dense index), all nodes in one pass.
fn covered_everywhere(index: &Index, target: &Profile) -> Vec<u64> {
    let n = index.nodes.len();
    let mut covered = vec![0u64; n];
    let mut last = vec![u32::MAX; n];
    for (p, (&c, &len)) in target.ids.iter().zip(target.lens.iter()).enumerate() {
        for &h in &index.containing[c as usize] {
            for &node in &index.holders[h as usize] {
                let node = node as usize;
                if last[node] != p as u32 {
                    last[node] = p as u32;
                    covered[node] += u64::from(len);
                }
            }
        }
    }
    covered
}

/// The coverage of `target` by `node`: `covered` from [`covered_everywhere`], or merged here.
fn coverage_of(
    index: &Index,
    node: &NodeEntry,
    digest: &Sha256Digest,
    target: &Profile,
    covered: Option<u64>,
) -> Coverage {
    let exact = node.held.binary_search(digest).is_ok();
    let incomplete = !exact && node.held.iter().any(|h| !index.profiles.contains_key(h));
    let covered = if exact {
        target.total
    } else if let Some(c) = covered {
        c
    } else {
        let mut marks = vec![false; target.ids.len()];
        for h in &node.held {
            if let Some(p) = index.profiles.get(h) {
                mark_shared(&target.ids, &p.ids, &mut marks);
            }
        }
        marks.iter().zip(target.lens.iter()).filter(|(m, _)| **m).map(|(_, l)| u64::from(*l)).sum()
    };
    Coverage {
        node_generation: node.generation,
        incomplete_at: incomplete.then_some(index.profiles_generation),
        covered,
        exact,
    }
}

/// Marks the positions of `target` (sorted) whose id is in `other` (sorted): a merge, or
/// binary searches when one side is much smaller.
fn mark_shared(target: &[u32], other: &[u32], marks: &mut [bool]) {
    if other.len() * 16 < target.len() {
        for id in other {
            if let Ok(i) = target.binary_search(id) {
                marks[i] = true;
            }
        }
        return;
    }
    if target.len() * 16 < other.len() {
        for (i, id) in target.iter().enumerate() {
            if !marks[i] && other.binary_search(id).is_ok() {
                marks[i] = true;
            }
        }
        return;
    }
    let (mut i, mut j) = (0, 0);
    while i < target.len() && j < other.len() {
        match target[i].cmp(&other[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                marks[i] = true;
                i += 1;
                j += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use thaw_schema::holdings::HeldSnapshot;

    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn chunks(ids: impl IntoIterator<Item = u32>, len: u32) -> SnapshotChunks {
        SnapshotChunks { chunks: ids.into_iter().map(|n| (id(n), len)).collect() }
    }

    fn node(name: &str, held: &[Sha256Digest]) -> NodeHoldings {
        NodeHoldings {
            node: name.into(),
            peer_endpoint: None,
            capacity_bytes: 1 << 30,
            used_bytes: 0,
            snapshots: held
                .iter()
                .map(|d| HeldSnapshot {
                    reference: "r/x:y".into(),
                    digest: *d,
                    size_bytes: 1,
                    cached_bytes: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn scores_are_the_rounded_share_of_covered_bytes() {
        let s = Scorer::new(HerdConfig::OFF);
        let (a, b, c) = (Sha256Digest::of(b"a"), Sha256Digest::of(b"b"), Sha256Digest::of(b"c"));
        s.insert_profile(a, &chunks(0..100, 4096));
        // b shares 64 of its 100 chunks with a; c 30 with a, 10 more with b, dupes ignored.
        s.insert_profile(b, &chunks((36..100).chain(200..236), 4096));
        s.insert_profile(c, &chunks((0..30).chain(200..210).chain(300..360).chain(0..30), 4096));
        let names: Vec<String> =
            ["has-a", "has-b", "has-c", "has-b-c", "cold", "absent"].map(String::from).into();
        s.set_holdings(&[
            node("has-a", &[a]),
            node("has-b", &[b]),
            node("has-c", &[c]),
            node("has-b-c", &[b, c]),
            node("cold", &[]),
        ]);
        assert_eq!(s.coverage_scores(&a, &names), vec![10, 6, 3, 9, 0, 0]);
        // The exact snapshot scores 10 even when all its chunks are elsewhere too.
        assert_eq!(s.coverage_scores(&c, &names)[2], 10);
        // Holdings change: the cache follows.
        s.set_holdings(&[node("cold", &[a])]);
        assert_eq!(s.coverage_scores(&a, &names), vec![0, 0, 0, 0, 10, 0]);
        assert_eq!(s.coverage_scores(&Sha256Digest::of(b"unknown"), &names), vec![0; 6]);
    }

    #[test]
    fn a_snapshot_still_being_materialized_covers_nothing() {
        let s = Scorer::new(HerdConfig::OFF);
        let a = Sha256Digest::of(b"a");
        s.insert_profile(a, &chunks(0..10, 100));
        let mut pulling = node("pulling", &[a]);
        pulling.snapshots[0].cached_bytes = 0;
        s.set_holdings(&[pulling, node("holder", &[a])]);
        let names = vec!["pulling".to_owned(), "holder".to_owned()];
        assert_eq!(s.coverage_scores(&a, &names), vec![0, 10]);
    }

    #[test]
    fn a_profile_arriving_later_refreshes_cached_coverage() {
        let s = Scorer::new(HerdConfig::OFF);
        let (a, b) = (Sha256Digest::of(b"a"), Sha256Digest::of(b"b"));
        s.insert_profile(a, &chunks(0..10, 100));
        s.set_holdings(&[node("n", &[b])]);
        let names = vec!["n".to_owned()];
        assert_eq!(s.coverage_scores(&a, &names), vec![0]);
        s.insert_profile(b, &chunks(0..5, 100));
        assert_eq!(s.coverage_scores(&a, &names), vec![5]);
    }

    #[test]
    fn one_pass_and_node_by_node_coverage_agree() {
        let s = Scorer::new(HerdConfig::OFF);
        let mut rng = 0x1234_5678_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let digests: Vec<Sha256Digest> = (0..30u32).map(|i| Sha256Digest::of(&i.to_le_bytes())).collect();
        for d in &digests[..25] {
            let len = 1 + next(4000) as u32;
            s.insert_profile(*d, &chunks((0..200).map(|_| next(1000) as u32), len));
        }
        let holdings: Vec<NodeHoldings> = (0..40)
            .map(|i| {
                let held: Vec<Sha256Digest> = (0..next(5)).map(|_| digests[next(30) as usize]).collect();
                node(&format!("n{i}"), &held)
            })
            .collect();
        s.set_holdings(&holdings);
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let index = s.index.read().unwrap();
        for d in &digests[..25] {
            let target = index.profiles.get(d).unwrap().clone();
            let all = covered_everywhere(&index, &target);
            for name in &names {
                let n = &index.nodes[name];
                let one = coverage_of(&index, n, d, &target, None);
                let batch = coverage_of(&index, n, d, &target, Some(all[n.idx as usize]));
                assert_eq!(one.covered, batch.covered, "{name} for {d}");
                assert_eq!(one.exact, batch.exact);
            }
        }
        drop(index);
        // And through the cache: many stale nodes take the one-pass path.
        let a = s.coverage_scores(&digests[0], &names);
        let index = s.index.read().unwrap();
        let target = index.profiles.get(&digests[0]).unwrap().clone();
        for (name, got) in names.iter().zip(a) {
            let c = coverage_of(&index, &index.nodes[name], &digests[0], &target, None);
            assert_eq!(got, score(c, target.total), "{name}");
        }
    }

    #[test]
    fn shared_marking_agrees_across_strategies() {
        let target: Vec<u32> = (0..1000).map(|x| x * 3).collect();
        for other in
            [vec![3, 6, 9, 2997], (0..3000).collect::<Vec<u32>>(), (0..1500).map(|x| x * 2).collect()]
        {
            let mut marks = vec![false; target.len()];
            mark_shared(&target, &other, &mut marks);
            let expected: Vec<bool> = target.iter().map(|t| other.contains(t)).collect();
            assert_eq!(marks, expected);
        }
    }
}
