//! Authentication and retries against hand-written servers: the bearer token flow from
//! `WWW-Authenticate` with credentials from a Docker config file, Basic authentication,
//! `thaw login`, and backoff on 503/429.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::*;
use thaw_client::{ClientOptions, Error, Reference, Registry, Stats};

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn json(body: &str) -> RawResponse {
    RawResponse {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: body.into(),
        declared: None,
    }
}

fn unauthorized(challenge: String) -> RawResponse {
    RawResponse {
        status: 401,
        headers: vec![("www-authenticate", challenge)],
        body: br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
        declared: None,
    }
}

/// A registry behind a token service: tokens for alice:secret only; two pages of tags.
async fn token_registry(token_requests: Arc<Mutex<Vec<String>>>) -> String {
    serve_raw(Arc::new(move |r: &RawRequest| {
        let host = r.header("host").unwrap_or_default().to_owned();
        if r.path.starts_with("/token") {
            token_requests.lock().unwrap().push(r.path.clone());
            if r.header("authorization") != Some(basic("alice", "secret").as_str()) {
                return RawResponse { status: 401, headers: vec![], body: vec![], declared: None };
            }
            return json(r#"{"token":"T-1","expires_in":300}"#);
        }
        if r.header("authorization") != Some("Bearer T-1") {
            return unauthorized(format!(
                r#"Bearer realm="http://{host}/token",service="fake-registry",scope="repository:fn/x:pull""#
            ));
        }
        match r.path.as_str() {
            "/v2/" => json("{}"),
            "/v2/fn/x/tags/list?n=1000" => RawResponse {
                headers: vec![("link", r#"</v2/fn/x/tags/list?n=1000&last=a>; rel="next""#.into())],
                ..json(r#"{"name":"fn/x","tags":["a"]}"#)
            },
            "/v2/fn/x/tags/list?n=1000&last=a" => json(r#"{"name":"fn/x","tags":["b"]}"#),
            _ => RawResponse { status: 404, headers: vec![], body: vec![], declared: None },
        }
    }))
    .await
}

fn docker_config(dir: &std::path::Path, host: &str, user: &str, pass: &str) -> std::path::PathBuf {
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(&path, format!(r#"{{"auths":{{"http://{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_come_from_the_realm_with_docker_config_credentials() {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let host = token_registry(requests.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = Reference::parse(&format!("{host}/fn/x")).unwrap();

    let options = ClientOptions {
        docker_config: Some(docker_config(dir.path(), &host, "alice", "secret")),
        ..test_options()
    };
    let registry = Registry::for_reference(&reference, &options, Arc::new(Stats::new())).unwrap();
    assert_eq!(registry.tags("fn/x").await.unwrap(), ["a", "b"]);
    let asked = requests.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "one token serves both pages: {asked:?}");
    assert!(
        asked[0].contains("service=fake-registry") && asked[0].contains("scope=repository%3Afn%2Fx%3Apull"),
        "{asked:?}"
    );

    // Wrong password: the token service refuses, and the error says so.
    let options = ClientOptions {
        docker_config: Some(docker_config(dir.path(), &host, "alice", "wrong")),
        ..test_options()
    };
    let registry = Registry::for_reference(&reference, &options, Arc::new(Stats::new())).unwrap();
    let err = registry.tags("fn/x").await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("refused the credentials"), "{err}");
    assert!(err.hint().unwrap().contains("thaw login"));

    // No credentials at all.
    let registry =
        Registry::for_reference(&reference, &options_without_credentials(), Arc::new(Stats::new())).unwrap();
    assert!(matches!(registry.tags("fn/x").await.unwrap_err(), Error::Auth { .. }));
}

fn options_without_credentials() -> ClientOptions {
    test_options()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_thaw_login() {
    let host = serve_raw(Arc::new(|r: &RawRequest| {
        if r.header("authorization") != Some(basic("bob", "hunter2").as_str()) {
            return unauthorized(r#"Basic realm="fake""#.into());
        }
        match r.path.as_str() {
            "/v2/" => json("{}"),
            "/v2/fn/x/tags/list?n=1000" => json(r#"{"name":"fn/x","tags":["only"]}"#),
            _ => RawResponse { status: 404, headers: vec![], body: vec![], declared: None },
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let thaw = |args: &[&str], password: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(args)
            .env("DOCKER_CONFIG", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = thaw(&["login", "--plain-http", &host, "-u", "bob", "--password-stdin"], "nope");
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(!dir.path().join("config.json").exists(), "a failed login stores nothing");
    let good = thaw(&["login", "--plain-http", &host, "-u", "bob", "--password-stdin"], "hunter2");
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let tags = thaw(&["tags", "--plain-http", &format!("{host}/fn/x")], "");
    assert!(tags.status.success(), "{}", String::from_utf8_lossy(&tags.stderr));
    assert_eq!(String::from_utf8_lossy(&tags.stdout), "only\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_backoff() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let host = serve_raw(Arc::new(move |_r: &RawRequest| match seen.fetch_add(1, Ordering::SeqCst) {
        0 => RawResponse { status: 503, headers: vec![], body: vec![], declared: None },
        1 => RawResponse {
            status: 429,
            headers: vec![("retry-after", "0".into())],
            body: vec![],
            declared: None,
        },
        _ => json(r#"{"name":"fn/x","tags":["t"]}"#),
    }))
    .await;
    let reference = Reference::parse(&format!("{host}/fn/x")).unwrap();
    let registry = client_for(&reference);
    assert_eq!(registry.tags("fn/x").await.unwrap(), ["t"]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // A registry that keeps failing: the error carries the status, after the last try.
    let always = serve_raw(Arc::new(|_r: &RawRequest| RawResponse {
        status: 502,
        headers: vec![],
        body: b"bad gateway".to_vec(),
        declared: None,
    }))
    .await;
    let reference = Reference::parse(&format!("{always}/fn/x")).unwrap();
    let err = client_for(&reference).tags("fn/x").await.unwrap_err();
    assert!(matches!(err, Error::Registry { status: 502, .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_token_service_is_retried() {
    // The registry answers 503 with Retry-After while its credential checks are queued: the
    // credentials were not judged, so the client asks again instead of failing.
    let token_calls = Arc::new(AtomicUsize::new(0));
    let seen = token_calls.clone();
    let host = serve_raw(Arc::new(move |r: &RawRequest| {
        let host = r.header("host").unwrap_or_default().to_owned();
        if r.path.starts_with("/token") {
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                return RawResponse {
                    status: 503,
                    headers: vec![("retry-after", "0".into())],
                    body:
                        br#"{"errors":[{"code":"UNAVAILABLE","message":"busy checking other credentials"}]}"#
                            .to_vec(),
                    declared: None,
                };
            }
            return json(r#"{"token":"T-1","expires_in":300}"#);
        }
        if r.header("authorization") != Some("Bearer T-1") {
            return unauthorized(format!(
                r#"Bearer realm="http://{host}/token",service="fake-registry",scope="repository:fn/x:pull""#
            ));
        }
        match r.path.as_str() {
            "/v2/fn/x/tags/list?n=1000" => json(r#"{"name":"fn/x","tags":["t"]}"#),
            _ => RawResponse { status: 404, headers: vec![], body: vec![], declared: None },
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let reference = Reference::parse(&format!("{host}/fn/x")).unwrap();
    let options = ClientOptions {
        docker_config: Some(docker_config(dir.path(), &host, "alice", "secret")),
        ..test_options()
    };
    let registry = Registry::for_reference(&reference, &options, Arc::new(Stats::new())).unwrap();
    assert_eq!(registry.tags("fn/x").await.unwrap(), ["t"]);
    assert_eq!(token_calls.load(Ordering::SeqCst), 3, "two busy answers, then the token");
}
