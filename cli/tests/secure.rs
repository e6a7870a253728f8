//! `quiver serve` as an operator secures it: TLS with client certificates
//! and API keys made by `quiver auth create-key`, a certificate renewed
//! while serving, and secrets (API keys, Redis password, S3 secret key,
//! Kafka SASL password) absent from logs, errors, `/metrics` and the
//! registry.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_proto::tonic;
use quiver_proto::v1 as pb;
use quiver_proto::FeatureServiceClient;
use quiver_testkit::{Pki, RedisServer, S3Server};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn quiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
}

/// A running `quiver serve`; everything it prints is kept.
struct Serve {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl Serve {
    fn start(cmd: &mut Command) -> Serve {
        let mut child = cmd
            .env("QUIVER_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let out2 = output.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = BufReader::new(err).read_to_string(&mut buf);
            out2.lock().unwrap().push_str(&buf);
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !line.starts_with("quiver listening") {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!("quiver serve did not start: {}", output.lock().unwrap());
            }
        }
        let addr = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        let (grpc, http) = (addr("grpc="), addr("http="));
        let out2 = output.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = stdout.read_to_string(&mut buf);
            out2.lock().unwrap().push_str(&buf);
        });
        Serve {
            child,
            grpc,
            http,
            output,
        }
    }

    /// Stops it with SIGTERM; everything it printed.
    fn stop(mut self) -> String {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "quiver serve exited with {status}");
        std::thread::sleep(Duration::from_millis(200));
        let out = self.output.lock().unwrap().clone();
        out
    }
}

fn create_key(keys: &std::path::Path, name: &str, scopes: &str) -> String {
    let out = quiver()
        .args([
            "auth",
            "create-key",
            "--name",
            name,
            "--scopes",
            scopes,
            "--keys-file",
        ])
        .arg(keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("qv_") && key.len() == 67, "{key}");
    key
}

async fn grpc_channel(addr: SocketAddr, pki: &Pki, client_cert: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_file()).unwrap()))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(pki.client_cert_file()).unwrap(),
            std::fs::read(pki.client_key_file()).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn get_registry(
    ch: Channel,
    key: Option<&str>,
) -> Result<pb::GetRegistryResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::GetRegistryRequest {});
    if let Some(k) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    FeatureServiceClient::new(ch)
        .get_registry(req)
        .await
        .map(|r| r.into_inner())
}

/// One HTTP/1.1 GET over TLS: status, body and the server's certificate.
async fn https_get(
    addr: SocketAddr,
    path: &str,
    pki: &Pki,
    client_cert: bool,
    key: Option<&str>,
) -> Result<(u16, String, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.ca_file()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = if client_cert {
        let certs = CertificateDer::pem_file_iter(pki.client_cert_file())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.client_key_file()).unwrap();
        builder.with_client_auth_cert(certs, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    tls.read_to_end(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body, peer))
}

#[tokio::test]
async fn tls_with_client_certificates_and_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let keys = dir.path().join("keys.toml");
    let reader = create_key(&keys, "notebook", "read");
    let config = dir.path().join("q.toml");
    std::fs::write(&config, "[server.tls]\nreload_interval = \"100ms\"\n").unwrap();
    let serve = Serve::start(
        quiver()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--archive",
                "",
            ])
            .arg("--store-path")
            .arg(dir.path().join("online.redb"))
            .arg("--tls-cert")
            .arg(pki.server_cert_file())
            .arg("--tls-key")
            .arg(pki.server_key_file())
            .arg("--tls-client-ca")
            .arg(pki.ca_file())
            .arg("--auth-keys-file")
            .arg(&keys),
    );

    // gRPC: a client certificate and a key.
    let ch = grpc_channel(serve.grpc, &pki, true).await.unwrap();
    let reg = get_registry(ch.clone(), Some(&reader)).await.unwrap();
    assert!(reg.feature_views.iter().any(|v| v.name == "user_profile"));
    let e = get_registry(ch, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // Without a client certificate, or without TLS: no call gets through.
    match grpc_channel(serve.grpc, &pki, false).await {
        Err(_) => {}
        // TLS 1.3: the client learns of the refusal at its first call.
        Ok(ch) => {
            // Refused: UNAVAILABLE, UNKNOWN or CANCELLED, as the
            // transport reports the closed connection.
            get_registry(ch, Some(&reader)).await.unwrap_err();
        }
    }
    let plain = Channel::from_shared(format!("http://{}", serve.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(get_registry(ch, Some(&reader)).await.is_err());
    }

    // REST over TLS, the same rules.
    let (status, body, first_cert) =
        https_get(serve.http, "/api/v1/registry", &pki, true, Some(&reader))
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = https_get(serve.http, "/api/v1/registry", &pki, true, None)
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthenticated\""), "{body}");
    let refused = https_get(serve.http, "/health", &pki, false, None).await;
    assert!(
        refused.as_ref().map_or(true, |(s, _, _)| *s != 200),
        "no client certificate, yet {refused:?}"
    );

    // A renewed certificate is served to new connections.
    let renewed = pki.issue_server("server-renewed");
    assert_ne!(renewed, first_cert);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, cert) = https_get(serve.http, "/health", &pki, true, None)
            .await
            .unwrap();
        assert_eq!(status, 200);
        if cert == renewed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = grpc_channel(serve.grpc, &pki, true).await.unwrap();
    get_registry(ch, Some(&reader)).await.unwrap();

    let log = serve.stop();
    assert!(log.contains("TLS certificate"), "no reload logged:\n{log}");
    assert!(!log.contains(&reader), "the API key is in the log");
}

