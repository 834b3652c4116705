//! Storage-level deduplication through plain OCI uploads: the same 256 MiB memory-like
//! file pushed to two repositories costs no new chunk bytes the second time, and a copy
//! with a few pages changed costs only the chunks around those pages.

mod common;

use common::*;
use std::path::Path;

const PAGE: usize = 4096;
const FILE_SIZE: usize = 256 << 20;
/// The largest chunk the registry cuts (FastCDC max); a changed page can touch at most a
/// couple of chunks of at most this size.
const MAX_CHUNK: u64 = 256 << 10;

/// A guest-memory-like image: runs of zero pages (~40%), runs of pages drawn from a
/// pool of distinct random pages (so page content repeats), and runs of compressible
/// text pages.
fn memory_like_image(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let pool: Vec<Vec<u8>> = (0..2048).map(|_| rng.bytes(PAGE)).collect();
    let words: [&[u8]; 12] = [
        b"kernel ",
        b"python ",
        b"import ",
        b"module ",
        b"lambda ",
        b"return ",
        b"thaw ",
        b"snapshot ",
        b"memory ",
        b"restore ",
        b"function ",
        b"runtime ",
    ];
    let text_pages: Vec<Vec<u8>> = (0..256)
        .map(|_| {
            let mut p = Vec::with_capacity(PAGE + 16);
            while p.len() < PAGE {
                p.extend_from_slice(words[rng.below(words.len() as u64) as usize]);
            }
            p.truncate(PAGE);
            p
        })
        .collect();
    let zero = vec![0u8; PAGE];
    let mut out = Vec::with_capacity(FILE_SIZE);
    while out.len() < FILE_SIZE {
        let run = 1 + rng.below(64) as usize;
        let kind = rng.below(100);
        for _ in 0..run {
            if out.len() >= FILE_SIZE {
                break;
            }
            let page: &[u8] = if kind < 40 {
                &zero
            } else if kind < 85 {
                &pool[rng.below(pool.len() as u64) as usize]
            } else {
                &text_pages[rng.below(text_pages.len() as u64) as usize]
            };
            out.extend_from_slice(page);
        }
    }
    out
}

fn chunk_bytes(storage: &Path) -> u64 {
    dir_usage(&storage.join("chunks")).1
}

#[tokio::test]
async fn identical_pushes_share_chunks_and_edits_cost_only_changed_chunks() {
    let r = TestRegistry::start().await;
    let storage = r.storage();
    let image = memory_like_image(0x7A_5EED);
    let zero_pages = image.chunks(PAGE).filter(|p| p.iter().all(|b| *b == 0)).count();
    let zero_share = zero_pages as f64 / (FILE_SIZE / PAGE) as f64;
    assert!((0.3..0.5).contains(&zero_share), "test data should be ~40% zero pages, is {zero_share:.2}");
    let digest = sha256_digest(&image);

    // First push: chunked PATCHes of 8 MiB.
    let d1 = r.push_blob_chunked("dedup/first", &image, 8 << 20).await;
    assert_eq!(d1, digest);
    let after_first = chunk_bytes(&storage);
    assert!(after_first > 0, "chunks/ holds the first push");
    assert!(
        after_first < (FILE_SIZE as u64) * 7 / 10,
        "zero pages are not stored and text compresses: chunks/ holds {after_first} bytes \
         for a {FILE_SIZE}-byte file that is ~40% zero"
    );

    // Second push of the same bytes to another repository: one monolithic PUT.
    let d2 = r.push_blob("dedup/second", &image).await;
    assert_eq!(d2, digest);
    let after_second = chunk_bytes(&storage);
    assert_eq!(after_second, after_first, "pushing identical content again must not add chunk bytes");

    for name in ["dedup/first", "dedup/second"] {
        let (got, len) = r.get_blob_digest(name, &digest).await;
        assert_eq!(len, FILE_SIZE as u64, "length read back from {name}");
        assert_eq!(got, digest, "bytes read back from {name}");
    }

    // A copy with a few scattered pages rewritten.
    let mut edited = image.clone();
    let mut rng = Rng::new(99);
    let pages = FILE_SIZE / PAGE;
    let changed: Vec<usize> = (0..8).map(|i| i * (pages / 8) + 1234).collect();
    for &p in &changed {
        rng.fill(&mut edited[p * PAGE..(p + 1) * PAGE]);
    }
    let d3 = r.push_blob_chunked("dedup/edited", &edited, 8 << 20).await;
    assert_ne!(d3, digest);
    let growth = chunk_bytes(&storage) - after_second;
    let bound = changed.len() as u64 * 3 * MAX_CHUNK;
    assert!(growth > 0, "changed pages must produce new chunks");
    assert!(
        growth <= bound,
        "editing {} pages added {growth} chunk bytes; at most {bound} expected \
         (only chunks around changed pages are new)",
        changed.len()
    );
    println!(
        "dedup: file {FILE_SIZE} B ({:.0}% zero pages); chunks/ after first push {after_first} B, \
         after identical second push {after_second} B, growth for {} edited pages {growth} B \
         (bound {bound} B)",
        zero_share * 100.0,
        changed.len()
    );
    let (got, _) = r.get_blob_digest("dedup/edited", &d3).await;
    assert_eq!(got, d3);
    // The original is untouched by the edit.
    let (got, _) = r.get_blob_digest("dedup/first", &digest).await;
    assert_eq!(got, digest);
    r.shutdown().await;
}
