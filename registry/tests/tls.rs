//! The registry over real TLS on loopback: certificates made by the `openssl` CLI, checked
//! from a rustls client; reload swaps the certificate for new connections only, and a
//! broken pair keeps the old one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use thaw_registry::tls::{ReloadingConfig, TlsFiles};
use thaw_registry::{RegistryConfig, ServeOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[path = "tls_certs/mod.rs"]
mod certs;
use certs::{install, make_ca, make_leaf};

fn der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.expect("TLS handshake")
}

fn peer_cert(tls: &Tls) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("server sent a certificate")[0].clone().into_owned()
}

/// `GET /v2/` on a kept-alive connection; returns the status line once the whole response
/// (headers and `Content-Length` bytes of body) has arrived.
async fn get_v2(tls: &mut Tls) -> String {
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if response.len() >= end + 4 + body_len {
                return head.lines().next().unwrap_or_default().to_uppercase();
            }
        }
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_for_new_connections_and_keeps_it_on_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "ca");
    let (first_cert, first_key) = make_leaf(d, "ca", "first", 1);
    let (second_cert, second_key) = make_leaf(d, "ca", "second", 2);
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    install(&first_cert, &cert);
    install(&first_key, &key);

    let storage = tempfile::tempdir().unwrap();
    let files = TlsFiles { poll: Duration::from_millis(100), ..TlsFiles::new(&cert, &key) };
    let registry = thaw_registry::spawn_with(
        RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.path().to_str().unwrap()),
        ServeOptions::default().with_tls(files),
    )
    .await
    .unwrap();
    let client = client_config(&ca);

    let mut old = connect(registry.addr(), &client).await;
    assert_eq!(peer_cert(&old), der(&first_cert));
    assert!(get_v2(&mut old).await.starts_with("HTTP/1.1 200"));

    install(&second_cert, &cert);
    install(&second_key, &key);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fresh = connect(registry.addr(), &client).await;
        if peer_cert(&fresh) == der(&second_cert) {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection made before the swap still works, on its old certificate.
    assert!(get_v2(&mut old).await.starts_with("HTTP/1.1 200"));
    assert_eq!(peer_cert(&old), der(&first_cert));

    // A broken certificate file (say, half-written) is refused; the second pair stays.
    std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // several poll periods
    let mut fresh = connect(registry.addr(), &client).await;
    assert_eq!(peer_cert(&fresh), der(&second_cert));
    assert!(get_v2(&mut fresh).await.starts_with("HTTP/1.1 200"));
    drop(registry);
}

#[test]
fn a_bad_pair_is_an_error_and_the_loaded_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    let (first_cert, first_key) = make_leaf(d, "ca", "first", 1);
    let (_, second_key) = make_leaf(d, "ca", "second", 2);
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    install(&first_cert, &cert);
    install(&first_key, &key);
    let config = ReloadingConfig::load(TlsFiles::new(&cert, &key)).unwrap();
    let loaded = config.current();
    assert!(!config.reload().unwrap(), "unchanged files are not a reload");

    // The key of another certificate: rustls refuses the mismatch.
    install(&second_key, &key);
    let err = config.reload().unwrap_err().to_string();
    assert!(err.contains("tls.crt") && err.contains("tls.key"), "{err}");
    assert!(Arc::ptr_eq(&loaded, &config.current()));

    std::fs::write(&key, b"").unwrap();
    let err = config.reload().unwrap_err().to_string();
    assert!(err.contains("PRIVATE KEY"), "{err}");
    assert!(Arc::ptr_eq(&loaded, &config.current()));

    // Missing files fail at start, naming the file.
    let err = ReloadingConfig::load(TlsFiles::new(d.join("nope.crt"), &key)).unwrap_err().to_string();
    assert!(err.contains("nope.crt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_ca_are_refused_with_a_certificate_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "ca");
    let (cert, key) = make_leaf(d, "ca", "registry", 7);
    let storage = tempfile::tempdir().unwrap();
    let registry = thaw_registry::spawn_with(
        RegistryConfig::new("127.0.0.1:0".parse().unwrap(), storage.path().to_str().unwrap()),
        ServeOptions::default().with_tls(TlsFiles::new(&cert, &key)),
    )
    .await
    .unwrap();
    let url = format!("https://{}/v2/", registry.addr());

    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    assert_eq!(trusting.get(&url).send().await.unwrap().status(), 200);

    let err = reqwest::Client::new().get(&url).send().await.unwrap_err();
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    assert!(chain.contains("certificate"), "{chain}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(reqwest::Client::new().get(format!("http://{}/v2/", registry.addr())).send().await.is_err());
    drop(registry);
}
