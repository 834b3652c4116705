//! Authentication and authorization, black-box over loopback: Bearer challenges, the token
//! endpoint, Basic auth, per-repository grants (the `_thaw` extension included), expired
//! and tampered tokens, mounts from unreadable repositories, the node directory and the
//! catalog, and the binary's `--auth-config`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use thaw_registry::auth::{Auth, AuthFile, Claims, ScopeGrant};

const PASSWORDS: [(&str, &str); 5] = [
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("node-1", "node-pw"),
    ("root", "root-pw"),
    ("carol", "carol-pw"),
];

fn auth_file() -> AuthFile {
    serde_json::from_value(json!({
        "service": "thaw-test",
        "grants": [
            {"user": "alice", "repository": "team-a/*", "actions": ["pull", "push", "delete"]},
            {"user": "bob", "repository": "team-a/*", "actions": ["pull"]},
            {"user": "carol", "repository": "team-b/*", "actions": ["pull", "push"]},
        ],
        "anonymous-pull": ["public/*"],
        "nodes-read": ["node-1"],
        "nodes-write": ["node-1"],
        "admins": ["root"],
    }))
    .expect("auth config")
}

fn users() -> HashMap<String, String> {
    // Cost 4 keeps the test quick; production files come from `htpasswd -B` (cost 5+).
    PASSWORDS.iter().map(|(u, p)| (u.to_string(), bcrypt::hash(p, 4).expect("bcrypt"))).collect()
}

struct Authed {
    base: String,
    client: reqwest::Client,
    auth: Arc<Auth>,
    _running: thaw_registry::RunningRegistry,
    _dir: tempfile::TempDir,
}

impl Authed {
    async fn start() -> Self {
        let auth = Arc::new(Auth::new(auth_file(), users(), Some(vec![7; 32])).expect("auth"));
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let config =
            thaw_registry::RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.to_str().unwrap());
        let options = thaw_registry::ServeOptions { auth: Some(auth.clone()), ..Default::default() };
        let running = thaw_registry::spawn_with(config, options).await.expect("spawn registry");
        Self { base: running.url(), client: client(), auth, _running: running, _dir: dir }
    }

    fn req(&self, method: Method, path: &str, authz: Option<&str>) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match authz {
            Some(a) => r.header("authorization", a),
            None => r,
        }
    }

    /// A token from the token endpoint for `user` (Basic) and `scopes`.
    async fn token(&self, user: Option<&str>, scopes: &[&str]) -> (String, Value) {
        let query: Vec<(&str, &str)> =
            std::iter::once(("service", "thaw-test")).chain(scopes.iter().map(|s| ("scope", *s))).collect();
        let mut r = self.client.get(format!("{}/v2/_thaw/token", self.base)).query(&query);
        if let Some(user) = user {
            r = r.basic_auth(user, Some(password(user)));
        }
        let resp = r.send().await.expect("token request");
        assert_eq!(resp.status(), StatusCode::OK, "token for {user:?}");
        let body: Value = resp.json().await.expect("token JSON");
        assert_eq!(body["token"], body["access_token"]);
        assert_eq!(body["expires_in"], 300);
        assert!(body["issued_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
        let token = body["token"].as_str().unwrap().to_owned();
        let claims = decode_claims(&token);
        (format!("Bearer {token}"), claims)
    }
}

fn password(user: &str) -> &'static str {
    PASSWORDS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).expect("known user")
}

fn basic(user: &str) -> String {
    basic_with(user, password(user))
}

fn basic_with(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn decode_claims(token: &str) -> Value {
    let payload = token.split('.').next().unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap())
        .unwrap()
}

/// Parses `Bearer k="v",k="v"` into its parameters.
fn parse_challenge(value: &str) -> HashMap<String, String> {
    let rest = value.strip_prefix("Bearer ").unwrap_or_else(|| panic!("not a Bearer challenge: {value}"));
    let mut out = HashMap::new();
    let mut s = rest;
    while let Some((key, after)) = s.split_once("=\"") {
        let (val, tail) = after.split_once('"').expect("closing quote");
        out.insert(key.trim_start_matches(',').trim().to_owned(), val.to_owned());
        s = tail;
    }
    out
}

