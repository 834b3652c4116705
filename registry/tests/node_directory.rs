//! The node directory (`/v2/_thaw/nodes[/<node>]`, docs/API.md), black-box: round trips,
//! listing order, overwrite, deletes, and everything a hostile or confused node cache can
//! send. Runs on S3 too (`THAW_TEST_STORAGE=s3`).

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn holdings(node: &str, snapshots: usize) -> Value {
    let snapshots: Vec<Value> = (0..snapshots)
        .map(|i| {
            json!({
                "reference": format!("registry.local/functions/fn-{i}:rev-1"),
                "digest": format!("sha256:{:064x}", i + 1),
                "sizeBytes": 1000 + i,
                "cachedBytes": 1000 + i,
            })
        })
        .collect();
    json!({
        "node": node,
        "peerEndpoint": format!("{node}:7070"),
        "capacityBytes": 1u64 << 34,
        "usedBytes": 12345,
        "snapshots": snapshots,
    })
}

async fn put(r: &TestRegistry, node_path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    r.req(Method::PUT, &format!("/v2/_thaw/nodes/{node_path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("PUT node")
}

async fn put_ok(r: &TestRegistry, record: &Value) {
    let node = record["node"].as_str().unwrap();
    let resp = put(r, node, serde_json::to_vec(record).unwrap()).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "PUT {node}: {}", body_text(resp).await);
}

async fn get_json(r: &TestRegistry, path: &str) -> Value {
    let resp = r.get(path).await;
    assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
    assert_eq!(header(resp.headers(), "content-type").as_deref(), Some("application/json"), "GET {path}");
    resp.json().await.expect("JSON body")
}

fn node_names(directory: &Value) -> Vec<String> {
    directory["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_record_round_trips_and_the_last_writer_wins() {
    let r = TestRegistry::start().await;
    let first = holdings("worker-1.example", 3);
    put_ok(&r, &first).await;
    assert_eq!(get_json(&r, "/v2/_thaw/nodes/worker-1.example").await, first);

    let mut second = holdings("worker-1.example", 1);
    second["usedBytes"] = json!(999);
    second.as_object_mut().unwrap().remove("peerEndpoint");
    put_ok(&r, &second).await;
    assert_eq!(get_json(&r, "/v2/_thaw/nodes/worker-1.example").await, second, "overwritten");
    assert_eq!(node_names(&get_json(&r, "/v2/_thaw/nodes").await), ["worker-1.example"]);

    let resp = r.delete("/v2/_thaw/nodes/worker-1.example").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    expect_error(r.get("/v2/_thaw/nodes/worker-1.example").await, 404, &["NAME_UNKNOWN"], "deleted").await;
    expect_error(r.delete("/v2/_thaw/nodes/worker-1.example").await, 404, &["NAME_UNKNOWN"], "deleted twice")
        .await;
    assert_eq!(get_json(&r, "/v2/_thaw/nodes").await, json!({ "nodes": [] }));
}

#[tokio::test]
async fn the_directory_lists_every_node_sorted_by_name() {
    let r = TestRegistry::start().await;
    assert_eq!(get_json(&r, "/v2/_thaw/nodes").await, json!({ "nodes": [] }), "empty directory");
    let names = ["node-b", "10.0.0.7", "node-a.zone-2", "node-a", "z"];
    for (i, name) in names.iter().enumerate() {
        put_ok(&r, &holdings(name, i)).await;
    }
    let directory = get_json(&r, "/v2/_thaw/nodes").await;
    let mut sorted: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    sorted.sort();
    assert_eq!(node_names(&directory), sorted);
    for record in directory["nodes"].as_array().unwrap() {
        let name = record["node"].as_str().unwrap();
        let i = names.iter().position(|n| *n == name).unwrap();
        assert_eq!(*record, holdings(name, i), "directory entry of {name}");
    }
    // Repositories and nodes do not mix: the catalog stays empty, and a repository push
    // leaves the directory alone.
    let catalog = get_json(&r, "/v2/_catalog").await;
    assert_eq!(catalog["repositories"], json!([]), "{catalog}");
    r.push_simple_image("nodes", "latest", b"layer").await;
    assert_eq!(node_names(&get_json(&r, "/v2/_thaw/nodes").await), sorted);
}

#[tokio::test]
async fn unknown_nodes_are_404_with_an_error_body() {
    let r = TestRegistry::start().await;
    expect_error(r.get("/v2/_thaw/nodes/never-seen").await, 404, &["NAME_UNKNOWN"], "GET unknown").await;
    expect_error(r.delete("/v2/_thaw/nodes/never-seen").await, 404, &["NAME_UNKNOWN"], "DELETE unknown")
        .await;
}

/// Sends `method path` exactly as written (reqwest would resolve `..` and `%2e%2e` itself)
/// and returns the status and the error codes of the answer.
async fn raw(r: &TestRegistry, method: &str, path: &str, body: &[u8]) -> (u16, Vec<String>) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.addr(),
        body.len()
    );
    let (status, text) = raw_http(r.addr(), &head, body, false).await.expect("an answer");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, error_codes(body.as_bytes()))
}

