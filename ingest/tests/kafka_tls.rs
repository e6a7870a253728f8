//! Kafka over TLS: `kafka.properties` reach librdkafka (built with SSL)
//! unchanged. A TLS listener with a certificate of a test CA stands in for
//! the broker (neither librdkafka's mock cluster nor tansu speaks TLS): a
//! producer configured with `security.protocol = SSL` and the CA completes
//! the handshake and sends its first Kafka request (ApiVersions) inside
//! it; with another CA it refuses the server's certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quiver_core::Registry;
use quiver_ingest::{KafkaConfig, KafkaEventSink};
use quiver_testkit::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What a connection to the stand-in broker did: the first request's API
/// key, read inside TLS, or the handshake's error.
type Seen = Result<i16, String>;

async fn tls_broker(pki: &Pki) -> (u16, mpsc::UnboundedReceiver<Seen>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.server_cert_file())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.server_key_file()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let seen = match acceptor.accept(tcp).await {
                    Err(e) => Err(e.to_string()),
                    Ok(mut tls) => {
                        // Length (int32), then api_key (int16).
                        let mut head = [0u8; 6];
                        match tls.read_exact(&mut head).await {
                            Ok(_) => Ok(i16::from_be_bytes([head[4], head[5]])),
                            Err(e) => Err(format!("after the handshake: {e}")),
                        }
                    }
                };
                let _ = tx.send(seen);
            });
        }
    });
    (port, rx)
}

fn registry() -> Arc<Registry> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    Arc::new(Registry::load(&path).unwrap())
}

fn producer(port: u16, ca: &Path) -> KafkaEventSink {
    let mut cfg = KafkaConfig::new(format!("127.0.0.1:{port}"));
    cfg.timeout = Duration::from_secs(5);
    cfg.extra = vec![
        ("security.protocol".into(), "SSL".into()),
        ("ssl.ca.location".into(), ca.display().to_string()),
    ];
    KafkaEventSink::new(&cfg, registry()).unwrap()
}

/// What connections did within `wait`.
async fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>, wait: Duration) -> Vec<Seen> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(s)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        let ok = s.is_ok();
        out.push(s);
        if ok {
            break;
        }
    }
    out
}

#[tokio::test]
async fn kafka_clients_speak_tls_with_the_configured_ca() {
    let pki = Pki::new();
    let (port, mut rx) = tls_broker(&pki).await;
    let trusted = producer(port, &pki.ca_file());
    let got = seen(&mut rx, Duration::from_secs(15)).await;
    // ApiVersions (18) is librdkafka's first request on a connection.
    assert!(got.contains(&Ok(18)), "{got:?}");
    drop(trusted);

    let other = Pki::new();
    let (port, mut rx) = tls_broker(&pki).await;
    let untrusting = producer(port, &other.ca_file());
    let got = seen(&mut rx, Duration::from_secs(4)).await;
    assert!(!got.is_empty(), "the producer never connected");
    assert!(got.iter().all(Result::is_err), "{got:?}");
    drop(untrusting);
}

#[test]
fn properties_librdkafka_does_not_know_are_refused_by_name() {
    let mut cfg = KafkaConfig::new("127.0.0.1:9");
    cfg.extra = vec![("security.protocol".into(), "SSL_BUT_WRONG".into())];
    let e = KafkaEventSink::new(&cfg, registry()).err().unwrap();
    assert!(e.message().contains("security.protocol"), "{e}");
}
