//! Issue 18, CPU amplification at commit, against the real `thaw-registry` binary: a `_thaw`
//! commit whose recipe is not the stored one makes the registry hash every byte the recipe
//! declares, and a small recipe can declare gigabytes. The registry refuses, before hashing,
//! a recipe that repeats its chunks far past what real files do, and runs whole-blob
//! verifications in slots capped per client and in total, so an attacker's commits cannot
//! take the cores (or the slots) honest commits need.
//!
//! That work was not done is shown by the registry's own CPU time (`/proc/<pid>/stat`,
//! user + system of all its threads), which a loaded machine does not inflate, against
//! what hashing the declared bytes costs: no wall-clock time is asserted.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use reqwest::{Client, StatusCode};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// The largest chunk the format allows (4 MiB).
const MAX_CHUNK: u32 = 4 << 20;

/// CPU seconds (user + system, every thread) the process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm field") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().expect("run getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK is a number")
}

/// CPU seconds this thread takes to SHA-256 `bytes` bytes: what the registry would spend
/// per byte it verifies (both use the `sha2` crate).
fn local_sha256_seconds(bytes: u64) -> f64 {
    let block = vec![0x5au8; MIB as usize];
    let thread_cpu = || {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("read schedstat");
        s.split_whitespace().next().expect("run time").parse::<u64>().expect("nanoseconds") as f64 / 1e9
    };
    let start = thread_cpu();
    let mut h = Sha256::new();
    for _ in 0..bytes / MIB {
        h.update(&block);
    }
    std::hint::black_box(h.finalize());
    thread_cpu() - start
}

/// A 4 MiB chunk that zstd shrinks to a few hundred bytes; `tag` makes it distinct.
fn compressible_chunk(tag: u64) -> Vec<u8> {
    let mut data = vec![b'a'; MAX_CHUNK as usize];
    data[..8].copy_from_slice(&tag.to_le_bytes());
    data
}

fn fixed_header(sha256: [u8; 32], size: u64, chunk: u32) -> RecipeHeader {
    RecipeHeader { sha256, size, kind: 0, min: chunk, avg: chunk, max: chunk }
}

/// A client bound to `source` (a loopback address) as its TCP source address.
fn client_from(source: IpAddr) -> Client {
    Client::builder()
        .no_proxy()
        .local_address(source)
        .timeout(Duration::from_secs(600))
        .build()
        .expect("build client")
}

async fn start(dir: &tempfile::TempDir, env: &[(&str, String)]) -> BinRegistry {
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).expect("storage dir");
    BinRegistry::start_with(storage.as_os_str(), &dir.path().join("registry.log"), env).await
}

async fn post_batch(c: &Client, reg: &BinRegistry, repo: &str, body: Vec<u8>) {
    let resp = c
        .post(format!("{}/v2/{repo}/_thaw/chunks", reg.base))
        .header("content-type", CHUNKS_TYPE)
        .body(body)
        .send()
        .await
        .expect("POST chunk batch");
    assert_eq!(resp.status(), StatusCode::OK, "chunk batch: {}", body_text(resp).await);
}

