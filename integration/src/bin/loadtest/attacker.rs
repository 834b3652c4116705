//! The load test's attacker (issue 18): runs beside the honest clients for the second half
//! of the run, each part from its own loopback address so the registry's per-client limits
//! see four more clients:
//!
//! - 127.0.0.2, slow readers: an authenticated blob GET that reads 1 KiB every 2 s through
//!   a 4 KiB receive buffer, holding its request slot as long as it can;
//! - 127.0.0.3, slowloris: connections that send a request head one header line every 2 s;
//! - 127.0.0.4, bad passwords: `Basic` guesses for the registry's one user, as fast as they
//!   are answered (none may get in);
//! - 127.0.0.5, amplification: a tenant uploads one 4 MiB chunk of a repeated byte (a few
//!   hundred bytes compressed), then commits recipes naming it thousands of times under
//!   made-up digests (each must be refused with a 4xx).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use thaw_schema::batch::BatchWriter;
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::digest::{ChunkId, Sha256Digest};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::recipe::{Recipe, RecipeEntry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::report::{ms, percentile};
use crate::{PASSWORD, USER};

const SLOW_READERS: usize = 32;
const SLOWLORIS: usize = 128;
const GUESSERS: usize = 16;
/// The amplification chunk: the largest a chunk may be.
const CHUNK_LEN: u32 = 4 << 20;
/// Pause between a slow reader's reads and a slowloris connection's header lines.
const DRIP: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Counts {
    slow_requests: AtomicU64,
    slow_cut: AtomicU64,
    slow_bytes: AtomicU64,
    loris_opened: AtomicU64,
    loris_cut: AtomicU64,
    guesses: AtomicU64,
    guesses_refused: AtomicU64,
    guesses_busy: AtomicU64,
    guesses_admitted: AtomicU64,
    amplifications: AtomicU64,
    amplifications_4xx: AtomicU64,
    /// Answers to amplification recipes that were not 4xx (each a failure), and errors.
    unexpected: Mutex<Vec<String>>,
    amplification_ms: Mutex<Vec<Duration>>,
}

/// What the attacker did and how the registry answered.
pub(crate) struct Report {
    counts: Arc<Counts>,
    amplification_entries: u32,
}

impl Report {
    /// No bad password got in and every amplification recipe was refused with a 4xx.
    pub(crate) fn held(&self) -> bool {
        self.counts.guesses_admitted.load(Relaxed) == 0 && self.counts.unexpected.lock().unwrap().is_empty()
    }

    /// The report section: manifest GET latencies before and during the attack, then what
    /// each part of the attacker saw.
    pub(crate) fn markdown(&self, quiet: &[Duration], attacked: &[Duration]) -> String {
        let c = &self.counts;
        let row = |label: &str, l: &[Duration]| {
            let mut l = l.to_vec();
            l.sort();
            format!(
                "| {label} | {} | {} | {} | {} | {} |\n",
                l.len(),
                ms(percentile(&l, 50.0)),
                ms(percentile(&l, 95.0)),
                ms(percentile(&l, 99.0)),
                ms(l.last().copied().unwrap_or_default())
            )
        };
        let mut amp = c.amplification_ms.lock().unwrap().clone();
        amp.sort();
        let mut md = String::from(
            "\n#### With a concurrent attacker (second half of the run)\n\n\
             | Manifest GET | Count | p50 ms | p95 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n",
        );
        md.push_str(&row("before the attack", quiet));
        md.push_str(&row("during the attack", attacked));
        md.push_str(&format!(
            "\n- Slow readers ({SLOW_READERS}, from 127.0.0.2, 1 KiB every {} s): {} requests, {} cut off by the \
             registry, {:.1} MiB read\n\
             - Slowloris ({SLOWLORIS} connections, from 127.0.0.3, a header line every {} s): {} opened, {} closed \
             by the registry\n\
             - Bad passwords ({GUESSERS} loops, from 127.0.0.4): {} guesses, {} refused with 401, {} with 503/429, \
             **{} let in**\n\
             - Amplification recipes (from 127.0.0.5, {} entries naming one 4 MiB chunk, {:.0} GiB declared): {} sent, \
             {} refused with 4xx, answered in p50 {} ms, max {} ms\n",
            DRIP.as_secs(),
            c.slow_requests.load(Relaxed),
            c.slow_cut.load(Relaxed),
            c.slow_bytes.load(Relaxed) as f64 / f64::from(1 << 20),
            DRIP.as_secs(),
            c.loris_opened.load(Relaxed),
            c.loris_cut.load(Relaxed),
            c.guesses.load(Relaxed),
            c.guesses_refused.load(Relaxed),
            c.guesses_busy.load(Relaxed),
            c.guesses_admitted.load(Relaxed),
            self.amplification_entries,
            f64::from(self.amplification_entries) * f64::from(CHUNK_LEN) / f64::from(1 << 30),
            c.amplifications.load(Relaxed),
            c.amplifications_4xx.load(Relaxed),
            ms(percentile(&amp, 50.0)),
            ms(amp.last().copied().unwrap_or_default()),
        ));
        for u in c.unexpected.lock().unwrap().iter().take(10) {
            md.push_str(&format!("  - unexpected: {u}\n"));
        }
        md
    }
}

/// The `Authorization` value of `Basic` credentials for the registry's user.
fn basic(password: &str) -> String {
    let request = reqwest::Client::new().get("http://localhost/").basic_auth(USER, Some(password)).build();
    let request = request.expect("a request to a fixed URL builds");
    request.headers()["authorization"].to_str().expect("base64 is ASCII").to_owned()
}

/// Attacks `host` from `from` until `until`; `repository` holds `blob` (the slow readers'
/// target).
pub(crate) async fn run(
    host: String,
    repository: String,
    blob: Option<Sha256Digest>,
    amplification_entries: u32,
    from: Instant,
    until: Instant,
) -> Report {
    tokio::time::sleep_until(from.into()).await;
    eprintln!("attacker starts");
    let counts = Arc::new(Counts::default());
    let addr: SocketAddr = host.parse().expect("the registry listens on an IP address");
    let mut tasks = Vec::new();
    if let Some(blob) = blob {
        let request = format!(
            "GET /v2/{repository}/blobs/{blob} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\n\r\n",
            basic(PASSWORD)
        );
        for _ in 0..SLOW_READERS {
            tasks.push(tokio::spawn(slow_reader(addr, request.clone(), counts.clone(), until)));
        }
    }
    for _ in 0..SLOWLORIS {
        tasks.push(tokio::spawn(slowloris(addr, counts.clone(), until)));
    }
    for i in 0..GUESSERS {
        let url = format!("http://{host}/v2/{repository}/tags/list");
        tasks.push(tokio::spawn(guesser(i, url, counts.clone(), until)));
    }
    tasks.push(tokio::spawn(amplifier(host.clone(), amplification_entries, counts.clone(), until)));
    for t in tasks {
        let _ = t.await;
    }
    Report { counts, amplification_entries }
}

async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind(SocketAddr::new(source.parse().expect("source address"), 0))?;
    socket.connect(addr).await
}

