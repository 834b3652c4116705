//! End to end: a `thaw-registry` process and real `thaw-node-cache` processes on loopback.
//!
//! Cold and warm ensure, a second revision that fetches only the chunks it does not share,
//! eviction order under a small capacity, leases blocking eviction, concurrent ensures
//! fetching once, holdings in the registry's node directory, and damaged cached files.

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use serde_json::json;
use support::{
    assert_files, bytes_from, new_chunk_bytes, push, recipes, revision, NodeCache, RegistryProcess,
    SnapshotData,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_warm_and_second_revision_fetch_only_what_they_lack() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/hello:v1", SnapshotData::new(4096, 512, 1)).await;
    let v2 = push(&host, "fn/hello:v2", revision(&v1.data, 8, 2)).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = NodeCache::start(&host, dirs.0.path(), 1 << 30, "node-a").await;
    let b = NodeCache::start(&host, dirs.1.path(), 1 << 30, "node-b").await;

    // Cold: everything non-zero comes from the registry, nothing locally.
    let cold = a.ensure(&v1.reference).await;
    assert_eq!(cold["hit"], false);
    assert_files(&cold, &v1.data);
    let r1 = recipes(&v1.reference).await;
    let all_v1 = new_chunk_bytes(&[], &r1);
    assert_eq!(bytes_from(&cold, "registry"), all_v1, "{cold}");
    let memory = std::fs::metadata(cold["files"]["memory"].as_str().unwrap()).unwrap();
    assert!(
        memory.blocks() * 512 < memory.len() * 3 / 4,
        "the memory file is not sparse: {} of {} bytes allocated",
        memory.blocks() * 512,
        memory.len()
    );

    // Warm: a hit, no bytes moved, a private disk copy per lease.
    let warm = a.ensure(&v1.reference).await;
    assert_eq!(warm["hit"], true);
    assert_eq!(warm["bytes"], json!({"local": 0, "peers": 0, "registry": 0}));
    assert_eq!(warm["files"]["memory"], cold["files"]["memory"]);
    assert_ne!(warm["files"]["disk"], cold["files"]["disk"], "each lease gets its own disk copy");
    assert_files(&warm, &v1.data);
    std::fs::write(warm["files"]["disk"].as_str().unwrap(), b"the VM wrote here").unwrap();
    let again = a.ensure(&v1.reference).await;
    assert_files(&again, &v1.data);

    // Revision 2 on the node holding revision 1: only the chunks v1 lacks leave the registry.
    let r2 = recipes(&v2.reference).await;
    let expected = new_chunk_bytes(&r1, &r2);
    let second = a.ensure(&v2.reference).await;
    assert_eq!(second["hit"], false);
    assert_files(&second, &v2.data);
    assert_eq!(bytes_from(&second, "registry"), expected, "{second}");
    assert!(bytes_from(&second, "local") > 4 * expected, "{second}");
    eprintln!(
        "revision 2: {} bytes from the registry (its new chunks: {expected}), {} copied locally; cold v1: {all_v1}",
        bytes_from(&second, "registry"),
        bytes_from(&second, "local")
    );

    // The other node is cold for revision 2: it fetches all of it.
    let cold_b = b.ensure(&v2.reference).await;
    assert_eq!(bytes_from(&cold_b, "registry"), new_chunk_bytes(&[], &r2));
    assert_files(&cold_b, &v2.data);

    // Both nodes' holdings reach the registry's node directory.
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let directory = loop {
        let r = http.get(format!("http://{host}/v2/_thaw/nodes")).send().await.unwrap();
        if r.status().is_success() {
            let d: serde_json::Value = r.json().await.unwrap();
            let held = |node: &str| {
                d["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["node"] == node)
                    .map_or(0, |n| n["snapshots"].as_array().unwrap().len())
            };
            if held("node-a") == 2 && held("node-b") == 1 {
                break d;
            }
        }
        assert!(std::time::Instant::now() < deadline, "holdings never reached the registry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node_a = directory["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "node-a").unwrap();
    let digests: Vec<&str> =
        node_a["snapshots"].as_array().unwrap().iter().map(|s| s["digest"].as_str().unwrap()).collect();
    assert!(
        digests.contains(&cold["digest"].as_str().unwrap())
            && digests.contains(&second["digest"].as_str().unwrap())
    );
    assert_eq!(node_a["capacityBytes"], 1u64 << 30);

    // The metrics say the same.
    let metrics = http.get(a.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("thaw_cache_ensure_total{result=\"hit\"} 2\n"), "{metrics}");
    assert!(metrics.contains("thaw_cache_ensure_total{result=\"miss\"} 2\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("thaw_cache_bytes_total{{source=\"registry\"}} {}\n", all_v1 + expected)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_and_leases() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    // Three unrelated functions (their memory shares only the common page pool).
    let s: Vec<_> = futures_join(&host).await;
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = NodeCache::start(&host, probe_dir.path(), 1 << 30, "probe").await;
    probe.ensure(&s[0].reference).await;
    let listing = probe.get("/v1/snapshots").await;
    let snapshot_bytes = listing["snapshots"][0]["allocated_bytes"].as_u64().unwrap();
    drop(probe);
    // Before materializing, the cache reserves what the recipes say the files need: every
    // data chunk, rounded up to whole blocks (more than the files end up allocating).
    let mut estimate = 0;
    for p in &s {
        let r = recipes(&p.reference).await;
        let e: u64 = r
            .iter()
            .flat_map(|r| &r.entries)
            .filter(|e| e.chunk_id().is_some())
            .map(|e| u64::from(e.byte_len()).div_ceil(4096) * 4096)
            .sum();
        estimate = estimate.max(e);
    }
    // Room for one snapshot and a new one's reservation, plus half a snapshot: two snapshots
    // (and two leases' small disk copies) fit, a third one's reservation does not.
    let capacity = snapshot_bytes + estimate + snapshot_bytes / 2;
    eprintln!("snapshot: {snapshot_bytes} bytes allocated, up to {estimate} reserved; capacity {capacity}");
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), capacity, "node-lru").await;
    let mut digests = Vec::new();
    for p in &s[..2] {
        let e = node.ensure(&p.reference).await;
        node.release(e["lease"].as_str().unwrap()).await;
        digests.push(e["digest"].as_str().unwrap().to_owned());
    }
    // s0 is used again, so s1 is now the least recently used.
    let e = node.ensure(&s[0].reference).await;
    node.release(e["lease"].as_str().unwrap()).await;
    let e = node.ensure(&s[2].reference).await;
    digests.push(e["digest"].as_str().unwrap().to_owned());
    node.release(e["lease"].as_str().unwrap()).await;
    let cached = node.cached().await;
    assert!(cached.contains(&digests[0]) && cached.contains(&digests[2]), "{cached:?} of {digests:?}");
    assert!(!cached.contains(&digests[1]), "the least recently used snapshot should be gone: {cached:?}");

    // Leases: with s0 and s2 leased, s1 can only come in by evicting a leased snapshot: refused.
    let l0 = node.ensure(&s[0].reference).await;
    let l2 = node.ensure(&s[2].reference).await;
    let (status, body) = node.post("/v1/snapshots/ensure", json!({"reference": s[1].reference})).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "NO_SPACE", "{body}");
    let cached = node.cached().await;
    assert!(
        cached.contains(&digests[0]) && cached.contains(&digests[2]),
        "leased snapshots were evicted: {cached:?}"
    );
    assert_files(&l0, &s[0].data);
    assert_files(&l2, &s[2].data);
    // Released, the oldest lease goes and s1 fits again, evicting s0.
    node.release(l0["lease"].as_str().unwrap()).await;
    let back = node.ensure(&s[1].reference).await;
    assert_files(&back, &s[1].data);
    let cached = node.cached().await;
    assert!(!cached.contains(&digests[0]) && cached.contains(&digests[2]), "{cached:?}");
    let disk = node.get("/v1/disk").await;
    assert!(disk["used_by_index"].as_u64().unwrap() <= capacity, "{disk}");

    // Usage order survives a restart.
    let mut node = node;
    node.release(back["lease"].as_str().unwrap()).await;
    node.release(l2["lease"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // the flusher's interval
    node.restart().await;
    let listing = node.get("/v1/snapshots").await;
    let order: Vec<&str> =
        listing["snapshots"].as_array().unwrap().iter().map(|s| s["digest"].as_str().unwrap()).collect();
    assert_eq!(
        order,
        vec![digests[1].as_str(), digests[2].as_str()],
        "most recently used first, after a restart"
    );
}

async fn futures_join(host: &str) -> Vec<support::Pushed> {
    let mut out = Vec::new();
    for (i, seed) in [11u64, 22, 33].into_iter().enumerate() {
        out.push(push(host, &format!("fn/f{i}:v1"), SnapshotData::new(2048, 256, seed)).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensures_of_one_snapshot_fetch_it_once() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/burst:v1", SnapshotData::new(4096, 512, 7)).await;
    let dir = tempfile::tempdir().unwrap();
    let node = std::sync::Arc::new(NodeCache::start(&host, dir.path(), 1 << 30, "node-burst").await);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (node, r) = (node.clone(), v1.reference.clone());
            tokio::spawn(async move { node.ensure(&r).await })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let misses: Vec<_> = answers.iter().filter(|a| a["hit"] == false).collect();
    assert_eq!(misses.len(), 1, "exactly one ensure materializes: {answers:?}");
    let total: u64 = answers.iter().map(|a| bytes_from(a, "registry")).sum();
    assert_eq!(total, new_chunk_bytes(&[], &recipes(&v1.reference).await));
    let leases: std::collections::HashSet<&str> =
        answers.iter().map(|a| a["lease"].as_str().unwrap()).collect();
    assert_eq!(leases.len(), 8);
    for a in &answers {
        assert_files(a, &v1.data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_cached_files_are_found_and_fetched_again() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/rot:v1", SnapshotData::new(2048, 256, 3)).await;
    let v2 = push(&host, "fn/rot:v2", revision(&v1.data, 20, 4)).await;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), 1 << 30, "node-rot").await;
    let first = node.ensure(&v1.reference).await;
    node.release(first["lease"].as_str().unwrap()).await;
    let memory = first["files"]["memory"].as_str().unwrap().to_owned();
    let offset = first_data_offset(&v1.data.memory);

    // 1. Someone writes into the cached file: the next ensure notices and fetches again.
    flip_byte(&memory, offset, false);
    let after = node.ensure(&v1.reference).await;
    assert_eq!(after["hit"], false, "a modified cached file must not be handed out: {after}");
    assert!(bytes_from(&after, "registry") > 0);
    assert_files(&after, &v1.data);
    node.release(after["lease"].as_str().unwrap()).await;

    // 2. Bit rot (the modification time unchanged): a scrub finds it.
    flip_byte(&memory, offset, true);
    let (status, report) = node.post("/v1/scrub", json!({})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["corrupt"], json!([first["digest"]]), "{report}");
    let refetched = node.ensure(&v1.reference).await;
    assert_eq!(refetched["hit"], false);
    assert_files(&refetched, &v1.data);
    node.release(refetched["lease"].as_str().unwrap()).await;

    // 3. Rot in a file another snapshot copies chunks from: the copy's check fails, the
    //    damaged source is dropped and revision 2 still materializes intact.
    flip_byte(&memory, offset, true);
    let second = node.ensure(&v2.reference).await;
    assert_files(&second, &v2.data);
    assert!(
        !node.cached().await.contains(&first["digest"].as_str().unwrap().to_owned()),
        "the damaged snapshot stayed"
    );
    let metrics = reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("thaw_cache_corrupt_total 3\n"), "{metrics}");
}

/// Offset of the first non-zero byte (a byte that lives in a stored chunk).
fn first_data_offset(data: &[u8]) -> u64 {
    data.iter().position(|&b| b != 0).expect("some data") as u64
}

/// Flips one byte of a file in place; with `keep_mtime`, puts the modification time back.
fn flip_byte(path: &str, offset: u64, keep_mtime: bool) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mtime = file.metadata().unwrap().modified().unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    file.write_all_at(&b, offset).unwrap();
    file.sync_all().unwrap();
    if keep_mtime {
        file.set_modified(mtime).unwrap();
    } else {
        // Make sure the change shows even on a coarse clock.
        file.set_modified(mtime + Duration::from_secs(1)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_prefetch_on_another_node_then_hit() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A snapshot this node just took, published through its cache.
    let data = SnapshotData::new(2048, 256, 55);
    let snapshot = tempfile::tempdir().unwrap();
    data.write(snapshot.path());
    let root = snapshot.path().to_str().unwrap();
    let a = NodeCache::start_with(&host, dirs.0.path(), 1 << 30, "node-pub", &["--publish-root", root]).await;
    let b = NodeCache::start(&host, dirs.1.path(), 1 << 30, "node-pre").await;
    let reference = format!("{host}/fn/published:v1");
    let (status, published) = a
        .post(
            "/v1/snapshots/publish",
            json!({"reference": reference, "dir": snapshot.path().display().to_string()}),
        )
        .await;
    assert_eq!(status, 200, "{published}");
    assert!(published["bytes_sent"].as_u64().unwrap() > 0);
    let (status, body) =
        a.post("/v1/snapshots/publish", json!({"reference": reference, "dir": "relative/dir"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("BAD_REQUEST")), "{body}");

    // Prefetched on the other node, in the background; then an ensure is a hit.
    let (status, body) = b.post("/v1/snapshots/prefetch", json!({"reference": reference})).await;
    assert_eq!(status, 202, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !b.cached().await.contains(&published["digest"].as_str().unwrap().to_owned()) {
        assert!(std::time::Instant::now() < deadline, "the prefetch never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hit = b.ensure(&reference).await;
    assert_eq!(hit["hit"], true, "{hit}");
    assert_eq!(hit["digest"], published["digest"]);
    assert_files(&hit, &data);
    // A prefetch takes no lease.
    let listing = b.get("/v1/snapshots").await;
    assert_eq!(listing["snapshots"][0]["leases"], 1, "only the ensure's lease: {listing}");

    // Bad input to the local API: clear errors, nothing cached.
    let (status, body) = b.post("/v1/snapshots/ensure", json!({"reference": "Not A Reference"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        b.post("/v1/snapshots/ensure", json!({"reference": format!("{host}/fn/published:nope")})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("NOT_FOUND")), "{body}");
    let (status, body) = b.post("/v1/snapshots/ensure", json!({"ref": "x"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = b.post("/v1/snapshots/release", json!({"lease": "no-such-lease"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(b.cached().await.len(), 1);
}

/// The `thaw` CLI of this target directory (built by `cargo test --workspace`, as thaw-client
/// has tests of its own; `cargo build -p thaw-client` otherwise).
fn thaw_cli() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(std::path::Path::parent).unwrap().join("thaw");
    assert!(bin.is_file(), "{} is missing: run `cargo build -p thaw-client`", bin.display());
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_cache_subcommands_drive_the_local_api() {
    let registry = RegistryProcess::start().await;
    let host = registry.host();
    let v1 = push(&host, "fn/cli:v1", SnapshotData::new(1024, 128, 77)).await;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeCache::start(&host, dir.path(), 1 << 30, "node-cli").await;
    let thaw = |args: &[&str]| {
        let out = std::process::Command::new(thaw_cli())
            .args(args)
            .env("THAW_NODE_CACHE", format!("http://{}", node.addr))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = thaw(&["--json", "cache", "ensure", &v1.reference]);
    assert_eq!(code, Some(0), "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_files(&answer, &v1.data);
    let (code, stdout, _) = thaw(&["cache", "list"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains(answer["digest"].as_str().unwrap()) && stdout.contains("1 leases"), "{stdout}");
    let (code, _, stderr) = thaw(&["cache", "release", answer["lease"].as_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    // Failures: exit 1 with the node cache's code and message; usage errors exit 2.
    let (code, _, stderr) = thaw(&["cache", "ensure", &format!("{host}/fn/cli:missing")]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("NOT_FOUND") && stderr.contains("fn/cli:missing"), "{stderr}");
    let (code, _, stderr) = thaw(&["cache", "release"]);
    assert_eq!(code, Some(2), "{stderr}");
}
