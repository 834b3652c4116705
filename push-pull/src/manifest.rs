//! Reading fetched manifests: the descriptors thaw needs, with layer titles checked before
//! anything is written under them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thaw_schema::media::{self, FileRole, ANNOTATION_TITLE};
use thaw_schema::Sha256Digest;

use crate::error::{Error, Result};
use crate::registry::FetchedManifest;
use crate::snapshot::is_safe_title;

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its digest.
    pub digest: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The `org.opencontainers.image.title` annotation.
    pub fn title(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(ANNOTATION_TITLE).map(String::as_str)
    }

    /// The recipe digest named by the `dev.thaw.recipe` annotation; `None` without one, or
    /// when it is not a sha256 digest (then the file is verified whole).
    pub fn recipe_digest(&self) -> Option<Sha256Digest> {
        self.annotations.as_ref()?.get(media::ANNOTATION_RECIPE)?.parse().ok()
    }

    /// The snapshot role of a thaw layer.
    pub fn role(&self) -> Option<FileRole> {
        FileRole::from_media_type(&self.media_type)
    }
}

/// The parts of an image manifest or index thaw reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestDoc {
    /// Must be 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// `artifactType`, when set.
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    /// Config descriptor (image manifests).
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layers (image manifests).
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Child manifests (indexes).
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl ManifestDoc {
    /// Parses a fetched manifest.
    pub fn parse(m: &FetchedManifest) -> Result<Self> {
        let doc: Self = serde_json::from_slice(&m.body).map_err(|e| {
            Error::protocol(
                format!("reading manifest {}", m.digest),
                format!("not a manifest thaw can read: {e}"),
            )
        })?;
        if doc.schema_version != 2 {
            return Err(Error::protocol(format!("reading manifest {}", m.digest), "schemaVersion is not 2"));
        }
        Ok(doc)
    }

    /// True for an index / manifest list.
    pub fn is_index(media_type: &str) -> bool {
        media_type == media::OCI_INDEX || media_type == media::DOCKER_MANIFEST_LIST
    }
}

/// A layer to write as a file: its descriptor and its checked title.
#[derive(Debug, Clone)]
pub struct FileLayer {
    /// The layer.
    pub descriptor: Descriptor,
    /// The file name (checked by [`is_safe_title`]).
    pub title: String,
}

/// The layers of an image manifest that name files, with their titles checked: a title with
/// `/`, `..` or an absolute path, or two layers with one title, refuse the whole artifact.
/// Layers without a title are left out (as `oras pull` does).
pub fn file_layers(doc: &ManifestDoc, what: &str) -> Result<Vec<FileLayer>> {
    let mut out: Vec<FileLayer> = Vec::new();
    for layer in &doc.layers {
        let Some(title) = layer.title() else {
            tracing::warn!(digest = %layer.digest, "{what}: layer without a title is not written");
            continue;
        };
        if !is_safe_title(title) {
            return Err(Error::Snapshot(format!(
                "{what}: layer {} has the title {title:?}, which is not a plain file name; refusing to write it",
                layer.digest
            )));
        }
        if out.iter().any(|l| l.title == title) {
            return Err(Error::Snapshot(format!("{what}: two layers are both titled {title:?}")));
        }
        out.push(FileLayer { descriptor: layer.clone(), title: title.to_owned() });
    }
    Ok(out)
}
