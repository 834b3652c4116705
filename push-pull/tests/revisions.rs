//! Revision 2 of a snapshot differs from revision 1 in a small part. Its push must send (with
//! revision 1 as its base or without one), and its pull with revision 1 as a seed must fetch,
//! at most 1.1x the compressed size of the chunks revision 2 adds — counting every body byte
//! on the wire (queries, recipes, manifests and batch framing included).

mod common;

use std::collections::HashSet;

use common::*;
use thaw_client::tuning::{chunker_for, ZSTD_LEVEL};
use thaw_client::{PullOptions, PushOptions, Reference};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::media::FileRole;
use thaw_schema::ChunkId;

const MEMORY_PAGES: usize = 16 * 1024; // 64 MiB
const DISK_BLOCKS: usize = 8 * 1024; // 32 MiB

fn roles() -> [(&'static str, FileRole); 4] {
    [
        ("memory", FileRole::Memory),
        ("vmstate", FileRole::Vmstate),
        ("disk.ext4", FileRole::Disk),
        ("info.json", FileRole::Info),
    ]
}

/// Chunk ids of a snapshot's files, each cut with the chunker its role gets.
fn chunk_ids(data: &SnapshotData) -> HashSet<ChunkId> {
    let mut ids = HashSet::new();
    for ((_, bytes), (_, role)) in data.files().iter().zip(roles()) {
        for c in chunker_for(Some(role)).chunks(*bytes).unwrap() {
            let c = c.unwrap();
            if !c.is_zero() {
                ids.insert(ChunkId::of(&c.data));
            }
        }
    }
    ids
}

/// Compressed bytes of the distinct chunks of `data` not in `known`.
fn added_compressed_bytes(data: &SnapshotData, known: &HashSet<ChunkId>) -> (u64, usize) {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for ((_, bytes), (_, role)) in data.files().iter().zip(roles()) {
        for c in chunker_for(Some(role)).chunks(*bytes).unwrap() {
            let c = c.unwrap();
            if c.is_zero() {
                continue;
            }
            let id = ChunkId::of(&c.data);
            if !known.contains(&id) && seen.insert(id) {
                total += EncodedChunk::compress(&c.data, ZSTD_LEVEL).payload.len() as u64;
            }
        }
    }
    (total, seen.len())
}

/// Revision 2: a 1 MiB heap region rewritten, 24 scattered pages dirtied, a new vmstate, a
/// few disk blocks changed, a new info file.
fn revision_2(rev1: &SnapshotData) -> SnapshotData {
    let mut rng = Rng::new(0xbeef);
    let mut memory = rev1.memory.clone();
    let heap = 9000 * PAGE;
    for p in 0..256 {
        let page = &mut memory[heap + p * PAGE..heap + (p + 1) * PAGE];
        if p % 3 == 0 {
            rng.fill(page);
        } else {
            page.copy_from_slice(&text_page(50_000 + p as u64));
        }
    }
    for _ in 0..24 {
        let p = rng.below(MEMORY_PAGES as u64) as usize;
        let at = p * PAGE + rng.below(PAGE as u64 - 64) as usize;
        rng.fill(&mut memory[at..at + 64]);
    }
    let mut vmstate = rev1.vmstate.clone();
    rng.fill(&mut vmstate);
    let mut disk = rev1.disk.clone();
    for b in [10, 4000, 7000] {
        disk[b * PAGE..(b + 1) * PAGE].copy_from_slice(&text_page(90_000 + b as u64));
    }
    let info = String::from_utf8(rev1.info.clone()).unwrap().replace("hello-", "hello-rev2-").into_bytes();
    SnapshotData { memory, vmstate, disk, info }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_2_sends_and_fetches_little_more_than_its_new_chunks() {
    let work = tempfile::tempdir().unwrap();
    let rev1 = SnapshotData::new(MEMORY_PAGES, DISK_BLOCKS, 21);
    let rev2 = revision_2(&rev1);
    let (dir1, dir2) = (work.path().join("rev1"), work.path().join("rev2"));
    rev1.write(&dir1);
    rev2.write(&dir2);
    let (added, added_chunks) = added_compressed_bytes(&rev2, &chunk_ids(&rev1));

    // Pushed with revision 1 as the base, as a function's next revision is.
    let registry = ThawRegistry::start().await;
    let r1 = Reference::parse(&format!("{}/functions/hello:rev-1", registry.host())).unwrap();
    let r2 = Reference::parse(&format!("{}/functions/hello:rev-2", registry.host())).unwrap();
    let thaw = client_for(&r1);
    let push1 = thaw_client::push_dir(&thaw, &r1, &dir1, &PushOptions::default()).await.unwrap();
    let based = PushOptions { base: Some(r1.clone()), ..Default::default() };
    let push2 = thaw_client::push_dir(&thaw, &r2, &dir2, &based).await.unwrap();

    let pulled1 = work.path().join("node/rev1");
    let pull1 = thaw_client::pull(&thaw, &r1, &pulled1, &PullOptions::default()).await.unwrap();
    assert_same_files(&rev1, &pulled1);
    let pulled2 = work.path().join("node/rev2");
    let options = PullOptions { seeds: vec![pulled1.clone()], ..Default::default() };
    let pull2 = thaw_client::pull(&thaw, &r2, &pulled2, &options).await.unwrap();
    assert_same_files(&rev2, &pulled2);

    // The same two pushes into a fresh registry, revision 2 without a base: every chunk id
    // of revision 2 is then asked about, in the binary query (32 bytes each; JSON took 67).
    let plain = ThawRegistry::start().await;
    let p1 = Reference::parse(&format!("{}/functions/hello:rev-1", plain.host())).unwrap();
    let p2 = Reference::parse(&format!("{}/functions/hello:rev-2", plain.host())).unwrap();
    let plain_client = client_for(&p1);
    thaw_client::push_dir(&plain_client, &p1, &dir1, &PushOptions::default()).await.unwrap();
    let unbased = thaw_client::push_dir(&plain_client, &p2, &dir2, &PushOptions::default()).await.unwrap();

    eprintln!(
        "rev 1: {} MiB of files; push sent {} B, pull received {} B",
        (rev1.memory.len() + rev1.disk.len()) >> 20,
        push1.stats.bytes_sent,
        pull1.stats.bytes_received
    );
    eprintln!(
        "rev 2 adds {added_chunks} chunks, {added} B compressed; push with base sent {} B ({:.3}x) and \
         received {} B; without base sent {} B ({:.3}x); pull with seed received {} B ({:.3}x), \
         sent {} B, {} chunks local",
        push2.stats.bytes_sent,
        push2.stats.bytes_sent as f64 / added as f64,
        push2.stats.bytes_received,
        unbased.stats.bytes_sent,
        unbased.stats.bytes_sent as f64 / added as f64,
        pull2.stats.bytes_received,
        pull2.stats.bytes_received as f64 / added as f64,
        pull2.stats.bytes_sent,
        pull2.stats.chunks_local
    );
    for (what, sent) in
        [("push 2", push2.stats.chunks_transferred), ("unbased push 2", unbased.stats.chunks_transferred)]
    {
        assert_eq!(sent as usize, added_chunks, "{what} sent exactly the new chunks");
    }
    assert_eq!(
        pull2.stats.chunks_transferred as usize, added_chunks,
        "pull 2 fetched exactly the new chunks"
    );
    assert!(
        push2.stats.bytes_sent as f64 <= 1.1 * added as f64,
        "push of rev 2 sent {} B for {added} B of new compressed chunks",
        push2.stats.bytes_sent
    );
    assert!(
        pull2.stats.bytes_received as f64 <= 1.1 * added as f64,
        "pull of rev 2 received {} B for {added} B of new compressed chunks",
        pull2.stats.bytes_received
    );
    // Without a base, the metadata (a binary missing-chunks query entry and a recipe entry
    // per chunk, 69 bytes per 64 KiB chunk) comes on top, and still fits in the 10%.
    assert!(
        unbased.stats.bytes_sent as f64 <= 1.1 * added as f64,
        "push of rev 2 without a base sent {} B for {added} B of new compressed chunks",
        unbased.stats.bytes_sent
    );
    // Revision 1 itself went up compressed, without its zero pages.
    let raw1 = (rev1.memory.len() + rev1.disk.len()) as u64;
    assert!(
        push1.stats.bytes_sent < raw1 / 2,
        "rev 1 push sent {} of {raw1} raw bytes",
        push1.stats.bytes_sent
    );
}
