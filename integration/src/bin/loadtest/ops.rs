//! The operations of the mix, each checking what it gets: pulls hashed against their
//! sources, revisions pushed, `_thaw` missing queries, manifest GETs, inspects, tag lists
//! and ranged blob GETs compared byte for byte.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use thaw_client::{PullOptions, PushOptions, Reference, Registry};
use thaw_schema::digest::{ChunkId, Sha256Digest};

use crate::workload::{sha256_file, source_files, Catalog, Counters, Rng, Snapshot, SourceFile};
use crate::{CHANGED_PAGES, PAGE, PASSWORD, REVISIONS_KEPT_PER_CLIENT, USER};

/// Pulls into a fresh directory and hashes every file against its source; answers the
/// bytes pulled.
pub(crate) async fn pull(registry: &Registry, snapshot: &Snapshot, dest: &Path, seeded: bool) -> Result<u64> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let options = PullOptions {
        seeds: if seeded { vec![snapshot.seed.clone()] } else { Vec::new() },
        cache: None,
        no_destination_seed: true,
    };
    let report = thaw_client::pull(registry, &snapshot.reference, dest, &options).await?;
    let expected = snapshot.files.clone();
    let pulled: Vec<(String, PathBuf)> =
        report.files.iter().map(|f| (f.title.clone(), f.path.clone())).collect();
    let reference = snapshot.reference.to_string();
    let bytes = tokio::task::spawn_blocking(move || -> Result<u64> {
        ensure!(
            pulled.len() == expected.len(),
            "CORRUPT: {} files pulled, {} pushed",
            pulled.len(),
            expected.len()
        );
        let mut bytes = 0;
        for want in &expected {
            let (_, path) = pulled
                .iter()
                .find(|(t, _)| *t == want.title)
                .with_context(|| format!("CORRUPT: {reference}: {} was not pulled", want.title))?;
            let got = sha256_file(path)?;
            ensure!(
                got == want.digest,
                "CORRUPT: {reference}: {} hashes to {got}, not {}",
                want.title,
                want.digest
            );
            bytes += want.size;
        }
        Ok(bytes)
    })
    .await??;
    std::fs::remove_dir_all(dest)?;
    Ok(bytes)
}

/// Derives a revision of a base snapshot (a few memory pages rewritten; the other files
/// shared by hard link), pushes it with the base as `base`, and lists it.
pub(crate) async fn push_revision(
    registry: &Registry,
    catalog: &Catalog,
    c: usize,
    n: usize,
    rng: &mut Rng,
    dir: &Path,
) -> Result<()> {
    let base = catalog.bases[rng.below(catalog.bases.len() as u64) as usize].clone();
    std::fs::create_dir_all(dir)?;
    let rev_dir = tempfile::Builder::new().prefix("rev-").tempdir_in(dir)?;
    let seeds: Vec<u64> = (0..CHANGED_PAGES * 2 + 1).map(|_| rng.next()).collect();
    let (base_files, target) = (base.files.clone(), rev_dir.path().to_owned());
    let files = tokio::task::spawn_blocking(move || -> Result<Vec<SourceFile>> {
        for f in &base_files {
            let to = target.join(&f.title);
            if f.title == "memory" {
                let status = Command::new("cp").arg("--sparse=always").arg(&f.path).arg(&to).status()?;
                ensure!(status.success(), "cp {} failed", f.path.display());
                let file = std::fs::OpenOptions::new().write(true).open(&to)?;
                let pages = f.size / PAGE;
                for i in 0..CHANGED_PAGES {
                    let page = seeds[2 * i] % pages;
                    let mut bytes = vec![0u8; PAGE as usize];
                    let mut r = Rng(seeds[2 * i + 1] | 1);
                    for chunk in bytes.chunks_mut(8) {
                        chunk.copy_from_slice(&r.next().to_le_bytes());
                    }
                    file.write_all_at(&bytes, page * PAGE)?;
                }
            } else if f.title == "info.json" {
                let mut info = std::fs::read(&f.path)?;
                info.extend_from_slice(
                    format!("{{\"loadtest_revision\":{}}}\n", seeds[CHANGED_PAGES * 2]).as_bytes(),
                );
                std::fs::File::create(&to)?.write_all(&info)?;
            } else {
                std::fs::hard_link(&f.path, &to)?;
            }
        }
        source_files(&target)
    })
    .await??;
    let repository = base.reference.repository();
    let reference = Reference::parse(&format!("{}/{repository}:c{c}-r{n}", registry.host()))?;
    let options = PushOptions { base: Some(base.reference.clone()), ..PushOptions::default() };
    thaw_client::push_dir(registry, &reference, rev_dir.path(), &options).await?;
    let snapshot = Arc::new(Snapshot {
        reference,
        files,
        seed: base.files[0].path.parent().context("base directory")?.to_owned(),
        known_chunks: base.known_chunks.clone(),
        base: base.base,
        _dir: Some(rev_dir),
    });
    let mut revisions = catalog.revisions.lock().unwrap();
    revisions.push((c, snapshot));
    // Forget this client's oldest revisions; a pull still using one keeps its files alive.
    while revisions.iter().filter(|(owner, _)| *owner == c).count() > REVISIONS_KEPT_PER_CLIENT {
        let oldest = revisions.iter().position(|(owner, _)| *owner == c).expect("one of them");
        revisions.remove(oldest);
    }
    Ok(())
}

