//! The chunking study (issue #8, part 4): how much each chunking strategy stores, what a new
//! revision adds, what different functions share, how large the recipes get and how fast
//! ingest runs, on the files of a real snapshot corpus.
//!
//! Everything goes through thaw-schema's own chunker ([`ChunkerParams::chunks`]), chunk ids
//! ([`ChunkId::of`]), chunk frames ([`EncodedChunk::compress`]) and recipe codec
//! ([`Recipe::encode`]), so the numbers are those the registry and client would produce.
//! The `bin/chunking_study.rs` binary renders the results as docs/CHUNKING.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hint::black_box;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use thaw_schema::chunker::is_zero;
use thaw_schema::frame::{Codec, EncodedChunk, FRAME_HEADER_LEN};
use thaw_schema::recipe::{Recipe, RecipeEntry};
use thaw_schema::{ChunkId, ChunkerKind, ChunkerParams, Sha256Digest};

/// The guest page size: the unit a page-grouped store deduplicates by.
pub const PAGE: usize = 4096;

/// The zstd levels every stored size is reported at.
pub const LEVELS: [i32; 3] = [-1, 1, 3];

/// One file of the corpus, read into memory.
#[derive(Debug)]
pub struct Blob {
    /// Function the file belongs to.
    pub function: String,
    /// Revision of that function.
    pub revision: String,
    /// The file's bytes.
    pub data: Vec<u8>,
}

impl Blob {
    /// `function/revision`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.function, self.revision)
    }
}

/// A way of splitting files into stored units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Chunks cut by thaw-schema's chunker, each deduplicated and compressed on its own.
    Chunks(ChunkerParams),
    /// Deduplicated by 4 KiB page, but the pages a store has not seen are compressed together,
    /// in file order, in groups of `group` bytes (the idea in DESIGN.md; not a thaw format).
    PageGroups {
        /// Group size in bytes.
        group: u32,
    },
}

impl Strategy {
    /// Short human name, e.g. `fixed 64K`, `cdc 16/64/256K`, `4K pages, 64K groups`.
    pub fn name(&self) -> String {
        let k = |v: u32| v / 1024;
        match self {
            Self::Chunks(p) if p.kind == ChunkerKind::Fixed => format!("fixed {}K", k(p.max)),
            Self::Chunks(p) => format!("cdc {}/{}/{}K", k(p.min), k(p.avg), k(p.max)),
            Self::PageGroups { group } => format!("4K pages, {}K groups", k(*group)),
        }
    }

    /// The chunker whose cut the strategy deduplicates by.
    pub const fn chunker(&self) -> ChunkerParams {
        match self {
            Self::Chunks(p) => *p,
            Self::PageGroups { .. } => ChunkerParams::fixed(PAGE as u32),
        }
    }
}

/// The strategies the study compares: page-aligned fixed sizes, FastCDC around 16, 64 and
/// 256 KiB average, and 4 KiB dedup with grouped compression.
pub fn default_strategies() -> Vec<Strategy> {
    const K: u32 = 1024;
    let mut s: Vec<Strategy> =
        [4, 16, 32, 64].into_iter().map(|n| Strategy::Chunks(ChunkerParams::fixed(n * K))).collect();
    for avg in [16, 64, 256] {
        s.push(Strategy::Chunks(ChunkerParams::fastcdc(avg / 4 * K, avg * K, avg * 4 * K)));
    }
    s.push(Strategy::PageGroups { group: 16 * K });
    s.push(Strategy::PageGroups { group: 64 * K });
    s
}

/// Bytes before compression and as stored (chunk frames, header included) at each of [`LEVELS`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Uncompressed bytes.
    pub raw: u64,
    /// Stored bytes at each level of [`LEVELS`].
    pub stored: [u64; 3],
}

impl Sizes {
    /// Stored bytes at zstd `level` (one of [`LEVELS`]).
    pub fn at(&self, level: i32) -> u64 {
        let i = LEVELS.iter().position(|&l| l == level).expect("level is one of LEVELS");
        self.stored[i]
    }
}

