//! `thaw cache …`: the node cache's local API (thaw-node-cache) for operators and scripts.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};
use thaw_client::{Error, Result};

use super::progress::human_bytes;

/// Node cache operations.
#[derive(Debug, Subcommand)]
pub(super) enum CacheCommand {
    /// Make a snapshot present on this node and lease it; prints its files.
    Ensure {
        /// Reference, e.g. `localhost:5000/functions/hello:rev-1`.
        reference: String,
    },
    /// End a lease (by id, or the oldest lease of --reference).
    Release {
        /// The lease id `ensure` printed.
        lease: Option<String>,
        /// End the oldest lease of this reference instead.
        #[arg(long, value_name = "REF")]
        reference: Option<String>,
    },
    /// Extend a lease by the cache's lease TTL (`--lease-ttl`, default 10 minutes) from now;
    /// a lease not renewed in time is released by the cache itself.
    Renew {
        /// The lease id `ensure` printed.
        lease: String,
    },
    /// Fetch a snapshot in the background, without a lease.
    Prefetch {
        /// Reference.
        reference: String,
    },
    /// Push a snapshot this node just created, to the cache's own registry; the directory
    /// must be under the cache's `--publish-root`.
    Publish {
        /// Where to push it.
        reference: String,
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// List the cached snapshots.
    List,
    /// Verify every cached snapshot now and drop damaged ones.
    Scrub,
}

/// Runs one command against the cache at `base` (`http://host:port`).
pub(super) async fn run(base: &str, command: CacheCommand, json_out: bool) -> Result<()> {
    let (method, path, body) = match &command {
        CacheCommand::Ensure { reference } => {
            ("POST", "/v1/snapshots/ensure", json!({ "reference": reference }))
        }
        CacheCommand::Release { lease, reference } => {
            if lease.is_none() && reference.is_none() {
                return Err(Error::Usage("cache release needs a LEASE or --reference REF".into()));
            }
            let mut body = json!({});
            if let Some(l) = lease {
                body["lease"] = json!(l);
            }
            if let Some(r) = reference {
                body["reference"] = json!(r);
            }
            ("POST", "/v1/snapshots/release", body)
        }
        CacheCommand::Renew { lease } => ("POST", "/v1/snapshots/renew", json!({ "lease": lease })),
        CacheCommand::Prefetch { reference } => {
            ("POST", "/v1/snapshots/prefetch", json!({ "reference": reference }))
        }
        CacheCommand::Publish { reference, dir } => {
            let dir =
                std::path::absolute(dir).map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
            ("POST", "/v1/snapshots/publish", json!({ "reference": reference, "dir": dir }))
        }
        CacheCommand::List => ("GET", "/v1/snapshots", Value::Null),
        CacheCommand::Scrub => ("POST", "/v1/scrub", json!({})),
    };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let op = format!("{method} {url}");
    let http = reqwest::Client::new();
    let request = if method == "GET" { http.get(&url) } else { http.post(&url).json(&body) };
    let response = request.send().await.map_err(|source| Error::Transport { op: op.clone(), source })?;
    let status = response.status();
    let text = response.text().await.map_err(|source| Error::Transport { op: op.clone(), source })?;
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let code = answer["error"]["code"].as_str().unwrap_or("?");
        let message = answer["error"]["message"].as_str().map_or_else(|| answer.to_string(), str::to_owned);
        return Err(Error::Snapshot(format!("{op}: the node cache answered {status} {code}: {message}")));
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&answer).expect("serializes"));
        return Ok(());
    }
    match command {
        CacheCommand::Ensure { .. } => {
            let b = &answer["bytes"];
            eprintln!(
                "{} {} in {} ms: {} local, {} from peers, {} from the registry",
                answer["digest"].as_str().unwrap_or("?"),
                if answer["hit"] == true { "cached" } else { "materialized" },
                answer["millis"],
                human_bytes(b["local"].as_u64().unwrap_or(0)),
                human_bytes(b["peers"].as_u64().unwrap_or(0)),
                human_bytes(b["registry"].as_u64().unwrap_or(0)),
            );
            println!("lease\t{}", answer["lease"].as_str().unwrap_or("?"));
            println!("lease_expires_ms\t{}", answer["lease_expires_ms"]);
            if let Some(files) = answer["files"].as_object() {
                for (role, path) in files {
                    println!("{role}\t{}", path.as_str().unwrap_or("?"));
                }
            }
        }
        CacheCommand::List => {
            println!(
                "used {} of {}",
                human_bytes(answer["used_bytes"].as_u64().unwrap_or(0)),
                human_bytes(answer["capacity_bytes"].as_u64().unwrap_or(0))
            );
            for s in answer["snapshots"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{} leases\t{}",
                    s["digest"].as_str().unwrap_or("?"),
                    human_bytes(s["allocated_bytes"].as_u64().unwrap_or(0)),
                    s["leases"],
                    s["references"].as_array().and_then(|r| r.first()).and_then(Value::as_str).unwrap_or("")
                );
            }
        }
        _ => println!("{answer}"),
    }
    Ok(())
}
