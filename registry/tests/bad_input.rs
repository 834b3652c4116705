//! Hostile and broken input: every request here must fail with the spec's status and
//! error code (never a 5xx), and after each one nothing new may be reachable: no new file
//! under `repositories/`, tags unchanged, the blob still 404.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

/// A registry with one repository holding one tagged image, so "nothing changed" is
/// measured against a non-empty state.
async fn seeded(name: &str) -> TestRegistry {
    let r = TestRegistry::start().await;
    r.push_simple_image(name, "seed", b"seed layer").await;
    r
}

async fn assert_blob_absent(r: &TestRegistry, name: &str, digest: &str) {
    let resp = r.get(&format!("/v2/{name}/blobs/{digest}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "blob {digest} must not be readable in {name}");
}

// ---------------------------------------------------------------------------
// OCI uploads
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_digest_on_monolithic_put_is_digest_invalid() {
    let r = seeded("bad/digest").await;
    let before = reachable_state(&r.storage());
    let data = Rng::new(20).bytes(100_000);
    let claimed = sha256_digest(b"something else entirely");
    let url = r.start_upload("bad/digest").await;
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &claimed)]))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, &["DIGEST_INVALID"], "PUT with wrong digest").await;
    assert_nothing_new_reachable(&r.storage(), &before, "wrong digest PUT");
    assert_blob_absent(&r, "bad/digest", &claimed).await;
    assert_blob_absent(&r, "bad/digest", &sha256_digest(&data)).await;
    r.shutdown().await;
}

#[tokio::test]
async fn wrong_digest_on_post_with_digest_is_digest_invalid() {
    let r = seeded("bad/postdigest").await;
    let before = reachable_state(&r.storage());
    let claimed = sha256_digest(b"not this");
    let resp = r
        .req(Method::POST, "/v2/bad/postdigest/blobs/uploads/")
        .query(&[("digest", &claimed)])
        .header("Content-Type", "application/octet-stream")
        .body(b"this".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, &["DIGEST_INVALID"], "POST ?digest= with wrong digest").await;
    assert_nothing_new_reachable(&r.storage(), &before, "wrong digest POST");
    assert_blob_absent(&r, "bad/postdigest", &claimed).await;
    assert_blob_absent(&r, "bad/postdigest", &sha256_digest(b"this")).await;
    r.shutdown().await;
}

#[tokio::test]
async fn wrong_digest_after_chunked_upload_is_digest_invalid() {
    let r = seeded("bad/chunkdigest").await;
    let before = reachable_state(&r.storage());
    let data = Rng::new(21).bytes(3 * MIB);
    let claimed = sha256_digest(&data[1..]);
    let mut url = r.start_upload("bad/chunkdigest").await;
    for (a, b) in [(0, MIB), (MIB, 3 * MIB)] {
        let resp = r
            .client
            .patch(&url)
            .header("Content-Range", format!("{}-{}", a, b - 1))
            .body(data[a..b].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        url = r.resolve(&location(&resp).unwrap());
    }
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &claimed)]))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, &["DIGEST_INVALID"], "closing PUT with wrong digest").await;
    assert_nothing_new_reachable(&r.storage(), &before, "chunked upload, wrong digest");
    assert_blob_absent(&r, "bad/chunkdigest", &claimed).await;
    assert_blob_absent(&r, "bad/chunkdigest", &sha256_digest(&data)).await;
    r.shutdown().await;
}

