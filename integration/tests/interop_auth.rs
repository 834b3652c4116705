//! Interop with authentication on: oras-py, skopeo and thaw-client (the `thaw` CLI's
//! library, reading a Docker `config.json`) against an in-process thaw-registry that issues
//! bearer tokens. Each client must get through the 401 challenge → token endpoint → retry
//! flow with the right credentials, and fail without them or with a pull-only account.
//!
//! Needs `python3` with oras-py and `skopeo` (`scripts/install-test-deps.sh`). A missing
//! client fails the test; it is never skipped.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use common::{ensure_same_files, require_tool, run, snapshot_names, write_snapshot, CLIENT_DEADLINE};
use serde_json::json;
use thaw_registry::auth::{hash_password, Auth, AuthFile};
use thaw_registry::{RegistryConfig, RunningRegistry, ServeOptions};
use tokio::process::Command;

struct AuthedRegistry {
    running: RunningRegistry,
    _storage: tempfile::TempDir,
}

impl AuthedRegistry {
    /// alice may pull and push `team-a/*`; bob may only pull it.
    async fn start() -> Result<Self> {
        let file: AuthFile = serde_json::from_value(json!({
            "grants": [
                {"user": "alice", "repository": "team-a/*", "actions": ["pull", "push", "delete"]},
                {"user": "bob", "repository": "team-a/*", "actions": ["pull"]},
            ],
            "nodes-read": ["node-1"],
            "nodes-write": ["node-1"],
        }))?;
        let users: HashMap<String, String> =
            [("alice", "alice-pw"), ("bob", "bob-pw"), ("node-1", "node-pw")]
                .iter()
                .map(|(u, p)| Ok((u.to_string(), hash_password(p, 4)?)))
                .collect::<Result<_>>()?;
        let auth = Arc::new(Auth::new(file, users, None)?);
        let storage = tempfile::Builder::new().prefix("thaw-interop-auth-").tempdir()?;
        let config =
            RegistryConfig::new("127.0.0.1:0".parse()?, storage.path().to_str().context("UTF-8 path")?);
        let running =
            thaw_registry::spawn_with(config, ServeOptions { auth: Some(auth), ..Default::default() })
                .await?;
        Ok(Self { running, _storage: storage })
    }

