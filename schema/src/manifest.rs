//! Snapshot manifests: building them on `oci-spec` types, and reading what any manifest
//! (OCI or Docker, image or index) references, for the registry's checks.

use std::collections::HashMap;

use oci_spec::image::{DescriptorBuilder, ImageManifest, ImageManifestBuilder, MediaType};
use serde_json::Value;

use crate::media::{self, FileRole};
use crate::Sha256Digest;

/// Largest manifest body thaw accepts (4 MiB).
pub const MAX_MANIFEST_LEN: usize = 4 * 1024 * 1024;

/// One file of a snapshot, as it goes into the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Which of the four files.
    pub role: FileRole,
    /// File name, written as `org.opencontainers.image.title`.
    pub title: String,
    /// SHA-256 of the raw file.
    pub digest: Sha256Digest,
    /// File size in bytes.
    pub size: u64,
    /// The digest of its blob's recipe encoding, written as [`media::ANNOTATION_RECIPE`]:
    /// set only when the registry holds exactly that recipe for the blob.
    pub recipe: Option<Sha256Digest>,
}

/// Why a manifest could not be built or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The body is not a manifest thaw understands.
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

fn invalid(e: impl std::fmt::Display) -> ManifestError {
    ManifestError::Invalid(e.to_string())
}

/// Builds the OCI image manifest of a snapshot: `artifactType` thaw's, the config blob
/// (`config_digest`, `config_size`) typed as the snapshot config, one layer per file.
pub fn snapshot_manifest(
    config_digest: Sha256Digest,
    config_size: u64,
    files: &[SnapshotFile],
    annotations: HashMap<String, String>,
) -> Result<ImageManifest, ManifestError> {
    let digest = |d: Sha256Digest| d.to_string().parse::<oci_spec::image::Digest>().map_err(invalid);
    let config = DescriptorBuilder::default()
        .media_type(MediaType::Other(media::SNAPSHOT_CONFIG.to_owned()))
        .digest(digest(config_digest)?)
        .size(config_size)
        .build()
        .map_err(invalid)?;
    let layers = files
        .iter()
        .map(|f| {
            DescriptorBuilder::default()
                .media_type(MediaType::Other(f.role.media_type().to_owned()))
                .digest(digest(f.digest)?)
                .size(f.size)
                .annotations(layer_annotations(f))
                .build()
                .map_err(invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::Other(media::SNAPSHOT_ARTIFACT.to_owned()))
        .config(config)
        .layers(layers);
    if !annotations.is_empty() {
        builder = builder.annotations(annotations);
    }
    builder.build().map_err(invalid)
}

/// The bytes of a manifest, every object's keys in sorted order. oci-spec keeps annotations
/// in a `HashMap`, whose iteration order changes from one map to the next: serialized as is,
/// a layer with two annotations (title and recipe) would give the same snapshot another
/// manifest digest on each push.
pub fn canonical_json(manifest: &ImageManifest) -> Vec<u8> {
    // serde_json's `Value` keeps object keys in a BTreeMap (no `preserve_order` feature).
    let value = serde_json::to_value(manifest).expect("a manifest is JSON");
    serde_json::to_vec(&value).expect("JSON serializes")
}

fn layer_annotations(file: &SnapshotFile) -> HashMap<String, String> {
    let mut annotations = HashMap::from([(media::ANNOTATION_TITLE.to_owned(), file.title.clone())]);
    if let Some(recipe) = file.recipe {
        annotations.insert(media::ANNOTATION_RECIPE.to_owned(), recipe.to_string());
    }
    annotations
}

/// A reference from a manifest to other content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Target digest.
    pub digest: Sha256Digest,
    /// Declared size.
    pub size: u64,
    /// Declared media type.
    pub media_type: String,
    /// The recipe digest its [`media::ANNOTATION_RECIPE`] annotation names, if it has one.
    pub recipe: Option<Sha256Digest>,
}

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSummary {
    /// The manifest's media type (from the body, else from the request's Content-Type).
    pub media_type: String,
    /// The artifact type: `artifactType`, else the config's media type (image manifests).
    pub artifact_type: Option<String>,
    /// Blobs it references (config and layers).
    pub blobs: Vec<Reference>,
    /// Manifests it references (index entries).
    pub manifests: Vec<Reference>,
    /// The `subject`, for the referrers API.
    pub subject: Option<Reference>,
    /// Top-level annotations.
    pub annotations: Option<Value>,
}

fn reference(v: &Value) -> Result<Reference, ManifestError> {
    let digest = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("descriptor without digest"))?
        .parse::<Sha256Digest>()
        .map_err(invalid)?;
    let size =
        v.get("size").and_then(Value::as_u64).ok_or_else(|| invalid("descriptor without a valid size"))?;
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("descriptor without mediaType"))?
        .to_owned();
    let recipe = match v.get("annotations").and_then(|a| a.get(media::ANNOTATION_RECIPE)) {
        None => None,
        Some(value) => {
            Some(value.as_str().and_then(|s| s.parse::<Sha256Digest>().ok()).ok_or_else(|| {
                invalid(format!(
                    "annotation {} must be a sha256 digest, not {value}",
                    media::ANNOTATION_RECIPE
                ))
            })?)
        }
    };
    Ok(Reference { digest, size, media_type, recipe })
}