async fn expect_challenge(
    resp: reqwest::Response,
    scope: Option<&str>,
    what: &str,
) -> HashMap<String, String> {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    let value = header(resp.headers(), "www-authenticate").unwrap_or_else(|| panic!("{what}: no challenge"));
    let params = parse_challenge(&value);
    let body = resp.bytes().await.unwrap();
    assert_eq!(error_codes(&body), ["UNAUTHORIZED"], "{what}");
    assert!(params["realm"].ends_with("/v2/_thaw/token"), "{what}: {value}");
    assert!(params["realm"].starts_with("http://127.0.0.1:"), "{what}: {value}");
    assert_eq!(params["service"], "thaw-test", "{what}");
    assert_eq!(params.get("scope").map(String::as_str), scope, "{what}: {value}");
    params
}

async fn expect_denied(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{what}");
    assert_eq!(error_codes(&resp.bytes().await.unwrap()), ["DENIED"], "{what}");
}

/// Pushes a blob (POST with digest) and a manifest naming it, with `authz`.
async fn push_image(r: &Authed, name: &str, tag: &str, layer: &[u8], authz: &str) -> (String, String) {
    let config = b"{}".to_vec();
    for blob in [&config[..], layer] {
        let resp = r
            .req(
                Method::POST,
                &format!("/v2/{name}/blobs/uploads/?digest={}", sha256_digest(blob)),
                Some(authz),
            )
            .body(blob.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "push blob to {name}: {}", body_text(resp).await);
    }
    let manifest =
        image_manifest(descriptor(CONFIG_V1, &config), vec![descriptor(LAYER_TAR, layer)], json!({}));
    let resp = r
        .req(Method::PUT, &format!("/v2/{name}/manifests/{tag}"), Some(authz))
        .header("content-type", MANIFEST_V1)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "push manifest to {name}: {}", body_text(resp).await);
    (sha256_digest(&manifest), sha256_digest(layer))
}