#[tokio::test]
async fn secrets_stay_out_of_logs_metrics_and_registry() {
    let dir = tempfile::tempdir().unwrap();
    let redis_pw = "redis-Secret-PW-1";
    let s3_secret = "aws-Secret-Key-2";
    let sasl_pw = "kafka-Secret-PW-3";
    let redis = RedisServer::start_with_password(redis_pw);
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let keys = dir.path().join("keys.toml");
    let reader = create_key(&keys, "reader", "read");
    let writer = create_key(&keys, "writer", "write");
    let config = dir.path().join("q.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[online_store]
redis_url = "redis://:{redis_pw}@127.0.0.1:{port}"

[kafka]
brokers = "127.0.0.1:1"
timeout = "1s"
properties = {{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", "sasl.username" = "quiver", "sasl.password" = "{sasl_pw}", "debug" = "conf,security,broker" }}

[archive]
location = "s3://lake/quiver"
options = {{ aws_endpoint = "{endpoint}", aws_allow_http = "true", aws_region = "us-east-1" }}
"#,
            port = redis.port(),
            endpoint = s3.endpoint(),
        ),
    )
    .unwrap();
    let serve = Serve::start(
        quiver()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .arg("--auth-keys-file")
            .arg(&keys)
            .env("AWS_ACCESS_KEY_ID", "quiver-test")
            .env("AWS_SECRET_ACCESS_KEY", s3_secret)
            .env_remove("QUIVER_ARCHIVE"),
    );
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", serve.http);
    let mut seen = String::new();
    // Reads through Redis with its password work.
    let r = http
        .get(url("/api/v1/features/user/u1"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    seen.push_str(&r.text().await.unwrap());
    for (path, key) in [
        ("/api/v1/registry", Some(&reader)),
        ("/api/v1/registry", Some(&writer)),
        ("/metrics", None),
    ] {
        let mut req = http.get(url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        seen.push_str(&req.send().await.unwrap().text().await.unwrap());
    }
    // A wrong key, and PushEvents to an unreachable broker with SASL.
    let r = http
        .get(url("/api/v1/registry"))
        .bearer_auth(format!("{reader}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    seen.push_str(&r.text().await.unwrap());
    let now = quiver_core::time::format_rfc3339(quiver_core::time::system_time_to_micros(
        std::time::SystemTime::now(),
    ));
    let r = http
        .post(url("/api/v1/events"))
        .bearer_auth(&writer)
        .json(
            &serde_json::json!({"events": [{"event_id": "e1", "event_type": "login",
            "event_time": now, "entities": {"user_id": "u1"}, "attributes": {"device": "ios"}}]}),
        )
        .send()
        .await
        .unwrap();
    seen.push_str(&r.text().await.unwrap());
    // Historical retrieval reads the S3 offline store with the secret key.
    let ch = Channel::from_shared(format!("http://{}", serve.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::GetHistoricalFeaturesRequest {
        kind: Some(pb::get_historical_features_request::Kind::Features(
            pb::FeatureList {
                val: vec!["user_daily:spend_1d".into()],
            },
        )),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {reader}").parse().unwrap());
    if let Err(e) = FeatureServiceClient::new(ch)
        .get_historical_features(req)
        .await
    {
        seen.push_str(e.message());
    }
    let reg = get_registry(
        Channel::from_shared(format!("http://{}", serve.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        Some(&reader),
    )
    .await
    .unwrap();
    seen.push_str(&format!("{reg:?}"));

    let log = serve.stop();
    assert!(
        log.contains("sasl") || log.contains("SASL"),
        "librdkafka's debug log is missing:\n{log}"
    );
    for secret in [
        redis_pw,
        s3_secret,
        sasl_pw,
        reader.as_str(),
        writer.as_str(),
    ] {
        assert!(!log.contains(secret), "{secret} is in the log");
        assert!(!seen.contains(secret), "{secret} is in a response");
    }
}

#[test]
fn serving_beyond_loopback_without_keys_warns() {
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: &[&str]| {
        Serve::start(
            quiver()
                .args(["serve", "--archive", ""])
                .args(extra)
                .arg("--store-path")
                .arg(dir.path().join("online.redb")),
        )
        .stop()
    };
    let log = start(&["--grpc-addr", "0.0.0.0:0", "--http-addr", "127.0.0.1:0"]);
    assert!(log.contains("WITHOUT AUTHENTICATION"), "{log}");
    let log = start(&["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]);
    assert!(!log.contains("WITHOUT AUTHENTICATION"), "{log}");
}
