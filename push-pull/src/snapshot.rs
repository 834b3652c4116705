//! A snapshot on disk: which file plays which role, the file names that are safe to write,
//! and the config blob made from the info file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};
use thaw_schema::media::FileRole;

use crate::error::{Error, Result};

/// One file of a snapshot to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Its role.
    pub role: FileRole,
    /// The name written as the layer title (and used by `thaw pull` / `oras pull`).
    pub title: String,
    /// Where it is.
    pub path: PathBuf,
}

/// Files given explicitly for some roles (`--memory FILE`, …); the rest are found by name.
#[derive(Debug, Clone, Default)]
pub struct RoleOverrides {
    /// Guest memory file.
    pub memory: Option<PathBuf>,
    /// microVM state file.
    pub vmstate: Option<PathBuf>,
    /// Disk image.
    pub disk: Option<PathBuf>,
    /// Info file.
    pub info: Option<PathBuf>,
}

impl RoleOverrides {
    fn get(&self, role: FileRole) -> Option<&PathBuf> {
        match role {
            FileRole::Memory => self.memory.as_ref(),
            FileRole::Vmstate => self.vmstate.as_ref(),
            FileRole::Disk => self.disk.as_ref(),
            FileRole::Info => self.info.as_ref(),
        }
    }
}

/// The role a file name implies: memory `memory`, `mem`, `mem_file`, `*.mem`; vmstate
/// `vmstate`, `snapshot`, `snap_file`, `*.vmstate`, `*.snap`; disk `disk*`, `*.ext4`, `*.img`;
/// info `info`, `info.json`, `info_file`.
pub fn role_for_name(name: &str) -> Option<FileRole> {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e);
    match lower.as_str() {
        "memory" | "mem" | "mem_file" => return Some(FileRole::Memory),
        "vmstate" | "snapshot" | "snap_file" => return Some(FileRole::Vmstate),
        "info" | "info.json" | "info_file" => return Some(FileRole::Info),
        _ => {}
    }
    match ext {
        Some("mem") => Some(FileRole::Memory),
        Some("vmstate" | "snap") => Some(FileRole::Vmstate),
        Some("ext4" | "img") => Some(FileRole::Disk),
        _ if lower.starts_with("disk") => Some(FileRole::Disk),
        _ => None,
    }
}

/// True when `title` is a plain file name that cannot escape a directory: not empty, no
/// `/` or `\`, not `.` or `..`, no NUL or control characters, at most 255 bytes.
pub fn is_safe_title(title: &str) -> bool {
    !title.is_empty()
        && title.len() <= 255
        && title != "."
        && title != ".."
        && !title.contains(['/', '\\'])
        && !title.chars().any(char::is_control)
}

fn file_name_of(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Snapshot(format!("{} has no UTF-8 file name", path.display())))?;
    if !is_safe_title(name) {
        return Err(Error::Snapshot(format!("{name:?} cannot be used as a file name in an artifact")));
    }
    Ok(name.to_owned())
}

/// The snapshot in `dir`: every regular, non-hidden file must have a role (by name or by
/// override), and each role at most one file. Files given by override may live elsewhere.
pub fn snapshot_files(dir: Option<&Path>, overrides: &RoleOverrides) -> Result<Vec<SnapshotFile>> {
    let mut by_role: BTreeMap<FileRole, SnapshotFile> = BTreeMap::new();
    for role in FileRole::ALL {
        if let Some(path) = overrides.get(role) {
            let meta = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
            if !meta.is_file() {
                return Err(Error::Snapshot(format!(
                    "{} ({}) is not a regular file",
                    path.display(),
                    role.key()
                )));
            }
            by_role.insert(role, SnapshotFile { role, title: file_name_of(path)?, path: path.clone() });
        }
    }
    let mut unknown = Vec::new();
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(|e| Error::io("reading", &path, e))?;
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if meta.is_file() && !hidden {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            if FileRole::ALL.iter().any(|r| overrides.get(*r).is_some_and(|p| same_file(p, &path))) {
                continue;
            }
            let title = file_name_of(&path)?;
            let Some(role) = role_for_name(&title) else {
                unknown.push(title);
                continue;
            };
            if overrides.get(role).is_some() {
                continue; // the role was given explicitly; other candidates are ignored
            }
            if let Some(existing) = by_role.get(&role) {
                return Err(Error::Snapshot(format!(
                    "both {:?} and {title:?} in {} look like the {} file; name one with --{}",
                    existing.title,
                    dir.display(),
                    role.key(),
                    role.key()
                )));
            }
            by_role.insert(role, SnapshotFile { role, title, path });
        }
    }
    if !unknown.is_empty() {
        return Err(Error::Snapshot(format!(
            "cannot tell the role of {} in {}: name files memory, vmstate, disk.ext4 and info.json, \
             or pass --memory/--vmstate/--disk/--info",
            unknown.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", "),
            dir.map_or_else(|| ".".into(), |d| d.display().to_string())
        )));
    }
    let files: Vec<SnapshotFile> = by_role.into_values().collect();
    if files.is_empty() {
        return Err(Error::Snapshot(format!(
            "no snapshot files found in {}",
            dir.map_or_else(|| "(no directory)".into(), |d| d.display().to_string())
        )));
    }
    let mut titles: Vec<&str> = files.iter().map(|f| f.title.as_str()).collect();
    titles.sort_unstable();
    if let Some(w) = titles.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Snapshot(format!("two snapshot files are both named {:?}", w[0])));
    }
    Ok(files)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Largest info file copied into the config blob.
