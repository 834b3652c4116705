//! Distributed MinIO under two thaw-registry replicas, with one MinIO process killed in the
//! middle of pushes and pulls by the real `thaw` binary.
//!
//! Four `minio server` processes on loopback, two drives each, form one erasure set of
//! eight drives (MinIO's default parity for it, EC:4). A TCP balancer in this test spreads
//! S3 connections over the four, as a load balancer in front of a MinIO cluster does, and
//! skips a node that refuses connections. Two registry replicas store into one bucket
//! prefix through it. While `thaw push` (alternating replicas) and `thaw pull` (from the
//! other replica) run, node 2 is SIGKILLed, pushes and pulls go on without it, and it is
//! started again. The test shows that every acknowledged push is there afterwards,
//! byte-identical through both replicas; that every client error during the outage was a
//! retryable one (503) and its retry succeeded; and that MinIO healed: every object the
//! replicas wrote while node 2 was down is on node 2's drives again.

mod common;
#[path = "../../registry/tests/common/minio.rs"]
#[allow(dead_code, unreachable_pub)]
mod minio;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use minio::{list_keys, unique_prefix, MinioCluster};
use serde_json::Value;
use thaw_registry::{RegistryConfig, RunningRegistry};
use tokio::net::{TcpListener, TcpStream};

const NODES: usize = 4;
const DRIVES_PER_NODE: usize = 2;
/// The node killed in the middle of the run.
const VICTIM: usize = 2;
const REVISIONS: usize = 8;

/// Spreads TCP connections round-robin over `nodes`, skipping a node that refuses or that
/// its health check has taken out of rotation, as a load balancer in front of MinIO does
/// (MinIO's deployment guide puts its health checks there: a node that has just started
/// answers before it sees its peers again, and then answers 404 for objects written while
/// it was away).
struct Balancer {
    addr: SocketAddr,
    in_rotation: Arc<Vec<AtomicBool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(nodes: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let in_rotation: Arc<Vec<AtomicBool>> =
            Arc::new(nodes.iter().map(|_| AtomicBool::new(true)).collect());
        let rotation = in_rotation.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (nodes, first) = (nodes.clone(), next.fetch_add(1, Ordering::Relaxed));
                let rotation = rotation.clone();
                tokio::spawn(async move {
                    for i in 0..nodes.len() {
                        let n = (first + i) % nodes.len();
                        if !rotation[n].load(Ordering::SeqCst) {
                            continue;
                        }
                        let target = nodes[n];
                        let connect =
                            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(target));
                        if let Ok(Ok(mut server)) = connect.await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, in_rotation, task }
    }

    /// Takes node `n` out of rotation or puts it back (what a failed or passed health
    /// check does).
    fn set_in_rotation(&self, n: usize, on: bool) {
        self.in_rotation[n].store(on, Ordering::SeqCst);
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `thaw --plain-http --json <args>`: its JSON report, or its stderr when it failed.
fn thaw(args: &[&str]) -> Result<Value, String> {
    let (command, rest) = args.split_first().expect("a subcommand");
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .env("DOCKER_CONFIG", "/nonexistent/thaw-test")
        .env_remove("THAW_REGISTRY")
        .env_remove("THAW_CACHE")
        .args([command, "--plain-http", "--json", "--quiet"])
        .args(rest)
        .output()
        .expect("run thaw");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("{}: {stderr}", out.status));
    }
    Ok(serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("thaw {args:?}: JSON report: {e}\n{stderr}")))
}

/// A client error a caller may retry: the registry said 503 (S3 unavailable).
fn is_retryable(err: &str) -> bool {
    err.contains("registry answered 503")
}

/// Revision `n`: its own memory image (sharing the pool pages every snapshot has), disk
/// and info.
fn revision(n: usize) -> SnapshotData {
    SnapshotData::new(1024, 512, 0xd157 + n as u64)
}

