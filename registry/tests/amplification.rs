//! Issue 18, findings 3 and 5, against the real `thaw-registry` binary: small requests must
//! not make the registry decode, buffer or keep more than its configured limits allow.
//!
//! Memory is measured as the growth of the registry's peak resident set (`VmHWM` in
//! `/proc/<pid>/status`) across the hostile requests, and bounded by a figure derived from
//! the limits the registry documents (docs/API.md, "Limits"), not by the size of the
//! blobs the requests name.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Client, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// The largest chunk the format allows (4 MiB).
const MAX_CHUNK: u32 = 4 << 20;

/// What one reading request may hold (docs/API.md, "Limits"): the chunk reader keeps up to
/// 2 windows in flight, each with at most 16 MiB of distinct uncompressed chunks decoded
/// and 16 MiB of frames plus 16 MiB of gap bytes fetched, and one finished window being
/// consumed; hashing a commit adds one 16 MiB batch, which may pin one more chunk.
const READER_BOUND: u64 = 3 * 16 * MIB + 2 * (16 * MIB + 16 * MIB) + 16 * MIB + 4 * MIB;
/// Allocator and runtime slack on top of a request's own buffers (thread stacks, arenas).
const SLACK: u64 = 64 * MIB;

/// The registry's peak resident set so far, from `/proc/<pid>/status`.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kib: u64 = line.split_whitespace().nth(1).expect("VmHWM value").parse().expect("VmHWM number");
    kib * 1024
}

/// A 4 MiB chunk that zstd shrinks to a few hundred bytes; `tag` makes it distinct.
fn compressible_chunk(tag: u64) -> Vec<u8> {
    let mut data = vec![b'a'; MAX_CHUNK as usize];
    data[..8].copy_from_slice(&tag.to_le_bytes());
    data
}

async fn start(dir: &tempfile::TempDir, env: &[(&str, String)]) -> BinRegistry {
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).expect("storage dir");
    BinRegistry::start_with(storage.as_os_str(), &dir.path().join("registry.log"), env).await
}

async fn post_batch(c: &Client, reg: &BinRegistry, repo: &str, body: Vec<u8>) -> reqwest::Response {
    c.post(format!("{}/v2/{repo}/_thaw/chunks", reg.base))
        .header("content-type", CHUNKS_TYPE)
        .body(body)
        .send()
        .await
        .expect("POST chunk batch")
}

async fn put_recipe(
    c: &Client,
    reg: &BinRegistry,
    repo: &str,
    digest: &str,
    recipe: Vec<u8>,
) -> reqwest::Response {
    c.put(format!("{}/v2/{repo}/_thaw/blobs/{digest}", reg.base))
        .header("content-type", RECIPE_TYPE)
        .body(recipe)
        .send()
        .await
        .expect("PUT recipe")
}

fn fixed_4mib_header(sha256: [u8; 32], size: u64) -> RecipeHeader {
    RecipeHeader { sha256, size, kind: 0, min: MAX_CHUNK, avg: MAX_CHUNK, max: MAX_CHUNK }
}

