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

#[path = "../../integration/src/control_plane.rs"]
#[allow(dead_code, unreachable_pub)]
mod control_plane;

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

/// Against a real control plane (integration/src/control_plane.rs): deploy/'s CRD and the
/// extender's RBAC applied, the extender started in kube mode with its own service account's
/// token, exactly the permissions deploy/extender.yaml grants. It serves, and its reflector
/// learns a `NodeSnapshotCache` written to the API server.
#[test]
fn holdings_kube_against_a_cluster_serves() {
    let plane = control_plane::ControlPlane::start("http://127.0.0.1:1");
    let deploy = control_plane::repo_root().join("deploy");
    for file in ["00-namespace.yaml", "crd.yaml", "extender.yaml"] {
        plane.must(&["apply", "-f", &deploy.join(file).display().to_string()]);
    }
    plane.must(&["wait", "--for=condition=Established", "crd/nodesnapshotcaches.thaw.dev", "--timeout=60s"]);
    let token = plane.must(&["create", "token", "thaw-extender", "-n", "thaw-system", "--duration=1h"]);
    let kubeconfig = plane.kubeconfig_for_token("thaw-extender", token.trim());

    let addr = format!("127.0.0.1:{}", control_plane::free_port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-extender"));
    cmd.args(["--listen", &addr, "--registry", "http://127.0.0.1:1", "--holdings", "kube"])
        .env("KUBECONFIG", &kubeconfig)
        .env("THAW_LOG", "info");
    let ext = control_plane::Guarded::spawn("thaw-extender", &cmd, &plane.dir().join("thaw-extender.log"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let nodes_gauge = |n: u32| {
        let needle = format!("thaw_extender_cache_entries{{cache=\"nodes\"}} {n}\n");
        let url = format!("http://{addr}/metrics");
        let http = http.clone();
        async move {
            let Ok(r) = http.get(url).send().await else { return false };
            r.status().is_success() && r.text().await.is_ok_and(|m| m.contains(&needle))
        }
    };
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "thaw-extender did not serve:\n{}", ext.log_tail(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(nodes_gauge(0).await, "no holdings yet");
    });

    // A node's holdings, written as a node cache writes them; the reflector picks them up.
    plane.apply(
        &serde_json::json!({"apiVersion": "thaw.dev/v1alpha1", "kind": "NodeSnapshotCache",
                            "metadata": {"name": "worker-1"}, "spec": {"nodeName": "worker-1"}})
        .to_string(),
    );
    let status = serde_json::json!({"status": {"capacityBytes": 1u64 << 30, "usedBytes": 4096, "snapshotCount": 1, "snapshots": [{
        "reference": "127.0.0.1:1/fn/hello:hello-00001",
        "digest": format!("sha256:{}", "ab".repeat(32)),
        "sizeBytes": 4096, "cachedBytes": 4096}]}});
    plane.must(&[
        "patch",
        "nodesnapshotcache",
        "worker-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes_gauge(1).await {
            assert!(
                Instant::now() < deadline,
                "the extender never saw worker-1's holdings:\n{}",
                ext.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