/// What happened to one push or pull while the run went on.
#[derive(Default)]
struct Log {
    /// Acknowledged pushes: (revision, digest, replica).
    acked: Vec<(usize, String, usize)>,
    /// Client errors seen (all retried until they succeeded).
    errors: Vec<String>,
    /// Pulls that came back byte-identical during the run.
    pulls: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_pulls_survive_a_minio_node_dying_and_healing() {
    let started = Instant::now();
    let mut cluster = tokio::task::block_in_place(|| MinioCluster::start(NODES, DRIVES_PER_NODE));
    eprintln!("distributed MinIO up in {:.1} s", started.elapsed().as_secs_f64());
    let nodes: Vec<SocketAddr> = (0..cluster.node_count()).map(|n| cluster.s3_addr(n)).collect();
    let balancer = Balancer::start(nodes).await;
    for (k, v) in cluster.env_for(&balancer.endpoint()) {
        std::env::set_var(k, v);
    }
    std::env::remove_var("AWS_SESSION_TOKEN");

    let prefix = unique_prefix("distributed");
    let storage = cluster.storage_url(&prefix);
    let replicas: Vec<RunningRegistry> = vec![
        thaw_registry::spawn(RegistryConfig::new("127.0.0.1:0".parse().unwrap(), &storage)).await.unwrap(),
        thaw_registry::spawn(RegistryConfig::new("127.0.0.1:0".parse().unwrap(), &storage)).await.unwrap(),
    ];
    let hosts: Vec<String> = replicas.iter().map(|r| r.addr().to_string()).collect();

    let work = tempfile::tempdir().unwrap();
    let revisions: Arc<Vec<SnapshotData>> = Arc::new((0..REVISIONS).map(revision).collect());
    let dirs: Vec<PathBuf> = (0..REVISIONS).map(|n| work.path().join(format!("rev{n}"))).collect();
    for (data, dir) in revisions.iter().zip(&dirs) {
        data.write(dir);
    }
    let reference = |replica: usize, n: usize| format!("{}/functions/ha:rev-{n}", hosts[replica]);
    let log = Arc::new(Mutex::new(Log::default()));

    // The pusher: every revision in turn, alternating replicas, each retried until it is
    // acknowledged (a client that gets a retryable error retries).
    let pusher = {
        let (log, dirs) = (log.clone(), dirs.clone());
        let refs: Vec<(usize, String)> = (0..REVISIONS).map(|n| (n % 2, reference(n % 2, n))).collect();
        std::thread::spawn(move || {
            for (n, (replica, r)) in refs.iter().enumerate() {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match thaw(&["push", r, dirs[n].to_str().unwrap()]) {
                        Ok(report) => {
                            let digest = report["digest"].as_str().expect("digest").to_owned();
                            log.lock().unwrap().acked.push((n, digest, *replica));
                            break;
                        }
                        Err(e) => {
                            assert!(is_retryable(&e), "push of revision {n} failed for good: {e}");
                            assert!(Instant::now() < deadline, "push of revision {n} kept failing: {e}");
                            log.lock().unwrap().errors.push(format!("push {n}: {e}"));
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            }
        })
    };
    // The puller: the newest acknowledged revision, from the replica it was not pushed to,
    // compared byte for byte, until the pusher is done.
    let puller = {
        let (log, revisions, work) = (log.clone(), revisions.clone(), work.path().to_owned());
        let refs: Vec<Vec<String>> = (0..REVISIONS).map(|n| vec![reference(0, n), reference(1, n)]).collect();
        let pusher_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = pusher_done.clone();
        let handle = std::thread::spawn(move || {
            let mut round = 0usize;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let newest =
                    log.lock().unwrap().acked.last().map(|(n, d, replica)| (*n, d.clone(), *replica));
                if let Some((n, digest, replica)) = newest {
                    let out = work.join(format!("pull-{round}"));
                    match thaw(&["pull", &refs[n][1 - replica], out.to_str().unwrap()]) {
                        Ok(report) => {
                            assert_eq!(report["digest"].as_str(), Some(digest.as_str()), "revision {n}");
                            assert_same_files(&revisions[n], &out);
                            log.lock().unwrap().pulls += 1;
                        }
                        Err(e) => {
                            assert!(is_retryable(&e), "pull of revision {n} failed for good: {e}");
                            log.lock().unwrap().errors.push(format!("pull {n}: {e}"));
                        }
                    }
                    let _ = std::fs::remove_dir_all(&out);
                    round += 1;
                }
                if finished {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        (handle, pusher_done)
    };

    // The fault: kill a node once two pushes are acknowledged, keep it down for two more,
    // then start it again while pushes and pulls go on.
    let acked = |log: &Mutex<Log>| log.lock().unwrap().acked.len();
    let wait_for_acks = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked(&log) < want && !pusher.is_finished() {
            assert!(Instant::now() < deadline, "pushes stalled at {} acknowledged", acked(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    tokio::task::block_in_place(|| wait_for_acks(2));
    let killed_at = acked(&log);
    cluster.stop(VICTIM);
    // Connections to it are refused from here on; its health check fails too, and keeps it
    // out of rotation until it passes again.
    balancer.set_in_rotation(VICTIM, false);
    let outage = Instant::now();
    eprintln!("killed MinIO node {VICTIM} after {killed_at} acknowledged pushes");
    tokio::task::block_in_place(|| wait_for_acks(killed_at + 2));
    let written_without_victim = acked(&log) - killed_at;
    tokio::task::block_in_place(|| {
        cluster.start_again(VICTIM);
        // The balancer's health check: MinIO's cluster health answers 200 on a node once it
        // has write quorum again.
        let deadline = Instant::now() + Duration::from_secs(120);
        while cluster.cluster_health(VICTIM) != Some(200) {
            assert!(Instant::now() < deadline, "node {VICTIM} never reported a healthy cluster");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    balancer.set_in_rotation(VICTIM, true);
    eprintln!(
        "restarted node {VICTIM} after {:.1} s down; {written_without_victim} pushes acknowledged meanwhile",
        outage.elapsed().as_secs_f64()
    );
    tokio::task::block_in_place(|| pusher.join()).expect("pusher");
    puller.1.store(true, Ordering::SeqCst);
    tokio::task::block_in_place(|| puller.0.join()).expect("puller");

    let log = Arc::try_unwrap(log).ok().expect("threads done").into_inner().unwrap();
    assert_eq!(log.acked.len(), REVISIONS, "every revision acknowledged");
    assert!(written_without_victim >= 1, "some pushes ran while node {VICTIM} was down");
    assert!(log.pulls >= 2, "pulls ran during the run: {}", log.pulls);

    // MinIO healed node 2: every object under the prefix is on both of its drives again.
    let bucket = cluster.client(0);
    let keys = list_keys(bucket.as_ref(), &prefix).await;
    assert!(!keys.is_empty());
    let drives = cluster.drive_dirs(VICTIM);
    let heal_started = Instant::now();
    let healed_after;
    let missing = |keys: &[String]| -> Vec<String> {
        keys.iter()
            .filter(|k| drives.iter().any(|d| !d.join(minio::BUCKET).join(k).join("xl.meta").is_file()))
            .cloned()
            .collect()
    };
    loop {
        let left = missing(&keys);
        if left.is_empty() {
            healed_after = heal_started.elapsed();
            break;
        }
        assert!(
            // Generous: healing is MinIO's work, paced by its scanner on a shared machine.
            heal_started.elapsed() < Duration::from_secs(120),
            "{} of {} objects still missing on node {VICTIM}'s drives after 120 s, e.g. {:?}",
            left.len(),
            keys.len(),
            &left[..left.len().min(3)]
        );
        // A read that finds shards missing queues the object for healing, as the registry's
        // own reads would; the background MRF healer gets the rest.
        for k in &left {
            let _ = bucket.get(&object_store::path::Path::from(k.as_str())).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nothing acknowledged was lost (checked once MinIO has healed; while it heals clients
    // see only retryable errors, checked above): every revision, through both replicas, byte-identical,
    // with node 2 back (and through a cold replica that only knows the bucket).
    let cold =
        thaw_registry::spawn(RegistryConfig::new("127.0.0.1:0".parse().unwrap(), &storage)).await.unwrap();
    let cold_host = cold.addr().to_string();
    tokio::task::block_in_place(|| {
        for (n, digest, _) in &log.acked {
            for host in hosts.iter().chain([&cold_host]) {
                let out = work.path().join(format!("verify-{n}-{host}"));
                let report = thaw(&["pull", &format!("{host}/functions/ha:rev-{n}"), out.to_str().unwrap()])
                    .unwrap_or_else(|e| panic!("pull of acknowledged revision {n} from {host}: {e}"));
                assert_eq!(report["digest"].as_str(), Some(digest.as_str()));
                assert_same_files(&revisions[*n], &out);
                std::fs::remove_dir_all(&out).unwrap();
            }
        }
    });

    eprintln!(
        "{} objects on node {VICTIM}'s drives {:.1} s after the run ended; {} pulls during the \
         run; {} retryable client errors, all retried: {:?}; total {:.1} s",
        keys.len(),
        healed_after.as_secs_f64(),
        log.pulls,
        log.errors.len(),
        log.errors,
        started.elapsed().as_secs_f64()
    );

    cold.shutdown().await;
    for r in replicas {
        r.shutdown().await;
    }
    drop(balancer);
    tokio::task::block_in_place(|| drop(cluster));
}
