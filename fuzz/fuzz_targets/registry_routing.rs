//! The registry's request router (`thaw_registry::routes::parse`: path → `Route`) on
//! arbitrary paths. Method dispatch lives in the registry's private `handlers` module and is
//! reachable only through `router(AppState)`, which needs a storage backend; it is not
//! fuzzed here (see fuzz/README.md).
//!
//! Properties:
//! - refusals are 404 `NAME_UNKNOWN` (unknown shape) or 400 `NAME_INVALID` (bad name);
//! - an accepted path starts with `/v2`; every repository name in a route is valid, every
//!   node name passes `validate_node_name`, and no other field holds a `/`;
//! - rendering the route back to a path (its free segments percent-encoded) parses to the
//!   same route;
//! - a digest field that `parse_digest` accepts is already in canonical form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_registry::routes::{parse, parse_digest, Route};
use thaw_schema::holdings::validate_node_name;
use thaw_schema::names::is_valid_repository_name;
use thaw_schema::ErrorCode;

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn render(r: &Route) -> String {
    match r {
        Route::Base => "/v2/".into(),
        Route::Catalog => "/v2/_catalog".into(),
        Route::Discover => "/v2/_oci/ext/discover".into(),
        Route::NodeDirectory => "/v2/_thaw/nodes".into(),
        Route::Node { node } => format!("/v2/_thaw/nodes/{}", enc(node)),
        Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{}", enc(reference)),
        Route::Blob { name, digest } => format!("/v2/{name}/blobs/{}", enc(digest)),
        Route::UploadStart { name } => format!("/v2/{name}/blobs/uploads/"),
        Route::Upload { name, id } => format!("/v2/{name}/blobs/uploads/{}", enc(id)),
        Route::Tags { name } => format!("/v2/{name}/tags/list"),
        Route::Referrers { name, digest } => format!("/v2/{name}/referrers/{}", enc(digest)),
        Route::ThawMissing { name } => format!("/v2/{name}/_thaw/chunks/missing"),
        Route::ThawChunks { name } => format!("/v2/{name}/_thaw/chunks"),
        Route::ThawFetch { name } => format!("/v2/{name}/_thaw/chunks/fetch"),
        Route::ThawCommit { name, digest } => format!("/v2/{name}/_thaw/blobs/{}", enc(digest)),
        Route::ThawRecipe { name, digest } => format!("/v2/{name}/_thaw/blobs/{}/recipe", enc(digest)),
    }
}

/// (repository name, free segments, digest-like segment) of a route.
fn parts(r: &Route) -> (Option<&str>, Vec<&str>, Option<&str>) {
    match r {
        Route::Base | Route::Catalog | Route::Discover | Route::NodeDirectory => (None, vec![], None),
        Route::Node { node } => (None, vec![node.as_str()], None),
        Route::Manifest { name, reference } => (Some(name.as_str()), vec![reference.as_str()], None),
        Route::Blob { name, digest }
        | Route::Referrers { name, digest }
        | Route::ThawCommit { name, digest }
        | Route::ThawRecipe { name, digest } => {
            (Some(name.as_str()), vec![digest.as_str()], Some(digest.as_str()))
        }
        Route::Upload { name, id } => (Some(name.as_str()), vec![id.as_str()], None),
        Route::UploadStart { name }
        | Route::Tags { name }
        | Route::ThawMissing { name }
        | Route::ThawChunks { name }
        | Route::ThawFetch { name } => (Some(name.as_str()), vec![], None),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let route = match parse(path) {
        Ok(r) => r,
        Err(e) => {
            let (code, status) = (e.code(), e.status().as_u16());
            assert!(
                (code == ErrorCode::NameUnknown && status == 404)
                    || (code == ErrorCode::NameInvalid && status == 400),
                "{path:?} refused with {code:?} {status}"
            );
            return;
        }
    };
    assert!(path.starts_with("/v2"), "{path:?} accepted as {route:?}");
    let (name, free, digest) = parts(&route);
    if let Some(name) = name {
        assert!(is_valid_repository_name(name), "{path:?}: invalid name in {route:?}");
    }
    if let Route::Node { node } = &route {
        assert!(validate_node_name(node).is_ok(), "{path:?}: invalid node in {route:?}");
    }
    for f in &free {
        assert!(!f.contains('/'), "{path:?}: a '/' inside a segment of {route:?}");
    }
    if let Some(d) = digest {
        if let Ok(parsed) = parse_digest(d) {
            assert_eq!(parsed.to_string(), d, "digest accepted in a non-canonical form");
        }
    }
    let again = render(&route);
    assert_eq!(
        parse(&again).unwrap_or_else(|e| panic!("{again:?} (from {path:?}): {e}")),
        route,
        "{again:?}"
    );
});
