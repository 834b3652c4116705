//! Tenant isolation against the real `thaw-registry` binary (issue 18, findings 1 and 2,
//! and the audit of every route): two tenants from an `--auth-config` file, `user-a` with
//! pull and push on `team-a/*` and `user-b` the same on `team-b/*`, each trying to reach
//! the other's bytes through `_thaw` commits, cross-repository mounts, query tricks,
//! referrers, manifests and the token endpoint.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The binary, started with `--auth-config`; killed on drop.
struct Tenants {
    child: Child,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

const USERS: [(&str, &str); 2] = [("user-a", "a-password"), ("user-b", "b-password")];

impl Tenants {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let htpasswd: String =
            USERS.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).expect("bcrypt"))).collect();
        std::fs::write(dir.path().join("htpasswd"), htpasswd).expect("write htpasswd");
        let config = json!({
            "htpasswd": "htpasswd",
            "service": "thaw-isolation",
            "grants": [
                {"user": "user-a", "repository": "team-a/*", "actions": ["pull", "push"]},
                {"user": "user-b", "repository": "team-b/*", "actions": ["pull", "push"]},
            ],
        });
        let config_path = dir.path().join("auth.json");
        std::fs::write(&config_path, config.to_string()).expect("write auth config");
        let addr = free_port();
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_thaw-registry"))
            .args(["--listen", &addr.to_string(), "--storage"])
            .arg(dir.path().join("storage"))
            .arg("--auth-config")
            .arg(&config_path)
            .env_remove("THAW_LISTEN")
            .env_remove("THAW_STORAGE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn thaw-registry");
        let mut me = Self { child, base: format!("http://{addr}"), client: client(), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // With auth on, an anonymous `GET /v2/` is 401: the registry is up.
            if let Ok(resp) = me.client.get(format!("{}/v2/", me.base)).send().await {
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                return me;
            }
            assert!(me.child.try_wait().expect("try_wait").is_none(), "thaw-registry exited early");
            assert!(Instant::now() < deadline, "thaw-registry never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn req(&self, user: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        let password = USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).expect("known user");
        self.client.request(method, format!("{}{path}", self.base)).basic_auth(user, Some(password))
    }

    /// Uploads `entries` as one chunk batch into `repo`.
    async fn upload_chunks(&self, user: &str, repo: &str, entries: &[BatchEntry]) {
        let resp = self
            .req(user, Method::POST, &format!("/v2/{repo}/_thaw/chunks"))
            .header("content-type", CHUNKS_TYPE)
            .body(chunk_batch(entries))
            .send()
            .await
            .expect("chunk upload");
        assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    }

    async fn commit(&self, user: &str, repo: &str, digest: &str, recipe: Vec<u8>) -> reqwest::Response {
        self.req(user, Method::PUT, &format!("/v2/{repo}/_thaw/blobs/{digest}"))
            .header("content-type", RECIPE_TYPE)
            .body(recipe)
            .send()
            .await
            .expect("commit")
    }

    /// Pushes `blob` into `repo` the `_thaw` way (chunks, then the recipe); its digest.
    async fn push_thaw(&self, user: &str, repo: &str, blob: &[u8]) -> FixedChunked {
        let fc = fixed_chunked(blob, 65_536);
        self.upload_chunks(user, repo, &fc.entries).await;
        let resp = self.commit(user, repo, &fc.digest, fc.recipe.clone()).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
        fc
    }

    /// Pushes `blob` into `repo` with a monolithic OCI upload; its digest.
    async fn push_oci(&self, user: &str, repo: &str, blob: &[u8]) -> String {
        let digest = sha256_digest(blob);
        let resp = self
            .req(user, Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .await
            .expect("monolithic upload");
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
        digest
    }

    async fn status(&self, user: &str, method: Method, path: &str) -> StatusCode {
        self.req(user, method, path).send().await.expect("request").status()
    }

    /// Asserts that `user` can read nothing of blob `digest` through `repo`.
    async fn assert_unreadable(&self, user: &str, repo: &str, digest: &str, what: &str) {
        for (method, path) in [
            (Method::HEAD, format!("/v2/{repo}/blobs/{digest}")),
            (Method::GET, format!("/v2/{repo}/blobs/{digest}")),
            (Method::GET, format!("/v2/{repo}/_thaw/blobs/{digest}/recipe")),
        ] {
            let status = self.status(user, method.clone(), &path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {method} {path}");
        }
    }
}

impl Drop for Tenants {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A recipe (fixed 64 KiB chunker) that claims to be `digest` with these entries.
fn forged_recipe(digest: &str, entries: &[RecipeEntry]) -> Vec<u8> {
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(digest_hex(digest), &mut sha256).expect("hex digest");
    let size = entries
        .iter()
        .map(|e| match e {
            RecipeEntry::Data { len, .. } | RecipeEntry::Zero { len } => u64::from(*len),
        })
        .sum();
    let header = RecipeHeader { sha256, size, kind: 0, min: 65_536, avg: 65_536, max: 65_536 };
    recipe_bytes(&header, entries)
}

fn data_entries(blob: &[u8]) -> Vec<RecipeEntry> {
    blob.chunks(65_536)
        .map(|piece| RecipeEntry::Data { len: piece.len() as u32, id: chunk_id(piece) })
        .collect()
}

#[tokio::test]
async fn a_commit_by_recipe_must_prove_possession_of_the_blob() {
    let t = Tenants::start().await;
    let secret = Rng::new(18).bytes(3 * 65_536 + 1000);
    let b = t.push_thaw("user-b", "team-b/app", &secret).await;
    let d = b.digest.as_str();

    // 1. An empty recipe naming user-b's digest.
    let resp = t.commit("user-a", "team-a/app", d, forged_recipe(d, &[])).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "empty recipe naming another tenant's blob").await;
    t.assert_unreadable("user-a", "team-a/app", d, "after the empty recipe").await;

    // 2. Partial: only the first chunk (user-a may even hold it; it is not the blob).
    let first = &secret[..65_536];
    t.upload_chunks("user-a", "team-a/app", &[encode_chunk(first)]).await;
    let resp = t.commit("user-a", "team-a/app", d, forged_recipe(d, &data_entries(first))).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "partial recipe").await;

    // 3. Wrong: the right lengths, one chunk replaced by one user-a uploaded.
    let mut entries = data_entries(&secret);
    let decoy = Rng::new(99).bytes(65_536);
    t.upload_chunks("user-a", "team-a/app", &[encode_chunk(&decoy)]).await;
    entries[1] = RecipeEntry::Data { len: 65_536, id: chunk_id(&decoy) };
    let resp = t.commit("user-a", "team-a/app", d, forged_recipe(d, &entries)).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "recipe with a wrong chunk").await;

    // 4. Zero runs of the right total length.
    let zeros: Vec<RecipeEntry> =
        secret.chunks(65_536).map(|p| RecipeEntry::Zero { len: p.len() as u32 }).collect();
    let resp = t.commit("user-a", "team-a/app", d, forged_recipe(d, &zeros)).await;
    expect_error(resp, 400, &["DIGEST_INVALID"], "zero-run recipe").await;

    t.assert_unreadable("user-a", "team-a/app", d, "after every forged recipe").await;
    let resp = t
        .req("user-a", Method::POST, "/v2/team-a/app/_thaw/chunks/fetch")
        .json(&json!({ "blob": d, "chunks": [hex::encode(chunk_id(&secret[65_536..131_072]))] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "chunk fetch through a forged link");
    // user-b still reads it.
    let resp = t.req("user-b", Method::GET, &format!("/v2/team-b/app/blobs/{d}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), secret.as_slice());
}

#[tokio::test]
async fn a_tenant_holding_the_bytes_still_dedups_against_other_tenants() {
    let t = Tenants::start().await;
    let shared = Rng::new(7).bytes(2 * 65_536 + 17);
    let b = t.push_thaw("user-b", "team-b/base", &shared).await;
    // user-a has the same bytes: its recipe names exactly the stored pieces, nothing is
    // uploaded again, and the blob is readable in team-a.
    let resp = t.commit("user-a", "team-a/base", &b.digest, b.recipe.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    let resp =
        t.req("user-a", Method::GET, &format!("/v2/team-a/base/blobs/{}", b.digest)).send().await.unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), shared.as_slice());

    // Cut differently (32 KiB), with its chunks uploaded: verified in full, also accepted.
    let other = Rng::new(8).bytes(100_000);
    let b2 = t.push_oci("user-b", "team-b/base", &other).await;
    let fc = fixed_chunked(&other, 32_768);
    t.upload_chunks("user-a", "team-a/base", &fc.entries).await;
    let resp = t.commit("user-a", "team-a/base", &b2, fc.recipe).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);

    // The empty blob is the one blob a recipe without entries can name.
    let empty = sha256_digest(b"");
    let resp = t.commit("user-a", "team-a/base", &empty, forged_recipe(&empty, &[])).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
}

#[tokio::test]
async fn a_mount_authorizes_exactly_the_query_the_handler_reads() {
    let t = Tenants::start().await;
    let theirs = t.push_oci("user-b", "team-b/app", b"team-b secret layer").await;
    let mine = t.push_oci("user-a", "team-a/lib", b"team-a own layer").await;

    // Repeated keys, however spelled, are refused before anything is linked.
    for query in [
        format!("mount={theirs}&from=team-a/lib&from=team-b/app"),
        format!("from=team-a/lib&mount={theirs}&from=team-b/app"),
        format!("mount={theirs}&from=team-a/lib&%66rom=team-b/app"),
        format!("mount={mine}&%6Dount={theirs}&from=team-a/lib"),
        format!("mount={theirs}&from=team-a/lib&fr%6Fm=team-b/app"),
    ] {
        let resp =
            t.req("user-a", Method::POST, &format!("/v2/team-a/app/blobs/uploads/?{query}")).send().await;
        expect_error(resp.unwrap(), 400, &["UNSUPPORTED"], &query).await;
    }
    // Percent-encoded keys and values are read as the handler reads them: a mount from
    // team-b falls back to a plain upload session.
    for query in [
        format!("%6Dount={theirs}&%66rom=team-b/app"),
        format!("mount={theirs}&%66rom=team-b/app"),
        format!("%6dount={theirs}&from=team-b/app"),
        format!("mount={theirs}&from=team-b%2Fapp"),
        format!("mount={theirs}&from=team-%62/app"),
        format!("%6D%6F%75%6E%74={}&%66%72%6F%6D=team-b%2fapp", theirs.replace(':', "%3A")),
    ] {
        let resp =
            t.req("user-a", Method::POST, &format!("/v2/team-a/app/blobs/uploads/?{query}")).send().await;
        let resp = resp.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "{query}: {}", body_text(resp).await);
    }
    t.assert_unreadable("user-a", "team-a/app", &theirs, "after the mount tricks").await;

    // The same spellings from a repository user-a may read do mount.
    let resp = t
        .req(
            "user-a",
            Method::POST,
            &format!("/v2/team-a/app/blobs/uploads/?%6Dount={mine}&%66rom=team-a%2Flib"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    assert_eq!(
        t.status("user-a", Method::HEAD, &format!("/v2/team-a/app/blobs/{mine}")).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn no_route_reads_another_tenants_repository() {
    let t = Tenants::start().await;
    // user-b: a layer, an image tagged v1 and a referrer (signature) of it.
    let layer = b"team-b private layer".to_vec();
    let layer_digest = t.push_oci("user-b", "team-b/app", &layer).await;
    let config = b"{}".to_vec();
    t.push_oci("user-b", "team-b/app", &config).await;
    let manifest =
        image_manifest(descriptor(CONFIG_V1, &config), vec![descriptor(LAYER_TAR, &layer)], json!({}));
    let manifest_digest = sha256_digest(&manifest);
    let put = |user: &'static str, repo: &'static str, reference: String, body: Vec<u8>| {
        t.req(user, Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", MANIFEST_V1)
            .body(body)
            .send()
    };
    let resp = put("user-b", "team-b/app", "v1".into(), manifest.clone()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);
    let referrer = image_manifest(
        descriptor(CONFIG_V1, &config),
        vec![descriptor(LAYER_TAR, &layer)],
        json!({ "artifactType": "application/vnd.example.sig", "subject": {
            "mediaType": MANIFEST_V1, "digest": manifest_digest, "size": manifest.len() } }),
    );
    let resp = put("user-b", "team-b/app", sha256_digest(&referrer), referrer.clone()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "{}", body_text(resp).await);

    // Straight at team-b: 403 on every route, whatever the method.
    for (method, path) in [
        (Method::GET, "/v2/team-b/app/manifests/v1".to_owned()),
        (Method::GET, "/v2/team-b/app/tags/list".to_owned()),
        (Method::GET, format!("/v2/team-b/app/referrers/{manifest_digest}")),
        (Method::GET, format!("/v2/team-b/app/blobs/{layer_digest}")),
        (Method::GET, format!("/v2/team-b/app/_thaw/blobs/{layer_digest}/recipe")),
        (Method::POST, "/v2/team-b/app/_thaw/chunks/fetch".to_owned()),
        (Method::POST, "/v2/team-b/app/_thaw/chunks/missing".to_owned()),
        (Method::POST, "/v2/team-b/app/blobs/uploads/".to_owned()),
        (Method::DELETE, format!("/v2/team-b/app/manifests/{manifest_digest}")),
        (Method::GET, "/v2/_catalog".to_owned()),
        (Method::GET, "/v2/_thaw/nodes".to_owned()),
        // Path spellings of team-b that decode to it.
        (Method::GET, "/v2/team-%62/app/tags/list".to_owned()),
        (Method::GET, "/v2/team-b/%61pp/manifests/v1".to_owned()),
    ] {
        let status = t.status("user-a", method.clone(), &path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    // Through team-a: nothing of team-b is visible by digest, subject or reference.
    for (method, path) in [
        (Method::GET, format!("/v2/team-a/app/manifests/{manifest_digest}")),
        (Method::GET, format!("/v2/team-a/app/blobs/{layer_digest}")),
        (Method::GET, format!("/v2/team-a/app/_thaw/blobs/{layer_digest}/recipe")),
    ] {
        let status = t.status("user-a", method.clone(), &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let resp = t
        .req("user-a", Method::GET, &format!("/v2/team-a/app/referrers/{manifest_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let index: Value = resp.json().await.unwrap();
    assert_eq!(index["manifests"], json!([]), "team-b's referrer leaked into team-a");
    // A manifest naming team-b's blobs (or an index naming team-b's manifest) is refused.
    let resp = put("user-a", "team-a/app", "stolen".into(), manifest.clone()).await.unwrap();
    expect_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"], "manifest naming team-b's blobs").await;
    let index = image_index(
        vec![json!({ "mediaType": MANIFEST_V1, "digest": manifest_digest, "size": manifest.len() })],
        json!({}),
    );
    let resp = t
        .req("user-a", Method::PUT, "/v2/team-a/app/manifests/stolen-index")
        .header("content-type", INDEX_V1)
        .body(index)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, &["MANIFEST_BLOB_UNKNOWN"], "index naming team-b's manifest").await;
}

#[tokio::test]
async fn tokens_grant_only_what_the_user_has_and_only_for_this_service() {
    let t = Tenants::start().await;
    let layer = t.push_oci("user-b", "team-b/app", b"token test layer").await;
    let token = |query: String| t.req("user-a", Method::GET, &format!("/v2/_thaw/token?{query}")).send();
    let resp = token(
        "service=thaw-isolation&scope=repository:team-b/app:pull,push&scope=repository:team-*:pull\
         &scope=repository:team-a/app:pull,push,delete&scope=registry:catalog:*&scope=registry:nodes:read"
            .into(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    let raw = body["token"].as_str().unwrap().to_owned();
    let payload = raw.split('.').next().unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "team-a/app", "actions": ["pull", "push"]}]),
        "granted beyond user-a's grants"
    );
    let bearer = format!("Bearer {raw}");
    let resp = t
        .client
        .get(format!("{}/v2/team-b/app/blobs/{layer}", t.base))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A repeated `service` is ambiguous: refused.
    let resp = token("service=thaw-isolation&service=other&scope=repository:team-a/app:pull".into()).await;
    expect_error(resp.unwrap(), 400, &["UNSUPPORTED"], "repeated service").await;
}
