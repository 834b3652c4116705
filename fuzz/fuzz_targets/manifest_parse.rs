//! Manifests, as the registry validates them on push (`thaw_schema::manifest::summarize`)
//! and as the client reads them on pull (`thaw_client::manifest::ManifestDoc::parse`,
//! `file_layers`). The first byte picks the request's Content-Type (none, the four
//! manifest types, or another); the rest is the body.
//!
//! Properties:
//! - `summarize`: an accepted manifest's media type is the Content-Type when one was sent;
//!   an index references only manifests, an image its config first and then its layers;
//!   the artifact type follows the documented rule; summarizing again with the media type
//!   it found as Content-Type gives the same summary.
//! - `ManifestDoc::parse`: schemaVersion is 2; every descriptor survives a JSON round trip;
//!   `file_layers` returns only safe, distinct titles, each that of one of the layers.
//! - Both: when the registry and the client both accept a body, they read the same
//!   references (config, layers, index entries).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use thaw_client::manifest::{file_layers, Descriptor, ManifestDoc};
use thaw_client::snapshot::is_safe_title;
use thaw_client::FetchedManifest;
use thaw_schema::manifest::{summarize, Reference};
use thaw_schema::{media, Sha256Digest};

const CONTENT_TYPES: [Option<&str>; 6] = [
    None,
    Some(media::OCI_MANIFEST),
    Some(media::OCI_INDEX),
    Some(media::DOCKER_MANIFEST),
    Some(media::DOCKER_MANIFEST_LIST),
    Some("application/json"),
];

fn same(r: &Reference, d: &Descriptor) -> bool {
    r.digest == d.digest && r.size == d.size && r.media_type == d.media_type
}

fuzz_target!(|data: &[u8]| {
    let Some((&ct, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[usize::from(ct) % CONTENT_TYPES.len()];

    let summary = summarize(body, content_type).ok();
    if let Some(s) = &summary {
        if let Some(c) = content_type {
            assert_eq!(s.media_type, c);
        }
        let is_index = s.media_type == media::OCI_INDEX || s.media_type == media::DOCKER_MANIFEST_LIST;
        let is_image = s.media_type == media::OCI_MANIFEST || s.media_type == media::DOCKER_MANIFEST;
        assert!(is_index ^ is_image, "accepted media type {:?}", s.media_type);
        if is_index {
            assert!(s.blobs.is_empty());
        } else {
            assert!(!s.blobs.is_empty() && s.manifests.is_empty(), "image without config");
        }
        let v: Value = serde_json::from_slice(body).expect("accepted body is JSON");
        match v.get("artifactType").and_then(Value::as_str) {
            Some(a) => assert_eq!(s.artifact_type.as_deref(), Some(a)),
            None if is_image => assert_eq!(s.artifact_type.as_ref(), Some(&s.blobs[0].media_type)),
            None => assert_eq!(s.artifact_type, None),
        }
        for r in s.blobs.iter().chain(&s.manifests).chain(&s.subject) {
            assert_eq!(r.digest.to_string().parse::<Sha256Digest>().unwrap(), r.digest);
        }
        let again = summarize(body, Some(&s.media_type)).expect("accepted again with its own media type");
        assert_eq!(&again, s);
    }

    let fetched = FetchedManifest {
        body: Bytes::copy_from_slice(body),
        media_type: content_type.unwrap_or(media::OCI_MANIFEST).to_owned(),
        digest: Sha256Digest::of(body),
    };
    let Ok(doc) = ManifestDoc::parse(&fetched) else { return };
    assert_eq!(doc.schema_version, 2);
    for d in doc.config.iter().chain(&doc.layers).chain(&doc.manifests) {
        let text = serde_json::to_vec(d).unwrap();
        let back: Descriptor = serde_json::from_slice(&text).expect("a descriptor round trips");
        assert_eq!(&back, d);
    }
    if let Ok(files) = file_layers(&doc, "fuzz") {
        assert!(files.len() <= doc.layers.len());
        for (i, f) in files.iter().enumerate() {
            assert!(is_safe_title(&f.title), "unsafe title {:?} accepted", f.title);
            assert_eq!(f.descriptor.title(), Some(f.title.as_str()));
            assert!(doc.layers.contains(&f.descriptor));
            assert!(files[..i].iter().all(|g| g.title != f.title), "title {:?} twice", f.title);
        }
    }

    if let Some(s) = &summary {
        if s.blobs.is_empty() {
            assert_eq!(s.manifests.len(), doc.manifests.len(), "index entries differ");
            for (r, d) in s.manifests.iter().zip(&doc.manifests) {
                assert!(same(r, d), "index entry differs: {r:?} vs {d:?}");
            }
        } else {
            let config = doc.config.as_ref().expect("registry found a config, client did not");
            assert!(same(&s.blobs[0], config), "config differs: {:?} vs {config:?}", s.blobs[0]);
            assert_eq!(s.blobs.len() - 1, doc.layers.len(), "layers differ");
            for (r, d) in s.blobs[1..].iter().zip(&doc.layers) {
                assert!(same(r, d), "layer differs: {r:?} vs {d:?}");
            }
        }
    }
});
