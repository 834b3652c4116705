//! End to end on one machine: a thaw-registry, three real `thaw-node-cache` processes each
//! holding a different revision of one function (ensured through their local API, published
//! by them to the registry's node directory), and the real `thaw-extender` binary in
//! `--holdings registry` mode, asked by kube-scheduler's wire format where a pod of each
//! revision should go.
//!
//! The node-cache binary is another package's, so Cargo does not build it for this test:
//! `support::node_cache_binary` looks for it next to this test binary's directory
//! (`target/<profile>/thaw-node-cache`), builds it with `cargo build -p thaw-node-cache` when
//! missing, and fails with a message saying so when that does not work.

mod support;

use std::time::{Duration, Instant};

use support::{
    args_with_names, expected_score, knative_pod, push, recipes, revision, ExtenderProcess, NodeCache,
    SnapshotData, ThawRegistry,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extender_ranks_real_node_caches_by_the_revision_they_hold() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    // Three revisions, each a few hundred pages away from the one before.
    let v1 = SnapshotData::new(4096, 512, 21);
    let v2 = revision(&v1, 48, 22);
    let v3 = revision(&v2, 48, 23);
    let refs = [
        push(&host, "fn/hello:hello-00001", &v1).await,
        push(&host, "fn/hello:hello-00002", &v2).await,
        push(&host, "fn/hello:hello-00003", &v3).await,
    ];
    let rec = [recipes(&refs[0]).await.1, recipes(&refs[1]).await.1, recipes(&refs[2]).await.1];

    let nodes = [
        NodeCache::start(&host, "worker-1").await,
        NodeCache::start(&host, "worker-2").await,
        NodeCache::start(&host, "worker-3").await,
    ];
    for (node, reference) in nodes.iter().zip(&refs) {
        node.ensure(reference).await;
    }

    let ext = ExtenderProcess::start(&[
        "--registry",
        &format!("http://{host}"),
        "--holdings",
        "registry",
        "--poll-interval-ms",
        "200",
        "--knative-template",
        "{registry}/{namespace}/{service}:{revision}",
        "--herd-window",
        "0",
    ])
    .await;
    let http = reqwest::Client::new();
    let names: Vec<String> = ["worker-3", "worker-1", "cold-worker", "worker-2"].map(String::from).into();

    for (i, revision) in ["hello-00001", "hello-00002", "hello-00003"].iter().enumerate() {
        let expected: Vec<i64> = names
            .iter()
            .map(|n| match n.strip_prefix("worker-").map(|k| k.parse::<usize>().unwrap() - 1) {
                Some(k) if k == i => 10,
                Some(k) => expected_score(&[&rec[k]], &rec[i]),
                None => 0,
            })
            .collect();
        let pod = knative_pod("fn", "hello", revision, &[]);
        // Until the node caches' holdings reach the directory and the extender has read them,
        // the answer is neutral or partial; then it is exact.
        let deadline = Instant::now() + Duration::from_secs(30);
        let answer = loop {
            let answer = support::prioritize(&http, &ext.addr, &args_with_names(&pod, &names)).await;
            if answer.iter().map(|(_, s)| *s).collect::<Vec<_>>() == expected {
                break answer;
            }
            assert!(Instant::now() < deadline, "{revision}: got {answer:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("{revision}: {answer:?}");
        let mut ranked = answer.clone();
        ranked.sort_by_key(|(_, s)| -s);
        assert_eq!(ranked[0].0, format!("worker-{}", i + 1), "{revision}: the holder first: {answer:?}");
        assert_eq!(ranked[3].0, "cold-worker", "{revision}: {answer:?}");
    }

    // The closer revision ranks above the farther one: for revision 3, worker-2 (revision 2)
    // above worker-1 (revision 1).
    let pod = knative_pod("fn", "hello", "hello-00003", &[]);
    let s = support::prioritize(&http, &ext.addr, &args_with_names(&pod, &names)).await;
    assert!(s[3].1 > s[1].1, "{s:?}");
    assert!(s[1].1 > s[2].1, "{s:?}");
}

/// `--holdings kube` with no in-cluster service account and no kubeconfig: a clear error at
/// start, not a running extender that never learns any holdings.
#[tokio::test]
async fn holdings_kube_without_cluster_configuration_fails_clearly() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-extender"))
        .args(["--listen", "127.0.0.1:0", "--registry", "http://127.0.0.1:1", "--holdings", "kube"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", home.path().join("missing-kubeconfig"))
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--holdings kube: no Kubernetes client configuration"), "{err}");
}

/// Needs a cluster with deploy/crd.yaml applied and a kubeconfig: the extender starts in
/// kube mode and serves.
#[tokio::test]
#[ignore = "needs cluster"]
async fn holdings_kube_against_a_cluster_serves() {
    let ext =
        support::ExtenderProcess::start(&["--registry", "http://127.0.0.1:1", "--holdings", "kube"]).await;
    let http = reqwest::Client::new();
    let r = http.get(format!("http://{}/healthz", ext.addr)).send().await.unwrap();
    assert!(r.status().is_success());
}
