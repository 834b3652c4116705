//! `publish`: pushing a snapshot this node just took. The local API is reachable by more
//! than the orchestrator, and the cache holds other tenants' VM memory and the node's
//! registry credentials, so publish only ever reads regular files under `--publish-root`
//! and only ever talks to the cache's own registry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use thaw_client::{PushOptions, Registry, Stats};
use thaw_schema::cache_api::PublishResponse;

use super::Cache;
use crate::error::{CacheError, Result};

impl Cache {
    /// Pushes the snapshot in `dir` (under the publish root) to `input`, a reference on the
    /// cache's registry.
    pub async fn publish(&self, input: &str, dir: &str) -> Result<PublishResponse> {
        let started = Instant::now();
        // The host first: nothing, not even a connection, goes to any other registry.
        let reference = self.parse_reference(input)?;
        let root = self.config.publish_root.clone().ok_or_else(|| {
            CacheError::Forbidden(
                "publishing is off on this node: start thaw-node-cache with --publish-root DIR \
                 (the directory new snapshots are written under) to allow it"
                    .into(),
            )
        })?;
        let dir = dir.to_owned();
        let dir = tokio::task::spawn_blocking(move || publishable_dir(&root, &dir))
            .await
            .map_err(|source| CacheError::Task { what: "publish check", source })??;
        // Built from the configured host, never from the reference.
        let registry = Registry::new(&self.config.registry, &self.config.client, Arc::new(Stats::new()))?;
        let report = thaw_client::push_dir(&registry, &reference, &dir, &PushOptions::default()).await?;
        Ok(PublishResponse {
            reference: report.reference,
            digest: report.digest,
            bytes_sent: report.stats.bytes_sent,
            millis: started.elapsed().as_millis() as u64,
        })
    }
}

/// `dir` resolved, if it lies under `root` (canonical) and holds no symbolic links a push
/// would follow out of it.
pub(super) fn publishable_dir(root: &Path, dir: &str) -> Result<PathBuf> {
    let path = Path::new(dir);
    if !path.is_absolute() {
        return Err(CacheError::BadRequest(format!("dir {dir:?} must be an absolute path")));
    }
    let resolved = std::fs::canonicalize(path)
        .map_err(|e| CacheError::BadRequest(format!("dir {dir:?} cannot be read: {e}")))?;
    if !resolved.starts_with(root) || !resolved.is_dir() {
        return Err(CacheError::Forbidden(format!(
            "dir {dir:?} is not a directory under --publish-root {}: publish reads snapshots only from there",
            root.display()
        )));
    }
    let entries = std::fs::read_dir(&resolved).map_err(|e| CacheError::io("listing", &resolved, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CacheError::io("listing", &resolved, e))?;
        let kind = entry.file_type().map_err(|e| CacheError::io("reading", &entry.path(), e))?;
        if kind.is_symlink() {
            return Err(CacheError::Forbidden(format!(
                "{} is a symbolic link: publish reads only regular files under --publish-root",
                entry.path().display()
            )));
        }
    }
    Ok(resolved)
}

/// The publish root, canonical, after checking it shares nothing with the cache directory:
/// a root holding the cache would let a caller publish other tenants' cached snapshots.
pub(super) fn check_publish_root(root: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let root =
        std::fs::canonicalize(root).map_err(|e| CacheError::io("resolving --publish-root", root, e))?;
    let cache = std::fs::canonicalize(cache_dir).map_err(|e| CacheError::io("resolving", cache_dir, e))?;
    if cache.starts_with(&root) || root.starts_with(&cache) {
        return Err(CacheError::BadRequest(format!(
            "--publish-root {} overlaps the cache directory {}: choose a directory of its own",
            root.display(),
            cache.display()
        )));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_directories_under_the_root_are_publishable() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let snap = root.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("memory"), b"m").unwrap();
        let root = check_publish_root(&root, &base.path().join("cache-elsewhere").tap_mkdir()).unwrap();
        assert_eq!(publishable_dir(&root, snap.to_str().unwrap()).unwrap(), snap.canonicalize().unwrap());
        // `..` out of the root, a relative path, the root's parent: refused.
        let escape = format!("{}/../", root.display());
        assert!(matches!(publishable_dir(&root, &escape), Err(CacheError::Forbidden(_))));
        assert!(matches!(publishable_dir(&root, "snap"), Err(CacheError::BadRequest(_))));
        // A link inside a snapshot directory pointing elsewhere: refused.
        std::os::unix::fs::symlink(base.path().join("secret"), snap.join("disk")).unwrap();
        assert!(matches!(publishable_dir(&root, snap.to_str().unwrap()), Err(CacheError::Forbidden(_))));
        // A root that holds the cache, or lies inside it: refused at start.
        assert!(check_publish_root(base.path(), &root.join("cache").tap_mkdir()).is_err());
        assert!(check_publish_root(&snap, &root).is_err());
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> Self;
    }

    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