#[tokio::test]
async fn without_credentials_pull_and_push_get_a_bearer_challenge() {
    let r = Authed::start().await;
    let params =
        expect_challenge(r.req(Method::GET, "/v2/", None).send().await.unwrap(), None, "GET /v2/").await;
    assert!(!params.contains_key("error"));
    let alice = basic("alice");
    push_image(&r, "team-a/app", "v1", b"layer", &alice).await;

    let pulls = [
        (Method::GET, "/v2/team-a/app/manifests/v1"),
        (Method::HEAD, "/v2/team-a/app/manifests/v1"),
        (Method::GET, "/v2/team-a/app/tags/list"),
    ];
    for (method, path) in pulls {
        let resp = r.req(method.clone(), path, None).send().await.unwrap();
        if method == Method::HEAD {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "HEAD {path}");
            let params = parse_challenge(&header(resp.headers(), "www-authenticate").unwrap());
            assert_eq!(params["scope"], "repository:team-a/app:pull");
        } else {
            expect_challenge(resp, Some("repository:team-a/app:pull"), path).await;
        }
    }
    let push_scope = Some("repository:team-a/app:pull,push");
    let resp = r.req(Method::POST, "/v2/team-a/app/blobs/uploads/", None).send().await.unwrap();
    expect_challenge(resp, push_scope, "start upload").await;
    let resp = r
        .req(Method::PUT, "/v2/team-a/app/manifests/v2", None)
        .header("content-type", MANIFEST_V1)
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_challenge(resp, push_scope, "PUT manifest").await;
    let resp =
        r.req(Method::POST, "/v2/team-a/app/_thaw/chunks/missing", None).json(&json!({"chunks": []})).send();
    expect_challenge(resp.await.unwrap(), push_scope, "missing probe").await;
    let resp = r.req(Method::DELETE, "/v2/team-a/app/manifests/v1", None).send().await.unwrap();
    expect_challenge(resp, Some("repository:team-a/app:delete"), "DELETE").await;
    // Wrong password: 401 too, never 403.
    let resp = r.req(Method::GET, "/v2/team-a/app/manifests/v1", Some(&basic_with("alice", "nope"))).send();
    expect_challenge(resp.await.unwrap(), Some("repository:team-a/app:pull"), "wrong password").await;
    // The discovery document stays public.
    let resp = r.req(Method::GET, "/v2/_oci/ext/discover", None).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_token_flow_grants_what_was_asked_and_allowed() {
    let r = Authed::start().await;
    let (alice, claims) = r.token(Some("alice"), &["repository:team-a/app:pull,push"]).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "team-a/app", "actions": ["pull", "push"]}])
    );
    let (manifest, _) = push_image(&r, "team-a/app", "v1", b"layer-1", &alice).await;
    let resp = r.req(Method::GET, "/v2/", Some(&alice)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // A token for one repository does not reach another, even one the user may push to:
    // the answer is 403 with an `insufficient_scope` challenge for a wider token (RFC 6750).
    let resp = r.req(Method::GET, "/v2/team-a/other/tags/list", Some(&alice)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let params = parse_challenge(&header(resp.headers(), "www-authenticate").expect("challenge"));
    assert_eq!(params["scope"], "repository:team-a/other:pull");
    assert_eq!(params["error"], "insufficient_scope");
    assert_eq!(error_codes(&resp.bytes().await.unwrap()), ["DENIED"]);

    // bob asks for push too; he only gets pull.
    let (bob, claims) =
        r.token(Some("bob"), &["repository:team-a/app:pull,push", "repository:team-b/x:pull"]).await;
    assert_eq!(claims["access"], json!([{"type": "repository", "name": "team-a/app", "actions": ["pull"]}]));
    let resp =
        r.req(Method::GET, &format!("/v2/team-a/app/manifests/{manifest}"), Some(&bob)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = r.req(Method::POST, "/v2/team-a/app/blobs/uploads/", Some(&bob)).send().await.unwrap();
    expect_denied(resp, "bob pushes with a token").await;

    // Anonymous tokens carry only anonymous rights.
    let (anon, claims) = r.token(None, &["repository:team-a/app:pull", "repository:public/x:pull"]).await;
    assert_eq!(claims["sub"], "");
    assert_eq!(claims["access"], json!([{"type": "repository", "name": "public/x", "actions": ["pull"]}]));
    let resp = r.req(Method::GET, "/v2/team-a/app/tags/list", Some(&anon)).send().await.unwrap();
    expect_challenge(resp, Some("repository:team-a/app:pull"), "anonymous token").await;

    // Wrong password at the token endpoint: 401.
    let resp = r
        .client
        .get(format!("{}/v2/_thaw/token?scope=repository:team-a/app:pull", r.base))
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_pull_only_user_can_neither_push_nor_probe_nor_read_elsewhere() {
    let r = Authed::start().await;
    let (_, layer) = push_image(&r, "team-a/app", "v1", b"layer-a", &basic("alice")).await;
    push_image(&r, "team-b/app", "v1", b"layer-b", &basic("carol")).await;
    let bob = basic("bob");

    let resp = r.req(Method::GET, &format!("/v2/team-a/app/blobs/{layer}"), Some(&bob)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"layer-a");

    let blob = b"new".to_vec();
    let resp = r
        .req(
            Method::POST,
            &format!("/v2/team-a/app/blobs/uploads/?digest={}", sha256_digest(&blob)),
            Some(&bob),
        )
        .body(blob)
        .send()
        .await
        .unwrap();
    expect_denied(resp, "bob uploads a blob").await;
    let resp = r
        .req(Method::PUT, "/v2/team-a/app/manifests/v2", Some(&bob))
        .header("content-type", MANIFEST_V1)
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_denied(resp, "bob pushes a manifest").await;
    let resp = r.req(Method::DELETE, "/v2/team-a/app/manifests/v1", Some(&bob)).send().await.unwrap();
    expect_denied(resp, "bob deletes").await;

    let chunk = encode_chunk(&[9u8; 5000]);
    let resp = r
        .req(Method::POST, "/v2/team-a/app/_thaw/chunks/missing", Some(&bob))
        .json(&json!({"chunks": [hex::encode(chunk.id)]}))
        .send()
        .await
        .unwrap();
    expect_denied(resp, "bob probes missing chunks").await;
    let resp = r
        .req(Method::POST, "/v2/team-a/app/_thaw/chunks", Some(&bob))
        .header("content-type", CHUNKS_TYPE)
        .body(chunk_batch(&[chunk]))
        .send()
        .await
        .unwrap();
    expect_denied(resp, "bob uploads chunks").await;
    let resp = r
        .req(Method::PUT, &format!("/v2/team-a/app/_thaw/blobs/{layer}"), Some(&bob))
        .header("content-type", RECIPE_TYPE)
        .body(vec![0u8; 8])
        .send()
        .await
        .unwrap();
    expect_denied(resp, "bob commits a recipe").await;

    // team-b is not his: blobs, recipes, chunk fetches and tags are refused.
    let other_layer = sha256_digest(b"layer-b");
    for (method, path) in [
        (Method::GET, format!("/v2/team-b/app/blobs/{other_layer}")),
        (Method::GET, format!("/v2/team-b/app/_thaw/blobs/{other_layer}/recipe")),
        (Method::POST, "/v2/team-b/app/_thaw/chunks/fetch".to_owned()),
        (Method::GET, "/v2/team-b/app/tags/list".to_owned()),
    ] {
        let body = json!({"blob": other_layer, "chunks": []});
        let resp = r.req(method.clone(), &path, Some(&bob)).json(&body).send().await.unwrap();
        expect_denied(resp, &format!("bob: {method} {path}")).await;
        let resp = r.req(method.clone(), &path, None).json(&body).send().await.unwrap();
        expect_challenge(resp, Some("repository:team-b/app:pull"), &format!("anonymous: {method} {path}"))
            .await;
    }

    // A pusher may probe: the dedup query works for alice.
    let resp = r
        .req(Method::POST, "/v2/team-a/app/_thaw/chunks/missing", Some(&basic("alice")))
        .json(&json!({"chunks": [hex::encode([1u8; 32])]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn expired_and_tampered_tokens_are_refused() {
    let r = Authed::start().await;
    let (alice, _) = r.token(Some("alice"), &["repository:team-a/app:pull,push"]).await;
    push_image(&r, "team-a/app", "v1", b"x", &alice).await;
    let path = "/v2/team-a/app/tags/list";

    let grant =
        ScopeGrant { kind: "repository".into(), name: "team-a/app".into(), actions: vec!["pull".into()] };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expired = Claims {
        sub: "alice".into(),
        aud: "thaw-test".into(),
        iat: now - 600,
        exp: now - 1,
        access: vec![grant.clone()],
    };
    let resp =
        r.req(Method::GET, path, Some(&format!("Bearer {}", r.auth.sign(&expired)))).send().await.unwrap();
    let params = expect_challenge(resp, Some("repository:team-a/app:pull"), "expired token").await;
    assert_eq!(params["error"], "invalid_token");

    // The same claims, valid, pass; then one changed byte of payload or signature fails.
    let valid = Claims { exp: now + 600, ..expired.clone() };
    let token = r.auth.sign(&valid);
    let resp = r.req(Method::GET, path, Some(&format!("Bearer {token}"))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (payload, signature) = token.split_once('.').unwrap();
    // Widen the grant to push without re-signing.
    let mut widened = valid.clone();
    widened.access[0].actions.push("push".into());
    let forged_payload = r.auth.sign(&widened).split_once('.').unwrap().0.to_owned();
    let mut flipped = signature.as_bytes().to_vec();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    for bad in [
        format!("{forged_payload}.{signature}"),
        format!("{payload}.{}", String::from_utf8(flipped).unwrap()),
        payload.to_owned(),
        "garbage".to_owned(),
    ] {
        let resp = r.req(Method::GET, path, Some(&format!("Bearer {bad}"))).send().await.unwrap();
        expect_challenge(resp, Some("repository:team-a/app:pull"), &format!("tampered {bad}")).await;
    }
    // A token signed with another key is refused too.
    let other = Auth::new(auth_file(), HashMap::new(), Some(vec![8; 32])).unwrap();
    let resp =
        r.req(Method::GET, path, Some(&format!("Bearer {}", other.sign(&valid)))).send().await.unwrap();
    expect_challenge(resp, Some("repository:team-a/app:pull"), "other key").await;
}

#[tokio::test]
async fn a_mount_from_an_unreadable_repository_becomes_a_plain_upload() {
    let r = Authed::start().await;
    let (_, layer) = push_image(&r, "team-b/app", "v1", b"secret-layer", &basic("carol")).await;
    let alice = basic("alice");
    let resp = r
        .req(
            Method::POST,
            &format!("/v2/team-a/app/blobs/uploads/?mount={layer}&from=team-b/app"),
            Some(&alice),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "mount from team-b must not happen for alice");
    let resp =
        r.req(Method::HEAD, &format!("/v2/team-a/app/blobs/{layer}"), Some(&alice)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // root may read both, so the mount happens.
    let resp = r
        .req(
            Method::POST,
            &format!("/v2/team-a/app/blobs/uploads/?mount={layer}&from=team-b/app"),
            Some(&basic("root")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn anonymous_pull_nodes_and_catalog_follow_their_own_rules() {
    let r = Authed::start().await;
    let (_, layer) = push_image(&r, "public/base", "v1", b"public-layer", &basic("root")).await;
    let resp = r.req(Method::GET, &format!("/v2/public/base/blobs/{layer}"), None).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "anonymous pull of public/*");
    let resp = r.req(Method::POST, "/v2/public/base/blobs/uploads/", None).send().await.unwrap();
    expect_challenge(resp, Some("repository:public/base:pull,push"), "anonymous push to public/*").await;

    let record = json!({
        "node": "worker-1", "peerEndpoint": "worker-1:7070", "capacityBytes": 1000, "usedBytes": 0, "snapshots": [],
    });
    let put = |authz: Option<String>| {
        r.req(Method::PUT, "/v2/_thaw/nodes/worker-1", authz.as_deref()).json(&record).send()
    };
    expect_challenge(put(None).await.unwrap(), Some("registry:nodes:write"), "anonymous node PUT").await;
    expect_denied(put(Some(basic("alice"))).await.unwrap(), "alice publishes holdings").await;
    assert_eq!(put(Some(basic("node-1"))).await.unwrap().status(), StatusCode::NO_CONTENT);
    let (node_token, claims) = r.token(Some("node-1"), &["registry:nodes:read,write"]).await;
    assert_eq!(
        claims["access"],
        json!([{"type": "registry", "name": "nodes", "actions": ["read", "write"]}])
    );
    let resp = r.req(Method::GET, "/v2/_thaw/nodes", Some(&node_token)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = r.req(Method::GET, "/v2/_thaw/nodes", Some(&basic("bob"))).send().await.unwrap();
    expect_denied(resp, "bob reads the node directory").await;

    let resp = r.req(Method::GET, "/v2/_catalog", Some(&basic("alice"))).send().await.unwrap();
    expect_denied(resp, "alice lists the catalog").await;
    let resp = r.req(Method::GET, "/v2/_catalog", Some(&basic("root"))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_binary_reads_its_auth_config() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = format!("alice:{}\n", bcrypt::hash("alice-pw", 4).unwrap());
    std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
    std::fs::write(dir.path().join("token.key"), [3u8; 32]).unwrap();
    let config = json!({
        "htpasswd": "htpasswd",
        "token-key-file": "token.key",
        "grants": [{"user": "alice", "repository": "*", "actions": ["pull", "push"]}],
    });
    let config_path = dir.path().join("auth.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let addr = free_port();
    let log = dir.path().join("registry.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
        .args(["--listen", &addr.to_string(), "--storage"])
        .arg(dir.path().join("storage"))
        .arg("--auth-config")
        .arg(&config_path)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .expect("spawn thaw-registry");
    let c = client();
    let base = format!("http://{addr}");
    let status = loop {
        if let Ok(resp) = c.get(format!("{base}/v2/")).send().await {
            break resp.status();
        }
        assert!(child.try_wait().unwrap().is_none(), "registry exited early");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let resp = c.get(format!("{base}/v2/")).basic_auth("alice", Some("alice-pw")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = c.get(format!("{base}/v2/")).basic_auth("alice", Some("wrong")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    child.kill().unwrap();
    child.wait().unwrap();

    // A config naming a non-bcrypt hash is refused at start, with a clear message.
    std::fs::write(dir.path().join("htpasswd"), "alice:{SHA}abc\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
        .args(["--listen", &free_port().to_string(), "--storage"])
        .arg(dir.path().join("storage"))
        .arg("--auth-config")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("htpasswd -B"), "{stderr}");
}