/// Sends a raw request, retrying 503/429 with backoff as thaw-client does (counted).
async fn send_retrying(
    counters: &Counters,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        let resp = build().send().await?;
        let status = resp.status().as_u16();
        if (status == 503 || status == 429) && attempt < 5 {
            let counter = if status == 503 { &counters.raw_503 } else { &counters.raw_429 };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            delay *= 2;
            continue;
        }
        return Ok(resp);
    }
    unreachable!("the loop returns")
}

/// Asks `_thaw` which of some stored and some made-up chunk ids are missing: exactly the
/// made-up ones must be.
pub(crate) async fn missing(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    rng: &mut Rng,
    counters: &Counters,
) -> Result<()> {
    let mut ids: Vec<String> = snapshot.known_chunks.iter().map(ChunkId::hex).collect();
    let invented: Vec<String> = (0..50).map(|_| ChunkId::of(&rng.next().to_le_bytes()).hex()).collect();
    for (i, id) in invented.iter().enumerate() {
        let at = (i * 7) % (ids.len() + 1);
        ids.insert(at, id.clone());
    }
    let url = format!("http://{host}/v2/{}/_thaw/chunks/missing", snapshot.reference.repository());
    let body = serde_json::json!({ "chunks": ids });
    let resp =
        send_retrying(counters, || http.post(&url).basic_auth(USER, Some(PASSWORD)).json(&body)).await?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.as_u16() == 200, "POST {url}: {status}: {text}");
    let answer: serde_json::Value = serde_json::from_str(&text).context("the missing answer")?;
    let got: HashSet<&str> = answer["missing"]
        .as_array()
        .context("no `missing` list")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let want: HashSet<&str> = invented.iter().map(String::as_str).collect();
    ensure!(
        got == want,
        "CORRUPT: missing answer lists {} ids, {} invented ones expected",
        got.len(),
        want.len()
    );
    Ok(())
}

/// A plain manifest GET by tag: the body must hash to the `Docker-Content-Digest` answered.
pub(crate) async fn manifest_get(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    counters: &Counters,
) -> Result<()> {
    let reference = &snapshot.reference;
    let url = format!(
        "http://{host}/v2/{}/manifests/{}",
        reference.repository(),
        reference.tag().context("a tagged reference")?
    );
    let resp = send_retrying(counters, || {
        http.get(&url)
            .basic_auth(USER, Some(PASSWORD))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
    })
    .await?;
    let status = resp.status();
    let digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = resp.bytes().await?;
    ensure!(status.as_u16() == 200, "GET {url}: {status}: {}", String::from_utf8_lossy(&body));
    let got = Sha256Digest::of(&body).to_string();
    ensure!(digest.as_deref() == Some(got.as_str()), "CORRUPT: {url} hashes to {got}, answered {digest:?}");
    Ok(())
}

pub(crate) async fn inspect(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    let report = thaw_client::inspect(registry, &snapshot.reference).await?;
    for want in &snapshot.files {
        let found = report.files.iter().find(|f| f.title.as_deref() == Some(&want.title));
        ensure!(
            found.is_some_and(|f| f.digest == want.digest && f.size == want.size),
            "CORRUPT: inspect shows {} not as pushed",
            want.title
        );
    }
    Ok(())
}

pub(crate) async fn tags(registry: &Registry, snapshot: &Snapshot) -> Result<()> {
    let tags = registry.tags(snapshot.reference.repository()).await?;
    let tag = snapshot.reference.tag().unwrap_or_default();
    ensure!(
        tags.iter().any(|t| t == tag),
        "CORRUPT: tag list of {} lacks {tag}",
        snapshot.reference.repository()
    );
    Ok(())
}

/// A plain OCI blob GET with `Range`, compared with the source file's bytes.
pub(crate) async fn range_get(
    http: &reqwest::Client,
    host: &str,
    snapshot: &Snapshot,
    rng: &mut Rng,
    counters: &Counters,
) -> Result<()> {
    let file = &snapshot.files[rng.below(snapshot.files.len() as u64) as usize];
    let len = (1 + rng.below(1 << 20)).min(file.size.max(1));
    let start = rng.below(file.size.saturating_sub(len) + 1);
    let end = start + len - 1;
    let url = format!("http://{host}/v2/{}/blobs/{}", snapshot.reference.repository(), file.digest);
    let resp = send_retrying(counters, || {
        http.get(&url).basic_auth(USER, Some(PASSWORD)).header("Range", format!("bytes={start}-{end}"))
    })
    .await?;
    let status = resp.status();
    ensure!(
        status.as_u16() == 206,
        "GET {url} bytes={start}-{end}: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    let body = resp.bytes().await?;
    let path = file.path.clone();
    let expected = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    })
    .await??;
    ensure!(
        body[..] == expected[..],
        "CORRUPT: {} bytes={start}-{end} differ from the source ({} bytes got)",
        file.title,
        body.len()
    );
    Ok(())
}
