//! Bearer tokens (`thaw_registry::auth`): `Auth::verify` on arbitrary tokens, on arbitrary
//! payloads carrying a correct signature, and `Auth::issue` on arbitrary users and scopes.
//!
//! Input: a mode byte, then the rest.
//! - mode 0: the rest is a token. It never panics; a token this key did not sign is refused
//!   (the fuzzer cannot forge HMAC-SHA256, so anything accepted must be a re-signing of its
//!   own payload).
//! - mode 1: the rest is a payload, signed with the registry's key. Accepted ⇒ its `aud` is
//!   the service and it has not expired; `grants` answers exactly from its `access` list;
//!   changing any one byte of the signature makes it refused.
//! - mode 2: the rest is `user \n scope \n scope …`. The issued token verifies to the same
//!   claims, grants nothing the config does not allow that user, and grants each requested
//!   action the config allows.
#![no_main]

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use thaw_registry::auth::{parse_scope, Access, Action, Auth, AuthFile, Grant, TokenError};

const KEY: [u8; 32] = [9; 32];
const SERVICE: &str = "thaw-fuzz";

fn auth() -> Auth {
    let grant = |user: &str, repository: &str, actions: &[Action]| Grant {
        user: user.into(),
        repository: repository.into(),
        actions: actions.to_vec(),
    };
    let file = AuthFile {
        service: Some(SERVICE.into()),
        grants: vec![
            grant("a", "team-a/*", &[Action::Pull, Action::Push]),
            grant("b", "team-b/*", &[Action::Pull]),
            grant("*", "shared", &[Action::Pull]),
        ],
        anonymous_pull: vec!["public/*".into()],
        nodes_read: vec!["node".into()],
        nodes_write: vec!["node".into()],
        admins: vec!["root".into()],
        ..AuthFile::default()
    };
    // Users only matter for passwords, which tokens never check.
    Auth::new(file, HashMap::new(), Some(KEY.to_vec())).expect("auth config")
}

fn sign(payload: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(&KEY).expect("any key length");
    m.update(payload.as_bytes());
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let auth = auth();
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else { return };
            if let Ok(claims) = auth.verify(token) {
                let (payload, _) = token.split_once('.').expect("accepted tokens have a dot");
                assert_eq!(token, format!("{payload}.{}", sign(payload)), "accepted a token not signed here");
                assert_eq!(claims.aud, SERVICE);
            }
        }
        1 => {
            let payload = URL_SAFE_NO_PAD.encode(rest);
            let signature = sign(&payload);
            let token = format!("{payload}.{signature}");
            match auth.verify(&token) {
                Ok(claims) => {
                    assert_eq!(claims.aud, SERVICE, "accepted a token for another service");
                    for g in &claims.access {
                        for word in ["pull", "push", "delete", "read", "write", "*", "bogus"] {
                            let listed = g.actions.iter().any(|a| a == word);
                            let access = match (g.kind.as_str(), word) {
                                ("repository", "pull") => Access::Repository(g.name.clone(), Action::Pull),
                                ("repository", "push") => Access::Repository(g.name.clone(), Action::Push),
                                ("repository", "delete") => {
                                    Access::Repository(g.name.clone(), Action::Delete)
                                }
                                ("registry", "read") if g.name == "nodes" => Access::Nodes("read"),
                                ("registry", "write") if g.name == "nodes" => Access::Nodes("write"),
                                ("registry", "*") if g.name == "catalog" => Access::Catalog,
                                _ => continue,
                            };
                            assert_eq!(claims.grants(&access), listed, "{g:?} {word}");
                        }
                    }
                    // Any single changed byte of the signature breaks it.
                    for i in 0..signature.len() {
                        let mut bad = signature.clone().into_bytes();
                        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
                        let bad = format!("{payload}.{}", String::from_utf8(bad).unwrap());
                        assert!(auth.verify(&bad).is_err(), "a changed signature verified");
                    }
                }
                Err(e) => assert_ne!(e, TokenError::BadSignature, "a correct signature refused"),
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let mut lines = text.split('\n');
            let user = lines.next().filter(|u| !u.is_empty());
            let scopes: Vec<String> = lines.map(str::to_owned).collect();
            let (token, claims) = auth.issue(user, &scopes);
            let verified = auth.verify(&token).expect("an issued token verifies");
            assert_eq!(verified.sub, claims.sub);
            assert_eq!(verified.access, claims.access);
            assert_eq!(claims.user(), user);
            let requested: Vec<Access> =
                scopes.iter().flat_map(|s| s.split(' ')).flat_map(parse_scope).collect();
            for access in &requested {
                assert_eq!(claims.grants(access), auth.allows(user, access), "{user:?} {access:?}");
            }
            for g in &claims.access {
                for a in &g.actions {
                    assert!(
                        requested.iter().any(|r| r.scope().is_some_and(|s| {
                            s.starts_with(&format!("{}:{}:", g.kind, g.name)) && claims.grants(r)
                        })),
                        "granted {g:?} {a} that was not asked for"
                    );
                }
            }
        }
    }
});
