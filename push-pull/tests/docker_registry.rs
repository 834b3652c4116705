//! Against Debian's `docker-registry` (distribution 2.8, no `_thaw`): thaw pushes with the
//! standard upload protocol (HEAD first, POST + PUT, PATCH pieces for big files), pulls with
//! plain downloads, `skopeo copy` reads the same artifact, and `thaw copy` moves it into a
//! thaw-registry unchanged.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;
use thaw_client::{PullOptions, PushOptions, Reference, UploadOptions};
use thaw_schema::media::ANNOTATION_TITLE;

/// Copies `reference` into an OCI layout with skopeo and checks the manifest digest and
/// every titled layer against `data`.
fn skopeo_reads_back(reference: &str, digest: &str, data: &SnapshotData, work: &Path) {
    let layout = work.join(format!("layout-{}", &digest[7..19]));
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:snap", layout.display()))
        .output()
        .expect("skopeo must be installed (Debian package skopeo)");
    assert!(out.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest, "skopeo kept the manifest digest");
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: Value = serde_json::from_slice(&blob(digest)).unwrap();
    let files = data.files();
    for layer in manifest["layers"].as_array().unwrap() {
        let title = layer["annotations"][ANNOTATION_TITLE].as_str().unwrap();
        let expected = files.iter().find(|(n, _)| *n == title).unwrap().1;
        assert!(blob(layer["digest"].as_str().unwrap()) == expected, "{title} differs after skopeo copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_registry_round_trips_and_skopeo_and_copy_agree() {
    let docker = DockerRegistry::start();
    let work = tempfile::tempdir().unwrap();
    // 40 MiB of memory: over the 32 MiB piece size, so it goes up in PATCH pieces.
    let data = SnapshotData::new(10 * 1024, 1024, 3);
    let src = work.path().join("snap");
    data.write(&src);
    let reference = Reference::parse(&format!("{}/functions/hello:v1", docker.host())).unwrap();
    let client = client_for(&reference);

    let pushed = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    assert!(!pushed.thaw, "docker-registry has no _thaw");
    assert_eq!(pushed.stats.blobs_transferred, 4);
    let again = thaw_client::push_dir(&client, &reference, &src, &PushOptions::default()).await.unwrap();
    assert_eq!(again.digest, pushed.digest);
    assert_eq!(again.stats.blobs_skipped, 4, "HEAD finds every blob");
    assert!(again.stats.bytes_sent < 4096, "{:?}", again.stats);

    let dest = work.path().join("out");
    let pulled = thaw_client::pull(&client, &reference, &dest, &PullOptions::default()).await.unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert!(pulled.files.iter().all(|f| !f.from_recipe));
    assert_same_files(&data, &dest);
    let holes = zero_page_bytes(&data.memory);
    assert!(
        allocated(&dest.join("memory")) <= data.memory.len() as u64 - holes / 2,
        "plain pulls keep holes too"
    );

    skopeo_reads_back(&reference.to_string(), &pushed.digest.to_string(), &data, work.path());

    // docker-registry → thaw-registry with thaw copy: same digest, and the files come back
    // from the thaw-registry's recipes.
    let thaw = ThawRegistry::start().await;
    let target = Reference::parse(&format!("{}/mirror/hello:v1", thaw.host())).unwrap();
    let mirror = client_for(&target);
    let copied =
        thaw_client::copy(&client, &reference, &mirror, &target, &UploadOptions::default()).await.unwrap();
    assert_eq!(copied.digest, pushed.digest);
    let dest2 = work.path().join("out2");
    let pulled2 = thaw_client::pull(&mirror, &target, &dest2, &PullOptions::default()).await.unwrap();
    assert!(pulled2.files.iter().all(|f| f.from_recipe), "copied layers got thaw recipes");
    assert_same_files(&data, &dest2);
    // skopeo reads the thaw-registry's copy identically as well.
    skopeo_reads_back(&target.to_string(), &pushed.digest.to_string(), &data, work.path());

    // And back: thaw-registry → docker-registry under another name.
    let back = Reference::parse(&format!("{}/functions/back:v1", docker.host())).unwrap();
    let copied_back =
        thaw_client::copy(&mirror, &target, &client, &back, &UploadOptions::default()).await.unwrap();
    assert_eq!(copied_back.digest, pushed.digest);
    let dest3 = work.path().join("out3");
    thaw_client::pull(&client, &back, &dest3, &PullOptions::default()).await.unwrap();
    assert_same_files(&data, &dest3);
}
