//! Every storage key the registry uses, spelled in this one place.
//!
//! ```text
//! chunks/packs/<pack id>                                   a pack of chunk frames (storage::pack), global
//! chunks/index/<pack id>                                   its index: chunk id → frame range, written after it
//! recipes/sha256/<64 hex>                                  one recipe per blob digest, global
//! manifests/sha256/<64 hex>                                manifest bytes, global
//! repositories/<name>/_layers/sha256/<64 hex>              blob link: the blob is readable in <name>; holds its size
//! repositories/<name>/_manifests/revisions/sha256/<64 hex> manifest link; holds its media type
//! repositories/<name>/_manifests/tags/<tag>                tag; holds the manifest digest
//! repositories/<name>/_referrers/sha256/<subject hex>/sha256/<64 hex>
//!                                                          referrer descriptor (JSON)
//! nodes/<node>                                             a node's latest holdings record (JSON), last writer wins
//! gc/serving/<random>                                      lease of a serving registry, renewed every 10 s (storage::fence)
//! gc/lock/<generation>                                     GC lock generation, created with If-None-Match (storage::fence)
//! gc/sweeps/<epoch, 20 digits>[.done]                      what a GC run may delete, published before it deletes; closed after
//! gc/probe/<random>                                        conditional-write probe, deleted at once
//! ```
//!
//! Content (chunks, recipes, manifests) is global and content-addressed, so it is stored
//! once (a chunk may sit in two packs when two replicas stored it at once; either copy
//! serves); visibility is per repository, through links. A link is written only after all the
//! content it points to, which is what makes an interrupted write invisible. Repository
//! names are validated before they reach here, and their grammar forbids `..`, empty
//! components and leading `_`, so they cannot escape their subtree or collide with `_layers`.
//! Node names are validated too (`thaw_schema::holdings::validate_node_name`: DNS subdomain
//! characters only, no empty label), so `nodes/<node>` is always one key directly under `nodes/`.

use object_store::path::Path;
use thaw_schema::Sha256Digest;

use super::pack::PackId;

pub(crate) const PACKS: &str = "chunks/packs";
pub(crate) const PACK_INDEXES: &str = "chunks/index";
pub(crate) const REPOSITORIES: &str = "repositories";
pub(crate) const NODES: &str = "nodes";
pub(crate) const GC_LEASES: &str = "gc/serving";
pub(crate) const GC_LOCK: &str = "gc/lock";
pub(crate) const GC_SWEEPS: &str = "gc/sweeps";
pub(crate) const GC_PROBES: &str = "gc/probe";

pub(crate) fn gc_lease(name: &str) -> Path {
    Path::from(format!("{GC_LEASES}/{name}"))
}

pub(crate) fn gc_lock(generation: u64) -> Path {
    Path::from(format!("{GC_LOCK}/{generation:020}"))
}

pub(crate) fn gc_sweep(epoch: u64, done: bool) -> Path {
    Path::from(format!("{GC_SWEEPS}/{epoch:020}{}", if done { ".done" } else { "" }))
}

pub(crate) fn gc_probe(name: &str) -> Path {
    Path::from(format!("{GC_PROBES}/{name}"))
}

pub(crate) fn pack(id: &PackId) -> Path {
    Path::from(format!("{PACKS}/{id}"))
}

pub(crate) fn pack_index(id: &PackId) -> Path {
    Path::from(format!("{PACK_INDEXES}/{id}"))
}

pub(crate) fn recipe(digest: &Sha256Digest) -> Path {
    Path::from(format!("recipes/sha256/{}", digest.hex()))
}

pub(crate) fn manifest(digest: &Sha256Digest) -> Path {
    Path::from(format!("manifests/sha256/{}", digest.hex()))
}

pub(crate) fn blob_link(repo: &str, digest: &Sha256Digest) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_layers/sha256/{}", digest.hex()))
}

pub(crate) fn manifest_link(repo: &str, digest: &Sha256Digest) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_manifests/revisions/sha256/{}", digest.hex()))
}

pub(crate) fn tags_dir(repo: &str) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_manifests/tags"))
}

pub(crate) fn tag(repo: &str, tag: &str) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_manifests/tags/{tag}"))
}

pub(crate) fn referrers_dir(repo: &str, subject: &Sha256Digest) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_referrers/sha256/{}", subject.hex()))
}

pub(crate) fn referrer(repo: &str, subject: &Sha256Digest, manifest: &Sha256Digest) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}/_referrers/sha256/{}/sha256/{}", subject.hex(), manifest.hex()))
}

pub(crate) fn node(name: &str) -> Path {
    Path::from(format!("{NODES}/{name}"))
}

pub(crate) fn repository_root(repo: &str) -> Path {
    Path::from(format!("{REPOSITORIES}/{repo}"))
}

/// The repository name a key under `repositories/` belongs to.
pub(crate) fn repository_of(key: &Path) -> Option<String> {
    let s = key.as_ref().strip_prefix("repositories/")?;
    ["/_layers/", "/_manifests/", "/_referrers/"]
        .iter()
        .filter_map(|m| s.find(m))
        .min()
        .map(|at| s[..at].to_owned())
}