/// The reported attack: a small recipe naming one highly compressible 4 MiB chunk hundreds
/// of times. The old registry decoded every occurrence of a read window at once (1 GiB
/// here) before answering; now each distinct chunk of a window is decoded once and the blob
/// is hashed as it streams, so the refusal costs a bounded amount of memory.
#[tokio::test]
async fn a_recipe_repeating_one_compressible_chunk_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 256 repeats are within the repetition bound (commit_work.rs refuses more), so the
    // recipe is hashed: this test is about the memory that takes.
    let reg = start(&dir, &[("THAW_MAX_CHUNK_REPEAT", "256".to_owned())]).await;
    let c = client();
    let repo = "tenant/amplify";
    let chunk = compressible_chunk(1);
    let entry = encode_chunk(&chunk);
    assert!(entry.payload.len() < 4096, "the chunk must compress well, got {} bytes", entry.payload.len());
    let resp = post_batch(&c, &reg, repo, chunk_batch(std::slice::from_ref(&entry))).await;
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);

    let repeats = 256u32;
    let entries = vec![RecipeEntry::Data { len: MAX_CHUNK, id: entry.id }; repeats as usize];
    let size = u64::from(repeats) * u64::from(MAX_CHUNK);
    // A digest the chunks do not add up to, as in the report.
    let claimed: [u8; 32] = Sha256::digest(b"not the blob").into();
    let digest = format!("sha256:{}", hex::encode(claimed));
    let recipe = recipe_bytes(&fixed_4mib_header(claimed, size), &entries);
    assert!(recipe.len() < 16 * 1024, "a small request: {} bytes", recipe.len());

    let pid = reg.child.id();
    let before = peak_rss(pid);
    let resp = put_recipe(&c, &reg, repo, &digest, recipe).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "a recipe whose chunks reassemble to another digest").await;
    let grew = peak_rss(pid).saturating_sub(before);
    assert!(
        grew <= READER_BOUND + SLACK,
        "a {}-byte recipe declaring {} MiB raised the registry's peak RSS by {} MiB (bound {} MiB)",
        entries.len() * 37,
        size / MIB,
        grew / MIB,
        (READER_BOUND + SLACK) / MIB
    );
    eprintln!("peak RSS growth for the repeated-chunk recipe: {} MiB", grew / MIB);

    // A recipe declaring another length for a stored chunk is the client's lie: refused
    // from the frame header, before anything is decompressed (the old code decoded the
    // chunk, then answered 500 as if storage were corrupt).
    let lie = vec![RecipeEntry::Data { len: 4096, id: entry.id }];
    let header = RecipeHeader { sha256: claimed, size: 4096, kind: 0, min: 4096, avg: 4096, max: 4096 };
    let resp = put_recipe(&c, &reg, repo, &digest, recipe_bytes(&header, &lie)).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "a recipe lying about a chunk's length").await;
}

/// A batch whose frames are small but declare more uncompressed bytes than a batch may
/// carry is refused from its headers, and a chunk named twice in one batch is refused:
/// the old registry decompressed every one (here 320 MiB) and stored them.
#[tokio::test]
async fn a_batch_declaring_too_many_uncompressed_bytes_is_refused_undecoded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reg = start(&dir, &[]).await;
    let c = client();
    let repo = "tenant/batch";
    let entries: Vec<BatchEntry> = (0..80).map(|i| encode_chunk(&compressible_chunk(i))).collect();
    let body = chunk_batch(&entries);
    assert!(body.len() < MIB as usize, "a small body: {} bytes", body.len());

    let pid = reg.child.id();
    let before = peak_rss(pid);
    let resp = post_batch(&c, &reg, repo, body).await;
    expect_error(resp, 413, &["SIZE_INVALID"], "a batch of 320 MiB uncompressed").await;
    let grew = peak_rss(pid).saturating_sub(before);
    assert!(grew <= 2 * MIB + SLACK, "refusing the batch raised peak RSS by {} MiB", grew / MIB);

    // Nothing of the refused batch was stored.
    let ids: Vec<String> =
        entries.iter().map(|e| blake3::Hash::from_bytes(e.id).to_hex().to_string()).collect();
    let resp = c
        .post(format!("{}/v2/{repo}/_thaw/chunks/missing", reg.base))
        .json(&json!({ "chunks": ids }))
        .send()
        .await
        .expect("missing query");
    assert_eq!(resp.status(), StatusCode::OK);
    let missing: serde_json::Value = resp.json().await.expect("missing answer");
    assert_eq!(missing["missing"].as_array().map(Vec::len), Some(80), "{missing}");

    // The same chunk twice in one batch.
    let twice = chunk_batch(&[entries[0].clone(), entries[0].clone()]);
    let resp = post_batch(&c, &reg, repo, twice).await;
    expect_error(resp, 400, &["BLOB_UPLOAD_INVALID"], "a batch naming a chunk twice").await;
}

/// A chunk fetch may not name a chunk twice (each would be sent again, a small query
/// making the registry send gigabytes).
#[tokio::test]
async fn a_fetch_naming_a_chunk_twice_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reg = start(&dir, &[]).await;
    let c = client();
    let repo = "tenant/fetch";
    let data = compressible_chunk(7);
    let blob: Vec<u8> = data.clone();
    let fixed = fixed_chunked(&blob, MAX_CHUNK);
    let resp = post_batch(&c, &reg, repo, chunk_batch(&fixed.entries)).await;
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    let resp = put_recipe(&c, &reg, repo, &fixed.digest, fixed.recipe.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);

    let id = blake3::Hash::from_bytes(fixed.entries[0].id).to_hex().to_string();
    let fetch = |ids: Vec<String>| {
        c.post(format!("{}/v2/{repo}/_thaw/chunks/fetch", reg.base))
            .json(&json!({ "blob": fixed.digest, "chunks": ids }))
            .send()
    };
    let resp = fetch(vec![id.clone()]).await.expect("fetch once");
    assert_eq!(resp.status(), StatusCode::OK);
    let once = resp.bytes().await.expect("fetch body");
    assert!(once.len() > 8 + 41, "one frame came back");
    let resp = fetch(vec![id; 1000]).await.expect("fetch many");
    expect_error(resp, 400, &["UNSUPPORTED"], "a fetch naming one chunk 1000 times").await;

    // The blob still reads back whole (the reader streams it from the shared recipe).
    assert_eq!(reg_get(&c, &reg, repo, &fixed.digest).await, blob);
}

