//! Test harness: real backends on ephemeral loopback ports.
//!
//! [`RedisServer::start`] runs the `redis-server` binary (Debian package
//! `redis-server`) on a free port with persistence off, waits until it
//! answers `PING` (polling, no fixed sleep), and kills it on drop. A
//! missing binary fails the test with the install command instead of
//! skipping it. [`RedisCluster::start`] forms a Redis Cluster of several
//! such servers with `redis-cli --cluster create`. [`S3Server::start`] runs
//! moto, an S3-compatible server, the same way. [`Pki`] makes a test CA
//! with server and client certificates (rcgen) for TLS tests.
//! [`MockKafka`] is librdkafka's in-process mock cluster, kept alive past
//! a failing test. [`OtlpReceiver`] is an OTLP/gRPC trace collector that
//! keeps the spans quiver processes export.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process owned by a test.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// Sends one inline command to 127.0.0.1:`port`; the start of the reply,
/// or `None` if nothing answers.
fn inline_command(port: u16, cmd: &str) -> Option<String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Spawns `cmd` with its output discarded; a missing binary fails with
/// the command that installs it.
fn spawn_quiet(cmd: &mut Command, name: &str, install: &str) -> Child {
    match cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{name} is not installed; install it with `{install}` (scripts/test.sh does this for you)"
        ),
        Err(e) => panic!("cannot start {name}: {e}"),
    }
}

/// Whether a Redis answers on `port` (a server with a password answers
/// NOAUTH, which is an answer).
fn answers_ping(port: u16) -> bool {
    inline_command(port, "PING").is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
}

impl RedisServer {
    /// Starts a fresh, empty Redis on a free loopback port.
    pub fn start() -> RedisServer {
        // The port is free when probed but could be taken before Redis binds
        // it; retry with a new port in that case.
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Self::start_on(port) {
                return server;
            }
        }
        panic!("redis-server did not come up on any of 5 ephemeral ports");
    }

    /// Starts Redis on `port`; `None` if it did not come up.
    fn start_on(port: u16) -> Option<RedisServer> {
        Self::start_with(port, &[])
    }

    /// Starts a Redis that requires `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> RedisServer {
        for _ in 0..5 {
            if let Some(s) = Self::start_with(free_port(), &["--requirepass", password]) {
                return s;
            }
        }
        panic!("redis-server did not come up on any of 5 ephemeral ports");
    }

    /// Starts a Redis that speaks TLS only (its plain port closed), with
    /// the server certificate of `pki`, requiring client certificates
    /// signed by `pki`'s CA when `client_certs`; [`RedisServer::port`] is
    /// the TLS port.
    pub fn start_tls(pki: &Pki, client_certs: bool) -> RedisServer {
        for _ in 0..5 {
            if let Some(s) = Self::start_tls_on(free_port(), pki, client_certs, &[]) {
                return s;
            }
        }
        panic!("redis-server with TLS did not come up on any of 5 ephemeral ports");
    }

    /// [`RedisServer::start_tls`] on `port` with extra arguments; `None` if
    /// it did not come up.
    fn start_tls_on(
        port: u16,
        pki: &Pki,
        client_certs: bool,
        extra: &[&str],
    ) -> Option<RedisServer> {
        {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                if client_certs { "yes" } else { "no" },
            ])
            .arg("--tls-cert-file")
            .arg(pki.server_cert_file())
            .arg("--tls-key-file")
            .arg(pki.server_key_file())
            .arg("--tls-ca-cert-file")
            .arg(pki.ca_file())
            .arg("--dir")
            .arg(dir.path())
            .args(extra);
            let mut child =
                spawn_quiet(&mut cmd, "redis-server", "apt-get install -y redis-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let addr = ([127, 0, 0, 1], port).into();
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Some(RedisServer {
                        child,
                        port,
                        _dir: dir,
                    });
                }
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.code() != Some(1) || port_taken(port),
                        "redis-server refused the TLS options (is it built with TLS?)"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    /// Starts Redis on `port` with extra arguments; `None` if it did not come up.
    fn start_with(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .args(extra);
        let mut child = spawn_quiet(&mut cmd, "redis-server", "apt-get install -y redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers_ping(port) {
                return Some(RedisServer {
                    child,
                    port,
                    _dir: dir,
                });
            }
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The loopback port Redis listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as if it crashed); [`RedisServer::restart`] brings
    /// it back on the same port, empty.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port after [`RedisServer::stop`].
    pub fn restart(&mut self) {
        self.stop();
        let again = Self::start_on(self.port).expect("redis-server did not restart on its port");
        *self = again;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of `n` primaries (no replicas), each a `redis-server`
/// child on its own ephemeral port, formed with `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    tls: bool,
}

