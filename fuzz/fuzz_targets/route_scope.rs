//! The route-to-scope mapping: `routes::parse` (path), `routes::Query::parse` (query),
//! `auth::required_access` and `auth::mount_source`, as the auth layer chains them.
//!
//! Input: a method byte, then `path[?query]`.
//!
//! Properties:
//! - an accepted query holds each key once (decoded: `%6Dount` is `mount`), every
//!   non-empty piece of the raw query is in it, and re-encoding it parses to the same pairs;
//! - every repository route needs an action on exactly the route's repository, with the
//!   action the method table says (reads pull, writes push, DELETE of a manifest or blob
//!   delete, the `_thaw` probes and uploads push); only `/v2/` is `Authenticated` and only
//!   the discovery document is `Public`;
//! - the scope string of every access parses back to that access (`parse_scope`);
//! - a mount source is the decoded `from` of a POST to an upload start, and removing
//!   `mount` and `from` (what the layer does when the caller may not read it) leaves
//!   neither.
#![no_main]

use axum::http::Method;
use libfuzzer_sys::fuzz_target;
use thaw_registry::auth::{mount_source, parse_scope, required_access, Access, Action};
use thaw_registry::routes::{parse, Query, Route, MAX_QUERY_LEN};

const METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::PUT, Method::POST, Method::PATCH, Method::DELETE, Method::OPTIONS];

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

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let method = METHODS[usize::from(m) % METHODS.len()].clone();
    let Ok(target) = std::str::from_utf8(rest) else { return };
    let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));

    let query = Query::parse(raw_query, &[]);
    if let Ok(query) = &query {
        let pairs = query.pairs();
        for (i, (k, _)) in pairs.iter().enumerate() {
            assert!(pairs[..i].iter().all(|(seen, _)| seen != k), "key {k:?} twice in {raw_query:?}");
            assert!(query.get(k).is_some());
        }
        let pieces = raw_query.split('&').filter(|p| !p.is_empty()).count();
        assert_eq!(pairs.len(), pieces, "{raw_query:?}");
        let encoded: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
        let encoded = encoded.join("&");
        if encoded.len() <= MAX_QUERY_LEN {
            let again = Query::parse(&encoded, &[]).expect("re-encoded query parses");
            assert_eq!(again.pairs(), pairs, "{raw_query:?}");
        }
    }
    // With `scope` repeatable, a query refused only for repeated keys may only differ there.
    if let Ok(scoped) = Query::parse(raw_query, &["scope"]) {
        if query.is_err() {
            assert!(scoped.all("scope").count() > 1, "{raw_query:?} refused for another reason");
        }
    }

    let Ok(route) = parse(path) else { return };
    let access = required_access(&route, &method);
    match (&route, &access) {
        (Route::Base, Access::Authenticated) | (Route::Discover, Access::Public) => {}
        (_, Access::Authenticated | Access::Public) => panic!("{route:?} {method} needs only {access:?}"),
        (Route::Catalog, Access::Catalog) => {}
        (Route::NodeDirectory | Route::Node { .. }, Access::Nodes(a)) => {
            let read = method == Method::GET || method == Method::HEAD;
            assert_eq!(*a, if read { "read" } else { "write" });
        }
        (r, Access::Repository(name, action)) => {
            assert_eq!(Some(name.as_str()), r.repository(), "{route:?} checks another repository");
            let read = method == Method::GET || method == Method::HEAD;
            let expected = match r {
                Route::Manifest { .. } | Route::Blob { .. } if method == Method::DELETE => Action::Delete,
                Route::Manifest { .. } | Route::Blob { .. } if method == Method::PUT => Action::Push,
                Route::Manifest { .. } | Route::Blob { .. } => Action::Pull,
                Route::Tags { .. }
                | Route::Referrers { .. }
                | Route::ThawRecipe { .. }
                | Route::ThawFetch { .. } => Action::Pull,
                _ => Action::Push,
            };
            assert_eq!(*action, expected, "{route:?} {method} (read: {read})");
        }
        (r, a) => panic!("{r:?} mapped to {a:?}"),
    }
    if let Some(scope) = access.scope() {
        assert!(parse_scope(&scope).contains(&access), "{scope:?} does not grant {access:?}");
    }

    let Ok(mut query) = query else { return };
    let source = mount_source(&route, &method, &query);
    match (&route, &source) {
        (Route::UploadStart { .. }, Some(Access::Repository(from, Action::Pull)))
            if method == Method::POST =>
        {
            assert_eq!(Some(from.as_str()), query.get("from"));
        }
        (_, None) => {
            assert!(
                !(matches!(route, Route::UploadStart { .. })
                    && method == Method::POST
                    && query.get("from").is_some())
            );
        }
        (r, s) => panic!("{r:?} {method}: mount source {s:?}"),
    }
    query.remove("mount");
    query.remove("from");
    assert!(query.get("mount").is_none() && query.get("from").is_none());
    assert!(mount_source(&route, &method, &query).is_none());
});
