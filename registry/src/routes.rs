//! Parsing request paths into routes. Repository names contain slashes, so paths are
//! matched from their end, and the name is validated before anything touches storage.
//! Registry-wide paths (`_catalog`, `_oci/…`, `_thaw/nodes…`) are matched first, by their
//! start: a repository name cannot begin with `_`, so none of them is a repository.

use thaw_schema::holdings::validate_node_name;
use thaw_schema::names::is_valid_repository_name;
use thaw_schema::{ErrorCode, Sha256Digest};

use crate::error::ApiError;

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/_oci/ext/discover`
    Discover,
    /// `/v2/_thaw/nodes`
    NodeDirectory,
    /// `/v2/_thaw/nodes/<node>`
    Node {
        /// The node name, validated.
        node: String,
    },
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        /// Repository.
        name: String,
        /// Tag or digest, as given.
        reference: String,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob {
        /// Repository.
        name: String,
        /// Digest, as given.
        digest: String,
    },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        /// Repository.
        name: String,
        /// Session id.
        id: String,
    },
    /// `/v2/<name>/tags/list`
    Tags {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`
    Referrers {
        /// Repository.
        name: String,
        /// Subject digest, as given.
        digest: String,
    },
    /// `/v2/<name>/_thaw/chunks/missing`
    ThawMissing {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/_thaw/chunks`
    ThawChunks {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/_thaw/chunks/fetch`
    ThawFetch {
        /// Repository.
        name: String,
    },
    /// `/v2/<name>/_thaw/blobs/<digest>`
    ThawCommit {
        /// Repository.
        name: String,
        /// Digest, as given.
        digest: String,
    },
    /// `/v2/<name>/_thaw/blobs/<digest>/recipe`
    ThawRecipe {
        /// Repository.
        name: String,
        /// Digest, as given.
        digest: String,
    },
}

impl Route {
    /// The repository the route is scoped to, or `None` for the registry-wide routes.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Route::Base | Route::Catalog | Route::Discover | Route::NodeDirectory | Route::Node { .. } => {
                None
            }
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. }
            | Route::ThawMissing { name }
            | Route::ThawChunks { name }
            | Route::ThawFetch { name }
            | Route::ThawCommit { name, .. }
            | Route::ThawRecipe { name, .. } => Some(name),
        }
    }
}

fn percent_decode(segment: &str) -> Option<String> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(segment.get(i + 1..i + 3).and_then(hex_byte)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.contains('/')).then_some(s)
}

/// Two hex digits as a byte. Not `u8::from_str_radix`, which also takes a sign (`%+f`).
fn hex_byte(two: &str) -> Option<u8> {
    two.bytes().all(|c| c.is_ascii_hexdigit()).then(|| u8::from_str_radix(two, 16).ok()).flatten()
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(ErrorCode::NameUnknown, format!("no such endpoint: {path}"))
        .with_status(axum::http::StatusCode::NOT_FOUND)
}

/// Parses a request path. Unknown shapes are 404; a malformed repository name is 400
/// `NAME_INVALID`.
pub fn parse(path: &str) -> Result<Route, ApiError> {
    let Some(rest) = path.strip_prefix("/v2") else { return Err(not_found(path)) };
    if rest.is_empty() || rest == "/" {
        return Ok(Route::Base);
    }
    let rest = rest.strip_prefix('/').ok_or_else(|| not_found(path))?;
    match rest {
        "_catalog" => return Ok(Route::Catalog),
        "_oci/ext/discover" => return Ok(Route::Discover),
        "_thaw/nodes" => return Ok(Route::NodeDirectory),
        _ => {}
    }
    if let Some(thaw) = rest.strip_prefix("_thaw/") {
        return parse_registry_wide_thaw(path, thaw);
    }
    let mut segs: Vec<String> =
        rest.split('/').map(percent_decode).collect::<Option<_>>().ok_or_else(|| not_found(path))?;
    // `/v2/<name>/blobs/uploads/` keeps its trailing slash; no other route has one.
    let trailing_slash = segs.last().is_some_and(String::is_empty);
    if trailing_slash {
        segs.pop();
    }
    let n = segs.len();
    let tail = |k: usize| -> Vec<&str> { segs[n.saturating_sub(k)..].iter().map(String::as_str).collect() };
    let name_before = |k: usize| -> Result<String, ApiError> {
        if n <= k {
            return Err(not_found(path));
        }
        let name = segs[..n - k].join("/");
        if !is_valid_repository_name(&name) {
            return Err(ApiError::new(ErrorCode::NameInvalid, format!("invalid repository name {name:?}"))
                .with_detail(serde_json::json!({ "name": name })));
        }
        Ok(name)
    };
    let route = if n >= 3 && tail(2) == ["blobs", "uploads"] {
        Route::UploadStart { name: name_before(2)? }
    } else if trailing_slash {
        return Err(not_found(path));
    } else if n >= 4 && tail(3)[..2] == ["blobs", "uploads"] {
        Route::Upload { name: name_before(3)?, id: segs[n - 1].clone() }
    } else if n >= 3 && tail(2) == ["tags", "list"] {
        Route::Tags { name: name_before(2)? }
    } else if n >= 4 && tail(3) == ["_thaw", "chunks", "missing"] {
        Route::ThawMissing { name: name_before(3)? }
    } else if n >= 4 && tail(3) == ["_thaw", "chunks", "fetch"] {
        Route::ThawFetch { name: name_before(3)? }
    } else if n >= 3 && tail(2) == ["_thaw", "chunks"] {
        Route::ThawChunks { name: name_before(2)? }
    } else if n >= 5 && tail(4)[0] == "_thaw" && tail(4)[1] == "blobs" && tail(4)[3] == "recipe" {
        Route::ThawRecipe { name: name_before(4)?, digest: segs[n - 2].clone() }
    } else if n >= 4 && tail(3)[..2] == ["_thaw", "blobs"] {
        Route::ThawCommit { name: name_before(3)?, digest: segs[n - 1].clone() }
    } else if n >= 3 && segs[n - 2] == "blobs" {
        Route::Blob { name: name_before(2)?, digest: segs[n - 1].clone() }
    } else if n >= 3 && segs[n - 2] == "manifests" {
        Route::Manifest { name: name_before(2)?, reference: segs[n - 1].clone() }
    } else if n >= 3 && segs[n - 2] == "referrers" {
        Route::Referrers { name: name_before(2)?, digest: segs[n - 1].clone() }
    } else {
        return Err(not_found(path));
    };
    Ok(route)
}