/// A free port whose cluster bus port (port + 10000) is valid too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 {
            return p;
        }
    }
}

fn cluster_ok(port: u16) -> bool {
    inline_command(port, "CLUSTER INFO").is_some_and(|r| r.contains("cluster_state:ok"))
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled servers and forms the cluster;
    /// returns once every node reports `cluster_state:ok`.
    pub fn start(n: usize) -> RedisCluster {
        assert!(n >= 3, "redis cluster needs at least 3 primaries");
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                for _ in 0..5 {
                    if let Some(s) =
                        RedisServer::start_with(cluster_port(), &["--cluster-enabled", "yes"])
                    {
                        return s;
                    }
                }
                panic!("cluster node did not come up");
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is not installed; install it with `apt-get install -y redis-tools`");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|s| cluster_ok(s.port())) {
            assert!(
                Instant::now() < deadline,
                "redis cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes, tls: false }
    }

    /// Starts `n` (at least 3) cluster-enabled servers that speak TLS
    /// only, clients and the cluster bus alike (`tls-cluster yes`), with
    /// `pki`'s server certificate; forms the cluster; [`RedisCluster::urls`]
    /// are then `rediss://` URLs.
    pub fn start_tls(n: usize, pki: &Pki) -> RedisCluster {
        assert!(n >= 3, "redis cluster needs at least 3 primaries");
        let extra = [
            "--cluster-enabled",
            "yes",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
        ];
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                for _ in 0..5 {
                    if let Some(s) = RedisServer::start_tls_on(cluster_port(), pki, false, &extra) {
                        return s;
                    }
                }
                panic!("TLS cluster node did not come up");
            })
            .collect();
        let ca = pki.ca_file();
        // redis-cli waits for a cluster to join without a deadline: give it one.
        let cli = |args: &[String]| {
            Command::new("timeout")
                .args(["60", "redis-cli"])
                .arg("--tls")
                .arg("--cacert")
                .arg(&ca)
                .args(args)
                .output()
                .expect(
                    "redis-cli is not installed; install it with `apt-get install -y redis-tools`",
                )
        };
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(nodes.iter().map(|s| format!("127.0.0.1:{}", s.port())));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(str::to_owned));
        let out = cli(&create);
        assert!(
            out.status.success(),
            "redis-cli --tls --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let ok = |port: u16| {
            let out = cli(&[
                "-p".to_owned(),
                port.to_string(),
                "CLUSTER".into(),
                "INFO".into(),
            ]);
            String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
        };
        while !nodes.iter().all(|s| ok(s.port())) {
            assert!(
                Instant::now() < deadline,
                "TLS redis cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes, tls: true }
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        self.nodes
            .iter()
            .map(|s| format!("{scheme}://127.0.0.1:{}", s.port()))
            .collect()
    }
}

/// An S3-compatible server (moto, from PyPI `moto[server]`) on a free
/// loopback port, killed on drop. The binary is `$QUIVER_MOTO_SERVER`, or
/// `moto_server` on `PATH` (scripts/test.sh installs it in its venv).
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    /// The CA file of an HTTPS server ([`S3Server::start_tls`]).
    ca_file: Option<std::path::PathBuf>,
}