impl AddAssign for Sizes {
    fn add_assign(&mut self, o: Self) {
        self.raw += o.raw;
        for (a, b) in self.stored.iter_mut().zip(o.stored) {
            *a += b;
        }
    }
}

/// One chunk of a file: where it is, how long, and its id (`None` for a zero chunk).
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// BLAKE3 id; `None` when every byte is zero.
    pub id: Option<ChunkId>,
}

/// Cuts `data` with `params` and hashes every non-zero chunk.
pub fn cut(params: ChunkerParams, data: &[u8]) -> Vec<Piece> {
    params
        .chunks(data)
        .expect("study chunker parameters are valid")
        .map(|c| {
            let c = c.expect("reading from memory does not fail");
            let id = (!c.is_zero()).then(|| ChunkId::of(&c.data));
            Piece { offset: c.offset, len: c.data.len() as u32, id }
        })
        .collect()
}

/// What the study found for one strategy on one set of files.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The strategy.
    pub strategy: Strategy,
    /// Bytes of all files.
    pub total: u64,
    /// Bytes in zero chunks (never stored).
    pub zero: u64,
    /// Non-zero chunks in all files.
    pub chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// What storing every file once costs: distinct non-zero chunks (or page groups).
    pub corpus: Sizes,
    /// What each later revision of a function adds.
    pub revisions: Vec<RevisionDelta>,
    /// Sharing between different functions.
    pub cross: CrossFunction,
    /// Recipe entries of all files.
    pub recipe_entries: u64,
    /// Encoded recipe bytes of all files.
    pub recipe_bytes: u64,
    /// `shared[a][b]`: distinct non-zero bytes of file `a` also present in file `b`
    /// (`shared[a][a]` is file `a`'s own distinct non-zero bytes).
    pub shared: Vec<Vec<u64>>,
}

/// The bytes a revision adds to a store.
#[derive(Debug, Clone)]
pub struct RevisionDelta {
    /// Function name.
    pub function: String,
    /// The revision already stored.
    pub from: String,
    /// The new revision.
    pub to: String,
    /// Distinct non-zero bytes of the new revision.
    pub new_unique: u64,
    /// What the new revision adds when only `from` is stored.
    pub given_previous: Sizes,
    /// What it adds when every other file of the corpus is stored.
    pub given_rest: Sizes,
}

/// Sharing between different functions.
#[derive(Debug, Clone, Default)]
pub struct CrossFunction {
    /// Distinct non-zero bytes that occur in at least two different functions.
    pub shared_raw: u64,
    /// Storing each function's files in a store of its own, summed.
    pub isolated: Sizes,
    /// Storing all functions in one store (equals the corpus size).
    pub together: Sizes,
}

struct Unique {
    len: u32,
    owners: u64,
    blob: u32,
    offset: u64,
}

/// Runs strategies over one set of files (all of one media type), reusing the 4 KiB cut.
pub struct Study<'a> {
    blobs: &'a [Blob],
    threads: usize,
    cuts: HashMap<ChunkerParams, Vec<Vec<Piece>>>,
}

impl<'a> Study<'a> {
    /// A study of `blobs` (at most 64) using `threads` threads for the untimed work.
    pub fn new(blobs: &'a [Blob], threads: usize) -> Self {
        assert!(blobs.len() <= 64, "the study tracks file membership in a u64");
        Self { blobs, threads: threads.max(1), cuts: HashMap::new() }
    }

    fn cut_all(&mut self, params: ChunkerParams) -> &Vec<Vec<Piece>> {
        let blobs = self.blobs;
        let threads = self.threads;
        self.cuts
            .entry(params)
            .or_insert_with(|| parallel_map(blobs.len(), threads, |i| cut(params, &blobs[i].data)))
    }

