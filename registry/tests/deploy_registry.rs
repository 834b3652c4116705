//! `deploy/registry.yaml` runs: the registry binary started with exactly the container's
//! args and environment from the manifest (issue 19, item 3), on a real S3 server (MinIO),
//! with the pod's volumes as directories and a read-only root filesystem emulated by an
//! unwritable working, home and temp directory. It must pass its readiness probe, enforce the
//! manifest's auth configuration, and serve a push (a two-step and a chunked upload, which
//! spool) and a pull.
//!
//! What the test substitutes, and only that: the S3 endpoint, credentials and bucket (for
//! the local MinIO), the Secrets' password hashes and token key (placeholders in the file),
//! the listen port (a free one, on loopback), and each volume's mount path (a directory
//! holding what the kubelet would mount there).

/// The shared single-server MinIO harness (a server of its own for this test binary).
#[path = "common/minio.rs"]
#[allow(dead_code)]
mod minio;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

const PASSWORD: &str = "deploy-test-password";

/// The objects of a multi-document YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap())
                .unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/registry.yaml has no {kind} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|s| s.as_str().expect("a string").to_owned()).collect()
}

/// The registry process; killed on drop.
struct Pod {
    child: Child,
    addr: String,
    _root: tempfile::TempDir,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `thaw-registry` as the manifest's Deployment runs it.
fn start_as_deployed(s3: &minio::Minio, bucket: &str) -> (Pod, Value) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/registry.yaml");
    let docs = documents(&manifest);
    let deployment = find(&docs, "Deployment", "thaw-registry");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "one container");
    let container = &containers[0];
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"], true,
        "the test emulates a read-only root because the manifest asks for one"
    );

    // As root (which writes anywhere), the process runs as the manifest's user and group,
    // so that unwritable means unwritable; otherwise as this user.
    let security = &pod["securityContext"];
    let run_as = is_root().then(|| {
        let uid = container["securityContext"]["runAsUser"].as_u64().expect("runAsUser") as u32;
        let gid = security["fsGroup"].as_u64().map_or(uid, |g| g as u32);
        (uid, gid)
    });
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The container's root filesystem: nothing here is writable.
    let ro = root.path().join("rootfs");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();

    // Volumes: Secrets as files (with the test's credentials in place of placeholders), an
    // emptyDir as an empty writable directory.
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v))
        .collect();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut auth_json = Value::Null;
    let mut secret_modes: Vec<(PathBuf, u32)> = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap();
        let mount_path = m["mountPath"].as_str().unwrap().to_owned();
        let volume = volumes.get(name).unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
        let dir = root.path().join("volumes").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            let data = find(&docs, "Secret", secret)["stringData"].as_object().unwrap();
            for (key, value) in data {
                let text = value.as_str().unwrap();
                let text = match key.as_str() {
                    "auth.json" => {
                        auth_json = serde_json::from_str(text).expect("auth.json in the Secret is JSON");
                        text.to_owned()
                    }
                    "htpasswd" => String::new(), // written below, for the users auth.json names
                    "token.key" => hex::encode(rand_bytes(32)),
                    _ => text.to_owned(),
                };
                std::fs::write(dir.join(key), text).unwrap();
            }
            secret_modes
                .push((dir.clone(), volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32));
        } else {
            assert!(volume.get("emptyDir").is_some(), "volume {name}: only secret and emptyDir are emulated");
            // The kubelet makes an emptyDir writable by everyone.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        mounts.push((mount_path, dir));
    }
    let in_pod = |value: &str| -> String {
        for (mount_path, dir) in &mounts {
            if let Some(rest) = value.strip_prefix(mount_path.as_str()) {
                return format!("{}{rest}", dir.display());
            }
        }
        value.to_owned()
    };

    // Users for the grants of the manifest's auth config (the Secret's htpasswd is a
    // placeholder an operator replaces).
    let mut htpasswd = String::new();
    let mut users: Vec<String> = auth_json["grants"]
        .as_array()
        .expect("the manifest's auth.json has grants")
        .iter()
        .map(|g| g["user"].as_str().unwrap().to_owned())
        .filter(|u| u != "*")
        .collect();
    users.sort();
    users.dedup();
    for user in &users {
        htpasswd.push_str(&format!("{user}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap()));
    }
    let auth_dir = mounts
        .iter()
        .find(|(_, dir)| dir.join("auth.json").is_file())
        .map(|(_, dir)| dir.clone())
        .expect("a Secret volume with auth.json");
    std::fs::write(auth_dir.join("htpasswd"), htpasswd).unwrap();
    // Secret files as the kubelet writes them: defaultMode, group fsGroup, read-only.
    for (dir, mode) in &secret_modes {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if let Some((_, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(0), Some(gid)).unwrap();
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    std::fs::set_permissions(root.path().join("volumes"), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The args, with the mount paths, the listen address and the bucket substituted.
    let port = free_port();
    let mut args = strings(&container["args"]);
    let container_port = container["ports"][0]["containerPort"].as_u64().unwrap();
    for i in 0..args.len() {
        args[i] = in_pod(&args[i]);
        if i > 0 && args[i - 1] == "--listen" {
            assert!(
                args[i].ends_with(&format!(":{container_port}")),
                "--listen {} vs containerPort",
                args[i]
            );
            args[i] = format!("127.0.0.1:{port}");
        }
        if let Some(rest) = args[i].strip_prefix("s3://") {
            let prefix = rest.split_once('/').map_or("", |(_, p)| p);
            args[i] = format!("s3://{bucket}/{prefix}");
        }
    }

    // The environment: nothing from this process, only what the pod gets.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let secret = from["secretRef"]["name"].as_str().expect("envFrom a secretRef");
        for (k, v) in find(&docs, "Secret", secret)["stringData"].as_object().unwrap() {
            env.insert(k.clone(), v.as_str().unwrap().to_owned());
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let value = e["value"].as_str().expect("env values are literal");
        env.insert(e["name"].as_str().unwrap().to_owned(), in_pod(value));
    }
    for (k, v) in s3.env() {
        if k.starts_with("AWS_") && k != "AWS_ALLOW_HTTP" {
            env.insert(k.to_owned(), v);
        }
    }
    env.insert("HOME".into(), ro.display().to_string());
    env.insert("TMPDIR".into(), ro.display().to_string());
    env.insert("THAW_LOG".into(), "warn".into());

    let mut command = Command::new(env!("CARGO_BIN_EXE_thaw-registry"));
    if let Some((uid, gid)) = run_as {
        use std::os::unix::process::CommandExt as _;
        command.uid(uid).gid(gid);
    }
    let child =
        command.args(&args).env_clear().envs(&env).current_dir(&ro).stdin(Stdio::null()).spawn().unwrap();
    (Pod { child, addr: format!("127.0.0.1:{port}"), _root: root }, container.clone())
}

/// True when this process runs as root (files it creates belong to uid 0).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

fn rand_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut seed = Sha256::digest(format!("{:?}{}", Instant::now(), std::process::id()));
    while out.len() < n {
        out.extend_from_slice(&seed);
        seed = Sha256::digest(seed);
    }
    out.truncate(n);
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until the container's readiness probe passes, as the kubelet runs it.
async fn wait_ready(pod: &mut Pod, container: &Value) {
    let probe = &container["readinessProbe"];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = pod.child.try_wait().unwrap() {
            panic!("thaw-registry exited at start ({status}), run as deploy/registry.yaml runs it");
        }
        let ready = if probe.get("tcpSocket").is_some() {
            tokio::net::TcpStream::connect(&pod.addr).await.is_ok()
        } else {
            let path = probe["httpGet"]["path"].as_str().expect("a tcpSocket or httpGet probe");
            // The kubelet counts 200-399 as ready.
            reqwest::get(format!("http://{}{path}", pod.addr))
                .await
                .is_ok_and(|r| (200..400).contains(&r.status().as_u16()))
        };
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the readiness probe never passed: {probe}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut block = Sha256::digest([seed]);
    while out.len() < n {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(n);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_serves_push_and_pull_as_deploy_registry_yaml_runs_it() {
    let s3 = minio::Minio::start();
    let (mut pod, container) = start_as_deployed(&s3, minio::BUCKET);
    wait_ready(&mut pod, &container).await;
    let base = format!("http://{}", pod.addr);
    let http = reqwest::Client::new();

    // Auth is on: anonymous is challenged, a pull-only user may not push.
    let r = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the manifest's registry serves anonymous callers");
    let r = http
        .post(format!("{base}/v2/functions/hello/blobs/uploads/"))
        .basic_auth("node-cache", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "node-cache may only pull: {}", r.text().await.unwrap());

    let push = |req: reqwest::RequestBuilder| req.basic_auth("ci", Some(PASSWORD));
    let repo = "functions/hello";
    // Blob 1, two-step: POST opens a session, PUT sends every byte (spooled; past the
    // in-memory buffer).
    let one = blob(3 << 20, 1);
    let r = push(http.post(format!("{base}/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let url = if location.starts_with('/') { format!("{base}{location}") } else { location };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r =
        push(http.put(format!("{url}{sep}digest={}", digest(&one)))).body(one.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201, "two-step upload: {}", r.text().await.unwrap());

    // Blob 2, chunked: POST, two PATCHes, PUT.
    let two = blob(5 << 20, 2);
    let r = push(http.post(format!("{base}/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let mut offset = 0;
    for piece in two.chunks(3 << 20) {
        let url = if location.starts_with('/') { format!("{base}{location}") } else { location.clone() };
        let end = offset + piece.len() - 1;
        let r = push(http.patch(&url))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(piece.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "PATCH: {}", r.text().await.unwrap());
        location = r.headers()["location"].to_str().unwrap().to_owned();
        offset = end + 1;
    }
    let url = if location.starts_with('/') { format!("{base}{location}") } else { location };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = push(http.put(format!("{url}{sep}digest={}", digest(&two)))).send().await.unwrap();
    assert_eq!(r.status(), 201, "chunked upload: {}", r.text().await.unwrap());

    // A manifest naming both, tagged.
    let config = b"{}".to_vec();
    let r = push(http.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={}", digest(&config))))
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "monolithic upload: {}", r.text().await.unwrap());
    let layer = |b: &[u8]| serde_json::json!({"mediaType": "application/octet-stream", "digest": digest(b), "size": b.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [layer(&one), layer(&two)],
    }))
    .unwrap();
    let r = push(http.put(format!("{base}/v2/{repo}/manifests/v1")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest: {}", r.text().await.unwrap());

    // Pulled back byte for byte, by the pull-only user.
    let pull = |req: reqwest::RequestBuilder| req.basic_auth("node-cache", Some(PASSWORD));
    let got = pull(http.get(format!("{base}/v2/{repo}/manifests/v1")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), manifest.as_slice());
    for b in [&one, &two] {
        let got = pull(http.get(format!("{base}/v2/{repo}/blobs/{}", digest(b)))).send().await.unwrap();
        assert_eq!(got.status(), 200);
        assert!(got.bytes().await.unwrap().as_ref() == b.as_slice(), "a pulled blob differs");
    }
}