async fn slow_reader(addr: SocketAddr, request: String, counts: Arc<Counts>, until: Instant) {
    while Instant::now() < until {
        let Ok(mut stream) = connect_from("127.0.0.2", addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        counts.slow_requests.fetch_add(1, Relaxed);
        let mut buf = [0u8; 1024];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            // A zero timeout still returns data already received: without this check a
            // reader would drain the rest of the blob at full speed after the attack ends.
            if left.is_zero() {
                return;
            }
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Err(_) => return,
                Ok(Ok(0) | Err(_)) => {
                    counts.slow_cut.fetch_add(1, Relaxed);
                    break;
                }
                Ok(Ok(n)) => counts.slow_bytes.fetch_add(n as u64, Relaxed),
            };
            tokio::time::sleep(DRIP.min(until.saturating_duration_since(Instant::now()))).await;
        }
    }
}

async fn slowloris(addr: SocketAddr, counts: Arc<Counts>, until: Instant) {
    while Instant::now() < until {
        let Ok(stream) = connect_from("127.0.0.3", addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counts.loris_opened.fetch_add(1, Relaxed);
        let (mut reader, mut writer) = stream.into_split();
        if writer.write_all(b"GET /v2/ HTTP/1.1\r\nHost: loris\r\n").await.is_err() {
            continue;
        }
        let mut buf = [0u8; 512];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            tokio::select! {
                read = reader.read(&mut buf) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        counts.loris_cut.fetch_add(1, Relaxed);
                        break;
                    }
                }
                () = tokio::time::sleep(DRIP.min(left)) => {
                    if Instant::now() >= until {
                        return;
                    }
                    let _ = writer.write_all(b"X-Loris: 1\r\n").await;
                }
            }
        }
    }
}

