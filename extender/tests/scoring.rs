//! Scoring against a real thaw-registry: coverage from real recipes, the exact snapshot at
//! 10, neutral answers for unknown snapshots and unreachable registries, herd damping.

mod support;

use std::time::{Duration, Instant};

use support::{
    args_with_names, expected_score, knative_pod, push, recipes, revision, test_config, Extender,
    SnapshotData, ThawRegistry,
};
use thaw_client::Reference;
use thaw_extender::herd::HerdConfig;
use thaw_schema::holdings::{HeldSnapshot, NodeHoldings};
use thaw_schema::Sha256Digest;

async fn publish(host: &str, node: &str, held: &[(&str, Sha256Digest)]) {
    let client = support::common::client_for(&Reference::parse(&format!("{host}/x/y:z")).unwrap());
    client
        .put_node_holdings(&NodeHoldings {
            node: node.into(),
            peer_endpoint: None,
            capacity_bytes: 1 << 30,
            used_bytes: 0,
            snapshots: held
                .iter()
                .map(|(r, d)| HeldSnapshot {
                    reference: (*r).into(),
                    digest: *d,
                    size_bytes: 1,
                    cached_bytes: 1,
                })
                .collect(),
        })
        .await
        .unwrap();
}

fn scores_by_node(answer: &[(String, i64)]) -> std::collections::HashMap<&str, i64> {
    answer.iter().map(|(h, s)| (h.as_str(), *s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_one_holder_outscores_cold_nodes_by_shared_bytes() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = SnapshotData::new(2048, 256, 11);
    let v2 = revision(&v1, 40, 12);
    let other = SnapshotData::new(2048, 256, 99);
    let r1 = push(&host, "fn/hello:hello-00001", &v1).await;
    let r2 = push(&host, "fn/hello:hello-00002", &v2).await;
    let ro = push(&host, "fn/other:other-00001", &other).await;
    let ((d1, rec1), (d2, rec2), (d_o, rec_o)) = (recipes(&r1).await, recipes(&r2).await, recipes(&ro).await);
    publish(&host, "node-a", &[(&r1, d1)]).await;
    publish(&host, "node-b", &[(&r2, d2)]).await;
    publish(&host, "node-c", &[]).await;
    publish(&host, "node-d", &[(&ro, d_o)]).await;
    let mut config = test_config(&host);
    config.herd = HerdConfig::OFF;
    let ext = Extender::start(config).await;
    ext.wait_warm(4, 3).await;

    // A pod of revision 2, found through its Knative labels.
    let pod = knative_pod("fn", "hello", "hello-00002", &[]);
    let names: Vec<String> =
        ["node-a", "node-b", "node-c", "node-d", "node-unknown"].map(String::from).into();
    let answer = ext.prioritize(&args_with_names(&pod, &names)).await;
    assert_eq!(answer.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(), names, "request order kept");
    let s = scores_by_node(&answer);
    let a = expected_score(&[&rec1], &rec2);
    eprintln!("revision 2: {answer:?}; revision 1 covers {a}/10");
    assert_eq!(s["node-b"], 10, "the exact snapshot");
    assert_eq!(s["node-a"], a, "revision 1 covers revision 2 in proportion to shared bytes");
    assert!(a > 0 && a < 10, "{a}");
    assert_eq!(s["node-c"], 0, "cold");
    assert_eq!(s["node-d"], expected_score(&[&rec_o], &rec2));
    assert!(s["node-a"] > s["node-d"]);
    assert_eq!(s["node-unknown"], 0, "a node missing from the directory is cold");

    // Holding both unrelated snapshots counts the union; the directory is re-read.
    publish(&host, "node-c", &[(&ro, d_o), (&r1, d1)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = ext.prioritize(&args_with_names(&pod, &names)).await;
        if s[2].1 == expected_score(&[&rec_o, &rec1], &rec2) {
            break;
        }
        assert!(Instant::now() < deadline, "node-c's new holdings never counted: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // By digest too, and revision 1 the other way round.
    let by_digest = format!("{host}/fn/hello@{d1}");
    let pod1 = knative_pod("fn", "hello", "hello-00002", &[("thaw.dev/snapshot", &by_digest)]);
    let s1 = ext.prioritize(&args_with_names(&pod1, &names)).await;
    assert_eq!(s1[0].1, 10, "{s1:?}");
    assert_eq!(s1[1].1, expected_score(&[&rec2], &rec1), "{s1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_snapshots_score_neutral() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let r1 = push(&host, "fn/hello:hello-00001", &SnapshotData::new(256, 64, 3)).await;
    let (d1, _) = recipes(&r1).await;
    publish(&host, "node-a", &[(&r1, d1)]).await;
    let ext = Extender::start(test_config(&host)).await;
    ext.wait_warm(1, 1).await;
    let names = support::node_names(3);
    for missing in [
        format!("{host}/fn/hello:hello-00009"),
        format!("{host}/fn/nothing:v1"),
        format!("{host}/fn/hello@{}", Sha256Digest::of(b"no such manifest")),
    ] {
        let pod = knative_pod("fn", "hello", "hello-00009", &[("thaw.dev/snapshot", &missing)]);
        let answer = ext.prioritize(&args_with_names(&pod, &["node-a".to_owned()])).await;
        assert_eq!(answer, vec![("node-a".to_owned(), 0)], "{missing}");
        // Remembered: the second ask does not wait for the registry.
        let started = Instant::now();
        let again = ext.prioritize(&args_with_names(&pod, &names)).await;
        assert!(again.iter().all(|(_, s)| *s == 0), "{again:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_scores_neutral() {
    let port = support::free_port(); // nothing listens there
    let host = format!("127.0.0.1:{port}");
    let mut config = test_config(&host);
    config.resolver.cold_wait = Duration::from_secs(3);
    let ext = Extender::start(config).await;
    let pod = knative_pod("fn", "hello", "hello-00001", &[]);
    let names = support::node_names(1000);
    let started = Instant::now();
    let answer = ext.prioritize(&args_with_names(&pod, &names)).await;
    assert_eq!(answer.len(), 1000);
    assert!(answer.iter().zip(&names).all(|((h, s), n)| h == n && *s == 0));
    eprintln!("neutral answer with the registry down after {:?}", started.elapsed());
    let (status, filter) = ext.post("/filter", &args_with_names(&pod, &names)).await;
    assert_eq!(status, 200);
    assert_eq!(filter["NodeNames"].as_array().unwrap().len(), 1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = reqwest::get(format!("http://{}/metrics", ext.addr)).await.unwrap().text().await.unwrap();
        assert!(m.contains("thaw_extender_directory_reads_total{result=\"ok\"} 0\n"), "{m}");
        if !m.contains("thaw_extender_directory_reads_total{result=\"error\"} 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "directory failures not counted: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_one_revision_spreads_over_its_holders() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let r1 = push(&host, "fn/hello:hello-00001", &SnapshotData::new(256, 64, 5)).await;
    let (d1, _) = recipes(&r1).await;
    for n in ["node-a", "node-b", "node-c"] {
        publish(&host, n, &[(&r1, d1)]).await;
    }
    publish(&host, "node-d", &[]).await;
    let mut config = test_config(&host);
    config.herd = HerdConfig { window: Duration::from_secs(60), penalty: 1, max_penalty: 3 };
    let ext = Extender::start(config).await;
    ext.wait_warm(4, 1).await;
    let names: Vec<String> = ["node-a", "node-b", "node-c", "node-d"].map(String::from).into();
    let pod = knative_pod("fn", "hello", "hello-00001", &[]);
    let mut tops = Vec::new();
    for _ in 0..6 {
        let answer = ext.prioritize(&args_with_names(&pod, &names)).await;
        let best = answer.iter().map(|(_, s)| *s).max().unwrap();
        tops.push(answer.iter().find(|(_, s)| *s == best).unwrap().0.clone());
        assert_eq!(answer[3].1, 0, "a cold node stays at 0: {answer:?}");
        assert!(answer[..3].iter().all(|(_, s)| *s >= 7), "damping is capped: {answer:?}");
    }
    assert_eq!(tops, ["node-a", "node-b", "node-c", "node-a", "node-b", "node-c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_snapshot_answers_neutral_at_once_then_scores_once_fetched() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let v1 = SnapshotData::new(1024, 128, 31);
    let v2 = revision(&v1, 16, 32);
    let r1 = push(&host, "fn/hello:hello-00001", &v1).await;
    let r2 = push(&host, "fn/hello:hello-00002", &v2).await;
    let ((d1, rec1), (_, rec2)) = (recipes(&r1).await, recipes(&r2).await);
    publish(&host, "node-a", &[(&r1, d1)]).await;
    let mut config = test_config(&host);
    config.resolver.cold_wait = Duration::ZERO;
    config.herd = HerdConfig::OFF;
    let ext = Extender::start(config).await;
    ext.wait_warm(1, 1).await;
    // Revision 2 is held nowhere, so nothing warmed it: the first ask answers neutral at once
    // and starts the fetch.
    let pod = knative_pod("fn", "hello", "hello-00002", &[]);
    let names = vec!["node-a".to_owned(), "node-b".to_owned()];
    let first = ext.prioritize(&args_with_names(&pod, &names)).await;
    assert_eq!(first, vec![("node-a".to_owned(), 0), ("node-b".to_owned(), 0)]);
    let expected = expected_score(&[&rec1], &rec2);
    assert!(expected > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = ext.prioritize(&args_with_names(&pod, &names)).await;
        if s[0].1 == expected {
            assert_eq!(s[1].1, 0);
            break;
        }
        assert_eq!(s[0].1, 0, "neutral until fetched, then exact: {s:?}");
        assert!(Instant::now() < deadline, "revision 2 was never fetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = reqwest::get(format!("http://{}/metrics", ext.addr)).await.unwrap().text().await.unwrap();
    assert!(!m.contains("thaw_extender_neutral_total{reason=\"pending\"} 0\n"), "{m}");
    assert!(m.contains("thaw_extender_cache_entries{cache=\"profiles\"} 2\n"), "{m}");
}
