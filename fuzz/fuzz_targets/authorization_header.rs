//! `Authorization` header parsing (`thaw_registry::auth::parse_authorization`), the one
//! place a request's credentials are read.
//!
//! Properties:
//! - the scheme is case-insensitive: the same value with its scheme in other case parses
//!   the same;
//! - a Bearer token has no surrounding whitespace;
//! - Basic credentials decode from standard base64 of `user:password`, the user holds no
//!   `:`, and encoding them again parses back to the same user and password;
//! - `Invalid` is the only other answer, and it never panics.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use thaw_registry::auth::{parse_authorization, Credentials};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_authorization(data);
    let swapped: Vec<u8> = match data.iter().position(|&b| b == b' ') {
        Some(space) => data[..space]
            .iter()
            .map(|b| if b.is_ascii_lowercase() { b.to_ascii_uppercase() } else { b.to_ascii_lowercase() })
            .chain(data[space..].iter().copied())
            .collect(),
        None => data.to_vec(),
    };
    let again = parse_authorization(&swapped);
    match (&parsed, &again) {
        (Credentials::Invalid(_), Credentials::Invalid(_)) => {}
        (a, b) => assert_eq!(a, b, "scheme case changed the meaning of {data:?}"),
    }
    match parsed {
        Credentials::Bearer(token) => {
            assert_eq!(token.trim(), token);
            let value = format!("Bearer {token}");
            assert_eq!(parse_authorization(value.as_bytes()), Credentials::Bearer(token));
        }
        Credentials::Basic { user, password } => {
            assert!(!user.contains(':'), "user {user:?} holds a ':'");
            let value = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
            assert_eq!(parse_authorization(value.as_bytes()), Credentials::Basic { user, password });
        }
        Credentials::Invalid(why) => assert!(!why.is_empty()),
    }
});