async fn guesser(i: usize, url: String, counts: Arc<Counts>, until: Instant) {
    let Ok(client) = reqwest::Client::builder()
        .local_address("127.0.0.4".parse::<std::net::IpAddr>().expect("address"))
        .timeout(Duration::from_secs(30))
        .build()
    else {
        return;
    };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let guess = format!("guess-{i}-{n}");
        let Ok(resp) = client.get(&url).header("authorization", basic(&guess)).send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counts.guesses.fetch_add(1, Relaxed);
        let counter = match resp.status().as_u16() {
            401 => &counts.guesses_refused,
            429 | 503 => &counts.guesses_busy,
            _ => &counts.guesses_admitted,
        };
        counter.fetch_add(1, Relaxed);
    }
}

async fn amplifier(host: String, entries: u32, counts: Arc<Counts>, until: Instant) {
    if let Err(e) = amplify(&host, entries, &counts, until).await {
        counts.unexpected.lock().unwrap().push(format!("{e:#}"));
    }
}

async fn amplify(host: &str, entries: u32, counts: &Counts, until: Instant) -> Result<()> {
    let client = reqwest::Client::builder()
        .local_address("127.0.0.5".parse::<std::net::IpAddr>()?)
        .timeout(Duration::from_secs(300))
        .build()?;
    let repository = "load/amplify";
    let data = vec![b'a'; CHUNK_LEN as usize];
    let id = ChunkId::of(&data);
    let mut batch = BatchWriter::new();
    batch.push(&id, &EncodedChunk::compress(&data, 3));
    let resp = client
        .post(format!("http://{host}/v2/{repository}/_thaw/chunks"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", thaw_schema::media::CHUNK_BATCH)
        .body(batch.finish())
        .send()
        .await?;
    ensure!(resp.status().is_success(), "uploading the amplification chunk: {}", resp.status());
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let digest = Sha256Digest::of(format!("made up {n}").as_bytes());
        let recipe = Recipe {
            digest,
            size: u64::from(entries) * u64::from(CHUNK_LEN),
            chunker: ChunkerParams::fixed(CHUNK_LEN),
            entries: vec![RecipeEntry::Data { len: CHUNK_LEN, id }; entries as usize],
        };
        let started = Instant::now();
        let resp = client
            .put(format!("http://{host}/v2/{repository}/_thaw/blobs/{digest}"))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", thaw_schema::media::RECIPE)
            .body(recipe.encode())
            .send()
            .await?;
        counts.amplifications.fetch_add(1, Relaxed);
        counts.amplification_ms.lock().unwrap().push(started.elapsed());
        if resp.status().is_client_error() {
            counts.amplifications_4xx.fetch_add(1, Relaxed);
        } else {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            counts.unexpected.lock().unwrap().push(format!("amplification recipe answered {status}: {text}"));
        }
    }
    Ok(())
}
