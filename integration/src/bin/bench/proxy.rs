//! A byte-counting TCP proxy on loopback, put in front of every server the benchmark
//! measures (thaw-registry, docker-registry, MinIO), so that bytes on the wire are counted
//! the same way for all three systems: every byte of every request and response, headers,
//! framing and retries included, as the server's socket sees them.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// Bytes client → server (`up`) and server → client (`down`) so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Wire {
    pub(crate) up: u64,
    pub(crate) down: u64,
}

impl Wire {
    pub(crate) fn since(self, earlier: Wire) -> Wire {
        Wire { up: self.up - earlier.up, down: self.down - earlier.down }
    }
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

/// A proxy listening on `<bind>:<ephemeral>` (loopback, or the host end of the benchmark's
/// veth link) that forwards every connection to `upstream`. Its accept thread lives as long
/// as the benchmark process.
pub(crate) struct Proxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
}

impl Proxy {
    pub(crate) fn start(bind: IpAddr, upstream: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind(SocketAddr::new(bind, 0)).context("binding the byte-counting proxy")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        std::thread::Builder::new().name(format!("proxy-{}", addr.port())).spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                pipe(&client, &server, shared.clone(), true);
                pipe(&server, &client, shared.clone(), false);
            }
        })?;
        Ok(Self { addr, counters })
    }

    /// The address clients connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn wire(&self) -> Wire {
        Wire { up: self.counters.up.load(Ordering::SeqCst), down: self.counters.down.load(Ordering::SeqCst) }
    }
}

/// Copies `from` → `to` on a thread of its own, counting; on end of stream it closes the
/// write half of `to`, so half-closes pass through.
fn pipe(from: &TcpStream, to: &TcpStream, counters: Arc<Counters>, up: bool) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    let spawned = std::thread::Builder::new().name("proxy-pipe".into()).spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let counter = if up { &counters.up } else { &counters.down };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
    drop(spawned);
}