/// Reads the references of an OCI or Docker manifest or index. `content_type` is the
/// request's Content-Type, used when the body has no `mediaType`.
pub fn summarize(body: &[u8], content_type: Option<&str>) -> Result<ManifestSummary, ManifestError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| invalid("not a JSON object"))?;
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    let body_type = obj.get("mediaType").and_then(Value::as_str);
    if let (Some(b), Some(c)) = (body_type, content_type) {
        if b != c {
            return Err(invalid(format!("mediaType {b:?} differs from Content-Type {c:?}")));
        }
    }
    let media_type = body_type
        .or(content_type)
        .map(str::to_owned)
        .or_else(|| obj.contains_key("manifests").then(|| media::OCI_INDEX.to_owned()))
        .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
    let list = |key: &str| -> Result<Vec<Reference>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(reference).collect(),
            Some(_) => Err(invalid(format!("{key} must be an array"))),
        }
    };
    let is_index = media_type == media::OCI_INDEX || media_type == media::DOCKER_MANIFEST_LIST;
    let is_image = media_type == media::OCI_MANIFEST || media_type == media::DOCKER_MANIFEST;
    let (blobs, manifests) = if is_index {
        (Vec::new(), list("manifests")?)
    } else if is_image {
        let config = obj.get("config").ok_or_else(|| invalid("image manifest without config"))?;
        let mut blobs = vec![reference(config)?];
        blobs.extend(list("layers")?);
        (blobs, Vec::new())
    } else {
        return Err(invalid(format!("unsupported manifest media type {media_type:?}")));
    };
    let subject = obj.get("subject").map(reference).transpose()?;
    let artifact_type = obj.get("artifactType").and_then(Value::as_str).map(str::to_owned).or_else(|| {
        if is_image {
            blobs.first().map(|c| c.media_type.clone())
        } else {
            None
        }
    });
    Ok(ManifestSummary {
        media_type,
        artifact_type,
        blobs,
        manifests,
        subject,
        annotations: obj.get("annotations").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_manifest_reads_back() {
        let files = vec![SnapshotFile {
            role: FileRole::Memory,
            title: "memory".into(),
            digest: Sha256Digest::of(b"m"),
            size: 1,
            recipe: Some(Sha256Digest::of(b"recipe")),
        }];
        let m = snapshot_manifest(Sha256Digest::of(b"{}"), 2, &files, HashMap::new()).unwrap();
        let body = serde_json::to_vec(&m).unwrap();
        let s = summarize(&body, Some(media::OCI_MANIFEST)).unwrap();
        assert_eq!(s.artifact_type.as_deref(), Some(media::SNAPSHOT_ARTIFACT));
        assert_eq!(s.blobs.len(), 2);
        assert_eq!(s.blobs[1].digest, Sha256Digest::of(b"m"));
        assert_eq!(s.blobs[1].recipe, Some(Sha256Digest::of(b"recipe")));
        assert_eq!(s.blobs[0].recipe, None);
        assert!(s.subject.is_none());
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(media::ANNOTATION_TITLE));
    }

    #[test]
    fn the_same_snapshot_always_gives_the_same_manifest_bytes() {
        let files: Vec<SnapshotFile> = FileRole::ALL
            .iter()
            .map(|&role| SnapshotFile {
                role,
                title: role.key().to_owned(),
                digest: Sha256Digest::of(role.key().as_bytes()),
                size: 1,
                recipe: Some(Sha256Digest::of(role.media_type().as_bytes())),
            })
            .collect();
        let annotations: HashMap<String, String> =
            (0..8).map(|i| (format!("dev.thaw.test.{i}"), i.to_string())).collect();
        let first = canonical_json(
            &snapshot_manifest(Sha256Digest::of(b"{}"), 2, &files, annotations.clone()).unwrap(),
        );
        for _ in 0..20 {
            let again = snapshot_manifest(Sha256Digest::of(b"{}"), 2, &files, annotations.clone()).unwrap();
            assert_eq!(canonical_json(&again), first);
        }
    }

    #[test]
    fn bad_manifests_are_rejected() {
        assert!(summarize(b"nope", None).is_err());
        assert!(summarize(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(summarize(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            None
        )
        .is_err());
        let bad_digest =
            br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:xyz","size":1},"layers":[]}"#;
        assert!(summarize(bad_digest, None).is_err());
        let bad_recipe = br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[{"mediaType":"b","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1,"annotations":{"dev.thaw.recipe":"md5:00"}}]}"#;
        let err = summarize(bad_recipe, None).unwrap_err().to_string();
        assert!(err.contains("dev.thaw.recipe must be a sha256 digest"), "{err}");
        let mismatch =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(summarize(mismatch, Some(media::OCI_MANIFEST)).is_err());
        assert!(summarize(mismatch, Some(media::OCI_INDEX)).is_ok());
    }
}