pub const MAX_INFO_IN_CONFIG: u64 = 1024 * 1024;

/// The snapshot config blob (`application/vnd.thaw.snapshot.config.v1+json`) made from the
/// info file: its bytes unchanged when they are a JSON object; otherwise a wrapper object
/// `{"thaw.info": {"encoding": "json"|"utf-8"|"base64", "value"|"text"|"data": …}}`; `{}`
/// without an info file, and `{"thaw.info": {"encoding": "omitted", "size": n}}` for an info
/// file over 1 MiB (the info layer still carries it whole).
pub fn config_blob(info: Option<&Path>) -> Result<Vec<u8>> {
    let Some(path) = info else { return Ok(b"{}".to_vec()) };
    let size = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?.len();
    if size > MAX_INFO_IN_CONFIG {
        return Ok(serde_json::to_vec(&json!({ "thaw.info": { "encoding": "omitted", "size": size } }))
            .expect("serializes"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let wrapped = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(_)) => return Ok(bytes),
        Ok(other) => json!({ "thaw.info": { "encoding": "json", "value": other } }),
        Err(_) => match std::str::from_utf8(&bytes) {
            Ok(text) => json!({ "thaw.info": { "encoding": "utf-8", "text": text } }),
            Err(_) => json!({ "thaw.info": {
                "encoding": "base64",
                "data": base64::engine::general_purpose::STANDARD.encode(&bytes)
            } }),
        },
    };
    Ok(serde_json::to_vec(&wrapped).expect("serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_by_name() {
        for (name, role) in [
            ("memory", Some(FileRole::Memory)),
            ("mem_file", Some(FileRole::Memory)),
            ("guest.mem", Some(FileRole::Memory)),
            ("vmstate", Some(FileRole::Vmstate)),
            ("snap_file", Some(FileRole::Vmstate)),
            ("fc.vmstate", Some(FileRole::Vmstate)),
            ("disk", Some(FileRole::Disk)),
            ("disk-diff", Some(FileRole::Disk)),
            ("rootfs.ext4", Some(FileRole::Disk)),
            ("info.json", Some(FileRole::Info)),
            ("info_file", Some(FileRole::Info)),
            ("notes.txt", None),
        ] {
            assert_eq!(role_for_name(name), role, "{name}");
        }
    }

    #[test]
    fn titles() {
        for bad in ["", ".", "..", "a/b", "/etc", "a\\b", "x\ny", "../x"] {
            assert!(!is_safe_title(bad), "{bad:?}");
        }
        assert!(is_safe_title("memory") && is_safe_title("..hidden") && is_safe_title("disk.ext4"));
    }

    #[test]
    fn directories() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["memory", "vmstate", "disk.ext4", "info.json", ".hidden"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let files = snapshot_files(Some(dir.path()), &RoleOverrides::default()).unwrap();
        let roles: Vec<_> = files.iter().map(|f| (f.role, f.title.as_str())).collect();
        assert_eq!(
            roles,
            [
                (FileRole::Memory, "memory"),
                (FileRole::Vmstate, "vmstate"),
                (FileRole::Disk, "disk.ext4"),
                (FileRole::Info, "info.json")
            ]
        );
        std::fs::write(dir.path().join("stray"), "x").unwrap();
        let e = snapshot_files(Some(dir.path()), &RoleOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("stray"), "{e}");
        let over = RoleOverrides { disk: Some(dir.path().join("stray")), ..Default::default() };
        let files = snapshot_files(Some(dir.path()), &over).unwrap();
        assert!(files.iter().any(|f| f.role == FileRole::Disk && f.title == "stray"));
        std::fs::write(dir.path().join("mem"), "x").unwrap();
        assert!(snapshot_files(Some(dir.path()), &over).unwrap_err().to_string().contains("--memory"));
    }

    #[test]
    fn config_from_info() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("info");
        assert_eq!(config_blob(None).unwrap(), b"{}");
        std::fs::write(&p, br#"{"kernel":"5.10"}"#).unwrap();
        assert_eq!(config_blob(Some(&p)).unwrap(), br#"{"kernel":"5.10"}"#);
        std::fs::write(&p, b"plain text").unwrap();
        let v: Value = serde_json::from_slice(&config_blob(Some(&p)).unwrap()).unwrap();
        assert_eq!(v["thaw.info"]["text"], "plain text");
        std::fs::write(&p, [0xff, 0xfe, 0]).unwrap();
        let v: Value = serde_json::from_slice(&config_blob(Some(&p)).unwrap()).unwrap();
        assert_eq!(v["thaw.info"]["encoding"], "base64");
        std::fs::write(&p, b"[1,2]").unwrap();
        let v: Value = serde_json::from_slice(&config_blob(Some(&p)).unwrap()).unwrap();
        assert_eq!(v["thaw.info"]["value"][1], 2);
    }
}
