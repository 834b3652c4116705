//! Client round trips with the registry on S3 (a real Garage on loopback): a plain OCI
//! push and pull of a 64 MiB memory-like file over HTTP (chunked and monolithic uploads,
//! whole and ranged reads), the same through the `oci-client` crate, and the `_thaw` fast
//! path. Every byte read back is compared; the bucket is inspected to show where it went.

mod common;

use std::collections::BTreeMap;

use common::*;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::{Method, StatusCode};
use serde_json::json;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// Guest-memory-like bytes: zero runs (~40%), runs of pages from a shared pool (~45%),
/// runs of text pages (~15%).
fn memory_like(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let pool: Vec<Vec<u8>> = (0..1024).map(|_| rng.bytes(PAGE)).collect();
    let text: Vec<u8> =
        b"import runtime; lambda: return snapshot\n".iter().copied().cycle().take(PAGE).collect();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 1 + rng.below(32) as usize;
        let kind = rng.below(100);
        for _ in 0..run {
            match kind {
                0..=39 => out.extend_from_slice(&[0u8; PAGE]),
                40..=84 => out.extend_from_slice(&pool[rng.below(1024) as usize]),
                _ => out.extend_from_slice(&text),
            }
        }
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_oci_push_and_pull_of_64_mib_over_s3() {
    let r = TestRegistry::start_s3().await;
    let memory = memory_like(64 * MIB, 0x64);
    let vmstate = Rng::new(5).bytes(40_000);
    let config = br#"{"function":"fn-s3","revision":"v1"}"#;

    // Chunked upload of the memory file (8 MiB PATCHes), monolithic for the rest.
    let d_mem = r.push_blob_chunked("s3/fn", &memory, 8 * MIB).await;
    let d_vm = r.push_blob("s3/fn", &vmstate).await;
    r.push_blob("s3/fn", config).await;
    let manifest = image_manifest(
        descriptor("application/vnd.thaw.snapshot.config.v1+json", config),
        vec![
            descriptor("application/vnd.thaw.snapshot.memory.v1", &memory),
            descriptor("application/vnd.thaw.snapshot.vmstate.v1", &vmstate),
        ],
        json!({ "artifactType": "application/vnd.thaw.snapshot.v1" }),
    );
    let d_manifest = r.push_manifest("s3/fn", "v1", MANIFEST_V1, &manifest).await;

    // Pull: manifest by tag, blobs whole and in ranges.
    let resp = r.get("/v2/s3/fn/manifests/v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), "docker-content-digest").as_deref(), Some(d_manifest.as_str()));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());
    assert_eq!(r.get_blob_digest("s3/fn", &d_mem).await, (d_mem.clone(), memory.len() as u64));
    assert_eq!(r.get_blob("s3/fn", &d_vm).await, vmstate);
    for (start, end) in [(0usize, 4095usize), (5 * MIB - 7, 9 * MIB + 3), (64 * MIB - 10, 64 * MIB - 1)] {
        let resp = r
            .req(Method::GET, &format!("/v2/s3/fn/blobs/{d_mem}"))
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(resp.bytes().await.unwrap().as_ref(), &memory[start..=end], "range {start}-{end}");
    }
    // A second push of the same file (another repository) stores no new chunk data.
    let packs_before = list_files(&r.storage().join("chunks/packs"));
    r.push_blob("s3/fn-copy", &memory).await;
    assert_eq!(list_files(&r.storage().join("chunks/packs")), packs_before, "identical content adds no pack");

    // What the bucket holds: packs well under the file size (zero pages are not stored and
    // text compresses), their indexes, and the links that make the blobs visible.
    let packs = list_files(&r.storage().join("chunks/packs"));
    let stored: u64 = packs.values().sum();
    assert!(
        !packs.is_empty() && stored < memory.len() as u64 * 7 / 10,
        "{} packs, {stored} bytes",
        packs.len()
    );
    assert_eq!(list_files(&r.storage().join("chunks/index")).len(), packs.len(), "one index per pack");
    let links = reachable_state(&r.storage());
    assert!(
        links.keys().any(|k| k.to_string_lossy().contains(digest_hex(&d_mem))),
        "blob link in the bucket: {links:?}"
    );
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_push_and_pull_over_s3() {
    let r = TestRegistry::start_s3().await;
    let host = r.addr().to_string();
    let memory = memory_like(64 * MIB, 0x0c1);
    let title = |t: &str| Some(BTreeMap::from([("org.opencontainers.image.title".to_owned(), t.to_owned())]));
    let layers = vec![
        ImageLayer::new(memory.clone(), "application/vnd.thaw.snapshot.memory.v1".into(), title("memory")),
        ImageLayer::new(
            Rng::new(9).bytes(30_001),
            "application/vnd.thaw.snapshot.vmstate.v1".into(),
            title("vmstate"),
        ),
    ];
    let config = Config::new(b"{}".to_vec(), "application/vnd.thaw.snapshot.config.v1+json".into(), None);
    for monolithic in [true, false] {
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            use_monolithic_push: monolithic,
            ..ClientConfig::default()
        });
        let reference: Reference = format!("{host}/s3/oci-client:mono-{monolithic}").parse().unwrap();
        client
            .push(&reference, &layers, config.clone(), &RegistryAuth::Anonymous, None)
            .await
            .expect("oci-client push");
        let image = client
            .pull(
                &reference,
                &RegistryAuth::Anonymous,
                vec!["application/vnd.thaw.snapshot.memory.v1", "application/vnd.thaw.snapshot.vmstate.v1"],
            )
            .await
            .expect("oci-client pull");
        assert_eq!(image.layers.len(), 2);
        for want in &layers {
            let got =
                image.layers.iter().find(|l| l.annotations == want.annotations).expect("layer by title");
            assert!(
                got.data == want.data,
                "layer {:?} (monolithic {monolithic}) came back different",
                want.annotations
            );
        }
    }
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_fast_path_round_trip_over_s3() {
    let r = TestRegistry::start_s3().await;
    let blob = memory_like(24 * MIB + 123, 0x7);
    let fixed = fixed_chunked(&blob, 64 * 1024);
    let ids: Vec<String> = fixed.entries.iter().map(|e| hex::encode(e.id)).collect();
    let missing = |ids: Vec<String>| {
        let r = &r;
        async move {
            let resp = r
                .req(Method::POST, "/v2/s3/thaw/_thaw/chunks/missing")
                .json(&json!({ "chunks": ids }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<serde_json::Value>().await.unwrap()["missing"].as_array().unwrap().len()
        }
    };
    assert_eq!(missing(ids.clone()).await, ids.len());
    for batch in fixed.entries.chunks(100) {
        let resp = r
            .req(Method::POST, "/v2/s3/thaw/_thaw/chunks")
            .header("content-type", CHUNKS_TYPE)
            .body(chunk_batch(batch))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    }
    assert_eq!(missing(ids.clone()).await, 0);
    let resp = r
        .req(Method::PUT, &format!("/v2/s3/thaw/_thaw/blobs/{}", fixed.digest))
        .header("content-type", RECIPE_TYPE)
        .body(fixed.recipe.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_eq!(r.get_blob_digest("s3/thaw", &fixed.digest).await, (fixed.digest.clone(), blob.len() as u64));
    let resp = r.get(&format!("/v2/s3/thaw/_thaw/blobs/{}/recipe", fixed.digest)).await;
    assert_eq!(resp.bytes().await.unwrap().as_ref(), fixed.recipe.as_slice());
    // Fetch in reverse order: frames come back in request order and match their ids.
    let wanted: Vec<String> = ids.iter().rev().take(50).cloned().collect();
    let resp = r
        .req(Method::POST, "/v2/s3/thaw/_thaw/chunks/fetch")
        .json(&json!({ "blob": fixed.digest, "chunks": wanted }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.unwrap();
    let entries = thaw_schema::batch::parse_batch(&body).expect("a chunk batch");
    assert_eq!(entries.len(), 50);
    for ((id, frame), want) in entries.iter().zip(&wanted) {
        assert_eq!(&id.hex(), want);
        frame.decode(id).expect("fetched frame matches its id");
    }
    r.shutdown().await;
}