#[tokio::test]
async fn path_tricks_are_refused_before_storage() {
    let r = TestRegistry::start().await;
    put_ok(&r, &holdings("victim", 1)).await;
    let long = "a".repeat(254);
    let tricks =
        ["..", "%2e%2e", "a%2Fb", "..%2Fvictim", "Node-1", "node_1", "-node", "a..b", "%zz", "%00", &long];
    for bad in tricks {
        let record = serde_json::to_vec(&holdings(bad, 0)).unwrap();
        for (method, body) in [("PUT", &record[..]), ("GET", &[][..]), ("DELETE", &[][..])] {
            let path = format!("/v2/_thaw/nodes/{bad}");
            let (status, codes) = raw(&r, method, &path, body).await;
            assert_eq!(
                (status, codes.first().map(String::as_str)),
                (400, Some("NAME_INVALID")),
                "{method} {path}"
            );
        }
    }
    // Deeper paths are no route at all (and never a repository called `_thaw`).
    for unknown in [
        "/v2/_thaw/nodes/a/b",
        "/v2/_thaw/nodes/",
        "/v2/_thaw/nodes/victim/manifests/latest",
        "/v2/_thaw/nodes/victim/..",
    ] {
        let (status, codes) = raw(&r, "GET", unknown, &[]).await;
        assert_eq!(status, 404, "GET {unknown}");
        assert!(!codes.is_empty(), "{unknown}: spec error body");
    }
    let resp = r.req(Method::POST, "/v2/_thaw/nodes/victim").send().await.unwrap();
    expect_error(resp, 405, &["UNSUPPORTED"], "POST a node").await;
    assert_eq!(node_names(&get_json(&r, "/v2/_thaw/nodes").await), ["victim"], "nothing else was stored");
    assert_eq!(get_json(&r, "/v2/_thaw/nodes/victim").await, holdings("victim", 1));
}

#[tokio::test]
async fn bad_bodies_are_refused_and_store_nothing() {
    let r = TestRegistry::start().await;
    // The body names another node.
    let resp = put(&r, "node-a", serde_json::to_vec(&holdings("node-b", 1)).unwrap()).await;
    expect_error(resp, 400, &["NAME_INVALID"], "name mismatch").await;
    // Not JSON, wrong shape, unknown fields (top level and per snapshot), a bad digest.
    let mut unknown_top = holdings("node-a", 1);
    unknown_top["extra"] = json!(1);
    let mut unknown_inner = holdings("node-a", 1);
    unknown_inner["snapshots"][0]["extra"] = json!(true);
    let mut bad_digest = holdings("node-a", 1);
    bad_digest["snapshots"][0]["digest"] = json!("sha256:xyz");
    let mut no_capacity = holdings("node-a", 1);
    no_capacity.as_object_mut().unwrap().remove("capacityBytes");
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{not json".to_vec()),
        ("empty", Vec::new()),
        ("an array", b"[]".to_vec()),
        ("unknown top-level field", serde_json::to_vec(&unknown_top).unwrap()),
        ("unknown snapshot field", serde_json::to_vec(&unknown_inner).unwrap()),
        ("bad digest", serde_json::to_vec(&bad_digest).unwrap()),
        ("missing field", serde_json::to_vec(&no_capacity).unwrap()),
    ];
    for (what, body) in bodies {
        expect_error(put(&r, "node-a", body).await, 400, &["UNSUPPORTED"], what).await;
    }
    // Too many snapshots, in a body under the size limit.
    let too_many = holdings("node-a", 1025);
    let body = serde_json::to_vec(&too_many).unwrap();
    assert!(body.len() < 1 << 20);
    expect_error(put(&r, "node-a", body).await, 400, &["SIZE_INVALID"], "1025 snapshots").await;
    put_ok(&r, &holdings("node-a", 1024)).await;
    // Over 1 MiB: refused by its declared length, and when streamed without one.
    let mut huge = holdings("node-a", 1);
    huge["snapshots"][0]["reference"] = json!("r".repeat(1 << 20));
    let body = serde_json::to_vec(&huge).unwrap();
    // The registry answers a declared oversize from the headers and closes without reading
    // the body, so a client still writing may see its write fail first: send the headers,
    // read the early answer, as raw_http_early does.
    let head = format!(
        "PUT /v2/_thaw/nodes/node-a HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.addr(),
        body.len()
    );
    let (status, text) = raw_http_early(r.addr(), &head, &body).await.expect("an answer to a 2 MiB body");
    let answer = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert_eq!(
        (status, error_codes(answer.as_bytes())),
        (413, vec!["SIZE_INVALID".to_string()]),
        "2 MiB body: {text}"
    );
    // Streamed without a length, the refusal comes once 1 MiB has been read; the client may
    // still be writing, and then sees the connection close instead of the answer. Either is
    // a refusal; what matters is below: nothing was stored.
    let stream = futures::stream::iter(
        body.chunks(64 * 1024).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let sent = r
        .req(Method::PUT, "/v2/_thaw/nodes/node-a")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    match sent {
        Ok(resp) => {
            expect_error(resp, 413, &["SIZE_INVALID"], "2 MiB streamed body").await;
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "2 MiB streamed body: unexpected failure {e:?}"),
    }

    // Only the one good record is stored.
    assert_eq!(get_json(&r, "/v2/_thaw/nodes/node-a").await, holdings("node-a", 1024));
    assert_eq!(node_names(&get_json(&r, "/v2/_thaw/nodes").await), ["node-a"]);
    expect_error(r.get("/v2/_thaw/nodes/node-b").await, 404, &["NAME_UNKNOWN"], "mismatched node").await;
}

/// Two registry processes on one storage directory (replicas) see one directory.
#[tokio::test]
async fn replicas_share_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let a = BinRegistry::start(&storage, &dir.path().join("a.log")).await;
    let b = BinRegistry::start(&storage, &dir.path().join("b.log")).await;
    let c = client();
    let record = holdings("shared-node", 2);
    let resp = c.put(format!("{}/v2/_thaw/nodes/shared-node", a.base)).json(&record).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let got: Value =
        c.get(format!("{}/v2/_thaw/nodes/shared-node", b.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, record);
    let resp = c.delete(format!("{}/v2/_thaw/nodes/shared-node", b.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = c.get(format!("{}/v2/_thaw/nodes/shared-node", a.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