/// `/v2/_thaw/<thaw>`: only `nodes/<node>` is left once `nodes` itself is matched. The node
/// name becomes a storage key, so it is percent-decoded and validated here: a decoded `/`,
/// `..` or any character outside a DNS subdomain is 400 `NAME_INVALID`.
fn parse_registry_wide_thaw(path: &str, thaw: &str) -> Result<Route, ApiError> {
    let Some(segment) = thaw.strip_prefix("nodes/").filter(|s| !s.is_empty() && !s.contains('/')) else {
        return Err(not_found(path));
    };
    let invalid = |node: &str, why: String| {
        ApiError::new(ErrorCode::NameInvalid, format!("invalid node name {node:?}: {why}"))
            .with_detail(serde_json::json!({ "node": node }))
    };
    let node = percent_decode(segment)
        .ok_or_else(|| invalid(segment, "it is not a single percent-decodable path segment".into()))?;
    validate_node_name(&node).map_err(|e| invalid(&node, e.why.to_owned()))?;
    Ok(Route::Node { node })
}

/// A request's query string, decoded once. The auth layer authorizes this value and hands
/// the same value to the handler (as a request extension), so both read exactly the same
/// parameters: keys and values are `+`/`%XX`-decoded before they are compared, and a key
/// that appears twice (however it is spelled) is refused instead of one spelling winning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

/// Largest query string accepted (a token request naming many scopes fits easily).
pub const MAX_QUERY_LEN: usize = 16 * 1024;

impl Query {
    /// Parses `raw` (without the `?`). Every key may appear once, except those in
    /// `repeatable` (the token endpoint's `scope`); a repeated key is 400 `UNSUPPORTED`.
    pub fn parse(raw: &str, repeatable: &[&str]) -> Result<Self, ApiError> {
        let bad = |why: String| {
            ApiError::new(ErrorCode::Unsupported, why).with_status(axum::http::StatusCode::BAD_REQUEST)
        };
        if raw.len() > MAX_QUERY_LEN {
            return Err(bad(format!("query string of {} bytes; at most {MAX_QUERY_LEN}", raw.len())));
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        for piece in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let (key, value) = (percent_decode_query(k), percent_decode_query(v));
            if !repeatable.contains(&key.as_str()) && pairs.iter().any(|(seen, _)| *seen == key) {
                return Err(bad(format!("query parameter {key:?} is given more than once")));
            }
            pairs.push((key, value));
        }
        Ok(Self { pairs })
    }

    /// The value of `key`, if present (the only one, for a non-repeatable key).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Removes `key` (the auth layer drops a mount the caller may not read from).
    pub fn remove(&mut self, key: &str) {
        self.pairs.retain(|(k, _)| k != key);
    }