/// Sends one HTTP/1.1 request without a body; the status code, or `None`
/// if nothing answers.
fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// One HTTPS request with `curl`, trusting `ca`; the status code, or
/// `None` if nothing answers.
fn curl_status(ca: &std::path::Path, method: &str, url: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-X",
            method,
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|c| *c != 0)
}

impl S3Server {
    /// Starts moto on a free port and waits until it answers HTTP.
    pub fn start() -> S3Server {
        Self::start_with(None)
    }

    /// Starts moto serving HTTPS with `pki`'s server certificate.
    pub fn start_tls(pki: &Pki) -> S3Server {
        Self::start_with(Some(pki))
    }

    fn start_with(pki: Option<&Pki>) -> S3Server {
        let bin = std::env::var("QUIVER_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            if let Some(pki) = pki {
                cmd.arg("--ssl-cert")
                    .arg(pki.server_cert_file())
                    .arg("--ssl-key")
                    .arg(pki.server_key_file());
            }
            let ca_file = pki.map(Pki::ca_file);
            let mut child = spawn_quiet(
                &mut cmd,
                &bin,
                "pip install 'moto[server]' (on PATH, or set QUIVER_MOTO_SERVER)",
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let up = match &ca_file {
                    None => http_status(port, "GET", "/").is_some(),
                    Some(ca) => {
                        curl_status(ca, "GET", &format!("https://127.0.0.1:{port}/")).is_some()
                    }
                };
                if up {
                    return S3Server {
                        child,
                        port,
                        ca_file,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not come up on any of 5 ephemeral ports");
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.ca_file.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (path-style `PUT /bucket`).
    pub fn create_bucket(&self, name: &str) {
        let status = match &self.ca_file {
            None => http_status(self.port, "PUT", &format!("/{name}")),
            Some(ca) => curl_status(ca, "PUT", &format!("{}/{name}", self.endpoint())),
        };
        assert_eq!(status, Some(200), "creating bucket {name} on moto");
    }

    /// object_store options that point its S3 client at this server (plain
    /// HTTP allowed unless it serves TLS; the CA is not among them).
    pub fn options(&self) -> Vec<(String, String)> {
        let allow_http = self.ca_file.is_none().to_string();
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", allow_http),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_region", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_taken(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// A test certificate authority with a server certificate (for
/// `localhost` and 127.0.0.1) and a client certificate it signed, as PEM
/// files in a temporary directory (rcgen).
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A new CA, server and client certificate.
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "quiver test CA");
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("ca.pem");
        let pki = Pki { dir, ca, ca_key };
        pki.issue_server("server");
        pki.issue_client("client");
        pki
    }

    /// Issues (again) the server certificate, with `name` as its common
    /// name, replacing `server.pem`/`server.key` by rename; returns the
    /// certificate's DER.
    pub fn issue_server(&self, name: &str) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        // ClientAuth too: Redis cluster nodes present their certificate as
        // clients on each other's TLS cluster bus.
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, "server")
    }

    fn issue_client(&self, name: &str) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, "client")
    }

    fn issue(&self, params: rcgen::CertificateParams, file: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("certificate");
        // Key first: a reader that sees the new certificate sees its key.
        let write = |ext: &str, text: String| {
            let tmp = self.dir.path().join(format!("{file}.{ext}.tmp"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, self.dir.path().join(format!("{file}.{ext}"))).expect("rename");
        };
        write("key", key.serialize_pem());
        write("pem", cert.pem());
        cert.der().to_vec()
    }

    /// The CA certificate (PEM file).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
    /// The server certificate (PEM file).
    pub fn server_cert_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.pem")
    }
    /// The server key (PEM file).
    pub fn server_key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.key")
    }
    /// The client certificate (PEM file).
    pub fn client_cert_file(&self) -> std::path::PathBuf {
        self.dir.path().join("client.pem")
    }
    /// The client key (PEM file).
    pub fn client_key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("client.key")
    }
}

