//! Interop: the `oci-client` crate (0.15, the Rust OCI client of oras-project) against an
//! in-process thaw-registry, over plain HTTP.
//!
//! oci-client pushes a thaw-style artifact (config + two layers, all with annotations,
//! `artifactType` set) and pulls it back: bytes, digests and the manifest must survive, and
//! `pull_manifest`, `fetch_manifest_digest` (HEAD, `Docker-Content-Digest`) and the push's
//! manifest `Location` must agree on one manifest digest. Both of its blob upload modes
//! run: monolithic (POST, PUT ?digest=) and chunked (POST, PATCH `Content-Range` of 4 MiB
//! each, PUT ?digest=). oci-client verifies each pulled blob against its digest and the
//! `Docker-Content-Digest` header itself.
//!
//! Note: oci-client falls back from a chunked to a monolithic push, with only a log line, when
//! the registry answers a chunk with an unexpected 2xx status; the registry's own tests pin
//! chunked-upload status codes.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use common::{ensure_same_bytes, header, http, memory_image, sha256_digest, TestRegistry, TestRng};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

const ARTIFACT_TYPE: &str = "application/vnd.thaw.snapshot.v1";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.thaw.snapshot.config.v1+json";
const MEMORY_MEDIA_TYPE: &str = "application/vnd.thaw.snapshot.memory.v1";
const VMSTATE_MEDIA_TYPE: &str = "application/vnd.thaw.snapshot.vmstate.v1";
const TITLE: &str = "org.opencontainers.image.title";

fn client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..ClientConfig::default()
    })
}

fn annotations(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
}

struct Artifact {
    config: Config,
    layers: Vec<ImageLayer>,
    manifest: OciImageManifest,
}

/// A thaw-style artifact: 9 MiB + 123 bytes of guest memory (three 4 MiB chunks in a
/// chunked push), an odd-sized vmstate, and the info file as config.
fn artifact(seed: u64) -> Artifact {
    let mut memory = memory_image(seed);
    memory.truncate(9 * 1024 * 1024 + 123);
    let vmstate = TestRng::new(seed ^ 0x5eed).bytes(41_234);
    let info = format!("{{\"function\":\"hello\",\"seed\":{seed},\"memory_bytes\":{}}}\n", memory.len());
    let config = Config::new(
        info.into_bytes(),
        CONFIG_MEDIA_TYPE.to_owned(),
        annotations(&[("dev.thaw.test.part", "config")]),
    );
    let layers = vec![
        ImageLayer::new(
            memory,
            MEMORY_MEDIA_TYPE.to_owned(),
            annotations(&[(TITLE, "memory"), ("dev.thaw.test.part", "layer-0")]),
        ),
        ImageLayer::new(
            vmstate,
            VMSTATE_MEDIA_TYPE.to_owned(),
            annotations(&[(TITLE, "vmstate"), ("dev.thaw.test.part", "layer-1")]),
        ),
    ];
    let mut manifest =
        OciImageManifest::build(&layers, &config, annotations(&[("dev.thaw.test.client", "oci-client")]));
    manifest.artifact_type = Some(ARTIFACT_TYPE.to_owned());
    Artifact { config, layers, manifest }
}

/// Checks that `pulled` holds each of `pushed` (bytes, media type, annotations).
/// `Client::pull` downloads layers concurrently and returns them in completion order, so
/// each is matched by its title annotation.
fn ensure_same_layers(what: &str, pushed: &[ImageLayer], pulled: &[ImageLayer]) -> Result<()> {
    ensure!(pulled.len() == pushed.len(), "{what}s: pulled {}, pushed {}", pulled.len(), pushed.len());
    for want in pushed {
        let title =
            want.annotations.as_ref().and_then(|a| a.get(TITLE)).context("pushed layer has no title")?;
        let got = pulled
            .iter()
            .find(|l| l.annotations.as_ref().and_then(|a| a.get(TITLE)) == Some(title))
            .with_context(|| format!("no pulled {what} is titled {title:?}"))?;
        ensure_same_bytes(&format!("{what} {title}"), &want.data, &got.data)?;
        ensure!(
            got.media_type == want.media_type && got.annotations == want.annotations,
            "{what} {title}: media type {} annotations {:?}",
            got.media_type,
            got.annotations
        );
    }
    Ok(())
}

