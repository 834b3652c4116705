//! SIGKILL at random points during ensures and evictions, in a loop: after every restart,
//! each snapshot the cache reports present verifies, and disk usage matches the index.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::common::Rng;
use support::{assert_files, push, revision, NodeCache, SnapshotData, ThawRegistry};

const ITERATIONS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_ensures_and_evictions_leaves_a_consistent_cache() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let base = SnapshotData::new(2048, 256, 100);
    let mut pushed = vec![push(&host, "fn/crash:v0", revision(&base, 30, 1)).await];
    for i in 1..4u64 {
        pushed.push(push(&host, &format!("fn/crash:v{i}"), revision(&base, 30, 1 + i)).await);
    }
    pushed.push(push(&host, "fn/other:v1", SnapshotData::new(2048, 256, 999)).await);
    let dir = tempfile::tempdir().unwrap();
    // Room for about two of these snapshots: most ensures evict something.
    let capacity = 14 << 20;
    // Leases survive a crash (they are stored before `ensure` answers); those the killed
    // bursts never released end by their TTL, as a crashed orchestrator's would.
    let mut node =
        NodeCache::start_env(&host, dir.path(), capacity, "node-crash", &[("THAW_LEASE_TTL", "1")]).await;
    let mut by_digest: HashMap<String, usize> = HashMap::new();
    let mut rng = Rng::new(42);
    let mut killed_mid_ensure = 0;
    for iteration in 0..ITERATIONS {
        // A burst of ensures and releases, killed after a random delay.
        let http = reqwest::Client::new();
        let url = node.url("/v1/snapshots/ensure");
        let release_url = node.url("/v1/snapshots/release");
        let picks: Vec<usize> = (0..3).map(|_| rng.below(pushed.len() as u64) as usize).collect();
        let refs: Vec<String> = picks.iter().map(|&i| pushed[i].reference.clone()).collect();
        let burst = tokio::spawn(async move {
            for r in refs {
                let Ok(resp) = http.post(&url).json(&serde_json::json!({ "reference": r })).send().await
                else {
                    return;
                };
                let Ok(body) = resp.json::<serde_json::Value>().await else { return };
                if let Some(lease) = body["lease"].as_str() {
                    let _ = http.post(&release_url).json(&serde_json::json!({ "lease": lease })).send().await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        if !burst.is_finished() {
            killed_mid_ensure += 1;
        }
        node.kill();
        let _ = burst.await;
        node.restart().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let listed = node.get("/v1/snapshots").await;
            let held: u64 =
                listed["snapshots"].as_array().unwrap().iter().map(|s| s["leases"].as_u64().unwrap()).sum();
            if held == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "iteration {iteration}: leases never expired: {listed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Consistent: disk matches the index, every listed snapshot verifies.
        let disk = node.get("/v1/disk").await;
        assert_eq!(
            disk["allocated_on_disk"], disk["used_by_index"],
            "iteration {iteration}: disk usage and the index disagree: {disk}"
        );
        let listed = node.get("/v1/snapshots").await;
        let listed = listed["snapshots"].as_array().unwrap().clone();
        assert!(listed.iter().map(|s| s["allocated_bytes"].as_u64().unwrap()).sum::<u64>() <= capacity);
        let leftovers = std::fs::read_dir(dir.path().join("work")).unwrap().count();
        assert_eq!(leftovers, 0, "iteration {iteration}: work in progress survived the restart");
        let (status, report) = node.post("/v1/scrub", serde_json::json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(report["corrupt"], serde_json::json!([]), "iteration {iteration}: {report}");
        assert_eq!(report["checked"].as_u64().unwrap() as usize, listed.len());
        for s in listed {
            let digest = s["digest"].as_str().unwrap().to_owned();
            let reference = &s["references"][0];
            let i = match by_digest.get(&digest) {
                Some(&i) => i,
                None => {
                    let i = pushed
                        .iter()
                        .position(|p| p.reference == reference.as_str().unwrap())
                        .expect("a pushed reference");
                    by_digest.insert(digest.clone(), i);
                    i
                }
            };
            let answer = node.ensure(&digest_reference(&pushed[i].reference, &digest)).await;
            assert_eq!(answer["hit"], true, "iteration {iteration}: listed but not a hit");
            assert_files(&answer, &pushed[i].data);
            node.release(answer["lease"].as_str().unwrap()).await;
        }
    }
    eprintln!("{ITERATIONS} kills, {killed_mid_ensure} of them while ensures were still running");
    assert!(
        killed_mid_ensure >= ITERATIONS / 4,
        "too few kills landed mid-ensure ({killed_mid_ensure}) to test anything"
    );
}

/// `host/repo:tag` → `host/repo@digest`.
fn digest_reference(reference: &str, digest: &str) -> String {
    let name = reference.rsplit_once(':').map_or(reference, |(n, _)| n);
    format!("{name}@{digest}")
}