/// This process's resident set now and its peak since the last
/// [`reset_peak_rss`], in bytes (Linux `/proc/self/status`: VmRSS, VmHWM).
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).expect(key);
        let n: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect(key);
        n * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Resets the peak resident set (VmHWM) to the current one.
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// librdkafka's in-process mock cluster (see [`MockCluster`]), with topics
/// made by [`MockKafka::with_topics`].
///
/// A test that panics while a consumer of the cluster still runs in a
/// spawned task has that consumer dropped after the cluster, when the
/// runtime shuts down; rust-rdkafka's consumer drop then waits without
/// limit for librdkafka to leave the group on brokers that are gone, and
/// the test hangs instead of reporting its failure. So on a panic the
/// cluster is left running (leaked) until the process exits.
pub struct MockKafka {
    cluster: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl MockKafka {
    /// One mock broker with `topics` (name, partitions) created.
    ///
    /// # Panics
    /// When librdkafka cannot start the cluster or create a topic.
    pub fn with_topics(topics: &[(&str, i32)]) -> MockKafka {
        let cluster = MockCluster::new(1).expect("starting librdkafka's mock cluster");
        for (name, partitions) in topics {
            cluster
                .create_topic(name, *partitions, 1)
                .unwrap_or_else(|e| panic!("creating the mock topic {name}: {e}"));
        }
        MockKafka {
            cluster: Some(cluster),
        }
    }

    /// The brokers' `host:port` list, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// The cluster itself (e.g. to take brokers down).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        self.cluster
            .as_ref()
            .expect("the cluster is kept until drop")
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(c) = self.cluster.take() {
                std::mem::forget(c);
            }
        }
    }
}

/// One span as an [`OtlpReceiver`] received it; ids in lowercase hex (as
/// in `traceparent`), attribute values as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// `(trace_id, span_id)` of each linked span.
    pub links: Vec<(String, String)>,
    /// Attributes by key.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Whether the span's status is `Error`.
    pub error: bool,
}

impl ReceivedSpan {
    /// An attribute's value, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Spans = std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>;

struct Collector {
    spans: Spans,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    keep: bool,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
        fn text(kv: &KeyValue) -> String {
            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            }
        }
        fn hex(bytes: &[u8]) -> String {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
        let request = request.into_inner();
        let n: usize = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if !self.keep {
            return Ok(tonic::Response::new(Default::default()));
        }
        let mut got = Vec::new();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                got.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                    // STATUS_CODE_ERROR
                    error: span.status.as_ref().is_some_and(|s| s.code == 2),
                });
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// An OTLP/gRPC trace collector on a free loopback port, keeping every
/// span it receives; stopped on drop. It runs on a thread of its own, so
/// that it serves whatever the test's runtime is doing.
pub struct OtlpReceiver {
    addr: std::net::SocketAddr,
    spans: Spans,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts the collector.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub fn start() -> OtlpReceiver {
        OtlpReceiver::start_with(true)
    }

    /// Starts a collector that only counts what it receives (benchmarks:
    /// [`OtlpReceiver::spans`] stays empty).
    pub fn counting() -> OtlpReceiver {
        OtlpReceiver::start_with(false)
    }

    fn start_with(keep: bool) -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the bound address");
        let spans = Spans::default();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let collector = Collector {
            spans: spans.clone(),
            count: count.clone(),
            keep,
        };
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the receiver's runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("the receiver's listener");
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    let _ = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(collector))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .expect("starting the receiver's thread");
        OtlpReceiver {
            addr,
            spans,
            count,
            stop: Some(stop),
        }
    }

    /// The endpoint to export to: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many spans were received so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Polls until `done` holds for the spans received, and returns them.
    ///
    /// # Panics
    /// After `timeout`, listing what was received.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                let list: Vec<String> = spans
                    .iter()
                    .map(|s| {
                        format!(
                            "{} {:?} trace={} span={} parent={} links={:?}",
                            s.service, s.name, s.trace_id, s.span_id, s.parent_span_id, s.links
                        )
                    })
                    .collect();
                panic!(
                    "no {what} within {timeout:?}; received:\n{}",
                    list.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