#[tokio::test]
async fn body_shorter_than_content_length_links_nothing() {
    let r = seeded("bad/truncated").await;
    let before = reachable_state(&r.storage());
    let data = Rng::new(22).bytes(200_000);
    let digest = sha256_digest(&data);
    let url = reqwest::Url::parse(&r.start_upload("bad/truncated").await).unwrap();
    let path = format!(
        "{}?{}digest={}",
        url.path(),
        url.query().map(|q| format!("{q}&")).unwrap_or_default(),
        digest
    );
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        r.addr(),
        data.len()
    );
    // Half the body, then the client goes away.
    let answer = raw_http(r.addr(), &head, &data[..100_000], true).await;
    if let Some((status, text)) = &answer {
        assert!(*status < 500, "a truncated body is the client's fault, not a {status}: {text}");
        assert_ne!(*status, 201, "a truncated body must not commit: {text}");
    }
    assert_nothing_new_reachable(&r.storage(), &before, "truncated PUT body");
    assert_blob_absent(&r, "bad/truncated", &digest).await;
    r.shutdown().await;
}

#[tokio::test]
async fn put_digest_after_short_upload_is_rejected() {
    let r = seeded("bad/short").await;
    let before = reachable_state(&r.storage());
    let data = Rng::new(23).bytes(2 * MIB);
    let digest = sha256_digest(&data);
    let url = r.start_upload("bad/short").await;
    let resp = r
        .client
        .patch(&url)
        .header("Content-Range", format!("0-{}", MIB - 1))
        .body(data[..MIB].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = r.resolve(&location(&resp).unwrap());
    let resp = r
        .client
        .put(with_query(&url, &[("digest", &digest)]))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, &["DIGEST_INVALID", "BLOB_UPLOAD_INVALID"], "closing PUT after half the blob")
        .await;
    assert_nothing_new_reachable(&r.storage(), &before, "short upload");
    assert_blob_absent(&r, "bad/short", &digest).await;
    r.shutdown().await;
}