async fn reg_get(c: &Client, reg: &BinRegistry, repo: &str, digest: &str) -> Vec<u8> {
    let resp = c.get(format!("{}/v2/{repo}/blobs/{digest}", reg.base)).send().await.expect("GET blob");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.expect("blob body").to_vec()
}

/// A client bound to `source` (a loopback address) as its TCP source address.
fn client_from(source: IpAddr) -> Client {
    Client::builder().no_proxy().local_address(source).build().expect("build client")
}

async fn open_session(c: &Client, reg: &BinRegistry, repo: &str) -> reqwest::Response {
    c.post(format!("{}/v2/{repo}/blobs/uploads/", reg.base))
        .header("content-length", "0")
        .send()
        .await
        .expect("POST upload")
}

/// Upload sessions are capped per client address and in total; past a cap the answer is
/// 429 `TOOMANYREQUESTS`, and another client still gets a session while the first is at
/// its cap. The old registry opened sessions without limit.
#[tokio::test]
async fn upload_sessions_are_capped_per_client_and_in_total() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = [
        ("THAW_MAX_UPLOAD_SESSIONS_PER_CLIENT", "4".to_owned()),
        ("THAW_MAX_UPLOAD_SESSIONS", "6".to_owned()),
    ];
    let reg = start(&dir, &env).await;
    let a = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    let b = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));

    let mut a_sessions = Vec::new();
    for i in 0..4 {
        let resp = open_session(&a, &reg, "tenant/a").await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "session {i} of client a");
        a_sessions.push(reg_resolve(&reg, &location(&resp).expect("Location")));
    }
    let resp = open_session(&a, &reg, "tenant/a").await;
    assert!(resp.headers().contains_key("retry-after"), "a 429 says when to retry");
    expect_error(resp, 429, &["TOOMANYREQUESTS"], "client a's fifth session").await;

    // Another client is not held back by a's sessions.
    for i in 0..2 {
        let resp = open_session(&b, &reg, "tenant/b").await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "session {i} of client b");
    }
    // Six open in total: the process-wide cap refuses b too.
    let resp = open_session(&b, &reg, "tenant/b").await;
    expect_error(resp, 429, &["TOOMANYREQUESTS"], "a session past the total cap").await;

    // Ending a session frees its place.
    let resp = a.delete(&a_sessions[0]).send().await.expect("DELETE session");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = open_session(&a, &reg, "tenant/a").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "a session after one was cancelled");
}

fn reg_resolve(reg: &BinRegistry, location: &str) -> String {
    resolve(&reg.base, location)
}

/// Idle sessions end on their own clock, with GC off (its default), and their spool files
/// go with them. The old registry expired sessions only inside GC runs.
#[tokio::test]
async fn idle_upload_sessions_expire_without_gc() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reg = start(&dir, &[("THAW_UPLOAD_MAX_AGE", "1s".to_owned())]).await;
    let c = client();
    let resp = open_session(&c, &reg, "tenant/idle").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = reg_resolve(&reg, &location(&resp).expect("Location"));
    let resp = c
        .patch(&url)
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 100_000])
        .send()
        .await
        .expect("PATCH");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let spool = dir.path().join("storage").join("_uploads");
    assert_eq!(list_files(&spool).len(), 1, "the session spools to one file");

    // Poll (the registry checks a few times per max age); no timing is asserted beyond
    // "eventually", with a deadline far above the configured second.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = c.get(&url).send().await.expect("GET session");
        if resp.status() == StatusCode::NOT_FOUND {
            expect_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"], "an expired session").await;
            break;
        }
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "a live session answers 204");
        assert!(Instant::now() < deadline, "an idle session was never expired");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Its spool file is deleted with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list_files(&spool).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the expired session's spool file stayed: {:?}",
            list_files(&spool)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