    /// Analyses one strategy.
    pub fn run(&mut self, strategy: Strategy) -> Analysis {
        let blobs = self.blobs;
        let threads = self.threads;
        let params = strategy.chunker();
        let cuts = self.cut_all(params).clone();
        // Keep the 4 KiB cut for the page-group strategies; drop the others once used.
        if params != ChunkerParams::fixed(PAGE as u32) {
            self.cuts.remove(&params);
        }

        let mut uniques: HashMap<ChunkId, Unique> = HashMap::new();
        let (mut total, mut zero, mut chunks) = (0u64, 0u64, 0u64);
        for (b, pieces) in cuts.iter().enumerate() {
            for p in pieces {
                total += u64::from(p.len);
                match p.id {
                    None => zero += u64::from(p.len),
                    Some(id) => {
                        chunks += 1;
                        uniques
                            .entry(id)
                            .or_insert(Unique { len: p.len, owners: 0, blob: b as u32, offset: p.offset })
                            .owners |= 1 << b;
                    }
                }
            }
        }
        let bytes_of = |u: &Unique| {
            let start = u.offset as usize;
            &blobs[u.blob as usize].data[start..start + u.len as usize]
        };

        // Stored size of every distinct chunk (page-group strategies compress groups instead).
        let per_chunk: HashMap<ChunkId, [u32; 3]> = match strategy {
            Strategy::Chunks(_) => {
                let list: Vec<(&ChunkId, &Unique)> = uniques.iter().collect();
                let sizes = parallel_map(list.len(), threads, |i| compressed_sizes(bytes_of(list[i].1)));
                list.iter().map(|(id, _)| **id).zip(sizes).collect()
            }
            Strategy::PageGroups { .. } => HashMap::new(),
        };
        // What a store holding the files whose bits are in `stored_mask` adds for `files`.
        let adds = |files: &[usize], stored_mask: u64| -> Sizes {
            match strategy {
                Strategy::Chunks(_) => {
                    let mut seen = HashSet::new();
                    let mut s = Sizes::default();
                    for &f in files {
                        for id in cuts[f].iter().filter_map(|p| p.id.as_ref()) {
                            let u = &uniques[id];
                            if u.owners & stored_mask == 0 && seen.insert(*id) {
                                s.raw += u64::from(u.len);
                                for (acc, z) in s.stored.iter_mut().zip(per_chunk[id]) {
                                    *acc += u64::from(z);
                                }
                            }
                        }
                    }
                    s
                }
                Strategy::PageGroups { group } => {
                    grouped_sizes(blobs, &cuts, &uniques, files, stored_mask, group as usize, threads)
                }
            }
        };

        let all: Vec<usize> = (0..blobs.len()).collect();
        let corpus = adds(&all, 0);

        let mut by_function: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, b) in blobs.iter().enumerate() {
            by_function.entry(b.function.as_str()).or_default().push(i);
        }
        let mut revisions = Vec::new();
        for (function, files) in &by_function {
            for pair in files.windows(2) {
                let (prev, next) = (pair[0], pair[1]);
                let new_unique = adds(&[next], 0).raw;
                revisions.push(RevisionDelta {
                    function: function.to_string(),
                    from: blobs[prev].revision.clone(),
                    to: blobs[next].revision.clone(),
                    new_unique,
                    given_previous: adds(&[next], 1 << prev),
                    given_rest: adds(&[next], !(1u64 << next)),
                });
            }
        }

        let masks: Vec<u64> =
            by_function.values().map(|files| files.iter().fold(0u64, |m, &f| m | 1 << f)).collect();
        let mut cross = CrossFunction { together: corpus, ..Default::default() };
        for files in by_function.values() {
            cross.isolated += adds(files, 0);
        }
        let mut shared = vec![vec![0u64; blobs.len()]; blobs.len()];
        for u in uniques.values() {
            if masks.iter().filter(|&&m| u.owners & m != 0).count() >= 2 {
                cross.shared_raw += u64::from(u.len);
            }
            for a in bits(u.owners) {
                for b in bits(u.owners) {
                    shared[a][b] += u64::from(u.len);
                }
            }
        }