#[tokio::test]
async fn unknown_upload_session_is_404_blob_upload_unknown() {
    let r = seeded("bad/session").await;
    let before = reachable_state(&r.storage());
    let path = "/v2/bad/session/blobs/uploads/6f1c3e2a-9b7d-4c1e-8f00-0123456789ab";
    let resp = r.req(Method::PATCH, path).body(b"data".to_vec()).send().await.unwrap();
    expect_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"], "PATCH unknown session").await;
    let resp = r
        .req(Method::PUT, path)
        .query(&[("digest", sha256_digest(b"data"))])
        .body(b"data".to_vec())
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"], "PUT unknown session").await;
    let resp = r.get(path).await;
    expect_error(resp, 404, &["BLOB_UPLOAD_UNKNOWN"], "GET unknown session").await;
    assert_nothing_new_reachable(&r.storage(), &before, "unknown session");
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

/// An image manifest of exactly `size` bytes (padded with an annotation), whose config
/// and layer exist in `name`.
async fn manifest_of_size(r: &TestRegistry, name: &str, size: usize) -> Vec<u8> {
    let config = b"{\"size\":\"test\"}";
    r.push_blob(name, config).await;
    let build = |pad: usize| {
        image_manifest(
            descriptor(CONFIG_V1, config),
            vec![],
            json!({"annotations": {"pad": "x".repeat(pad)}}),
        )
    };
    let overhead = build(0).len();
    let m = build(size - overhead);
    assert_eq!(m.len(), size);
    m
}

#[tokio::test]
async fn manifest_just_under_4_mib_is_accepted() {
    let r = seeded("bad/bigok").await;
    let m = manifest_of_size(&r, "bad/bigok", 4 * MIB - 4096).await;
    r.push_manifest("bad/bigok", "big", MANIFEST_V1, &m).await;
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_over_4_mib_is_413() {
    let r = seeded("bad/big").await;
    let m = manifest_of_size(&r, "bad/big", 4 * MIB + 1).await;
    let before = reachable_state(&r.storage());
    // Over a raw socket: a registry may (and this one should) answer from the
    // Content-Length alone and close, which makes an ordinary client fail mid-send.
    let head = format!(
        "PUT /v2/bad/big/manifests/huge HTTP/1.1\r\nHost: {}\r\nContent-Type: {MANIFEST_V1}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.addr(),
        m.len()
    );
    let (status, text) =
        raw_http_early(r.addr(), &head, &m).await.expect("an answer to a 4 MiB + 1 manifest");
    assert_eq!(status, 413, "manifest of 4 MiB + 1: {text}");
    assert!(text.contains("SIZE_INVALID"), "413 names SIZE_INVALID: {text}");
    assert_nothing_new_reachable(&r.storage(), &before, "oversized manifest");
    assert_eq!(r.tags("bad/big").await, vec!["seed".to_owned()]);
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_naming_missing_blobs_is_manifest_blob_unknown() {
    let r = seeded("bad/missing").await;
    let before = reachable_state(&r.storage());
    let config = b"{\"present\":true}";
    r.push_blob("bad/missing", config).await;
    let before_with_config = reachable_state(&r.storage());
    assert!(before_with_config.len() > before.len());

    // Missing layer.
    let m = image_manifest(
        descriptor(CONFIG_V1, config),
        vec![descriptor(LAYER_TAR, b"never uploaded")],
        json!({}),
    );
    let resp = r.put_manifest("bad/missing", "t1", MANIFEST_V1, &m).await;
    expect_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"], "missing layer").await;
    // Missing config.
    let m2 = image_manifest(descriptor(CONFIG_V1, b"{\"absent\":true}"), vec![], json!({}));
    let resp = r.put_manifest("bad/missing", "t2", MANIFEST_V1, &m2).await;
    expect_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"], "missing config").await;
    // A blob that exists only in another repository does not count either.
    let other = r.push_blob("bad/elsewhere", b"elsewhere").await;
    let before_with_config = reachable_state(&r.storage());
    let m3 = image_manifest(
        descriptor(CONFIG_V1, config),
        vec![json!({"mediaType": LAYER_TAR, "digest": other, "size": 9})],
        json!({}),
    );
    let resp = r.put_manifest("bad/missing", "t3", MANIFEST_V1, &m3).await;
    expect_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"], "layer only in another repository").await;

    assert_nothing_new_reachable(&r.storage(), &before_with_config, "manifests with missing blobs");
    assert_eq!(r.tags("bad/missing").await, vec!["seed".to_owned()]);
    for m in [&m, &m2, &m3] {
        let resp = r.get(&format!("/v2/bad/missing/manifests/{}", sha256_digest(m))).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    r.shutdown().await;
}

#[tokio::test]
async fn malformed_manifest_is_manifest_invalid() {
    let r = seeded("bad/json").await;
    let before = reachable_state(&r.storage());
    for (what, body) in [
        ("not JSON", b"this is not json".to_vec()),
        ("truncated JSON", b"{\"schemaVersion\": 2, \"config\": {".to_vec()),
        ("wrong schemaVersion", serde_json::to_vec(&json!({"schemaVersion": 1, "layers": []})).unwrap()),
    ] {
        let resp = r.put_manifest("bad/json", "broken", MANIFEST_V1, &body).await;
        expect_error(resp, 400, &["MANIFEST_INVALID"], what).await;
    }
    assert_nothing_new_reachable(&r.storage(), &before, "malformed manifests");
    r.shutdown().await;
}

#[tokio::test]
async fn manifest_put_under_the_wrong_digest_is_digest_invalid() {
    let r = seeded("bad/mdigest").await;
    let config = b"{}";
    r.push_blob("bad/mdigest", config).await;
    let before = reachable_state(&r.storage());
    let m = image_manifest(descriptor(CONFIG_V1, config), vec![], json!({}));
    let wrong = sha256_digest(b"some other manifest");
    let resp = r.put_manifest("bad/mdigest", &wrong, MANIFEST_V1, &m).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "manifest PUT by wrong digest").await;
    assert_nothing_new_reachable(&r.storage(), &before, "manifest by wrong digest");
    for d in [wrong, sha256_digest(&m)] {
        let resp = r.get(&format!("/v2/bad/mdigest/manifests/{d}")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

async fn assert_name_invalid(r: &TestRegistry, name: &str) {
    let resp = r.req(Method::POST, &format!("/v2/{name}/blobs/uploads/")).send().await.unwrap();
    expect_error(resp, 400, &["NAME_INVALID"], &format!("POST uploads to {name:?}")).await;
    let resp = r.put_manifest(name, "t", MANIFEST_V1, br#"{"schemaVersion":2}"#).await;
    expect_error(resp, 400, &["NAME_INVALID"], &format!("PUT manifest to {name:?}")).await;
}

#[tokio::test]
async fn uppercase_and_malformed_names_are_name_invalid() {
    let r = seeded("bad/names").await;
    let before = reachable_state(&r.storage());
    for name in ["Upper/case", "bad/Name", "a..b", "a/-lead", "trail-/x", "a//b", "a__-b"] {
        assert_name_invalid(&r, name).await;
    }
    assert_nothing_new_reachable(&r.storage(), &before, "invalid names");
    r.shutdown().await;
}

#[tokio::test]
async fn dot_dot_path_segments_are_name_invalid() {
    let r = seeded("bad/dots").await;
    let before = reachable_state(&r.storage());
    // reqwest normalizes `..` away, so these go over a raw socket.
    for name in ["a/../b", "../escape", "a/..", "bad/dots/../../x"] {
        let head = format!(
            "POST /v2/{name}/blobs/uploads/ HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            r.addr()
        );
        let (status, text) = raw_http(r.addr(), &head, b"", false)
            .await
            .unwrap_or_else(|| panic!("no answer to POST /v2/{name}/blobs/uploads/"));
        assert_eq!(status, 400, "POST uploads to {name:?}: {text}");
        assert!(text.contains("NAME_INVALID"), "POST uploads to {name:?} names NAME_INVALID: {text}");
    }
    assert_nothing_new_reachable(&r.storage(), &before, "dot-dot names");
    assert!(
        !r.storage().parent().unwrap().join("escape").exists() && !r.storage().join("escape").exists(),
        "nothing escaped the storage tree"
    );
    r.shutdown().await;
}

#[tokio::test]
async fn name_over_255_characters_is_name_invalid() {
    let r = seeded("bad/long").await;
    // 255 characters is fine (positive control)…
    let ok = format!("long/{}", "a".repeat(250));
    assert_eq!(ok.len(), 255);
    r.start_upload(&ok).await;
    // …256 is not.
    let before = reachable_state(&r.storage());
    let too_long = format!("long/{}", "a".repeat(251));
    assert_name_invalid(&r, &too_long).await;
    assert_nothing_new_reachable(&r.storage(), &before, "256-character name");
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// Digests and ranges
// ---------------------------------------------------------------------------

const BAD_DIGESTS: [&str; 6] = [
    "sha256:abc",
    "notadigest",
    "sha256:",
    "sha256:ZZZZ567890123456789012345678901234567890123456789012345678901234",
    // Upper-case hex is not a valid sha256 encoding.
    "sha256:ABCDEF7890123456789012345678901234567890123456789012345678901234",
    "sha256:0123456789012345678901234567890123456789012345678901234567890123ff",
];

#[tokio::test]
async fn malformed_digests_are_400_digest_invalid() {
    let r = seeded("bad/dg").await;
    let before = reachable_state(&r.storage());
    for d in BAD_DIGESTS {
        let resp = r.get(&format!("/v2/bad/dg/blobs/{d}")).await;
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("GET blob {d}")).await;
        let resp = r.head(&format!("/v2/bad/dg/blobs/{d}")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "HEAD blob {d}");
        let resp = r.delete(&format!("/v2/bad/dg/blobs/{d}")).await;
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("DELETE blob {d}")).await;
        let resp = r.get(&format!("/v2/bad/dg/referrers/{d}")).await;
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("referrers of {d}")).await;
        let resp = r.get(&format!("/v2/bad/dg/_thaw/blobs/{d}/recipe")).await;
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("recipe of {d}")).await;

        let resp = r
            .req(Method::POST, "/v2/bad/dg/blobs/uploads/")
            .query(&[("digest", d)])
            .body(b"x".to_vec())
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("POST ?digest={d}")).await;

        let url = r.start_upload("bad/dg").await;
        let resp = r.client.put(with_query(&url, &[("digest", d)])).body(b"x".to_vec()).send().await.unwrap();
        expect_error(resp, 400, &["DIGEST_INVALID"], &format!("PUT ?digest={d}")).await;
    }
    assert_nothing_new_reachable(&r.storage(), &before, "malformed digests");
    r.shutdown().await;
}

#[tokio::test]
async fn range_past_the_end_is_416() {
    let r = seeded("bad/range").await;
    let data = Rng::new(24).bytes(1000);
    let digest = r.push_blob("bad/range", &data).await;
    for range in ["bytes=1000-1999", "bytes=5000-", "bytes=2000-3000"] {
        let resp = r
            .req(Method::GET, &format!("/v2/bad/range/blobs/{digest}"))
            .header("Range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "Range {range} of a 1000-byte blob");
    }
    r.shutdown().await;
}

// ---------------------------------------------------------------------------
// The `_thaw` extension
// ---------------------------------------------------------------------------

async fn post_batch(r: &TestRegistry, name: &str, body: Vec<u8>) -> reqwest::Response {
    r.req(Method::POST, &format!("/v2/{name}/_thaw/chunks"))
        .header("Content-Type", CHUNKS_TYPE)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn put_recipe(r: &TestRegistry, name: &str, digest: &str, recipe: Vec<u8>) -> reqwest::Response {
    r.req(Method::PUT, &format!("/v2/{name}/_thaw/blobs/{digest}"))
        .header("Content-Type", RECIPE_TYPE)
        .body(recipe)
        .send()
        .await
        .unwrap()
}

async fn missing(r: &TestRegistry, name: &str, ids: &[[u8; 32]]) -> Vec<String> {
    let ids: Vec<String> = ids.iter().map(hex::encode).collect();
    let resp = r
        .req(Method::POST, &format!("/v2/{name}/_thaw/chunks/missing"))
        .json(&json!({ "chunks": ids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "chunks/missing");
    let v: Value = resp.json().await.unwrap();
    v["missing"].as_array().expect("missing array").iter().map(|x| x.as_str().unwrap().to_owned()).collect()
}

/// A blob with data chunks and a zero run, cut into fixed 64 KiB chunks.
fn sample_blob(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut blob = rng.bytes(200_000);
    blob.extend(std::iter::repeat_n(0u8, 3 * 65_536));
    blob.extend(b"text text text ".repeat(10_000));
    blob
}

/// Positive control for the hand-built formats below: if this fails, the negative tests
/// in this section prove nothing.
#[tokio::test]
async fn thaw_fast_path_round_trip_control() {
    let r = seeded("thaw/ok").await;
    let blob = sample_blob(30);
    let fc = fixed_chunked(&blob, 65_536);
    let ids: Vec<_> = fc.entries.iter().map(|e| e.id).collect();
    assert_eq!(missing(&r, "thaw/ok", &ids).await.len(), ids.len());
    let resp = post_batch(&r, "thaw/ok", chunk_batch(&fc.entries)).await;
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    assert!(missing(&r, "thaw/ok", &ids).await.is_empty());
    let resp = put_recipe(&r, "thaw/ok", &fc.digest, fc.recipe.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(fc.digest.as_str()));
    assert_eq!(r.get_blob("thaw/ok", &fc.digest).await, blob);
    r.shutdown().await;
}

#[tokio::test]
async fn garbage_chunk_batches_are_blob_upload_invalid() {
    let r = seeded("thaw/garbage").await;
    let good = encode_chunk(&Rng::new(31).bytes(10_000));
    let mut truncated = chunk_batch(std::slice::from_ref(&good));
    truncated.truncate(truncated.len() - 10);
    let mut bad_codec = good.clone();
    bad_codec.codec = 7;
    let mut zero_len = good.clone();
    zero_len.uncompressed_len = 0;
    let mut too_long = good.clone();
    too_long.uncompressed_len = 4 * MIB as u32 + 1;
    let mut header_only = b"THAWCHK\x01".to_vec();
    header_only.extend_from_slice(&good.id[..20]);
    let garbage_zstd =
        BatchEntry { codec: CODEC_ZSTD, payload: b"definitely not a zstd frame".to_vec(), ..good.clone() };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", Rng::new(32).bytes(5000)),
        ("wrong magic", {
            let mut b = chunk_batch(std::slice::from_ref(&good));
            b[0] = b'X';
            b
        }),
        ("unknown version", {
            let mut b = chunk_batch(std::slice::from_ref(&good));
            b[7] = 9;
            b
        }),
        ("body ends inside an entry", truncated),
        ("body ends inside an entry header", header_only),
        ("unknown codec", chunk_batch(&[bad_codec])),
        ("zero uncompressed length", chunk_batch(&[zero_len])),
        ("uncompressed length over 4 MiB", chunk_batch(&[too_long])),
        ("payload not a zstd frame", chunk_batch(&[garbage_zstd])),
    ];
    let chunks_before = list_files(&r.storage().join("chunks"));
    let before = reachable_state(&r.storage());
    for (what, body) in cases {
        let resp = post_batch(&r, "thaw/garbage", body).await;
        expect_error(resp, 400, &["BLOB_UPLOAD_INVALID"], what).await;
    }
    assert_eq!(list_files(&r.storage().join("chunks")), chunks_before, "no chunk stored from a bad batch");
    assert_eq!(missing(&r, "thaw/garbage", &[good.id]).await.len(), 1);
    assert_nothing_new_reachable(&r.storage(), &before, "garbage batches");
    r.shutdown().await;
}

#[tokio::test]
async fn chunk_not_matching_its_id_is_digest_invalid_and_batch_is_not_stored() {
    let r = seeded("thaw/liar").await;
    let honest = encode_chunk(&Rng::new(33).bytes(20_000));
    let mut liar = encode_chunk(&Rng::new(34).bytes(20_000));
    liar.id = chunk_id(b"some other chunk");
    let raw_liar = BatchEntry {
        id: chunk_id(b"yet another"),
        codec: CODEC_RAW,
        uncompressed_len: 11,
        payload: b"hello world".to_vec(),
    };
    let chunks_before = list_files(&r.storage().join("chunks"));
    let before = reachable_state(&r.storage());
    for (what, batch) in [
        ("zstd chunk under the wrong id", vec![honest.clone(), liar.clone()]),
        ("raw chunk under the wrong id", vec![honest.clone(), raw_liar.clone()]),
    ] {
        let resp = post_batch(&r, "thaw/liar", chunk_batch(&batch)).await;
        expect_error(resp, 400, &["DIGEST_INVALID"], what).await;
    }
    // Neither the liar nor the honest chunk sharing its batch was stored.
    assert_eq!(
        list_files(&r.storage().join("chunks")),
        chunks_before,
        "chunks/ unchanged after rejected batches"
    );
    assert_eq!(missing(&r, "thaw/liar", &[honest.id, liar.id, raw_liar.id]).await.len(), 3);
    assert_nothing_new_reachable(&r.storage(), &before, "lying chunks");
    r.shutdown().await;
}

#[tokio::test]
async fn chunk_with_wrong_declared_length_is_rejected() {
    let r = seeded("thaw/len").await;
    let data = Rng::new(35).bytes(30_000);
    let mut e = encode_chunk(&data);
    e.uncompressed_len = 29_999;
    let chunks_before = list_files(&r.storage().join("chunks"));
    let resp = post_batch(&r, "thaw/len", chunk_batch(&[e])).await;
    expect_error(
        resp,
        400,
        &["BLOB_UPLOAD_INVALID", "DIGEST_INVALID"],
        "uncompressed length differs from the payload's",
    )
    .await;
    assert_eq!(list_files(&r.storage().join("chunks")), chunks_before);
    r.shutdown().await;
}

#[tokio::test]
async fn garbage_recipes_are_blob_upload_invalid() {
    let r = seeded("thaw/recipe").await;
    let blob = sample_blob(36);
    let fc = fixed_chunked(&blob, 65_536);
    let resp = post_batch(&r, "thaw/recipe", chunk_batch(&fc.entries)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let good = fc.recipe.clone();

    let mut bad_sum = good.clone();
    let n = bad_sum.len();
    bad_sum[n - 1] ^= 1;
    let with_sum = |mut body: Vec<u8>| {
        body.truncate(body.len() - 32);
        let s = *blake3::hash(&body).as_bytes();
        body.extend_from_slice(&s);
        body
    };
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let bad_magic = with_sum(bad_magic);
    let mut bad_count = good.clone();
    bad_count[61..65].copy_from_slice(&9999u32.to_le_bytes());
    let bad_count = with_sum(bad_count);
    let mut bad_size = good.clone();
    bad_size[40..48].copy_from_slice(&((blob.len() as u64) + 1).to_le_bytes());
    let bad_size = with_sum(bad_size);
    let mut bad_kind = good.clone();
    bad_kind[48] = 42;
    let bad_kind = with_sum(bad_kind);
    let mut bad_entry_kind = good.clone();
    bad_entry_kind[65] = 5;
    let bad_entry_kind = with_sum(bad_entry_kind);
    let mut truncated = good.clone();
    truncated.truncate(80);

    let before = reachable_state(&r.storage());
    for (what, body) in [
        ("random bytes", Rng::new(37).bytes(500)),
        ("empty body", Vec::new()),
        ("wrong trailing BLAKE3", bad_sum),
        ("wrong magic", bad_magic),
        ("entry count past the end", bad_count),
        ("lengths do not add up to the size", bad_size),
        ("unknown chunker kind", bad_kind),
        ("unknown entry kind", bad_entry_kind),
        ("truncated", truncated),
    ] {
        let resp = put_recipe(&r, "thaw/recipe", &fc.digest, body).await;
        expect_error(resp, 400, &["BLOB_UPLOAD_INVALID"], what).await;
    }
    assert_nothing_new_reachable(&r.storage(), &before, "garbage recipes");
    assert_blob_absent(&r, "thaw/recipe", &fc.digest).await;
    // The well-formed recipe still commits: the failures above were about the bytes.
    let resp = put_recipe(&r, "thaw/recipe", &fc.digest, good).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    r.shutdown().await;
}

#[tokio::test]
async fn recipe_naming_missing_chunks_is_blob_unknown() {
    let r = seeded("thaw/absent").await;
    let blob = sample_blob(38);
    let fc = fixed_chunked(&blob, 65_536);
    // Upload all but the first chunk.
    let resp = post_batch(&r, "thaw/absent", chunk_batch(&fc.entries[1..])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let before = reachable_state(&r.storage());
    let resp = put_recipe(&r, "thaw/absent", &fc.digest, fc.recipe.clone()).await;
    let body = expect_error(resp, 400, &["BLOB_UNKNOWN"], "recipe with a missing chunk").await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&hex::encode(fc.entries[0].id)),
        "the error detail names the missing chunk: {text}"
    );
    assert_nothing_new_reachable(&r.storage(), &before, "recipe with missing chunks");
    assert_blob_absent(&r, "thaw/absent", &fc.digest).await;
    r.shutdown().await;
}

#[tokio::test]
async fn recipe_for_another_digest_is_digest_invalid() {
    let r = seeded("thaw/mismatch").await;
    let blob = sample_blob(39);
    let fc = fixed_chunked(&blob, 65_536);
    let resp = post_batch(&r, "thaw/mismatch", chunk_batch(&fc.entries)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let before = reachable_state(&r.storage());
    let other = sha256_digest(b"another blob");
    let resp = put_recipe(&r, "thaw/mismatch", &other, fc.recipe.clone()).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "recipe digest differs from URL").await;
    assert_nothing_new_reachable(&r.storage(), &before, "recipe for another digest");
    assert_blob_absent(&r, "thaw/mismatch", &other).await;
    assert_blob_absent(&r, "thaw/mismatch", &fc.digest).await;
    r.shutdown().await;
}

#[tokio::test]
async fn recipe_whose_chunks_do_not_hash_to_the_blob_is_digest_invalid() {
    let r = seeded("thaw/lie").await;
    let blob = sample_blob(40);
    let fc = fixed_chunked(&blob, 65_536);
    // Chunks of a *different* blob of the same size, under a recipe claiming `blob`.
    let mut other_blob = blob.clone();
    other_blob[5] ^= 0xff;
    let other = fixed_chunked(&other_blob, 65_536);
    let resp = post_batch(&r, "thaw/lie", chunk_batch(&other.entries)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Take other's entries, put blob's sha256 in the header, fix the checksum.
    let mut lying = other.recipe.clone();
    lying[8..40].copy_from_slice(&hex::decode(digest_hex(&fc.digest)).unwrap());
    lying.truncate(lying.len() - 32);
    let s = *blake3::hash(&lying).as_bytes();
    lying.extend_from_slice(&s);
    let before = reachable_state(&r.storage());
    let resp = put_recipe(&r, "thaw/lie", &fc.digest, lying).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "reassembly does not hash to digest").await;
    assert_nothing_new_reachable(&r.storage(), &before, "lying recipe");
    assert_blob_absent(&r, "thaw/lie", &fc.digest).await;
    r.shutdown().await;
}

#[tokio::test]
async fn chunk_fetch_outside_the_named_blob_is_denied() {
    let r = seeded("thaw/fetch").await;
    let a = fixed_chunked(&sample_blob(41), 65_536);
    let b = fixed_chunked(&sample_blob(42), 65_536);
    for fc in [&a, &b] {
        let resp = post_batch(&r, "thaw/fetch", chunk_batch(&fc.entries)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = put_recipe(&r, "thaw/fetch", &fc.digest, fc.recipe.clone()).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    let fetch = |blob: String, ids: Vec<String>, name: &'static str| {
        r.req(Method::POST, &format!("/v2/{name}/_thaw/chunks/fetch"))
            .json(&json!({"blob": blob, "chunks": ids}))
            .send()
    };
    // Control: a chunk of `a` through `a` is served, as a batch.
    let resp = fetch(a.digest.clone(), vec![hex::encode(a.entries[0].id)], "thaw/fetch").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.unwrap();
    assert!(body.starts_with(b"THAWCHK\x01"));
    // A chunk of `b` requested as part of `a`.
    let resp = fetch(a.digest.clone(), vec![hex::encode(b.entries[0].id)], "thaw/fetch").await.unwrap();
    expect_error(resp, 403, &["DENIED"], "chunk not in the named blob").await;
    // `a` through a repository that cannot read it.
    let resp = fetch(a.digest.clone(), vec![hex::encode(a.entries[0].id)], "thaw/other").await.unwrap();
    expect_error(resp, 404, &["BLOB_UNKNOWN", "NAME_UNKNOWN"], "blob not readable in that repository").await;
    r.shutdown().await;
}