    /// The decoded pairs, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

/// Decodes `+` and `%XX` in a query key or value; a `%` not followed by two hex digits is
/// kept as is, and bytes that are not UTF-8 become U+FFFD (the same for every reader).
fn percent_decode_query(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], s.get(i + 1..i + 3).and_then(hex_byte)) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a digest from a path or query, as 400 `DIGEST_INVALID` on failure.
pub fn parse_digest(s: &str) -> Result<Sha256Digest, ApiError> {
    s.parse().map_err(|e| ApiError::digest_invalid(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(r: Route) -> String {
        r.repository().unwrap_or_else(|| panic!("{r:?}")).to_owned()
    }

    #[test]
    fn routes_parse_from_the_end() {
        assert_eq!(parse("/v2/").unwrap(), Route::Base);
        assert_eq!(parse("/v2").unwrap(), Route::Base);
        assert_eq!(parse("/v2/_catalog").unwrap(), Route::Catalog);
        assert_eq!(
            parse("/v2/a/b/manifests/latest").unwrap(),
            Route::Manifest { name: "a/b".into(), reference: "latest".into() }
        );
        assert_eq!(parse("/v2/a/blobs/uploads/").unwrap(), Route::UploadStart { name: "a".into() });
        assert_eq!(parse("/v2/a/blobs/uploads").unwrap(), Route::UploadStart { name: "a".into() });
        assert_eq!(
            parse("/v2/a/blobs/uploads/xyz").unwrap(),
            Route::Upload { name: "a".into(), id: "xyz".into() }
        );
        assert_eq!(name_of(parse("/v2/blobs/blobs/sha256%3Aab").unwrap()), "blobs");
        assert_eq!(
            parse("/v2/x/_thaw/blobs/sha256:ab/recipe").unwrap(),
            Route::ThawRecipe { name: "x".into(), digest: "sha256:ab".into() }
        );
        assert_eq!(name_of(parse("/v2/a/b/c/tags/list").unwrap()), "a/b/c");
        assert_eq!(name_of(parse("/v2/x/_thaw/chunks").unwrap()), "x");
    }

    #[test]
    fn path_tricks_are_refused() {
        for bad in
            ["/v2/../x/manifests/a", "/v2/A/manifests/a", "/v2/a/%2e%2e/manifests/x", "/v2/a%2Fb/tags/list"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse("/v2/Upper/tags/list").unwrap_err();
        assert_eq!(e.code(), ErrorCode::NameInvalid);
        let long = format!("/v2/{}/tags/list", "a".repeat(256));
        assert_eq!(parse(&long).unwrap_err().code(), ErrorCode::NameInvalid);
        assert!(parse("/v3/x").is_err());
        assert!(parse("/v2/x/manifests/").is_err());
    }

    #[test]
    fn a_query_is_decoded_once_and_keys_are_unique() {
        let q = Query::parse("%6Dount=sha256%3Aab&%66rom=team-b%2Fapp&x=a+b", &[]).unwrap();
        assert_eq!(q.get("mount"), Some("sha256:ab"));
        assert_eq!(q.get("from"), Some("team-b/app"));
        assert_eq!(q.get("x"), Some("a b"));
        for repeated in ["from=a&from=b", "from=a&%66rom=b", "mount=x&%6dount=x", "a&a", "f%72om=1&from=2"] {
            let e = Query::parse(repeated, &[]).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{repeated}");
        }
        let scopes = Query::parse("scope=a&scope=b&service=s", &["scope"]).unwrap();
        assert_eq!(scopes.all("scope").collect::<Vec<_>>(), ["a", "b"]);
        assert!(Query::parse("service=a&service=b", &["scope"]).is_err());
        // `%` without two hex digits stays as is; a sign is not a hex digit.
        assert_eq!(Query::parse("k=%+1%zz%4", &[]).unwrap().get("k"), Some("% 1%zz%4"));
        assert!(Query::parse(&"a".repeat(MAX_QUERY_LEN + 1), &[]).is_err());
        let mut q = Query::parse("mount=d&from=r&digest=x", &[]).unwrap();
        q.remove("mount");
        q.remove("from");
        assert_eq!(q.pairs(), [("digest".to_owned(), "x".to_owned())]);
    }

    #[test]
    fn node_paths_are_registry_wide() {
        assert_eq!(parse("/v2/_thaw/nodes").unwrap(), Route::NodeDirectory);
        assert_eq!(
            parse("/v2/_thaw/nodes/node-1.example").unwrap(),
            Route::Node { node: "node-1.example".into() }
        );
        assert_eq!(parse("/v2/_thaw/nodes/n%2d1").unwrap(), Route::Node { node: "n-1".into() });
        for bad in [
            "/v2/_thaw/nodes/..",
            "/v2/_thaw/nodes/a%2Fb",
            "/v2/_thaw/nodes/Node",
            "/v2/_thaw/nodes/%2e%2e",
            "/v2/_thaw/nodes/a%zz",
        ] {
            assert_eq!(parse(bad).unwrap_err().code(), ErrorCode::NameInvalid, "{bad}");
        }
        // Not node routes, and not repositories either (no repository name starts with `_`).
        for unknown in [
            "/v2/_thaw/nodes/",
            "/v2/_thaw/nodes/a/b",
            "/v2/_thaw",
            "/v2/_thaw/other",
            "/v2/_thaw/nodes/a/manifests/x",
        ] {
            assert_eq!(parse(unknown).unwrap_err().status(), axum::http::StatusCode::NOT_FOUND, "{unknown}");
        }
        assert_eq!(
            parse("/v2/_thaw/manifests/latest").unwrap_err().status(),
            axum::http::StatusCode::NOT_FOUND
        );
    }
}
