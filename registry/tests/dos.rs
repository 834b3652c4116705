//! Unauthenticated denial of service (issue 18, finding 4), against the real `thaw-registry`
//! binary over TCP, each attacker on its own loopback source address (127.0.0.2 and up) so
//! per-client limits tell it from the honest client:
//!
//! - slowloris heads, idle keep-alives and stalled request bodies are cut off by the
//!   timeouts while an honest client is served;
//! - a response nobody reads is dropped after the send timeout;
//! - one client holding its per-client in-flight cap cannot starve another;
//! - a flood of bad passwords does not hold up an honest login or honest pulls;
//! - an unknown user is rejected no faster than a known user with a wrong password.
//!
//! Limits are set through `THAW_*` variables, which a binary without them ignores.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::{Client, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The binary, run as a child process with its own storage directory.
struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the binary with `env` and, with `htpasswd` (lines `user:hash`), auth on:
    /// every user may push and pull `team/*`.
    async fn start(env: &[(&str, &str)], htpasswd: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_thaw-registry"));
        command.args(["--listen", &addr.to_string(), "--storage"]).arg(dir.path().join("storage"));
        if let Some(users) = htpasswd {
            std::fs::write(dir.path().join("htpasswd"), users).unwrap();
            let config = serde_json::json!({
                "htpasswd": "htpasswd",
                "grants": [{"user": "*", "repository": "team/*", "actions": ["pull", "push"]}],
            });
            std::fs::write(dir.path().join("auth.json"), config.to_string()).unwrap();
            command.arg("--auth-config").arg(dir.path().join("auth.json"));
        }
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = command
            .env("THAW_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn thaw-registry");
        let mut me = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(me.child.try_wait().unwrap().is_none(), "thaw-registry exited early: {}", me.log());
            assert!(Instant::now() < deadline, "thaw-registry never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        me
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes `bytes` as a blob of `repo` in one request; answers its digest.
    async fn push_blob(&self, client: &Client, repo: &str, bytes: &[u8], authz: Option<&str>) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let mut req = client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec());
        if let Some(a) = authz {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("push blob");
        assert_eq!(resp.status(), StatusCode::CREATED, "push {repo}: {}", resp.text().await.unwrap());
        digest
    }

    /// Starts an upload session from `client`; answers its absolute URL.
    async fn start_upload(&self, client: &Client, repo: &str) -> String {
        let resp = client.post(self.url(&format!("/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        if location.starts_with("http") {
            location
        } else {
            self.url(&location)
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_from(source: &str) -> Client {
    Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A raw TCP connection to `addr` leaving from `source`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    socket.connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection (or resets it); answers the bytes read and
/// when it closed, or `None` when it was still open after `patience`.
async fn until_closed(stream: &mut TcpStream, patience: Duration) -> Option<(Vec<u8>, Instant)> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(patience, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| (got, Instant::now()))
}

/// A PATCH to `upload` (a URL) declaring `declared` body bytes and sending `sent` of them.
async fn stalled_patch(
    source: &str,
    addr: SocketAddr,
    upload: &str,
    declared: usize,
    sent: usize,
) -> TcpStream {
    let path = upload.split_once(&addr.to_string()).map_or(upload, |(_, p)| p);
    let mut stream = connect_from(source, addr).await;
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![7u8; sent]).await.unwrap();
    stream
}

/// GET /v2/ and a blob read back from the honest client: both must succeed.
async fn honest_round(r: &Registry, honest: &Client, repo: &str, digest: &str, bytes: &[u8]) {
    let resp = honest.get(r.url("/v2/")).send().await.expect("honest GET /v2/");
    assert_eq!(resp.status(), StatusCode::OK, "honest GET /v2/");
    let resp =
        honest.get(r.url(&format!("/v2/{repo}/blobs/{digest}"))).send().await.expect("honest blob GET");
    assert_eq!(resp.status(), StatusCode::OK, "honest blob GET");
    assert_eq!(&resp.bytes().await.unwrap()[..], bytes, "honest blob bytes");
}

#[tokio::test]
async fn slowloris_idle_and_stalled_bodies_are_cut_off_while_an_honest_client_is_served() {
    let r = Registry::start(&[("THAW_HEADER_TIMEOUT", "1s"), ("THAW_BODY_TIMEOUT", "1s")], None).await;
    let honest = client_from("127.0.0.1");
    let blob = b"honest bytes".repeat(1000);
    let digest = r.push_blob(&honest, "dos/honest", &blob, None).await;
    let attacker = client_from("127.0.0.2");
    let upload = r.start_upload(&attacker, "dos/stall").await;

    let started = Instant::now();
    // Slowloris: a header line every 200 ms, never the blank line that ends the head.
    let mut loris = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.2", r.addr).await;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        loris.push(s);
    }
    let dribbling = Arc::new(AtomicBool::new(true));
    let (readers, writers): (Vec<_>, Vec<_>) = loris.into_iter().map(|s| s.into_split()).unzip();
    let dribble = tokio::spawn({
        let dribbling = dribbling.clone();
        async move {
            let mut writers = writers;
            while dribbling.load(Ordering::Relaxed) {
                for w in &mut writers {
                    let _ = w.write_all(b"X-Slow: y\r\n").await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    // Idle: connects and sends nothing.
    let mut idle = connect_from("127.0.0.2", r.addr).await;
    // A body that stops after 1,000 of 1,000,000 declared bytes.
    let mut stalled = stalled_patch("127.0.0.2", r.addr, &upload, 1_000_000, 1_000).await;

    // The honest client is served meanwhile.
    for _ in 0..5 {
        honest_round(&r, &honest, "dos/honest", &digest, &blob).await;
    }

    let patience = Duration::from_secs(10);
    for (i, mut reader) in readers.into_iter().enumerate() {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(patience, async {
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "slowloris connection {i} was still open after {patience:?}");
    }
    dribbling.store(false, Ordering::Relaxed);
    dribble.await.unwrap();
    assert!(until_closed(&mut idle, patience).await.is_some(), "an idle connection was still open");
    let (answer, _) =
        until_closed(&mut stalled, patience).await.expect("a stalled body still held its request");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "a stalled body is refused, not accepted: {answer}"
    );
    // 1 s timeouts: everything above closed long before the old code's (none) would have;
    // the bound is loose because this machine is shared.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    honest_round(&r, &honest, "dos/honest", &digest, &blob).await;
}

#[tokio::test]
async fn a_response_nobody_reads_is_dropped_after_the_send_timeout() {
    let r = Registry::start(&[("THAW_SEND_TIMEOUT", "1s")], None).await;
    let honest = client_from("127.0.0.1");
    // Incompressible, so the blob is far larger than every socket buffer on the way.
    let mut blob = vec![0u8; 24 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let digest = r.push_blob(&honest, "dos/big", &blob, None).await;

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut reader = socket.connect(r.addr).await.unwrap();
    let request = format!("GET /v2/dos/big/blobs/{digest} HTTP/1.1\r\nHost: {}\r\n\r\n", r.addr);
    reader.write_all(request.as_bytes()).await.unwrap();
    // Read nothing for well past the send timeout, then read what is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (got, _) =
        until_closed(&mut reader, Duration::from_secs(30)).await.expect("the response never ended");
    assert!(
        got.len() < blob.len(),
        "a client that read nothing for 4 s still got the whole {} byte response ({} bytes)",
        blob.len(),
        got.len()
    );
    let resp = honest.get(r.url(&format!("/v2/dos/big/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), blob.len(), "a reading client gets it all");
}

#[tokio::test]
async fn a_client_holding_its_cap_cannot_starve_another() {
    let r = Registry::start(
        &[
            ("THAW_MAX_INFLIGHT", "8"),
            ("THAW_MAX_INFLIGHT_PER_CLIENT", "4"),
            ("THAW_INFLIGHT_WAIT_MS", "500"),
            ("THAW_BODY_TIMEOUT", "120s"),
        ],
        None,
    )
    .await;
    let honest = client_from("127.0.0.3");
    let blob = b"still served".repeat(100);
    let digest = r.push_blob(&honest, "dos/honest", &blob, None).await;
    let attacker = client_from("127.0.0.2");
    let mut uploads = Vec::new();
    for _ in 0..12 {
        uploads.push(r.start_upload(&attacker, "dos/hog").await);
    }
    // Twelve requests whose bodies never finish: each holds a slot while its handler waits.
    let mut held = Vec::new();
    for upload in &uploads {
        held.push(stalled_patch("127.0.0.2", r.addr, upload, 1_000_000, 100).await);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..10 {
        honest_round(&r, &honest, "dos/honest", &digest, &blob).await;
    }
    // The attacker's requests past its own cap were the ones refused.
    let mut refused = 0;
    for stream in &mut held {
        let mut buf = [0u8; 12];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            refused += usize::from(buf[..n].starts_with(b"HTTP/1.1 503"));
        }
    }
    assert_eq!(refused, 12 - 4, "requests past the attacker's cap of 4 get 503");
}

/// `Basic` credentials.
fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::test]
async fn a_bad_password_flood_does_not_hold_up_honest_logins_or_pulls() {
    // bcrypt cost 11 (~0.1 s a check): 64 at once is seconds of CPU on a small machine.
    let users: Vec<String> = ["alice", "bob", "carol", "dave"]
        .iter()
        .map(|u| format!("{u}:{}\n", bcrypt::hash(format!("{u}-pw"), 11).unwrap()))
        .collect();
    let r = Registry::start(&[("THAW_MAX_INFLIGHT_PER_CLIENT", "4")], Some(&users.concat())).await;
    let honest = client_from("127.0.0.1");
    let login = |user: &'static str| {
        let (honest, url) = (honest.clone(), r.url("/v2/"));
        async move {
            let started = Instant::now();
            let resp =
                honest.get(url).header("authorization", basic(user, &format!("{user}-pw"))).send().await;
            assert_eq!(resp.unwrap().status(), StatusCode::OK, "{user} logs in");
            started.elapsed()
        }
    };
    let quiet = login("alice").await;
    let blob = b"team bytes".repeat(100);
    let alice = basic("alice", "alice-pw");
    let digest = r.push_blob(&honest, "team/app", &blob, Some(&alice)).await;

    let flooding = Arc::new(AtomicBool::new(true));
    let refusals = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for i in 0..64 {
        let (flooding, refusals, url) = (flooding.clone(), refusals.clone(), r.url("/v2/team/app/tags/list"));
        let attacker = client_from("127.0.0.2");
        flood.push(tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                let authz = basic("alice", &format!("guess-{i}"));
                if let Ok(resp) = attacker.get(&url).header("authorization", authz).send().await {
                    assert_ne!(resp.status(), StatusCode::OK, "a wrong password let the attacker in");
                    refusals.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut under_flood = Vec::new();
    for user in ["bob", "carol", "dave"] {
        under_flood.push(login(user).await);
    }
    for _ in 0..20 {
        let resp = honest
            .get(r.url(&format!("/v2/team/app/blobs/{digest}")))
            .header("authorization", &alice)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "alice pulls under the flood");
    }
    flooding.store(false, Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    let under_flood = median(under_flood);
    assert!(refusals.load(Ordering::Relaxed) > 0, "the flood was answered");
    // An uncached login waits at most for the attacker's few admitted checks.
    assert!(
        under_flood < quiet * 8 + Duration::from_secs(2),
        "an honest login took {under_flood:?} under the flood, {quiet:?} without"
    );
}

#[tokio::test]
async fn credentials_that_cannot_be_checked_in_time_get_a_retryable_503_not_a_401() {
    // One credential thread, given up on after 1 s, and an attacker whose single wrong
    // password for "slow" (bcrypt cost 15: seconds of a core) holds that thread for longer.
    let users = format!(
        "alice:{}\nslow:{}\n",
        bcrypt::hash("alice-pw", 4).unwrap(),
        bcrypt::hash("slow-pw", 15).unwrap()
    );
    let r =
        Registry::start(&[("THAW_CREDENTIAL_THREADS", "1"), ("THAW_CREDENTIAL_WAIT", "1s")], Some(&users))
            .await;
    let attacker = client_from("127.0.0.2");
    let url = r.url("/v2/team/app/tags/list");
    let guess = tokio::spawn(async move {
        let resp = attacker.get(url).header("authorization", basic("slow", "guess")).send().await.unwrap();
        assert_ne!(resp.status(), StatusCode::OK, "a wrong password let the attacker in");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Alice's right password, never checked before, on a request and at the token endpoint:
    // nothing is known about it yet, so the answer must be one a client retries.
    let honest = client_from("127.0.0.1");
    let alice = basic("alice", "alice-pw");
    let (request, token) = tokio::join!(
        honest.get(r.url("/v2/team/app/tags/list")).header("authorization", &alice).send(),
        honest
            .get(r.url("/v2/_thaw/token?scope=repository:team/app:pull"))
            .header("authorization", &alice)
            .send(),
    );
    for (what, resp) in [("a request", request.unwrap()), ("the token endpoint", token.unwrap())] {
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{what} while the checks are busy");
        assert!(resp.headers().contains_key("retry-after"), "{what}: {:?}", resp.headers());
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{what}: {body}");
    }

    // Once the attacker's check is done, the same credentials get in (the 503 was only
    // about the queue).
    guess.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp =
            honest.get(r.url("/v2/team/app/tags/list")).header("authorization", &alice).send().await.unwrap();
        if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
            // No tags pushed: 404 NAME_UNKNOWN, past authentication.
            assert_ne!(resp.status(), StatusCode::UNAUTHORIZED, "alice's password refused");
            break;
        }
        assert!(Instant::now() < deadline, "credential checks still busy a minute after the attack");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn unknown_users_are_rejected_no_faster_than_known_ones() {
    let users = format!("alice:{}\n", bcrypt::hash("alice-pw", 10).unwrap());
    let r = Registry::start(&[], Some(&users)).await;
    let c = client_from("127.0.0.1");
    let attempt = |user: String, password: String| {
        let (c, url) = (c.clone(), r.url("/v2/"));
        async move {
            let started = Instant::now();
            let resp = c.get(url).header("authorization", basic(&user, &password)).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            started.elapsed()
        }
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..15 {
        known.push(attempt("alice".into(), format!("wrong-{i}")).await);
        unknown.push(attempt(format!("nobody-{i}"), format!("wrong-{i}")).await);
    }
    let (known, unknown) = (median(known), median(unknown));
    let ratio = known.max(unknown).as_secs_f64() / known.min(unknown).as_secs_f64();
    assert!(ratio < 3.0, "median rejection: known user {known:?}, unknown user {unknown:?}");
}
