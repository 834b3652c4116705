//! OCI Distribution Spec v1.1 conformance, written from the spec's conformance
//! assertions (pull, push, content discovery, content management) against an in-process
//! registry. Each test starts its own registry on a fresh storage directory.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Pull
// ---------------------------------------------------------------------------

#[tokio::test]
async fn base_endpoint_answers_200() {
    let r = TestRegistry::start().await;
    let resp = r.get("/v2/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_get_by_tag_returns_exact_bytes_and_headers() {
    let r = TestRegistry::start().await;
    let (manifest, digest) = r.push_simple_image("pull/tag", "v1", b"layer one").await;
    let resp = r.get("/v2/pull/tag/manifests/v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "content-type").as_deref(), Some(MANIFEST_V1));
    assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(content_length(&h), Some(manifest.len() as u64));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_get_by_digest_returns_exact_bytes_and_headers() {
    let r = TestRegistry::start().await;
    let (manifest, digest) = r.push_simple_image("pull/digest", "v1", b"layer").await;
    let resp = r.get(&format!("/v2/pull/digest/manifests/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "content-type").as_deref(), Some(MANIFEST_V1));
    assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(content_length(&h), Some(manifest.len() as u64));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_head_by_tag_and_digest() {
    let r = TestRegistry::start().await;
    let (manifest, digest) = r.push_simple_image("pull/head", "latest", b"l").await;
    for reference in ["latest", digest.as_str()] {
        let resp = r.head(&format!("/v2/pull/head/manifests/{reference}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "HEAD manifest {reference}");
        let h = resp.headers().clone();
        assert_eq!(
            header(&h, "docker-content-digest").as_deref(),
            Some(digest.as_str()),
            "HEAD {reference} Docker-Content-Digest"
        );
        assert_eq!(content_length(&h), Some(manifest.len() as u64), "HEAD {reference} Content-Length");
        assert_eq!(header(&h, "content-type").as_deref(), Some(MANIFEST_V1));
        assert!(resp.bytes().await.unwrap().is_empty(), "HEAD has no body");
    }
    r.shutdown().await;
}

#[tokio::test]
async fn unknown_manifest_is_404_manifest_unknown() {
    let r = TestRegistry::start().await;
    r.push_simple_image("pull/missing", "present", b"l").await;
    let resp = r.get("/v2/pull/missing/manifests/absent").await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "GET unknown tag").await;
    let resp = r.get(&format!("/v2/pull/missing/manifests/{UNKNOWN_DIGEST}")).await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "GET unknown digest").await;
    let resp = r.head("/v2/pull/missing/manifests/absent").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "HEAD unknown tag");
    r.shutdown().await;
}

#[tokio::test]
async fn blob_get_and_head() {
    let r = TestRegistry::start().await;
    let data = Rng::new(1).bytes(10_000);
    let digest = r.push_blob("pull/blob", &data).await;

    let resp = r.get(&format!("/v2/pull/blob/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(content_length(&h), Some(data.len() as u64));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());

    let resp = r.head(&format!("/v2/pull/blob/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(content_length(&h), Some(data.len() as u64));
    assert!(resp.bytes().await.unwrap().is_empty(), "HEAD has no body");
    r.shutdown().await;
}

#[tokio::test]
async fn unknown_blob_is_404_blob_unknown() {
    let r = TestRegistry::start().await;
    r.push_blob("pull/noblob", b"something").await;
    let resp = r.get(&format!("/v2/pull/noblob/blobs/{UNKNOWN_DIGEST}")).await;
    expect_error(resp, 404, &["BLOB_UNKNOWN"], "GET unknown blob").await;
    let resp = r.head(&format!("/v2/pull/noblob/blobs/{UNKNOWN_DIGEST}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "HEAD unknown blob");
    r.shutdown().await;
}

#[tokio::test]
async fn blob_is_scoped_to_its_repository() {
    let r = TestRegistry::start().await;
    let digest = r.push_blob("scope/a", b"only in a").await;
    assert_eq!(r.get_blob("scope/a", &digest).await, b"only in a");
    let resp = r.get(&format!("/v2/scope/b/blobs/{digest}")).await;
    expect_error(
        resp,
        404,
        &["BLOB_UNKNOWN", "NAME_UNKNOWN"],
        "blob read through a repository it was never pushed to",
    )
    .await;
    r.shutdown().await;
}

#[tokio::test]
async fn blob_range_get_returns_206_with_content_range() {
    let r = TestRegistry::start().await;
    let data = Rng::new(2).bytes(5_000);
    let digest = r.push_blob("pull/range", &data).await;

    let resp = r.get(&format!("/v2/pull/range/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(resp.headers(), "accept-ranges").as_deref(),
        Some("bytes"),
        "GET blob advertises Accept-Ranges: bytes"
    );

    let resp = r
        .req(Method::GET, &format!("/v2/pull/range/blobs/{digest}"))
        .header("Range", "bytes=100-1099")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let h = resp.headers().clone();
    assert_eq!(header(&h, "content-range").as_deref(), Some("bytes 100-1099/5000"));
    assert_eq!(content_length(&h), Some(1000));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[100..1100]);

    // Open-ended range: to the end of the blob.
    let resp = r
        .req(Method::GET, &format!("/v2/pull/range/blobs/{digest}"))
        .header("Range", "bytes=4990-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(resp.headers(), "content-range").as_deref(), Some("bytes 4990-4999/5000"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[4990..]);
    r.shutdown().await;
}

#[tokio::test]
async fn blob_range_across_many_chunks_reassembles_exactly() {
    let r = TestRegistry::start().await;
    // 3 MiB, half random, half zero runs and repeated text: many stored chunks and
    // several all-zero (unstored) ones.
    let mut rng = Rng::new(3);
    let mut data = Vec::new();
    let text = b"thaw snapshots restore quickly on any node. ".repeat(2000);
    while data.len() < 3 << 20 {
        match rng.below(3) {
            0 => data.extend(rng.bytes(200_000)),
            1 => data.extend(std::iter::repeat_n(0u8, 300_000)),
            _ => data.extend_from_slice(&text),
        }
    }
    let digest = r.push_blob("pull/bigrange", &data).await;
    assert_eq!(r.get_blob("pull/bigrange", &digest).await, data);
    for (a, b) in [(0usize, 0usize), (65_535, 65_536), (123_457, 2_345_678)] {
        let resp = r
            .req(Method::GET, &format!("/v2/pull/bigrange/blobs/{digest}"))
            .header("Range", format!("bytes={a}-{b}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "range {a}-{b}");
        assert_eq!(header(resp.headers(), "content-range"), Some(format!("bytes {a}-{b}/{}", data.len())));
        assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[a..=b], "range {a}-{b} content");
    }
    r.shutdown().await;
}

#[tokio::test]
async fn empty_and_all_zero_blobs_round_trip() {
    let r = TestRegistry::start().await;
    let empty = r.push_blob("pull/zero", b"").await;
    let resp = r.get(&format!("/v2/pull/zero/blobs/{empty}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_length(resp.headers()), Some(0));
    assert!(resp.bytes().await.unwrap().is_empty());

    let zeros = vec![0u8; 1 << 20];
    let digest = r.push_blob("pull/zero", &zeros).await;
    assert_eq!(r.get_blob("pull/zero", &digest).await, zeros);
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Push
// ---------------------------------------------------------------------------

#[tokio::test]
async fn monolithic_post_then_put_returns_201() {
    let r = TestRegistry::start().await;
    let data = Rng::new(4).bytes(70_000);
    let digest = sha256_digest(&data);
    let url = r.start_upload("push/mono").await;
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &digest)]))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let loc = location(&resp).expect("201 carries Location");
    assert!(!loc.is_empty());
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    // The Location names the blob, and reads back the same bytes.
    let resp = r.client.get(r.resolve(&loc)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET the 201 Location {loc}");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
    r.shutdown().await;
}

#[tokio::test]
async fn post_with_digest_is_a_single_request_upload() {
    let r = TestRegistry::start().await;
    let data = b"{\"single\":\"request\"}".to_vec();
    let digest = sha256_digest(&data);
    let resp = r
        .req(Method::POST, "/v2/push/single/blobs/uploads/")
        .query(&[("digest", &digest)])
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(location(&resp).is_some_and(|l| !l.is_empty()));
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(r.get_blob("push/single", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_with_content_range_then_final_put_chunk() {
    let r = TestRegistry::start().await;
    let data = Rng::new(5).bytes(2_500);
    let digest = sha256_digest(&data);
    let mut url = r.start_upload("push/chunked").await;
    for (a, b) in [(0usize, 999usize), (1000, 1999)] {
        let resp = r
            .client
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{a}-{b}"))
            .body(data[a..=b].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "PATCH {a}-{b}");
        assert_eq!(upload_range(resp.headers()), Some((0, b as u64)), "Range after PATCH {a}-{b}");
        url = r.resolve(&location(&resp).expect("PATCH 202 carries Location"));
    }
    // The final chunk travels with the closing PUT.
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &digest)]))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "2000-2499")
        .body(data[2000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_eq!(r.get_blob("push/chunked", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_out_of_order_patch_is_416() {
    let r = TestRegistry::start().await;
    let data = Rng::new(6).bytes(2_000);
    let url = r.start_upload("push/ooo").await;
    let resp = r
        .client
        .patch(&url)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "1000-1999")
        .body(data[1000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "first PATCH not starting at 0");
    r.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_repeated_patch_is_416_and_upload_can_resume() {
    let r = TestRegistry::start().await;
    let data = Rng::new(7).bytes(2_000);
    let digest = sha256_digest(&data);
    let url = r.start_upload("push/repeat").await;
    let patch = |url: String, a: usize, b: usize| {
        r.client
            .patch(url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{a}-{b}"))
            .body(data[a..=b].to_vec())
            .send()
    };
    let resp = patch(url.clone(), 0, 999).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = r.resolve(&location(&resp).unwrap());

    let resp = patch(url.clone(), 0, 999).await.unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "repeating the first range");
    assert_eq!(upload_range(resp.headers()), Some((0, 999)), "416 reports the last valid range");

    // After the 416 the session is still usable from the last valid range.
    let resp = patch(url.clone(), 1000, 1999).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "resume after 416");
    let url = r.resolve(&location(&resp).unwrap());
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &digest)]))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(r.get_blob("push/repeat", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn streamed_patch_without_content_range_then_empty_put() {
    let r = TestRegistry::start().await;
    let data = Rng::new(8).bytes(300_000);
    let digest = sha256_digest(&data);
    let mut url = r.start_upload("push/streamed").await;
    for part in [&data[..123_456], &data[123_456..]] {
        let resp = r
            .client
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        url = r.resolve(&location(&resp).expect("Location"));
    }
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &digest)]))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_eq!(r.get_blob("push/streamed", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn upload_status_is_204_with_range() {
    let r = TestRegistry::start().await;
    let url = r.start_upload("push/status").await;
    let resp = r
        .client
        .patch(&url)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "0-1023")
        .body(vec![7u8; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = r.resolve(&location(&resp).unwrap());
    let resp = r.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(upload_range(resp.headers()), Some((0, 1023)));
    assert!(location(&resp).is_some(), "status answer carries Location");
    r.shutdown().await;
}

#[tokio::test]
async fn upload_cancel_makes_session_unknown() {
    let r = TestRegistry::start().await;
    let url = r.start_upload("push/cancel").await;
    let resp = r.client.delete(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "DELETE upload session");
    let resp = r.client.get(&url).send().await.unwrap();
    expect_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"], "status of a cancelled upload").await;
    r.shutdown().await;
}

#[tokio::test]
async fn cross_repository_mount_returns_201() {
    let r = TestRegistry::start().await;
    let data = Rng::new(9).bytes(100_000);
    let digest = r.push_blob("mount/source", &data).await;
    let resp = r
        .req(Method::POST, "/v2/mount/target/blobs/uploads/")
        .query(&[("mount", digest.as_str()), ("from", "mount/source")])
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "mount of an existing blob");
    assert!(location(&resp).is_some_and(|l| l.contains(&digest)));
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(r.get_blob("mount/target", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn mount_of_blob_missing_in_from_falls_back_to_upload_session() {
    let r = TestRegistry::start().await;
    r.push_blob("mount/src2", b"unrelated").await;
    let data = b"not in src2".to_vec();
    let digest = sha256_digest(&data);
    let resp = r
        .req(Method::POST, "/v2/mount/dst2/blobs/uploads/")
        .query(&[("mount", digest.as_str()), ("from", "mount/src2")])
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "mount fallback opens a session");
    let url = r.resolve(&location(&resp).expect("fallback 202 carries Location"));
    // Not mounted: the blob is not readable in the target yet.
    let resp = r.get(&format!("/v2/mount/dst2/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The session it opened works.
    let resp =
        r.client.put(with_query(&url, &[("digest", &digest)])).body(data.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(r.get_blob("mount/dst2", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_put_returns_201_with_location_and_digest() {
    let r = TestRegistry::start().await;
    let config = b"{}";
    r.push_blob("push/manifest", config).await;
    r.push_blob("push/manifest", b"layer").await;
    let manifest = image_manifest(
        descriptor(CONFIG_V1, config),
        vec![descriptor(LAYER_TAR, b"layer")],
        json!({"annotations": {"org.example": "x"}}),
    );
    let digest = sha256_digest(&manifest);
    let resp = r.put_manifest("push/manifest", "v1", MANIFEST_V1, &manifest).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(location(&resp).is_some_and(|l| !l.is_empty()));
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_put_by_digest_then_get() {
    let r = TestRegistry::start().await;
    let config = b"{\"by\":\"digest\"}";
    r.push_blob("push/bydigest", config).await;
    let manifest = image_manifest(descriptor(CONFIG_V1, config), vec![], json!({}));
    let digest = sha256_digest(&manifest);
    let resp = r.put_manifest("push/bydigest", &digest, MANIFEST_V1, &manifest).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = r.get(&format!("/v2/push/bydigest/manifests/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());
    // Pushing by digest creates no tag.
    assert!(r.tags("push/bydigest").await.is_empty());
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_with_subject_answers_oci_subject() {
    let r = TestRegistry::start().await;
    let (subject, subject_digest) = r.push_simple_image("push/subject", "base", b"l").await;
    r.push_blob("push/subject", b"{}").await;
    let referrer = image_manifest(
        descriptor(EMPTY_JSON_TYPE, b"{}"),
        vec![descriptor(EMPTY_JSON_TYPE, b"{}")],
        json!({
            "artifactType": "application/vnd.example.sig",
            "subject": descriptor(MANIFEST_V1, &subject),
        }),
    );
    let resp = r.put_manifest("push/subject", &sha256_digest(&referrer), MANIFEST_V1, &referrer).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(resp.headers(), "oci-subject").as_deref(), Some(subject_digest.as_str()));
    r.shutdown().await;
}

#[tokio::test]
async fn image_index_put_and_get_keeps_its_media_type() {
    let r = TestRegistry::start().await;
    let (manifest, _) = r.push_simple_image("push/index", "amd64", b"l").await;
    let mut child = descriptor(MANIFEST_V1, &manifest);
    child["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let index = image_index(vec![child], json!({}));
    let digest = r.push_manifest("push/index", "multi", INDEX_V1, &index).await;
    let resp = r.get("/v2/push/index/manifests/multi").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), "content-type").as_deref(), Some(INDEX_V1));
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(digest.as_str()));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), index.as_slice());
    r.shutdown().await;
}

#[tokio::test]
async fn retagging_moves_the_tag_and_keeps_the_old_manifest() {
    let r = TestRegistry::start().await;
    let (m1, d1) = r.push_simple_image("push/retag", "t", b"one").await;
    let (m2, d2) = r.push_simple_image("push/retag", "t", b"two").await;
    assert_ne!(d1, d2);
    let resp = r.get("/v2/push/retag/manifests/t").await;
    assert_eq!(resp.bytes().await.unwrap().as_ref(), m2.as_slice());
    let resp = r.get(&format!("/v2/push/retag/manifests/{d1}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), m1.as_slice());
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Content discovery
// ---------------------------------------------------------------------------

const TAGS: [&str; 6] = ["v2", "alpha", "v10", "latest", "beta", "v1"];

async fn push_tags(r: &TestRegistry, name: &str) -> Vec<String> {
    let (manifest, _) = r.push_simple_image(name, TAGS[0], b"tagged").await;
    for t in &TAGS[1..] {
        r.push_manifest(name, t, MANIFEST_V1, &manifest).await;
    }
    let mut sorted: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    sorted.sort();
    sorted
}

/// The target of a `Link: <…>; rel="next"` header.
fn next_link(h: &reqwest::header::HeaderMap) -> Option<String> {
    let v = header(h, "link")?;
    assert!(v.contains("rel=\"next\""), "Link header {v:?} lacks rel=\"next\"");
    let start = v.find('<')? + 1;
    let end = v.find('>')?;
    Some(v[start..end].to_owned())
}

fn tag_list(v: &Value) -> Vec<String> {
    v["tags"].as_array().expect("tags array").iter().map(|t| t.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn tags_list_is_lexically_sorted() {
    let r = TestRegistry::start().await;
    let sorted = push_tags(&r, "disc/tags").await;
    let resp = r.get("/v2/disc/tags/tags/list").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["name"], "disc/tags");
    assert_eq!(tag_list(&v), sorted);
    r.shutdown().await;
}

#[tokio::test]
async fn tags_list_n_limits_and_link_pages_through_all() {
    let r = TestRegistry::start().await;
    let sorted = push_tags(&r, "disc/page").await;
    let resp = r.get("/v2/disc/page/tags/list?n=4").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut next = next_link(resp.headers());
    assert!(next.is_some(), "n=4 of 6 tags must give a Link to the rest");
    let v: Value = resp.json().await.unwrap();
    let mut all = tag_list(&v);
    assert_eq!(all, sorted[..4]);
    let mut pages = 1;
    while let Some(link) = next {
        pages += 1;
        assert!(pages <= 3, "pagination does not terminate");
        let resp = r.client.get(r.resolve(&link)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET Link {link}");
        next = next_link(resp.headers());
        let v: Value = resp.json().await.unwrap();
        let page = tag_list(&v);
        assert!(page.len() <= 4, "page longer than n");
        all.extend(page);
    }
    assert_eq!(all, sorted, "pages concatenate to the full list");
    r.shutdown().await;
}

#[tokio::test]
async fn tags_list_last_starts_after_the_given_tag() {
    let r = TestRegistry::start().await;
    let sorted = push_tags(&r, "disc/last").await;
    let resp = r.get("/v2/disc/last/tags/list?n=2&last=beta").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let i = sorted.iter().position(|t| t == "beta").unwrap();
    assert_eq!(tag_list(&v), sorted[i + 1..i + 3]);

    let resp = r.get("/v2/disc/last/tags/list?last=v10").await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(tag_list(&v), vec!["v2".to_owned()]);
    r.shutdown().await;
}

#[tokio::test]
async fn tags_list_of_unknown_repository_is_404_name_unknown() {
    let r = TestRegistry::start().await;
    let resp = r.get("/v2/never/pushed/tags/list").await;
    expect_error(resp, 404, &["NAME_UNKNOWN"], "tags/list of unknown repository").await;
    r.shutdown().await;
}

struct Referrers {
    subject: String,
    /// digest → (artifactType, annotation value)
    expected: Vec<(String, String, String)>,
}

const TYPE_A: &str = "application/vnd.example.sbom";
const TYPE_B: &str = "application/vnd.example.signature";
const ANNOTATION: &str = "org.example.note";

/// Pushes a subject image and four referrers: two of type A (one via `artifactType`, one
/// via the config media type), one of type B, and one image index of type B.
async fn push_referrers(r: &TestRegistry, name: &str) -> Referrers {
    let (subject_bytes, subject) = r.push_simple_image(name, "subject", b"subject").await;
    let subject_desc = descriptor(MANIFEST_V1, &subject_bytes);
    r.push_blob(name, b"{}").await;
    let sbom = b"{\"sbom\":true}";
    r.push_blob(name, sbom).await;
    let mut expected = Vec::new();

    let a1 = image_manifest(
        descriptor(EMPTY_JSON_TYPE, b"{}"),
        vec![descriptor("application/json", sbom)],
        json!({"artifactType": TYPE_A, "subject": subject_desc,
               "annotations": {ANNOTATION: "a1"}}),
    );
    // Artifact type given by the config media type (no artifactType field).
    let a2 = image_manifest(
        descriptor(TYPE_A, sbom),
        vec![descriptor("application/json", sbom)],
        json!({"subject": subject_desc, "annotations": {ANNOTATION: "a2"}}),
    );
    let b1 = image_manifest(
        descriptor(EMPTY_JSON_TYPE, b"{}"),
        vec![descriptor(EMPTY_JSON_TYPE, b"{}")],
        json!({"artifactType": TYPE_B, "subject": subject_desc,
               "annotations": {ANNOTATION: "b1"}}),
    );
    for (m, t, note) in [(a1, TYPE_A, "a1"), (a2, TYPE_A, "a2"), (b1, TYPE_B, "b1")] {
        let d = sha256_digest(&m);
        let resp = r.put_manifest(name, &d, MANIFEST_V1, &m).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(resp.headers(), "oci-subject").as_deref(), Some(subject.as_str()));
        expected.push((d, t.to_owned(), note.to_owned()));
    }
    let idx = image_index(
        vec![],
        json!({"artifactType": TYPE_B, "subject": subject_desc,
               "annotations": {ANNOTATION: "i1"}}),
    );
    let d = sha256_digest(&idx);
    let resp = r.put_manifest(name, &d, INDEX_V1, &idx).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    expected.push((d, TYPE_B.to_owned(), "i1".to_owned()));
    Referrers { subject, expected }
}

async fn get_referrers(r: &TestRegistry, path: &str) -> (reqwest::header::HeaderMap, Value) {
    let resp = r.get(path).await;
    assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
    let h = resp.headers().clone();
    assert_eq!(header(&h, "content-type").as_deref(), Some(INDEX_V1), "referrers Content-Type");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], INDEX_V1);
    (h, v)
}

fn referrer_set(v: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = v["manifests"]
        .as_array()
        .expect("manifests array")
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap_or_default().to_owned(),
                d["artifactType"].as_str().unwrap_or_default().to_owned(),
                d["annotations"][ANNOTATION].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn referrers_lists_every_manifest_with_that_subject() {
    let r = TestRegistry::start().await;
    let refs = push_referrers(&r, "disc/referrers").await;
    let (_, v) = get_referrers(&r, &format!("/v2/disc/referrers/referrers/{}", refs.subject)).await;
    let mut want = refs.expected.clone();
    want.sort();
    assert_eq!(referrer_set(&v), want);
    // Each descriptor carries the referrer's media type and size.
    for d in v["manifests"].as_array().unwrap() {
        assert!(d["mediaType"] == MANIFEST_V1 || d["mediaType"] == INDEX_V1);
        assert!(d["size"].as_u64().is_some_and(|s| s > 0));
    }
    r.shutdown().await;
}

#[tokio::test]
async fn referrers_artifact_type_filter() {
    let r = TestRegistry::start().await;
    let refs = push_referrers(&r, "disc/filter").await;
    let (h, v) =
        get_referrers(&r, &format!("/v2/disc/filter/referrers/{}?artifactType={TYPE_A}", refs.subject)).await;
    assert_eq!(header(&h, "oci-filters-applied").as_deref(), Some("artifactType"));
    let mut want: Vec<_> = refs.expected.iter().filter(|e| e.1 == TYPE_A).cloned().collect();
    want.sort();
    assert_eq!(referrer_set(&v), want);
    r.shutdown().await;
}

#[tokio::test]
async fn referrers_of_unknown_digest_is_empty_index() {
    let r = TestRegistry::start().await;
    r.push_simple_image("disc/norefs", "x", b"l").await;
    let (_, v) = get_referrers(&r, &format!("/v2/disc/norefs/referrers/{UNKNOWN_DIGEST}")).await;
    assert_eq!(v["manifests"], json!([]));
    r.shutdown().await;
}

#[tokio::test]
async fn referrers_to_a_subject_not_yet_pushed() {
    let r = TestRegistry::start().await;
    r.push_blob("disc/early", b"{}").await;
    let subject = image_manifest(descriptor(EMPTY_JSON_TYPE, b"{}"), vec![], json!({}));
    let subject_digest = sha256_digest(&subject);
    let referrer = image_manifest(
        descriptor(EMPTY_JSON_TYPE, b"{}"),
        vec![descriptor(EMPTY_JSON_TYPE, b"{}")],
        json!({"artifactType": TYPE_B, "subject": descriptor(MANIFEST_V1, &subject),
               "annotations": {ANNOTATION: "early"}}),
    );
    let rd = sha256_digest(&referrer);
    let resp = r.put_manifest("disc/early", &rd, MANIFEST_V1, &referrer).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(resp.headers(), "oci-subject").as_deref(), Some(subject_digest.as_str()));
    let (_, v) = get_referrers(&r, &format!("/v2/disc/early/referrers/{subject_digest}")).await;
    assert_eq!(referrer_set(&v), vec![(rd, TYPE_B.to_owned(), "early".to_owned())]);
    r.shutdown().await;
}

#[tokio::test]
async fn referrers_drop_a_deleted_referrer() {
    let r = TestRegistry::start().await;
    let refs = push_referrers(&r, "disc/refdel").await;
    let gone = refs.expected[0].0.clone();
    let resp = r.delete(&format!("/v2/disc/refdel/manifests/{gone}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let (_, v) = get_referrers(&r, &format!("/v2/disc/refdel/referrers/{}", refs.subject)).await;
    let mut want: Vec<_> = refs.expected[1..].to_vec();
    want.sort();
    assert_eq!(referrer_set(&v), want);
    r.shutdown().await;
}

#[tokio::test]
async fn catalog_lists_repositories_in_order_with_pagination() {
    let r = TestRegistry::start().await;
    for name in ["cat/zeta", "cat/alpha", "cat/mid"] {
        r.push_simple_image(name, "v1", b"l").await;
    }
    let resp = r.get("/v2/_catalog").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let repos: Vec<&str> = v["repositories"]
        .as_array()
        .expect("repositories array")
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(repos, ["cat/alpha", "cat/mid", "cat/zeta"]);

    let resp = r.get("/v2/_catalog?n=2").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let link = next_link(resp.headers()).expect("n=2 of 3 repositories gives a Link");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["cat/alpha", "cat/mid"]));
    let resp = r.client.get(r.resolve(&link)).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["cat/zeta"]));
    r.shutdown().await;
}

#[tokio::test]
async fn extension_discovery_advertises_thaw() {
    let r = TestRegistry::start().await;
    let resp = r.get("/v2/_oci/ext/discover").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert!(v.to_string().contains("\"_thaw\""), "discover lists the _thaw extension: {v}");
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Content management
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_manifest_by_digest_is_202_then_404() {
    let r = TestRegistry::start().await;
    let (_, digest) = r.push_simple_image("mgmt/manifest", "doomed", b"l").await;
    let resp = r.delete(&format!("/v2/mgmt/manifest/manifests/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = r.get(&format!("/v2/mgmt/manifest/manifests/{digest}")).await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "GET deleted manifest").await;
    // A tag cannot resolve to a deleted manifest.
    let resp = r.get("/v2/mgmt/manifest/manifests/doomed").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "tag of deleted manifest");
    assert!(!r.tags("mgmt/manifest").await.contains(&"doomed".to_owned()));
    // Deleting again: 404.
    let resp = r.delete(&format!("/v2/mgmt/manifest/manifests/{digest}")).await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "DELETE deleted manifest").await;
    r.shutdown().await;
}

#[tokio::test]
async fn delete_tag_keeps_the_manifest() {
    let r = TestRegistry::start().await;
    let (manifest, digest) = r.push_simple_image("mgmt/tag", "keep", b"l").await;
    r.push_manifest("mgmt/tag", "drop", MANIFEST_V1, &manifest).await;
    let resp = r.delete("/v2/mgmt/tag/manifests/drop").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = r.get("/v2/mgmt/tag/manifests/drop").await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "GET deleted tag").await;
    assert_eq!(r.tags("mgmt/tag").await, vec!["keep".to_owned()]);
    let resp = r.get(&format!("/v2/mgmt/tag/manifests/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::OK, "manifest survives its tag");
    let resp = r.get("/v2/mgmt/tag/manifests/keep").await;
    assert_eq!(resp.status(), StatusCode::OK, "the other tag survives");
    r.shutdown().await;
}

#[tokio::test]
async fn delete_blob_is_202_then_404() {
    let r = TestRegistry::start().await;
    let digest = r.push_blob("mgmt/blob", b"delete me").await;
    let resp = r.delete(&format!("/v2/mgmt/blob/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = r.get(&format!("/v2/mgmt/blob/blobs/{digest}")).await;
    expect_error(resp, 404, &["BLOB_UNKNOWN"], "GET deleted blob").await;
    let resp = r.delete(&format!("/v2/mgmt/blob/blobs/{digest}")).await;
    expect_error(resp, 404, &["BLOB_UNKNOWN"], "DELETE deleted blob").await;
    r.shutdown().await;
}

#[tokio::test]
async fn delete_blob_in_one_repository_leaves_it_in_another() {
    let r = TestRegistry::start().await;
    let data = Rng::new(10).bytes(200_000);
    let digest = r.push_blob("mgmt/one", &data).await;
    r.push_blob("mgmt/two", &data).await;
    let resp = r.delete(&format!("/v2/mgmt/one/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = r.get(&format!("/v2/mgmt/one/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.get_blob("mgmt/two", &digest).await, data);
    r.shutdown().await;
}

#[tokio::test]
async fn delete_unknown_manifest_is_404() {
    let r = TestRegistry::start().await;
    r.push_simple_image("mgmt/unknown", "x", b"l").await;
    let resp = r.delete(&format!("/v2/mgmt/unknown/manifests/{UNKNOWN_DIGEST}")).await;
    expect_error(resp, 404, &["MANIFEST_UNKNOWN"], "DELETE unknown manifest").await;
    r.shutdown().await;
}