async fn commit(
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

async fn get_blob(c: &Client, reg: &BinRegistry, repo: &str, digest: &str) -> Vec<u8> {
    let resp = c.get(format!("{}/v2/{repo}/blobs/{digest}", reg.base)).send().await.expect("GET blob");
    assert_eq!(resp.status(), StatusCode::OK, "GET {repo}@{digest}");
    resp.bytes().await.expect("blob body").to_vec()
}

/// Pushes `blob` through `_thaw` in fixed `chunk`-byte chunks and checks it reads back.
async fn push_and_pull(c: &Client, reg: &BinRegistry, repo: &str, blob: &[u8], chunk: u32) -> String {
    let fixed = fixed_chunked(blob, chunk);
    post_batch(c, reg, repo, chunk_batch(&fixed.entries)).await;
    let resp = commit(c, reg, repo, &fixed.digest, fixed.recipe.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "honest commit: {}", body_text(resp).await);
    assert!(get_blob(c, reg, repo, &fixed.digest).await == blob, "{repo}@{} reads back", fixed.digest);
    fixed.digest
}

/// The reported attack: a ~75 KB recipe naming one stored, highly compressible 4 MiB chunk
/// 2,048 times (8 GiB to hash). The old registry hashed all of it (~10 s of CPU) and then
/// answered 400 `DIGEST_INVALID`; now it is refused from the recipe alone.
#[tokio::test]
async fn a_recipe_repeating_one_chunk_thousands_of_times_is_refused_before_hashing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reg = start(&dir, &[]).await;
    let c = client();
    let repo = "tenant/repeat";
    let chunk = compressible_chunk(1);
    let entry = encode_chunk(&chunk);
    post_batch(&c, &reg, repo, chunk_batch(std::slice::from_ref(&entry))).await;

    let repeats = 2048u32;
    let entries = vec![RecipeEntry::Data { len: MAX_CHUNK, id: entry.id }; repeats as usize];
    let size = u64::from(repeats) * u64::from(MAX_CHUNK);
    let claimed: [u8; 32] = Sha256::digest(b"not the blob").into();
    let digest = format!("sha256:{}", hex::encode(claimed));
    let recipe = recipe_bytes(&fixed_header(claimed, size, MAX_CHUNK), &entries);
    assert!(recipe.len() < 80_000, "a small request: {} bytes", recipe.len());

    let pid = reg.child.id();
    let before = cpu_seconds(pid);
    let resp = commit(&c, &reg, repo, &digest, recipe).await;
    let body =
        expect_error(resp, 400, &["BLOB_UPLOAD_INVALID"], "a recipe naming one chunk 2,048 times").await;
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("--max-chunk-repeat"), "the refusal names the setting: {text}");
    let spent = cpu_seconds(pid) - before;
    // Hashing the declared 8 GiB would cost the registry at least what hashing 1 GiB costs
    // this test, 8 times over; a refusal from the recipe costs next to nothing.
    let one_gib = 4.0 * local_sha256_seconds(256 * MIB);
    eprintln!("registry CPU for the refusal: {spent:.2} s; hashing 1 GiB here: {one_gib:.2} s");
    assert!(
        spent < one_gib.max(0.5),
        "refusing an 8 GiB recipe cost the registry {spent:.2} s of CPU, more than hashing 1 GiB ({one_gib:.2} s): it hashed"
    );
    let log = std::fs::read_to_string(dir.path().join("registry.log")).expect("registry log");
    assert!(!log.contains("verified a recipe by hashing"), "nothing was hashed:\n{log}");

    // A chunk is one length: a recipe declaring two lengths for one chunk is refused from
    // the recipe too (hashing would only find it out at that entry).
    let lie =
        [RecipeEntry::Data { len: MAX_CHUNK, id: entry.id }, RecipeEntry::Data { len: 4096, id: entry.id }];
    let size = u64::from(MAX_CHUNK) + 4096;
    let recipe = recipe_bytes(&fixed_header(claimed, size, MAX_CHUNK), &lie);
    let resp = commit(&c, &reg, repo, &digest, recipe).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "a chunk declared with two lengths").await;

    // Honest repetition stays well inside the bound: a blob that is the same chunk 16
    // times over commits and reads back whole.
    let blob = chunk.repeat(16);
    push_and_pull(&c, &reg, repo, &blob, MAX_CHUNK).await;
    let log = std::fs::read_to_string(dir.path().join("registry.log")).expect("registry log");
    assert!(log.contains("verified a recipe by hashing"), "the honest commit was verified:\n{log}");
}

