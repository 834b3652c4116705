//! Repository-name, tag and node-name rules (`thaw_schema::names`, `holdings`), checked
//! against independent oracles: the OCI Distribution Spec's regular expressions, run by
//! the `regex` crate. The input (UTF-8) is the candidate name.
//!
//! Properties:
//! - `is_valid_repository_name` agrees with the spec's regex plus the 255-byte limit;
//!   `is_valid_tag` with the tag regex; `validate_node_name` with its documented rule;
//! - an accepted repository name has no empty, `.` or `..` component, never starts with
//!   `_`, and routes to itself: `/v2/<name>/tags/list` parses to `Tags { name }`, and
//!   `/v2/<name>/manifests/<tag>` to that name and tag;
//! - an accepted node name routes to itself under `/v2/_thaw/nodes/`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use regex::Regex;
use thaw_registry::routes::{parse, Route};
use thaw_schema::holdings::validate_node_name;
use thaw_schema::names::{is_valid_repository_name, is_valid_tag, MAX_NAME_LEN};

struct Oracles {
    name: Regex,
    tag: Regex,
    node: Regex,
}

fn oracles() -> &'static Oracles {
    static O: OnceLock<Oracles> = OnceLock::new();
    O.get_or_init(|| {
        let component = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*";
        Oracles {
            name: Regex::new(&format!("^{component}(?:/{component})*$")).unwrap(),
            tag: Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").unwrap(),
            // The rule as `validate_node_name` documents it. Kubernetes' own DNS-1123
            // subdomain rule is stricter (each label starts and ends alphanumeric, so it
            // refuses `a-.b`); see fuzz/README.md.
            node: Regex::new(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$").unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let o = oracles();

    let valid = is_valid_repository_name(s);
    let expected = s.len() <= MAX_NAME_LEN && o.name.is_match(s);
    assert_eq!(valid, expected, "is_valid_repository_name({s:?}) = {valid}, the spec says {expected}");
    if valid {
        for c in s.split('/') {
            assert!(!c.is_empty() && c != "." && c != "..", "component {c:?} in {s:?}");
        }
        assert!(!s.starts_with('_'));
        assert_eq!(parse(&format!("/v2/{s}/tags/list")).unwrap(), Route::Tags { name: s.to_owned() });
        assert_eq!(
            parse(&format!("/v2/{s}/manifests/latest")).unwrap(),
            Route::Manifest { name: s.to_owned(), reference: "latest".to_owned() }
        );
    }

    let tag = is_valid_tag(s);
    assert_eq!(tag, o.tag.is_match(s), "is_valid_tag({s:?}) = {tag}");

    let node = validate_node_name(s).is_ok();
    let expected = s.len() <= 253 && o.node.is_match(s) && !s.contains("..");
    assert_eq!(node, expected, "validate_node_name({s:?}) ok = {node}, expected {expected}");
    if node {
        assert_eq!(parse(&format!("/v2/_thaw/nodes/{s}")).unwrap(), Route::Node { node: s.to_owned() });
    }
});
