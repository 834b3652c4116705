//! Media types and annotation keys thaw writes and reads.

/// `artifactType` of a thaw snapshot manifest.
pub const SNAPSHOT_ARTIFACT: &str = "application/vnd.thaw.snapshot.v1";
/// Config media type: the info file's content, parsed.
pub const SNAPSHOT_CONFIG: &str = "application/vnd.thaw.snapshot.config.v1+json";
/// Layer: the guest memory file.
pub const MEMORY_LAYER: &str = "application/vnd.thaw.snapshot.memory.v1";
/// Layer: the microVM state file.
pub const VMSTATE_LAYER: &str = "application/vnd.thaw.snapshot.vmstate.v1";
/// Layer: the disk snapshot.
pub const DISK_LAYER: &str = "application/vnd.thaw.snapshot.disk.v1";
/// Layer: the info file.
pub const INFO_LAYER: &str = "application/vnd.thaw.snapshot.info.v1+json";
/// A blob's recipe.
pub const RECIPE: &str = "application/vnd.thaw.recipe.v1";
/// `artifactType` of a working set: the order a restored VM first touched its memory's
/// chunks, a referrer of the snapshot manifest (docs/FORMAT.md, "Working set").
pub const WORKING_SET_ARTIFACT: &str = "application/vnd.thaw.working-set.v1";
/// Layer of a working-set manifest: the binary list of recipe entry indexes.
pub const WORKING_SET_LAYER: &str = "application/vnd.thaw.working-set.order.v1";
/// A batch of encoded chunks.
pub const CHUNK_BATCH: &str = "application/vnd.thaw.chunks.v1";
/// A binary missing-chunks query: raw chunk ids (docs/FORMAT.md).
pub const CHUNK_IDS: &str = "application/vnd.thaw.chunk-ids.v1";
/// The answer to a binary missing-chunks query (docs/FORMAT.md).
pub const MISSING_CHUNKS: &str = "application/vnd.thaw.missing-chunks.v1";

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest, accepted for compatibility with older clients.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The OCI empty descriptor's media type.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// Annotation that names a layer's file.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

/// Annotation on a layer: the SHA-256 of its blob's recipe encoding
/// ([`crate::Recipe::encoded_digest`]), `sha256:<hex>`. It binds the recipe to the manifest,
/// so a client holding the manifest by digest verifies manifest → recipe → chunk ids →
/// bytes and need not hash the whole file (docs/FORMAT.md, "The verified chunk chain").
pub const ANNOTATION_RECIPE: &str = "dev.thaw.recipe";

/// The four files of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileRole {
    /// Guest memory.
    Memory,
    /// microVM state.
    Vmstate,
    /// Disk image or diff.
    Disk,
    /// Metadata.
    Info,
}

impl FileRole {
    /// All roles, in manifest layer order.
    pub const ALL: [FileRole; 4] = [Self::Memory, Self::Vmstate, Self::Disk, Self::Info];

    /// The layer media type of this role.
    pub const fn media_type(self) -> &'static str {
        match self {
            Self::Memory => MEMORY_LAYER,
            Self::Vmstate => VMSTATE_LAYER,
            Self::Disk => DISK_LAYER,
            Self::Info => INFO_LAYER,
        }
    }

    /// The role of a layer media type, if it is one of thaw's.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.media_type() == media_type)
    }

    /// The key used in JSON (`"memory"`, `"vmstate"`, `"disk"`, `"info"`).
    pub const fn key(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Vmstate => "vmstate",
            Self::Disk => "disk",
            Self::Info => "info",
        }
    }
}