/// Zero runs are not bounded by the repetition rule (sparse disks are mostly zeros), and
/// they cost SHA-256 like data: an attacker can ask for tens of GiB of hashing with a
/// 160 KB recipe naming no stored chunk at all. Verifications run in slots, one per client
/// here and two in all: the attacker's second and third commit wait, then get 503 with
/// `Retry-After`, while its first hashes; an honest client from another address commits
/// and pulls meanwhile. The old registry hashed every commit at once, as many as sent.
#[tokio::test]
async fn an_attacker_gets_one_verification_slot_and_honest_commits_keep_theirs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = [
        ("THAW_MAX_VERIFICATIONS", "2".to_owned()),
        ("THAW_MAX_VERIFICATIONS_PER_CLIENT", "1".to_owned()),
        ("THAW_VERIFY_WAIT", "2s".to_owned()),
    ];
    let reg = start(&dir, &env).await;
    let honest = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    let attacker = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let mut rng = Rng::new(18);
    let before_attack = rng.bytes(3 * MIB as usize);
    let pulled_later = push_and_pull(&honest, &reg, "honest/app", &before_attack, 1 << 20).await;

    // 32,768 zero runs of 4 MiB: 128 GiB to hash, far more than the test lasts.
    let runs = 32_768u32;
    let size = u64::from(runs) * u64::from(MAX_CHUNK);
    let zeros = vec![RecipeEntry::Zero { len: MAX_CHUNK }; runs as usize];
    let mut attacks = FuturesUnordered::new();
    let mut recipes = Vec::new();
    for n in 0..3u8 {
        let claimed: [u8; 32] = Sha256::digest([n]).into();
        let digest = format!("sha256:{}", hex::encode(claimed));
        recipes.push((digest, recipe_bytes(&fixed_header(claimed, size, MAX_CHUNK), &zeros)));
    }
    assert!(recipes[0].1.len() < 200_000, "a small request: {} bytes", recipes[0].1.len());
    for (n, (digest, recipe)) in recipes.into_iter().enumerate() {
        let (attacker, base) = (attacker.clone(), reg.base.clone());
        attacks.push(tokio::spawn(async move {
            let resp = attacker
                .put(format!("{base}/v2/mallory/zeros/_thaw/blobs/{digest}"))
                .header("content-type", RECIPE_TYPE)
                .body(recipe)
                .send()
                .await
                .expect("attacker PUT");
            (n, resp)
        }));
        // In order, so the first takes the slot.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Two are refused once they have waited their 2 s; generous deadline for a slow machine,
    // far below what hashing 128 GiB takes.
    for _ in 0..2 {
        let (n, resp) = tokio::time::timeout(Duration::from_secs(60), attacks.next())
            .await
            .expect("the attacker's commits past its cap were not refused: they were all being hashed")
            .expect("an attack")
            .expect("attack task");
        assert!(resp.headers().contains_key("retry-after"), "commit {n}: a 503 says when to retry");
        expect_error(resp, 503, &["UNAVAILABLE"], "an attacker's commit past its verification cap").await;
    }
    assert_eq!(attacks.len(), 1);
    assert!(attacks.iter().all(|a| !a.is_finished()), "one attacking commit is still being hashed");

    // While it hashes, the honest client commits a new blob (the second slot) and pulls.
    let blob = rng.bytes(5 * MIB as usize);
    push_and_pull(&honest, &reg, "honest/app", &blob, 1 << 20).await;
    assert!(get_blob(&honest, &reg, "honest/app", &pulled_later).await == before_attack);
    assert!(
        attacks.iter().all(|a| !a.is_finished()),
        "the attacker's first commit was still hashing all along"
    );
    let log = std::fs::read_to_string(dir.path().join("registry.log")).expect("registry log");
    assert!(
        !log.contains(&format!("zero_bytes={size}")),
        "no 128 GiB verification finished during the test:\n{log}"
    );
    // The attacker hangs up: its verification ends with its connection, and the slot it
    // held serves the next commit from its address (a blob pushed honestly from there),
    // where a verification left running would hold it for minutes.
    for attack in attacks.iter() {
        attack.abort();
    }
    drop(attacks);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let small = rng.bytes(MIB as usize);
    let fixed = fixed_chunked(&small, 1 << 20);
    post_batch(&attacker, &reg, "mallory/zeros", chunk_batch(&fixed.entries)).await;
    loop {
        let resp = commit(&attacker, &reg, "mallory/zeros", &fixed.digest, fixed.recipe.clone()).await;
        if resp.status() == StatusCode::CREATED {
            break;
        }
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{}", body_text(resp).await);
        assert!(std::time::Instant::now() < deadline, "the hung-up verification kept its slot");
    }
}