/// Pushes `artifact` to `reference` and checks everything oci-client can read back.
/// Returns the manifest digest.
async fn push_and_pull(client: &Client, reference: &Reference, artifact: &Artifact) -> Result<String> {
    let auth = RegistryAuth::Anonymous;
    let pushed = client
        .push(reference, &artifact.layers, artifact.config.clone(), &auth, Some(artifact.manifest.clone()))
        .await
        .with_context(|| format!("oci-client push to {reference}"))?;

    // The raw manifest, and the digest every route agrees on.
    let (raw, digest) = client
        .pull_manifest_raw(reference, &auth, &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE])
        .await
        .context("pull_manifest_raw")?;
    ensure!(
        digest == sha256_digest(&raw),
        "pull_manifest_raw: digest {digest}, but the manifest hashes to {}",
        sha256_digest(&raw)
    );
    // The manifest PUT's Location must be a pullable URL of this manifest.
    let tag = reference.tag().unwrap_or("latest");
    ensure!(
        pushed.manifest_url.ends_with(&format!("/manifests/{digest}"))
            || pushed.manifest_url.ends_with(&format!("/manifests/{tag}")),
        "push answered manifest URL {}, want one ending in /manifests/{digest} or /{tag}",
        pushed.manifest_url
    );
    let head_digest =
        client.fetch_manifest_digest(reference, &auth).await.context("fetch_manifest_digest (HEAD)")?;
    ensure!(head_digest == digest, "HEAD manifest: Docker-Content-Digest {head_digest}, GET: {digest}");
    let (manifest, pulled_digest) = client.pull_manifest(reference, &auth).await.context("pull_manifest")?;
    ensure!(pulled_digest == digest, "pull_manifest answered digest {pulled_digest}, want {digest}");
    let OciManifest::Image(manifest) = manifest else {
        anyhow::bail!("pull_manifest answered an index, pushed an image manifest");
    };
    ensure!(
        serde_json::to_value(&manifest)? == serde_json::to_value(&artifact.manifest)?,
        "pulled manifest differs:\n{}\npushed:\n{}",
        serde_json::to_string_pretty(&manifest)?,
        serde_json::to_string_pretty(&artifact.manifest)?
    );

    // Pull by tag: layers and config byte for byte, annotations kept.
    let image = client
        .pull(reference, &auth, vec![MEMORY_MEDIA_TYPE, VMSTATE_MEDIA_TYPE])
        .await
        .with_context(|| format!("oci-client pull of {reference}"))?;
    ensure!(
        image.digest.as_deref() == Some(digest.as_str()),
        "pull answered digest {:?}, want {digest}",
        image.digest
    );
    ensure_same_bytes("config", &artifact.config.data, &image.config.data)?;
    ensure!(image.config.media_type == CONFIG_MEDIA_TYPE, "config media type {}", image.config.media_type);
    ensure_same_layers("layer", &artifact.layers, &image.layers)?;

    // Pull by digest reaches the same manifest.
    let by_digest = Reference::with_digest(
        reference.registry().to_owned(),
        reference.repository().to_owned(),
        digest.clone(),
    );
    let (_, again) = client
        .pull_manifest(&by_digest, &auth)
        .await
        .with_context(|| format!("pull_manifest {by_digest}"))?;
    ensure!(again == digest, "by digest: {again}, want {digest}");
    Ok(digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_monolithic_push_and_pull_round_trip() -> Result<()> {
    let registry = TestRegistry::start().await?;
    let reference: Reference = format!("{}/thaw/oci-client/mono:v1", registry.host()).parse()?;
    push_and_pull(&client(true), &reference, &artifact(11)).await?;
    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_chunked_push_and_pull_round_trip() -> Result<()> {
    let registry = TestRegistry::start().await?;
    let reference: Reference = format!("{}/thaw/oci-client/chunked:v1", registry.host()).parse()?;
    push_and_pull(&client(false), &reference, &artifact(12)).await?;
    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_lists_tags_and_mounts_blobs_across_repositories() -> Result<()> {
    let registry = TestRegistry::start().await?;
    let client = client(true);
    let auth = RegistryAuth::Anonymous;
    let artifact = artifact(13);
    let host = registry.host();
    let v1: Reference = format!("{host}/thaw/oci-client/tags:v1").parse()?;
    let digest = push_and_pull(&client, &v1, &artifact).await?;

    // The same manifest under two more tags: pushing blobs that exist is harmless.
    for tag in ["v2", "v10"] {
        let reference: Reference = format!("{host}/thaw/oci-client/tags:{tag}").parse()?;
        let again = push_and_pull(&client, &reference, &artifact).await?;
        ensure!(again == digest, "{tag}: manifest digest {again}, want {digest}");
    }
    let tags = client.list_tags(&v1, &auth, None, None).await?;
    ensure!(tags.name == "thaw/oci-client/tags", "tags/list names the repository {:?}", tags.name);
    ensure!(
        tags.tags == ["v1", "v10", "v2"],
        "tags/list: {:?}, want [\"v1\", \"v10\", \"v2\"] (lexical order)",
        tags.tags
    );
    let page = client.list_tags(&v1, &auth, Some(1), None).await?;
    ensure!(page.tags == ["v1"], "tags/list?n=1: {:?}", page.tags);
    let next = client.list_tags(&v1, &auth, Some(5), Some("v1")).await?;
    ensure!(next.tags == ["v10", "v2"], "tags/list?n=5&last=v1: {:?}", next.tags);

    // Cross-repository mount of every blob, then a manifest push that needs no upload.
    let target: Reference = format!("{host}/thaw/oci-client/mounted:v1").parse()?;
    let blobs =
        artifact.layers.iter().map(|l| sha256_digest(&l.data)).chain([sha256_digest(&artifact.config.data)]);
    for blob in blobs {
        client
            .mount_blob(&target, &v1, &blob)
            .await
            .with_context(|| format!("mounting {blob} from {v1} into {target} (want 201)"))?;
    }
    let url = client
        .push_manifest(&target, &artifact.manifest.clone().into())
        .await
        .context("pushing the manifest over mounted blobs")?;
    ensure!(
        url.ends_with(&format!("/manifests/{digest}")) || url.ends_with("/manifests/v1"),
        "manifest URL {url}"
    );
    let image = client
        .pull(&target, &auth, vec![MEMORY_MEDIA_TYPE, VMSTATE_MEDIA_TYPE])
        .await
        .context("pulling the mounted artifact")?;
    ensure_same_layers("mounted layer", &artifact.layers, &image.layers)?;

    registry.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_finds_the_referrers_of_a_snapshot() -> Result<()> {
    const SIGNATURE: &str = "application/vnd.thaw.test.signature.v1";
    const SBOM: &str = "application/vnd.thaw.test.sbom.v1";
    let registry = TestRegistry::start().await?;
    let client = client(true);
    let auth = RegistryAuth::Anonymous;
    let repo = "thaw/oci-client/referrers";
    let subject_ref: Reference = format!("{}/{repo}:v1", registry.host()).parse()?;
    let subject_digest = push_and_pull(&client, &subject_ref, &artifact(14)).await?;
    let (subject_raw, _) =
        client.pull_manifest_raw(&subject_ref, &auth, &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE]).await?;
    let subject = OciDescriptor {
        media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_owned(),
        digest: subject_digest.clone(),
        size: i64::try_from(subject_raw.len())?,
        ..OciDescriptor::default()
    };

    // Two artifacts that refer to the snapshot: a "signature" and an "sbom".
    let mut referrers = BTreeMap::new();
    for (tag, artifact_type) in [("signature", SIGNATURE), ("sbom", SBOM)] {
        let config = Config::new(b"{}".to_vec(), "application/vnd.oci.empty.v1+json".to_owned(), None);
        let layer = ImageLayer::new(
            format!("{artifact_type} of {subject_digest}\n").into_bytes(),
            "text/plain".to_owned(),
            annotations(&[(TITLE, tag)]),
        );
        let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        manifest.artifact_type = Some(artifact_type.to_owned());
        manifest.subject = Some(subject.clone());
        let reference: Reference = format!("{}/{repo}:{tag}", registry.host()).parse()?;
        client
            .push(&reference, &[layer], config, &auth, Some(manifest))
            .await
            .with_context(|| format!("pushing the {tag} referrer"))?;
        let digest = client.fetch_manifest_digest(&reference, &auth).await?;
        referrers.insert(artifact_type, digest);
    }

    let by_digest = Reference::with_digest(registry.host(), repo.to_owned(), subject_digest.clone());
    let all = client.pull_referrers(&by_digest, None).await.context("GET referrers")?;
    let mut listed: Vec<&str> = all.manifests.iter().map(|m| m.digest.as_str()).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = referrers.values().map(String::as_str).collect();
    want.sort_unstable();
    ensure!(listed == want, "referrers of {subject_digest}: {listed:?}, want {want:?}");
    let signatures =
        client.pull_referrers(&by_digest, Some(SIGNATURE)).await.context("GET referrers?artifactType=")?;
    let listed: Vec<&str> = signatures.manifests.iter().map(|m| m.digest.as_str()).collect();
    ensure!(
        listed == [referrers[SIGNATURE].as_str()],
        "referrers filtered by {SIGNATURE}: {listed:?}, want [{}]",
        referrers[SIGNATURE]
    );

    // What oci-client does not surface: each entry's artifactType, and the header that says
    // the filter was applied.
    let response = http()
        .get(format!("{}/v2/{repo}/referrers/{subject_digest}?artifactType={SBOM}", registry.url()))
        .send()
        .await?;
    ensure!(response.status() == 200, "GET referrers?artifactType={SBOM}: {}", response.status());
    ensure!(
        header(&response, "Content-Type")? == oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
        "referrers Content-Type {:?}",
        header(&response, "Content-Type")?
    );
    ensure!(
        header(&response, "OCI-Filters-Applied")? == "artifactType",
        "OCI-Filters-Applied {:?}",
        header(&response, "OCI-Filters-Applied")?
    );
    let index: serde_json::Value = response.json().await?;
    ensure!(
        index["manifests"]
            == serde_json::json!([{
                "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
                "digest": referrers[SBOM],
                "size": index["manifests"][0]["size"],
                "artifactType": SBOM,
            }]),
        "referrers?artifactType={SBOM}: {index}"
    );

    registry.stop().await;
    Ok(())
}