        let (mut recipe_entries, mut recipe_bytes) = (0u64, 0u64);
        for (b, pieces) in cuts.iter().enumerate() {
            let recipe = Recipe {
                // The digest does not change the encoded length.
                digest: Sha256Digest::from_bytes([0; 32]),
                size: blobs[b].data.len() as u64,
                chunker: params,
                entries: pieces
                    .iter()
                    .map(|p| match p.id {
                        Some(id) => RecipeEntry::Data { len: p.len, id },
                        None => RecipeEntry::Zero { len: p.len },
                    })
                    .collect(),
            };
            recipe_entries += recipe.entries.len() as u64;
            recipe_bytes += recipe.encode().len() as u64;
        }

        Analysis {
            strategy,
            total,
            zero,
            chunks,
            unique_chunks: uniques.len() as u64,
            corpus,
            revisions,
            cross,
            recipe_entries,
            recipe_bytes,
            shared,
        }
    }
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1 << i) != 0)
}

/// Stored frame sizes of one chunk at each of [`LEVELS`].
fn compressed_sizes(data: &[u8]) -> [u32; 3] {
    LEVELS.map(|level| (EncodedChunk::compress(data, level).payload.len() + FRAME_HEADER_LEN) as u32)
}

/// Pages of `files` that a store holding `stored_mask` lacks, each once, in file order,
/// packed into groups of `group` bytes and compressed group by group.
fn grouped_sizes(
    blobs: &[Blob],
    cuts: &[Vec<Piece>],
    uniques: &HashMap<ChunkId, Unique>,
    files: &[usize],
    stored_mask: u64,
    group: usize,
    threads: usize,
) -> Sizes {
    let mut seen = HashSet::new();
    let mut groups: Vec<Vec<u8>> = Vec::new();
    let mut current = Vec::with_capacity(group);
    for &f in files {
        for p in &cuts[f] {
            let Some(id) = p.id else { continue };
            if uniques[&id].owners & stored_mask != 0 || !seen.insert(id) {
                continue;
            }
            let start = p.offset as usize;
            current.extend_from_slice(&blobs[f].data[start..start + p.len as usize]);
            if current.len() >= group {
                groups.push(std::mem::replace(&mut current, Vec::with_capacity(group)));
            }
        }
        // A store packs each file's new pages on their own (the upload of one file).
        if !current.is_empty() {
            groups.push(std::mem::replace(&mut current, Vec::with_capacity(group)));
        }
    }
    let sizes = parallel_map(groups.len(), threads, |i| compressed_sizes(&groups[i]));
    let mut s = Sizes { raw: groups.iter().map(|g| g.len() as u64).sum(), stored: [0; 3] };
    for z in sizes {
        for (acc, v) in s.stored.iter_mut().zip(z) {
            *acc += u64::from(v);
        }
    }
    s
}

/// `f(0..n)` on `threads` threads, results in order.
fn parallel_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(n.max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break done;
                        }
                        done.push((i, f(i)));
                    }
                })
            })
            .collect();
        for w in workers {
            for (i, v) in w.join().expect("study worker panicked") {
                out[i] = Some(v);
            }
        }
    });
    out.into_iter().map(|v| v.expect("every index computed")).collect()
}

/// The non-zero 4 KiB pages of `blobs`, concatenated, up to `max` bytes: a sample on which
/// ingest throughput is measured without the zero pages that cost almost nothing.
pub fn nonzero_sample(blobs: &[Blob], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(max);
    for b in blobs {
        for page in b.data.chunks(PAGE) {
            if out.len() + page.len() > max {
                return out;
            }
            if !is_zero(page) {
                out.extend_from_slice(page);
            }
        }
    }
    out
}

