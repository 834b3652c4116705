//! The client asks which chunks are missing in the binary form (docs/FORMAT.md) and falls
//! back to JSON when the registry refuses it the way a registry without it does. The
//! registry is a real thaw-registry behind a raw forwarding proxy that answers binary
//! queries as the registry before the binary form did (400 `UNSUPPORTED`: the body is not
//! JSON), or as a strict one would (415).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use thaw_client::{PullOptions, PushOptions, Reference};

const IDS_TYPE: &str = "application/vnd.thaw.chunk-ids.v1";

#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// What thaw-registry answered before it knew the binary form.
    OldRegistry,
    /// 415 without an error body.
    UnsupportedMediaType,
}

/// Forwards `request` to `upstream` and returns its answer.
fn forward(http: &reqwest::Client, upstream: &str, request: &RawRequest) -> RawResponse {
    const ANSWER_HEADERS: [&str; 7] = [
        "content-type",
        "location",
        "docker-content-digest",
        "range",
        "docker-upload-uuid",
        "link",
        "oci-subject",
    ];
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).unwrap();
    let mut req = http.request(method, format!("http://{upstream}{}", request.path));
    for (k, v) in &request.headers {
        if !["host", "content-length", "connection"].iter().any(|h| k.eq_ignore_ascii_case(h)) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    let req = req.body(request.body.clone());
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let resp = req.send().await.expect("upstream answers");
            let status = resp.status().as_u16();
            let headers = ANSWER_HEADERS
                .iter()
                .filter_map(|h| resp.headers().get(*h).map(|v| (*h, v.to_str().unwrap().to_owned())))
                .collect();
            let body = resp.bytes().await.expect("upstream body").to_vec();
            RawResponse { status, headers, body, declared: None }
        })
    })
}

/// Missing-chunks queries a proxy saw: `Content-Type` and the status answered.
type Seen = Arc<Mutex<Vec<(String, u16)>>>;

/// A proxy to `upstream` that refuses binary missing-chunks queries as `refusal` says (or
/// forwards them too, with `None`) and records every missing-chunks query.
async fn proxy(upstream: String, refusal: Option<Refusal>) -> (String, Seen) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let handler: RawHandler = Arc::new(move |request: &RawRequest| {
        let query = request.path.ends_with("/_thaw/chunks/missing");
        let content_type = request.header("content-type").unwrap_or_default().to_owned();
        let answer = match refusal {
            Some(Refusal::OldRegistry) if query && content_type == IDS_TYPE => RawResponse {
                status: 400,
                headers: vec![("content-type", "application/json".to_owned())],
                body: br#"{"errors":[{"code":"UNSUPPORTED","message":"missing-chunks query: malformed JSON body: expected value at line 1 column 1"}]}"#.to_vec(),
                declared: None,
            },
            Some(Refusal::UnsupportedMediaType) if query && content_type == IDS_TYPE => {
                RawResponse { status: 415, headers: vec![], body: Vec::new(), declared: None }
            }
            _ => forward(&http, &upstream, request),
        };
        if query {
            log.lock().unwrap().push((content_type, answer.status));
        }
        answer
    });
    (serve_raw(handler).await, seen)
}

/// A snapshot written into a fresh work directory's `snapshot/`.
fn snapshot(pages: usize, blocks: usize, seed: u64) -> (tempfile::TempDir, SnapshotData, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let data = SnapshotData::new(pages, blocks, seed);
    let dir = work.path().join("snapshot");
    data.write(&dir);
    (work, data, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_without_the_binary_query_gets_json() {
    let (work, data, dir) = snapshot(2048, 1024, 5);
    for refusal in [Refusal::OldRegistry, Refusal::UnsupportedMediaType] {
        let registry = ThawRegistry::start().await;
        let (proxy, seen) = proxy(registry.host(), Some(refusal)).await;
        let via_proxy = Reference::parse(&format!("{proxy}/fn/fallback:v1")).unwrap();
        let client = client_for(&via_proxy);
        thaw_client::push_dir(&client, &via_proxy, &dir, &PushOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{refusal:?}: push through the proxy: {e}"));
        let seen: Vec<String> = seen.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
        let binary = seen.iter().filter(|t| *t == IDS_TYPE).count();
        let json = seen.iter().filter(|t| *t == "application/json").count();
        assert!(binary >= 1, "{refusal:?}: the client tried the binary form first: {seen:?}");
        assert_eq!(binary + json, seen.len(), "{refusal:?}: only the two forms: {seen:?}");
        assert_eq!(json, binary, "{refusal:?}: each refused query was asked again in JSON: {seen:?}");
        for pair in seen.chunks(2) {
            assert_eq!(pair, [IDS_TYPE, "application/json"], "{refusal:?}: binary, then JSON: {seen:?}");
        }

        // What went up through the fallback is complete: pull it straight from the registry.
        let direct = Reference::parse(&format!("{}/fn/fallback:v1", registry.host())).unwrap();
        let out = work.path().join(format!("pulled-{refusal:?}"));
        thaw_client::pull(&client_for(&direct), &direct, &out, &PullOptions::default()).await.unwrap();
        assert_same_files(&data, &out);
    }
}

/// Against the registry in this tree the binary form is used and nothing falls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_in_tree_is_asked_in_binary_only() {
    let (_work, _, dir) = snapshot(1024, 512, 6);
    let registry = ThawRegistry::start().await;
    let (proxy, seen) = proxy(registry.host(), None).await;
    let reference = Reference::parse(&format!("{proxy}/fn/binary:v1")).unwrap();
    thaw_client::push_dir(&client_for(&reference), &reference, &dir, &PushOptions::default()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(t, status)| t == IDS_TYPE && *status == 200), "{seen:?}");
}
