//! The verified chunk chain against an in-process thaw-registry: `thaw push` names each
//! layer's recipe in the manifest (`dev.thaw.recipe`, the SHA-256 of the recipe the
//! registry keeps the blob by), and a pull whose recipe is that one proves the file chunk by
//! chunk instead of hashing it whole. A manifest that names another recipe is accepted with
//! a warning (plain OCI mirrors upload whole blobs, which the registry cuts its own way), and
//! a pull of it checks the whole file. The attacks on the chain itself (a recipe swapped
//! under a manifest, a chunk substituted) are in `adversarial.rs`, where every byte the
//! registry sends is under the test's control.

mod common;

use common::*;
use serde_json::Value;
use thaw_client::{PullOptions, PushOptions, Reference};
use thaw_schema::{media, Sha256Digest};

/// `PUT`s a manifest body with a plain HTTP client, so the test sees every header.
async fn put_manifest(host: &str, repository: &str, tag: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .put(format!("http://{host}/v2/{repository}/manifests/{tag}"))
        .header("content-type", media::OCI_MANIFEST)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Pushes a small snapshot (seed `seed`) to `<host>/<repository>:v1`; answers its manifest
/// body as JSON.
async fn push_small(host: &str, repository: &str, seed: u64) -> Value {
    let work = tempfile::tempdir().unwrap();
    SnapshotData::new(64, 64, seed).write(&work.path().join("s"));
    let reference = Reference::parse(&format!("{host}/{repository}:v1")).unwrap();
    let client = client_for(&reference);
    thaw_client::push_dir(&client, &reference, &work.path().join("s"), &PushOptions::default())
        .await
        .unwrap();
    let manifest = client.get_manifest(repository, "v1").await.unwrap();
    serde_json::from_slice(&manifest.body).unwrap()
}

/// The layers of a manifest body, as JSON.
fn layers(body: &[u8]) -> Vec<Value> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["layers"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_layers_name_their_recipes_and_pulls_prove_them_chunk_by_chunk() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let data = SnapshotData::new(1024, 512, 11);
    let src = work.path().join("snap");
    data.write(&src);
    let reference = Reference::parse(&format!("{}/fn/chain:v1", registry.host())).unwrap();
    let client = client_for(&reference);
    let pushed = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();

    let manifest = client.get_manifest("fn/chain", "v1").await.unwrap();
    for layer in layers(&manifest.body) {
        let blob: Sha256Digest = layer["digest"].as_str().unwrap().parse().unwrap();
        let named = layer["annotations"][media::ANNOTATION_RECIPE].as_str().unwrap_or_else(|| {
            panic!("layer {blob} has no {} annotation: {layer}", media::ANNOTATION_RECIPE)
        });
        let recipe = client.recipe("fn/chain", &blob).await.unwrap().unwrap();
        assert_eq!(named, recipe.encoded_digest().to_string(), "layer {blob}");
    }
    assert!(pushed.files.iter().all(|f| f.blob.recipe.is_some()), "{:?}", pushed.files);

    let dest = work.path().join("out");
    let pulled = thaw_client::pull(&client, &reference, &dest, &PullOptions::default()).await.unwrap();
    assert!(pulled.files.iter().all(|f| f.from_recipe && f.verified_by_chain), "{:?}", pulled.files);
    assert_same_files(&data, &dest);

    // Pushed again, every blob is skipped: the recipe digests come from HEAD of each recipe,
    // and the manifest is the same one.
    let again = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    assert_eq!(again.stats.blobs_skipped, 4);
    assert_eq!(
        again.digest, pushed.digest,
        "a re-push writes the same annotations: {:?} then {:?}",
        pushed.files, again.files
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_naming_another_recipe_is_accepted_with_a_warning_and_checked_whole_on_pull() {
    let registry = ThawRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (SnapshotData::new(512, 256, 21), SnapshotData::new(512, 256, 22));
    a.write(&work.path().join("a"));
    b.write(&work.path().join("b"));
    let host = registry.host();
    let ref_a = Reference::parse(&format!("{host}/fn/two:a")).unwrap();
    let ref_b = Reference::parse(&format!("{host}/fn/two:b")).unwrap();
    let client = client_for(&ref_a);
    thaw_client::push_dir(&client, &ref_a, &work.path().join("a"), &PushOptions::default()).await.unwrap();
    thaw_client::push_dir(&client, &ref_b, &work.path().join("b"), &PushOptions::default()).await.unwrap();

    // A's manifest, its memory layer annotated with B's memory recipe.
    let manifest_a = client.get_manifest("fn/two", "a").await.unwrap();
    let manifest_b = client.get_manifest("fn/two", "b").await.unwrap();
    let memory_layer = |body: &[u8]| {
        layers(body).into_iter().find(|l| l["mediaType"] == media::MEMORY_LAYER).expect("a memory layer")
    };
    let other = memory_layer(&manifest_b.body)["annotations"][media::ANNOTATION_RECIPE].clone();
    let mut forged: Value = serde_json::from_slice(&manifest_a.body).unwrap();
    for layer in forged["layers"].as_array_mut().unwrap() {
        if layer["mediaType"] == media::MEMORY_LAYER {
            layer["annotations"][media::ANNOTATION_RECIPE] = other.clone();
        }
    }
    let body = serde_json::to_vec(&forged).unwrap();
    let digest = Sha256Digest::of(&body);
    let response = put_manifest(&host, "fn/two", "forged", body).await;
    assert_eq!(response.status(), 201);
    let warning = response.headers().get("warning").expect("a Warning header").to_str().unwrap().to_owned();
    assert!(warning.starts_with("299 - \""), "{warning}");
    assert!(
        warning.contains(media::ANNOTATION_RECIPE) && warning.contains(other.as_str().unwrap()),
        "{warning}"
    );

    // An honest manifest gets no warning.
    let response = put_manifest(&host, "fn/two", "honest", manifest_a.body.to_vec()).await;
    assert_eq!(response.status(), 201);
    assert!(response.headers().get("warning").is_none());

    // Pulled, the forged manifest gives A's files: memory checked whole, the rest by the chain.
    let by_digest = Reference::parse(&format!("{host}/fn/two@{digest}")).unwrap();
    let dest = work.path().join("out");
    let pulled = thaw_client::pull(&client, &by_digest, &dest, &PullOptions::default()).await.unwrap();
    assert_same_files(&a, &dest);
    for f in &pulled.files {
        assert!(f.from_recipe, "{f:?}");
        assert_eq!(f.verified_by_chain, f.title != "memory", "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_recipe_annotation_is_refused() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let mut forged = push_small(&host, "fn/bad", 31).await;
    forged["layers"][0]["annotations"][media::ANNOTATION_RECIPE] = Value::String("not-a-digest".into());
    let response = put_manifest(&host, "fn/bad", "v2", serde_json::to_vec(&forged).unwrap()).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.contains("MANIFEST_INVALID") && text.contains("must be a sha256 digest"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_layers_naming_other_recipes_get_a_bounded_warning() {
    let registry = ThawRegistry::start().await;
    let host = registry.host();
    let mut forged = push_small(&host, "fn/many", 41).await;
    // 500 layers, all the same memory blob, each naming a different wrong recipe.
    let memory = forged["layers"][0].clone();
    let many: Vec<Value> = (0..500u32)
        .map(|i| {
            let mut layer = memory.clone();
            layer["annotations"][media::ANNOTATION_RECIPE] =
                Value::String(Sha256Digest::of(&i.to_le_bytes()).to_string());
            layer
        })
        .collect();
    forged["layers"] = Value::Array(many);
    let response = put_manifest(&host, "fn/many", "v2", serde_json::to_vec(&forged).unwrap()).await;
    assert_eq!(response.status(), 201);
    let warnings: Vec<&str> =
        response.headers().get_all("warning").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(warnings.len(), 9, "8 layers named, then a count: {warnings:?}");
    assert!(warnings[8].contains("492 more layers"), "{}", warnings[8]);
}