/// Single-thread speeds of one strategy's stages, MiB of input per second of the thread's
/// own CPU time (so that other processes on a shared machine slow the numbers down less),
/// median over repetitions.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// The strategy.
    pub strategy: Strategy,
    /// Cutting only (including the zero check).
    pub cut: f64,
    /// Cutting and BLAKE3.
    pub hash: f64,
    /// Cutting, BLAKE3 and zstd at each of [`LEVELS`]: the ingest path.
    pub ingest: [f64; 3],
    /// The same ingest runs measured by the wall clock.
    pub ingest_wall: [f64; 3],
    /// Ingest at zstd 3 with one reused zstd context instead of one per chunk.
    pub ingest_reused: f64,
    /// Decoding a level-3 frame and verifying the id: the restore path.
    pub decode: f64,
    /// Decoding with one reused zstd context.
    pub decode_reused: f64,
    /// False when the thread's CPU time was not readable and the wall clock was used instead.
    pub cpu_clock: bool,
}

/// Nanoseconds the calling thread has spent on a CPU (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Measures [`Throughput`] on `sample` on the calling thread: `reps` measurements per stage,
/// each repeating the work for at least `min_run`.
pub fn throughput(strategy: Strategy, sample: &[u8], reps: usize, min_run: Duration) -> Throughput {
    let params = strategy.chunker();
    let mib = sample.len() as f64 / (1024.0 * 1024.0);
    let cpu_clock = thread_cpu_ns().is_some();
    // (MiB per CPU-second, MiB per wall-second), each the median over `reps` runs.
    let speeds = |f: &dyn Fn()| -> (f64, f64) {
        let (mut cpu, mut wall): (Vec<f64>, Vec<f64>) = (0..reps.max(1))
            .map(|_| {
                // The kernel updates a running thread's CPU time at scheduler ticks (every few
                // ms), so each measurement repeats the work for at least `min_run`.
                let (c0, t) = (thread_cpu_ns(), Instant::now());
                let mut runs = 0u32;
                while runs == 0 || t.elapsed() < min_run {
                    f();
                    runs += 1;
                }
                let w = t.elapsed().as_secs_f64();
                let c = match (c0, thread_cpu_ns()) {
                    (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
                    _ => w,
                };
                let work = mib * f64::from(runs);
                (work / c, work / w)
            })
            .unzip();
        cpu.sort_by(f64::total_cmp);
        wall.sort_by(f64::total_cmp);
        (cpu[cpu.len() / 2], wall[wall.len() / 2])
    };
    let speed = |f: &dyn Fn()| speeds(f).0;
    let each_chunk = |f: &mut dyn FnMut(&[u8])| {
        for c in params.chunks(sample).expect("valid params") {
            let c = c.expect("in-memory read");
            if !is_zero(&c.data) {
                f(&c.data);
            }
        }
    };
    let cut = speed(&|| {
        each_chunk(&mut |d| {
            black_box(d);
        })
    });
    let hash = speed(&|| {
        each_chunk(&mut |d| {
            black_box(ChunkId::of(d));
        })
    });
    // The unit zstd compresses: each chunk, or a group of pages.
    let unit = match strategy {
        Strategy::Chunks(_) => 0,
        Strategy::PageGroups { group } => group as usize,
    };
    // Ingest: hash every non-zero chunk and hand each compression unit to `z`.
    let ingest_with = |z: &mut dyn FnMut(&[u8])| {
        let mut pending = Vec::with_capacity(unit);
        each_chunk(&mut |d| {
            black_box(ChunkId::of(d));
            if unit == 0 {
                z(d);
            } else {
                pending.extend_from_slice(d);
                if pending.len() >= unit {
                    z(&pending);
                    pending.clear();
                }
            }
        });
        if !pending.is_empty() {
            z(&pending);
        }
    };
    let ingest_both = LEVELS.map(|level| {
        speeds(&|| {
            ingest_with(&mut |u| {
                black_box(EncodedChunk::compress(u, level));
            })
        })
    });
    // The same at level 3 with one zstd context for all units, where `EncodedChunk::compress`
    // (`zstd::bulk::compress`) makes a new context per chunk.
    let ingest_reused = speed(&|| {
        let mut c = zstd::bulk::Compressor::new(3).expect("zstd context");
        ingest_with(&mut |u| {
            black_box(c.compress(u).expect("zstd compresses"));
        })
    });
    // Restore: decode frames and verify their content. A group frame is checked as a whole
    // (the BLAKE3 pass over its bytes costs about what checking its pages one by one would).
    let mut frames: Vec<(EncodedChunk, ChunkId)> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    each_chunk(&mut |d| {
        if unit == 0 {
            frames.push((EncodedChunk::compress(d, 3), ChunkId::of(d)));
        } else {
            pending.extend_from_slice(d);
            if pending.len() >= unit {
                frames.push((EncodedChunk::compress(&pending, 3), ChunkId::of(&pending)));
                pending.clear();
            }
        }
    });
    if !pending.is_empty() {
        frames.push((EncodedChunk::compress(&pending, 3), ChunkId::of(&pending)));
    }
    let decode = speed(&|| {
        for (frame, id) in &frames {
            black_box(frame.decode(id).expect("frame round trip"));
        }
    });
    let decode_reused = speed(&|| {
        let mut d = zstd::bulk::Decompressor::new().expect("zstd context");
        for (frame, id) in &frames {
            let bytes = match frame.codec {
                Codec::Zstd => d.decompress(&frame.payload, frame.raw_len as usize).expect("zstd decodes"),
                Codec::Raw => frame.payload.clone(),
            };
            assert_eq!(&ChunkId::of(&bytes), id, "frame round trip");
        }
    });
    Throughput {
        strategy,
        cut,
        hash,
        ingest: ingest_both.map(|s| s.0),
        ingest_wall: ingest_both.map(|s| s.1),
        ingest_reused,
        decode,
        decode_reused,
        cpu_clock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn counts_dedup_zero_and_revision_deltas() {
        // v1: 16 random pages + 16 zero pages; v2: the same with one page changed.
        let mut v1 = noise(16 * PAGE, 1);
        v1.extend(vec![0; 16 * PAGE]);
        let mut v2 = v1.clone();
        v2[5 * PAGE..6 * PAGE].copy_from_slice(&noise(PAGE, 4));
        let other = noise(8 * PAGE, 6);
        let blobs = vec![
            Blob { function: "a".into(), revision: "v1".into(), data: v1 },
            Blob { function: "a".into(), revision: "v2".into(), data: v2 },
            Blob { function: "b".into(), revision: "v1".into(), data: other },
        ];
        let mut study = Study::new(&blobs, 2);
        let a = study.run(Strategy::Chunks(ChunkerParams::fixed(PAGE as u32)));
        assert_eq!(a.total, (32 + 32 + 8) * PAGE as u64);
        assert_eq!(a.zero, 32 * PAGE as u64);
        assert_eq!(a.corpus.raw, (16 + 1 + 8) * PAGE as u64);
        assert_eq!(a.revisions.len(), 1);
        assert_eq!(a.revisions[0].given_previous.raw, PAGE as u64);
        assert_eq!(a.revisions[0].new_unique, 16 * PAGE as u64);
        assert_eq!(a.cross.shared_raw, 0);
        assert_eq!(a.cross.isolated, a.cross.together);
        assert_eq!(a.shared[0][1], 15 * PAGE as u64);
        // Random pages do not compress: stored is raw plus one frame header per chunk.
        assert_eq!(a.corpus.at(3), a.corpus.raw + 25 * FRAME_HEADER_LEN as u64);

        let g = study.run(Strategy::PageGroups { group: 16 * 1024 });
        assert_eq!(g.corpus.raw, a.corpus.raw);
        assert_eq!(g.revisions[0].given_previous.raw, PAGE as u64);
    }

    #[test]
    fn throughput_runs_on_every_strategy() {
        let sample = noise(256 * 1024, 9);
        for s in default_strategies() {
            let t = throughput(s, &sample, 1, Duration::ZERO);
            assert!(t.cut > 0.0 && t.ingest.iter().all(|&v| v > 0.0) && t.decode > 0.0, "{s:?}");
            assert!(t.ingest_reused > 0.0 && t.decode_reused > 0.0, "{s:?}");
        }
    }
}