    fn host(&self) -> String {
        self.running.addr().to_string()
    }
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Pushes (or pulls) a snapshot directory with oras-py, logged in as `user`.
const ORAS_SCRIPT: &str = r#"
import os, sys
import oras.client
mode, host, target, user, password, path = sys.argv[1:7]
client = oras.client.OrasClient(hostname=host, insecure=True)
if user:
    # What `login` does besides asking a Docker daemon (there is none here).
    client.auth.set_basic_auth(user, password)
if mode == "push":
    os.chdir(path)
    files = sorted(n for n in os.listdir(".") if os.path.isfile(n))
    response = client.push(target=f"{host}/{target}", files=files, quiet=True)
    if response.status_code != 201:
        raise SystemExit(f"manifest PUT answered {response.status_code}")
else:
    client.pull(target=f"{host}/{target}", outdir=path)
"#;

async fn oras(mode: &str, host: &str, target: &str, creds: Option<(&str, &str)>, path: &Path) -> Result<()> {
    let (user, password) = creds.unwrap_or(("", ""));
    let mut cmd = Command::new(python());
    cmd.args(["-c", ORAS_SCRIPT, mode, host, target, user, password])
        .arg(path)
        .env("NO_PROXY", "127.0.0.1")
        .env("DOCKER_CONFIG", path.parent().unwrap_or(path).join("no-docker-config"));
    run(cmd, CLIENT_DEADLINE).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_pushes_and_pulls_with_credentials_and_fails_without() -> Result<()> {
    require_tool(&python(), &["-c", "import oras.client"]).await?;
    let registry = AuthedRegistry::start().await?;
    let host = registry.host();
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    std::fs::create_dir_all(&src)?;
    write_snapshot(&src, 11)?;

    let refused = oras("push", &host, "team-a/snap:v1", None, &src).await;
    ensure!(refused.is_err(), "oras-py pushed without credentials");
    let refused = oras("push", &host, "team-a/snap:v1", Some(("bob", "bob-pw")), &src).await;
    ensure!(refused.is_err(), "oras-py pushed as pull-only bob");

    oras("push", &host, "team-a/snap:v1", Some(("alice", "alice-pw")), &src).await?;
    oras("pull", &host, "team-a/snap:v1", Some(("bob", "bob-pw")), &dst).await?;
    ensure_same_files(&src, &dst, &snapshot_names())?;
    let anonymous = oras("pull", &host, "team-a/snap:v1", None, &work.path().join("anon")).await;
    ensure!(anonymous.is_err(), "oras-py pulled without credentials");
    Ok(())
}

fn skopeo() -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy").env("NO_PROXY", "127.0.0.1");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_with_credentials_and_fails_without() -> Result<()> {
    require_tool("skopeo", &["--version"]).await?;
    require_tool(&python(), &["-c", "import oras.client"]).await?;
    let registry = AuthedRegistry::start().await?;
    let host = registry.host();
    let work = tempfile::tempdir()?;
    let src = work.path().join("src");
    std::fs::create_dir_all(&src)?;
    write_snapshot(&src, 12)?;
    oras("push", &host, "team-a/snap:v1", Some(("alice", "alice-pw")), &src).await?;
    let layout = work.path().join("layout");
    let layout_ref = format!("oci:{}:v1", layout.display());
    let source = format!("docker://{host}/team-a/snap:v1");

    // Pull: skopeo answers the bearer challenge with --src-creds.
    let mut cmd = skopeo();
    cmd.args([
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-creds",
        "bob:bob-pw",
        &source,
        &layout_ref,
    ]);
    run(cmd, CLIENT_DEADLINE).await?;
    let mut cmd = skopeo();
    cmd.args(["inspect", "--raw", "--tls-verify=false", &source]);
    ensure!(run(cmd, CLIENT_DEADLINE).await.is_err(), "skopeo inspected without credentials");

    // Push: alice may, bob may not.
    let target = format!("docker://{host}/team-a/copy:v1");
    let mut cmd = skopeo();
    cmd.args([
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        "bob:bob-pw",
        &layout_ref,
        &target,
    ]);
    ensure!(run(cmd, CLIENT_DEADLINE).await.is_err(), "skopeo pushed as pull-only bob");
    let mut cmd = skopeo();
    cmd.args([
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:alice-pw",
        &layout_ref,
        &target,
    ]);
    run(cmd, CLIENT_DEADLINE).await?;
    let raw = |reference: String| {
        let mut cmd = skopeo();
        cmd.args(["inspect", "--raw", "--tls-verify=false", "--creds", "bob:bob-pw", &reference]);
        cmd
    };
    let copied = run(raw(target.clone()), CLIENT_DEADLINE).await?.stdout;
    let original = run(raw(source), CLIENT_DEADLINE).await?.stdout;
    ensure!(copied == original, "the copied manifest differs from the original");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_client_pushes_and_pulls_with_a_docker_config() -> Result<()> {
    let registry = AuthedRegistry::start().await?;
    let host = registry.host();
    let work = tempfile::tempdir()?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    std::fs::create_dir_all(&src)?;
    write_snapshot(&src, 13)?;
    let config = |user: &str, password: &str| -> Result<std::path::PathBuf> {
        let path = work.path().join(format!("{user}-config.json"));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        std::fs::write(&path, json!({"auths": {host.clone(): {"auth": auth}}}).to_string())?;
        Ok(path)
    };
    let client = |config: Option<std::path::PathBuf>| -> Result<thaw_client::Registry> {
        let options = thaw_client::ClientOptions {
            plain_http: true,
            docker_config: Some(config.unwrap_or_else(|| work.path().join("none.json"))),
            ..Default::default()
        };
        Ok(thaw_client::Registry::new(&host, &options, Arc::new(thaw_client::Stats::new()))?)
    };
    let reference = thaw_client::Reference::parse(&format!("{host}/team-a/snap:v1"))?;
    let push = |r: thaw_client::Registry| {
        let (reference, src) = (reference.clone(), src.clone());
        async move { thaw_client::push_dir(&r, &reference, &src, &Default::default()).await }
    };

    let refused = push(client(None)?).await;
    ensure!(matches!(refused, Err(thaw_client::Error::Auth { .. })), "anonymous push: {refused:?}");
    let refused = push(client(Some(config("bob", "bob-pw")?))?).await;
    ensure!(refused.is_err(), "bob pushed");
    push(client(Some(config("alice", "alice-pw")?))?).await?;
    let bob = client(Some(config("bob", "bob-pw")?))?;
    thaw_client::pull(&bob, &reference, &dst, &Default::default()).await?;
    ensure_same_files(&src, &dst, &snapshot_names())?;
    let wrong = client(Some(config("bob", "nope")?))?;
    let refused = thaw_client::pull(&wrong, &reference, &work.path().join("x"), &Default::default()).await;
    ensure!(matches!(refused, Err(thaw_client::Error::Auth { .. })), "wrong password: {refused:?}");
    Ok(())
}

/// A node cache publishes its holdings with its own account: the client asks for
/// `registry:nodes:write` after the challenge; other accounts are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_publishes_holdings_with_its_own_credentials() -> Result<()> {
    let registry = AuthedRegistry::start().await?;
    let host = registry.host();
    let as_user = |user: &str, password: &str| -> Result<thaw_client::Registry> {
        let options = thaw_client::ClientOptions {
            plain_http: true,
            credentials: Some(thaw_client::Credentials { username: user.into(), password: password.into() }),
            ..Default::default()
        };
        Ok(thaw_client::Registry::new(&host, &options, Arc::new(thaw_client::Stats::new()))?)
    };
    let holdings: thaw_schema::holdings::NodeHoldings = serde_json::from_value(json!({
        "node": "node-1", "capacityBytes": 1000, "usedBytes": 0, "snapshots": [],
    }))?;
    let refused = as_user("alice", "alice-pw")?.put_node_holdings(&holdings).await;
    ensure!(refused.is_err(), "alice published node holdings");
    let node = as_user("node-1", "node-pw")?;
    node.put_node_holdings(&holdings).await?;
    let directory = node.node_directory().await?;
    ensure!(directory.nodes.len() == 1 && directory.nodes[0].node == "node-1", "directory: {directory:?}");
    let refused = as_user("bob", "bob-pw")?.node_directory().await;
    ensure!(refused.is_err(), "bob read the node directory");
    Ok(())
}
