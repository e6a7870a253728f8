//! Typed configuration: one struct, validated in one step.
//!
//! Precedence, lowest first: built-in defaults (the embedded mode) < the
//! TOML file given by `--config` / `QUIVER_CONFIG` < environment variables
//! < command-line flags. The reference is `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use quiver_core::event::EventTimeBounds;
use serde::{Deserialize, Deserializer};

/// Which online store serves features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// A local file (redb); no external services.
    Embedded,
    /// A Redis server.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "embedded" => Ok(Backend::Embedded),
            "redis" => Ok(Backend::Redis),
            "redis_cluster" => Ok(Backend::RedisCluster),
            other => bail!(
                "unknown online store {other:?}; use \"embedded\", \"redis\" or \"redis_cluster\""
            ),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and server behaviour.
    pub server: ServerConfig,
    /// Where the registry is.
    pub registry: RegistryConfig,
    /// The online store.
    pub online_store: OnlineStoreConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// The event log (Kafka).
    pub kafka: KafkaSettings,
    /// The ingest loop.
    pub ingest: IngestSettings,
    /// The raw-event archive (offline store).
    pub archive: ArchiveSettings,
    /// API keys for `serve` and `demo` (see `quiver_server::auth`).
    pub auth: AuthConfig,
    /// Where the batch layer's metrics go.
    pub metrics: MetricsConfig,
    /// Traces (OpenTelemetry, OTLP) and the log format.
    pub telemetry: quiver_core::telemetry::TelemetrySettings,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus Pushgateway base URL (`http://pushgateway:9091`) that
    /// `batch run` and `materialize` push their run's metrics to; empty
    /// (the default) pushes nothing.
    pub pushgateway_url: String,
}

/// `[auth]`: API keys. Authentication is on when `keys_file` or
/// `api_keys` is set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A TOML file of `[[keys]]`, read again when it changes and on SIGHUP.
    pub keys_file: Option<PathBuf>,
    /// Keys in the configuration itself (digests, never keys).
    pub api_keys: Vec<quiver_server::auth::KeySpec>,
    /// `/health`, `/ready` and gRPC health need a key (any scope).
    pub protect_health: bool,
    /// `/metrics` needs a key with scope `admin`.
    pub protect_metrics: bool,
    /// How often the keys file is checked for changes.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub reload_interval: Duration,
    /// `[auth.jwt]`: bearer JWTs of an identity provider (OIDC).
    pub jwt: Option<quiver_server::jwt::JwtSettings>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys_file: None,
            api_keys: Vec::new(),
            protect_health: false,
            protect_metrics: false,
            reload_interval: Duration::from_secs(5),
            jwt: None,
        }
    }
}

impl AuthConfig {
    /// The settings as the server takes them.
    pub fn settings(&self) -> quiver_server::auth::AuthSettings {
        quiver_server::auth::AuthSettings {
            api_keys: self.api_keys.clone(),
            keys_file: self.keys_file.clone(),
            protect_health: self.protect_health,
            protect_metrics: self.protect_metrics,
            reload_interval: self.reload_interval,
            jwt: self.jwt.clone(),
        }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers (`host:port,...`); empty means no event log (serve
    /// then answers PushEvents with UNAVAILABLE; `demo` runs one in process).
    pub brokers: String,
    /// The event topic.
    pub topic: String,
    /// Consumer group of `quiver ingest`.
    pub group_id: String,
    /// Topic for events that cannot be decoded.
    pub dead_letter_topic: String,
    /// Delivery deadline of a produced event.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub timeout: Duration,
    /// Extra librdkafka properties, e.g. `"security.protocol" = "SASL_SSL"`.
    pub properties: std::collections::BTreeMap<String, String>,
    /// Generation of the event topic: raise by one after deleting and
    /// recreating it (see `quiver_ingest::KafkaConfig::topic_epoch`).
    pub topic_epoch: u32,
}

/// `[ingest]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// Most messages per batch.
    pub batch_max: usize,
    /// Longest wait for a batch to fill.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub batch_wait: Duration,
    /// Largest accepted lead of an event time over the clock (PushEvents:
    /// the server's; ingest: the message's Kafka timestamp, capped at the
    /// ingest process's clock).
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub max_future_skew: Duration,
    /// Largest accepted age of an event time; empty (the default) accepts
    /// any past time.
    #[serde(deserialize_with = "optional_duration")]
    pub max_event_age: Option<Duration>,
    /// Where `quiver ingest` serves `/metrics`, `/health` and `/ready`.
    pub metrics_addr: SocketAddr,
}

/// `[archive]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSettings {
    /// Local directory, `file:///dir` or `s3://bucket/prefix`; empty disables the archive.
    pub location: String,
    /// Roll a partition's Parquet file at about this many bytes.
    pub roll_bytes: usize,
    /// Roll a partition's Parquet file when its oldest event is this old.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub roll_interval: Duration,
    /// object_store options (`aws_endpoint`, `aws_region`, `aws_allow_http`, ...); `AWS_*` environment variables are added.
    pub options: std::collections::BTreeMap<String, String>,
    /// PEM CA certificates of an `https://` S3 endpoint signed by a private
    /// CA (added to the system's roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: String::new(),
            topic: "quiver-events".into(),
            group_id: "quiver-ingest".into(),
            dead_letter_topic: "quiver-events-dlq".into(),
            timeout: Duration::from_secs(10),
            properties: Default::default(),
            topic_epoch: 0,
        }
    }
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            batch_max: 50_000,
            batch_wait: Duration::from_millis(250),
            max_future_skew: EventTimeBounds::default().max_future_skew,
            max_event_age: EventTimeBounds::default().max_age,
            metrics_addr: ([0, 0, 0, 0], 8001).into(),
        }
    }
}

impl ArchiveSettings {
    /// `options` as object_store takes them.
    pub fn store_options(&self) -> Vec<(String, String)> {
        let mut options: Vec<(String, String)> = self
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(ca) = &self.ca_file {
            options.push((
                quiver_core::storage::CA_FILE_OPTION.to_owned(),
                ca.display().to_string(),
            ));
        }
        options
    }
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            location: "quiver-data/offline".into(),
            roll_bytes: 64 * 1024 * 1024,
            roll_interval: Duration::from_secs(60),
            options: Default::default(),
            ca_file: None,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// REST listen address.
    pub http_addr: SocketAddr,
    /// How often the online store is pinged for gRPC health and `quiver_ready`.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub health_interval: Duration,
    /// How long shutdown waits for in-flight requests before giving up.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub shutdown_timeout: Duration,
    /// TLS on both listeners.
    pub tls: TlsConfig,
}

/// `[server.tls]`: TLS on both listeners when `cert_file` and `key_file`
/// are set; mutual TLS with `client_ca_file`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates of accepted client certificates.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes (also reloaded on SIGHUP).
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl TlsConfig {
    /// The settings as the server takes them; `None` without TLS.
    pub fn settings(&self) -> Option<quiver_server::tls::TlsSettings> {
        Some(quiver_server::tls::TlsSettings {
            cert_file: self.cert_file.clone()?,
            key_file: self.key_file.clone()?,
            client_ca_file: self.client_ca_file.clone(),
            reload_interval: self.reload_interval,
        })
    }
}

/// `[registry]`
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// A registry `.toml` file or a directory of them; unset means the bundled sample registry.
    pub path: Option<PathBuf>,
}

/// `[online_store]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineStoreConfig {
    /// `embedded` or `redis`.
    pub backend: Backend,
    /// File of the embedded store.
    pub path: PathBuf,
    /// Redis URL (`redis://[user:pass@]host:port[/db]`, `rediss://` for TLS).
    pub redis_url: String,
    /// Seed node URLs of a Redis Cluster.
    pub cluster_nodes: Vec<String>,
    /// Maximum pooled Redis connections.
    pub pool_size: usize,
    /// Deadline of each online-store call.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub timeout: Duration,
    /// How long a row outlives its view's TTL (served as OUTSIDE_MAX_AGE) before it expires.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub expiry_grace: Duration,
    /// PEM CA certificates of `rediss://` servers (default: the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for Redis servers that require one.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl OnlineStoreConfig {
    /// The certificates of `rediss://` connections.
    pub fn redis_tls(&self) -> quiver_core::store::RedisTls {
        quiver_core::store::RedisTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Maximum entity rows per GetOnlineFeatures call.
    pub max_entity_rows: usize,
    /// Maximum features per call.
    pub max_features: usize,
    /// Maximum rows per WriteFeatures call.
    pub max_write_rows: usize,
    /// Maximum request size in bytes (gRPC message, HTTP body).
    pub max_request_bytes: usize,
    /// Maximum entity rows per GetHistoricalFeatures call.
    pub max_historical_rows: usize,
    /// Maximum GetHistoricalFeatures request size in bytes.
    pub max_historical_bytes: usize,
    /// Most requests one API key (or, without authentication, one client
    /// address) has in flight; more get RESOURCE_EXHAUSTED / 429.
    pub max_in_flight_per_key: usize,
    /// Longest time a request may take before DEADLINE_EXCEEDED / 504
    /// (not GetHistoricalFeatures).
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub request_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: ([0, 0, 0, 0], 50051).into(),
            http_addr: ([0, 0, 0, 0], 8000).into(),
            health_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(10),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for OnlineStoreConfig {
    fn default() -> Self {
        OnlineStoreConfig {
            backend: Backend::Embedded,
            path: PathBuf::from("quiver-data/online.redb"),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            cluster_nodes: Vec::new(),
            pool_size: 64,
            timeout: Duration::from_millis(250),
            expiry_grace: Duration::from_secs(86_400),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = quiver_server::Limits::default();
        LimitsConfig {
            max_entity_rows: l.max_entity_rows,
            max_features: l.max_features,
            max_write_rows: l.max_write_rows,
            max_request_bytes: l.max_request_bytes,
            max_historical_rows: l.max_historical_rows,
            max_historical_bytes: l.max_historical_bytes,
            max_in_flight_per_key: l.max_in_flight_per_key,
            request_timeout: l.request_timeout,
        }
    }
}

/// Checks `kafka.brokers` as librdkafka reads `bootstrap.servers`: a
/// comma-separated list of `[protocol://]host[:port]` (IPv6 hosts in
/// brackets), so that a typo fails at start instead of as endless
/// connection retries.
fn check_brokers(list: &str) -> Result<()> {
    for entry in list.split(',') {
        let e = entry.trim();
        let bad = |why: &str| -> Result<()> {
            bail!("kafka.brokers {list:?}: {why}; write host:port[,host:port...], e.g. \"kafka-1:9092,kafka-2:9092\"")
        };
        if e.is_empty() {
            return bad("an entry is empty");
        }
        let rest = e.split_once("://").map_or(e, |(_, r)| r);
        let (host, port, v6) = if let Some(v6) = rest.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, "")) => (h, None, true),
                Some((h, tail)) => match tail.strip_prefix(':') {
                    Some(p) => (h, Some(p), true),
                    None => return bad(&format!("{e:?} has text after ']' that is not :port")),
                },
                None => return bad(&format!("{e:?} has an unclosed '['")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p), false),
                None => (rest, None, false),
            }
        };
        let bad_char = |c: char| c.is_whitespace() || "/[]".contains(c) || (c == ':' && !v6);
        if host.is_empty() || host.contains(bad_char) {
            return bad(&format!("{e:?} has no valid host"));
        }
        if let Some(p) = port {
            if p.parse::<u16>().map_or(true, |p| p == 0) {
                return bad(&format!("{e:?} has an invalid port {p:?}"));
            }
        }
    }
    Ok(())
}

/// A duration, or an empty string for none.
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    quiver_core::time::deserialize_duration(serde::de::value::StringDeserializer::<D::Error>::new(
        s,
    ))
    .map(Some)
}

/// Flags that override file and environment (all optional).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Configuration file (TOML). [env: QUIVER_CONFIG]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// gRPC listen address. [env: QUIVER_GRPC_ADDR]
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// REST listen address. [env: QUIVER_HTTP_ADDR]
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Registry file or directory. [env: QUIVER_REGISTRY]
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Online store backend: embedded, redis or redis_cluster. [env: QUIVER_ONLINE_STORE]
    #[arg(long)]
    pub online_store: Option<Backend>,
    /// Embedded store file. [env: QUIVER_STORE_PATH]
    #[arg(long)]
    pub store_path: Option<PathBuf>,
    /// Redis URL; implies --online-store redis unless that is set. [env: QUIVER_REDIS_URL]
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated; implies --online-store redis_cluster. [env: QUIVER_REDIS_CLUSTER_NODES]
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster_nodes: Option<Vec<String>>,
    /// Kafka bootstrap servers. [env: QUIVER_KAFKA_BROKERS]
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// Kafka event topic. [env: QUIVER_KAFKA_TOPIC]
    #[arg(long)]
    pub kafka_topic: Option<String>,
    /// Raw-event archive location (directory or s3://bucket/prefix). [env: QUIVER_ARCHIVE]
    #[arg(long)]
    pub archive: Option<String>,
    /// API keys file (TOML `[[keys]]` with SHA-256 digests); turns
    /// authentication on. [env: QUIVER_AUTH_KEYS_FILE]
    #[arg(long)]
    pub auth_keys_file: Option<PathBuf>,
    /// PEM certificate chain: TLS on both listeners (with --tls-key). [env: QUIVER_TLS_CERT]
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert. [env: QUIVER_TLS_KEY]
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate they signed
    /// (mutual TLS). [env: QUIVER_TLS_CLIENT_CA]
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
}

impl Config {
    /// Builds the configuration from file, environment and flags, then validates it.
    pub fn load(flags: &Overrides, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let path = flags
            .config
            .clone()
            .or_else(|| env("QUIVER_CONFIG").map(PathBuf::from));
        let mut cfg = match &path {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_flags(flags);
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`Config::load`] for `quiver demo`: listeners on loopback unless the
    /// file, environment or flags name an address, so that trying quiver
    /// out does not open it to the network.
    pub fn load_demo(flags: &Overrides, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let mut cfg = Config::load(flags, env)?;
        let path = flags
            .config
            .clone()
            .or_else(|| env("QUIVER_CONFIG").map(PathBuf::from));
        let in_file = |key: &str| {
            path.as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
                .and_then(|t| t.get("server")?.as_table()?.get(key).cloned())
                .is_some()
        };
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        if flags.grpc_addr.is_none() && env("QUIVER_GRPC_ADDR").is_none() && !in_file("grpc_addr") {
            cfg.server.grpc_addr.set_ip(loopback);
        }
        if flags.http_addr.is_none() && env("QUIVER_HTTP_ADDR").is_none() && !in_file("http_addr") {
            cfg.server.http_addr.set_ip(loopback);
        }
        Ok(cfg)
    }

    /// Parses a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        // As with env and flags: a Redis URL or cluster nodes in the file
        // select that backend unless the file names a backend itself.
        let raw: toml::Table = toml::from_str(&text).unwrap_or_default();
        if let Some(store) = raw.get("online_store").and_then(toml::Value::as_table) {
            if !store.contains_key("backend") {
                if store.contains_key("cluster_nodes") {
                    cfg.online_store.backend = Backend::RedisCluster;
                } else if store.contains_key("redis_url") {
                    cfg.online_store.backend = Backend::Redis;
                }
            }
        }
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, v: String) -> Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e| anyhow::anyhow!("environment variable {name}={v:?}: {e}"))
        }
        if let Some(v) = env("QUIVER_GRPC_ADDR") {
            self.server.grpc_addr = parse("QUIVER_GRPC_ADDR", v)?;
        }
        if let Some(v) = env("QUIVER_HTTP_ADDR") {
            self.server.http_addr = parse("QUIVER_HTTP_ADDR", v)?;
        }
        if let Some(v) = env("QUIVER_REGISTRY") {
            self.registry.path = Some(PathBuf::from(v));
        }
        if let Some(v) = env("QUIVER_STORE_PATH") {
            self.online_store.path = PathBuf::from(v);
        }
        if let Some(v) = env("QUIVER_REDIS_URL") {
            self.online_store.redis_url = v;
            self.online_store.backend = Backend::Redis;
        }
        if let Some(v) = env("QUIVER_REDIS_CLUSTER_NODES") {
            self.online_store.cluster_nodes = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            self.online_store.backend = Backend::RedisCluster;
        }
        if let Some(v) = env("QUIVER_REDIS_TLS_CA_FILE") {
            self.online_store.tls_ca_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("QUIVER_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = env("QUIVER_KAFKA_TOPIC") {
            self.kafka.topic = v;
        }
        if let Some(v) = env("QUIVER_ARCHIVE") {
            self.archive.location = v;
        }
        if let Some(v) = env("QUIVER_INGEST_METRICS_ADDR") {
            self.ingest.metrics_addr = parse("QUIVER_INGEST_METRICS_ADDR", v)?;
        }
        if let Some(v) = env("QUIVER_PUSHGATEWAY_URL") {
            self.metrics.pushgateway_url = v;
        }
        if let Some(v) = env("QUIVER_OTLP_ENDPOINT") {
            self.telemetry.otlp_endpoint = v;
        }
        if let Some(v) = env("QUIVER_TRACE_SAMPLING_RATIO") {
            self.telemetry.sampling_ratio = parse("QUIVER_TRACE_SAMPLING_RATIO", v)?;
        }
        if let Some(v) = env("QUIVER_LOG_FORMAT") {
            self.telemetry.log_format = parse("QUIVER_LOG_FORMAT", v)?;
        }
        if let Some(v) = env("QUIVER_AUTH_KEYS_FILE") {
            self.auth.keys_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("QUIVER_TLS_CERT") {
            self.server.tls.cert_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("QUIVER_TLS_KEY") {
            self.server.tls.key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("QUIVER_TLS_CLIENT_CA") {
            self.server.tls.client_ca_file = Some(PathBuf::from(v));
        }
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_ENDPOINT",
            "AWS_ALLOW_HTTP",
        ] {
            if let Some(v) = env(k) {
                self.archive.options.entry(k.to_lowercase()).or_insert(v);
            }
        }
        if let Some(v) = env("QUIVER_ONLINE_STORE") {
            self.online_store.backend = parse("QUIVER_ONLINE_STORE", v)?;
        }
        Ok(())
    }

    fn apply_flags(&mut self, f: &Overrides) {
        if let Some(a) = f.grpc_addr {
            self.server.grpc_addr = a;
        }
        if let Some(a) = f.http_addr {
            self.server.http_addr = a;
        }
        if let Some(p) = &f.registry {
            self.registry.path = Some(p.clone());
        }
        if let Some(p) = &f.store_path {
            self.online_store.path = p.clone();
        }
        if let Some(u) = &f.redis_url {
            self.online_store.redis_url = u.clone();
            self.online_store.backend = Backend::Redis;
        }
        if let Some(n) = &f.redis_cluster_nodes {
            self.online_store.cluster_nodes = n.clone();
            self.online_store.backend = Backend::RedisCluster;
        }
        if let Some(b) = f.online_store {
            self.online_store.backend = b;
        }
        if let Some(b) = &f.kafka_brokers {
            self.kafka.brokers = b.clone();
        }
        if let Some(t) = &f.kafka_topic {
            self.kafka.topic = t.clone();
        }
        if let Some(a) = &f.archive {
            self.archive.location = a.clone();
        }
        if let Some(k) = &f.auth_keys_file {
            self.auth.keys_file = Some(k.clone());
        }
        if let Some(p) = &f.tls_cert {
            self.server.tls.cert_file = Some(p.clone());
        }
        if let Some(p) = &f.tls_key {
            self.server.tls.key_file = Some(p.clone());
        }
        if let Some(p) = &f.tls_client_ca {
            self.server.tls.client_ca_file = Some(p.clone());
        }
    }

    /// Rejects settings that cannot work, before anything starts.
    pub fn validate(&self) -> Result<()> {
        self.telemetry.validate().map_err(anyhow::Error::msg)?;
        let s = &self.online_store;
        let redis_scheme = |u: &str| {
            let lower = u.get(..9).unwrap_or(u).to_ascii_lowercase();
            lower.starts_with("redis://") || lower.starts_with("rediss://")
        };
        if s.backend == Backend::Redis && !redis_scheme(&s.redis_url) {
            bail!(
                "online_store.redis_url ({}) must start with redis:// or rediss:// (TLS)",
                quiver_core::store::redis_url_redacted(&s.redis_url)
            );
        }
        if s.backend == Backend::RedisCluster {
            if s.cluster_nodes.is_empty() {
                bail!("online_store.cluster_nodes needs at least one redis:// or rediss:// seed node for the redis_cluster backend");
            }
            if let Some(bad) = s.cluster_nodes.iter().find(|u| !redis_scheme(u)) {
                bail!(
                    "online_store.cluster_nodes: {} must start with redis:// or rediss:// (TLS)",
                    quiver_core::store::redis_url_redacted(bad)
                );
            }
        }
        if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
            bail!("online_store needs both tls_cert_file and tls_key_file (a client certificate for Redis and its key), or neither");
        }
        if s.pool_size == 0 {
            bail!("online_store.pool_size must be at least 1");
        }
        if s.timeout.is_zero() {
            bail!("online_store.timeout must be greater than zero");
        }
        if self.server.health_interval.is_zero() {
            bail!("server.health_interval must be greater than zero");
        }
        let tls = &self.server.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            bail!(
                "server.tls needs both cert_file and key_file (--tls-cert, --tls-key), or neither"
            );
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            bail!("server.tls.client_ca_file (mutual TLS) needs cert_file and key_file too");
        }
        if self.server.grpc_addr == self.server.http_addr && self.server.grpc_addr.port() != 0 {
            bail!("server.grpc_addr and server.http_addr must differ");
        }
        let push = &self.metrics.pushgateway_url;
        if !push.is_empty() {
            match url::Url::parse(push) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => bail!(
                    "metrics.pushgateway_url ({push:?}) must be an http:// or https:// URL such as http://pushgateway:9091"
                ),
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_entity_rows", l.max_entity_rows),
            ("limits.max_features", l.max_features),
            ("limits.max_write_rows", l.max_write_rows),
            ("limits.max_in_flight_per_key", l.max_in_flight_per_key),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if l.max_request_bytes < 1024 {
            bail!("limits.max_request_bytes must be at least 1024");
        }
        if l.request_timeout.is_zero() {
            bail!("limits.request_timeout must be longer than 0s, e.g. \"30s\"");
        }
        let k = &self.kafka;
        if k.topic.is_empty() || k.dead_letter_topic.is_empty() || k.group_id.is_empty() {
            bail!("kafka.topic, kafka.dead_letter_topic and kafka.group_id must not be empty");
        }
        if !k.brokers.is_empty() {
            check_brokers(&k.brokers)?;
        }
        if k.topic == k.dead_letter_topic {
            bail!("kafka.dead_letter_topic must differ from kafka.topic");
        }
        if k.topic_epoch == u32::MAX {
            bail!(
                "kafka.topic_epoch must be below {} (raise it by one per recreation of the topic)",
                u32::MAX
            );
        }
        if self.ingest.batch_max == 0 {
            bail!("ingest.batch_max must be at least 1");
        }
        // Rows keep this much more tile history (see quiver_ingest::apply).
        if self.ingest.max_future_skew > Duration::from_secs(7 * 86_400) {
            bail!("ingest.max_future_skew must be at most 7d (aggregation rows keep this much extra history)");
        }
        if self.ingest.max_event_age.is_some_and(|d| d.is_zero()) {
            bail!("ingest.max_event_age must be greater than zero, or empty for no bound");
        }
        let a = &self.archive;
        if a.roll_bytes < 1024 {
            bail!("archive.roll_bytes must be at least 1024");
        }
        if a.location.contains("://")
            && !(a.location.starts_with("s3://") || a.location.starts_with("file://"))
        {
            bail!(
                "archive.location {:?}: use a directory, file:///dir or s3://bucket/prefix",
                a.location
            );
        }
        Ok(())
    }

    /// Kafka settings as the ingest crate takes them.
    pub fn kafka(&self, brokers: &str) -> quiver_ingest::KafkaConfig {
        quiver_ingest::KafkaConfig {
            brokers: brokers.to_owned(),
            topic: self.kafka.topic.clone(),
            group_id: self.kafka.group_id.clone(),
            timeout: self.kafka.timeout,
            extra: self
                .kafka
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            topic_epoch: self.kafka.topic_epoch,
        }
    }

    /// The accepted event times, for PushEvents and ingest alike.
    pub fn event_time_bounds(&self) -> EventTimeBounds {
        EventTimeBounds {
            max_future_skew: self.ingest.max_future_skew,
            max_age: self.ingest.max_event_age,
        }
    }

    /// The limits as the server takes them.
    pub fn limits(&self) -> quiver_server::Limits {
        quiver_server::Limits {
            max_entity_rows: self.limits.max_entity_rows,
            max_features: self.limits.max_features,
            max_write_rows: self.limits.max_write_rows,
            max_request_bytes: self.limits.max_request_bytes,
            max_historical_rows: self.limits.max_historical_rows,
            max_historical_bytes: self.limits.max_historical_bytes,
            max_in_flight_per_key: self.limits.max_in_flight_per_key,
            request_timeout: self.limits.request_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_kubernetes_config_map_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/quiver.toml");
        let cfg = Config::from_file(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.online_store.backend, Backend::Redis);
        assert_eq!(cfg.telemetry.sampling_ratio, 0.01);
        assert_eq!(
            cfg.telemetry.log_format,
            quiver_core::telemetry::LogFormat::Json
        );
    }

    #[test]
    fn telemetry_comes_from_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(
            &file,
            "[telemetry]\notlp_endpoint = \"http://collector:4317\"\nsampling_ratio = 0.5\nexport_timeout = \"3s\"\nservice_name = \"features-api\"\n",
        )
        .unwrap();
        let flags = Overrides {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::load(&flags, &env_of(&[])).unwrap();
        assert_eq!(cfg.telemetry.otlp_endpoint, "http://collector:4317");
        assert_eq!(cfg.telemetry.sampling_ratio, 0.5);
        assert_eq!(cfg.telemetry.export_timeout, Duration::from_secs(3));
        assert_eq!(cfg.telemetry.service_name, "features-api");
        let cfg = Config::load(
            &flags,
            &env_of(&[
                ("QUIVER_OTLP_ENDPOINT", "https://other:4317"),
                ("QUIVER_TRACE_SAMPLING_RATIO", "0.01"),
                ("QUIVER_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.telemetry.otlp_endpoint, "https://other:4317");
        assert_eq!(cfg.telemetry.sampling_ratio, 0.01);
        assert_eq!(
            cfg.telemetry.log_format,
            quiver_core::telemetry::LogFormat::Json
        );
        for (k, v, want) in [
            (
                "QUIVER_TRACE_SAMPLING_RATIO",
                "-0.1",
                "telemetry.sampling_ratio",
            ),
            (
                "QUIVER_TRACE_SAMPLING_RATIO",
                "half",
                "QUIVER_TRACE_SAMPLING_RATIO",
            ),
            ("QUIVER_LOG_FORMAT", "xml", "QUIVER_LOG_FORMAT"),
            (
                "QUIVER_OTLP_ENDPOINT",
                "collector",
                "telemetry.otlp_endpoint",
            ),
        ] {
            let e = Config::load(&flags, &env_of(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
    }

    #[test]
    fn nothing_configured_means_embedded() {
        let cfg = Config::load(&Overrides::default(), &env_of(&[])).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.online_store.backend, Backend::Embedded);
        assert_eq!(cfg.server.http_addr.port(), 8000);
        assert_eq!(cfg.server.grpc_addr.port(), 50051);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(
            &file,
            "[server]\ngrpc_addr = \"127.0.0.1:1\"\nhttp_addr = \"127.0.0.1:2\"\n[online_store]\ntimeout = \"1s\"\n",
        )
        .unwrap();
        let env = env_of(&[
            ("QUIVER_HTTP_ADDR", "127.0.0.1:3"),
            ("QUIVER_REDIS_URL", "redis://r:1"),
        ]);
        let flags = Overrides {
            config: Some(file),
            grpc_addr: Some("127.0.0.1:4".parse().unwrap()),
            ..Overrides::default()
        };
        let cfg = Config::load(&flags, &env).unwrap();
        assert_eq!(cfg.server.grpc_addr.port(), 4, "flag beats file");
        assert_eq!(cfg.server.http_addr.port(), 3, "env beats file");
        assert_eq!(
            cfg.online_store.timeout,
            Duration::from_secs(1),
            "file beats default"
        );
        assert_eq!(
            cfg.online_store.backend,
            Backend::Redis,
            "a redis url selects redis"
        );
        let flags = Overrides {
            online_store: Some(Backend::Embedded),
            ..flags
        };
        assert_eq!(
            Config::load(&flags, &env).unwrap().online_store.backend,
            Backend::Embedded
        );
    }

    #[test]
    fn tls_and_identity_provider_settings_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        std::fs::write(
            &file,
            "[online_store]\nredis_url = \"rediss://:pw@r:6380\"\ntls_ca_file = \"ca.pem\"\n\
             [archive]\nca_file = \"s3-ca.pem\"\n\
             [auth.jwt]\nissuer = \"https://idp/\"\naudience = \"quiver\"\njwks_url = \"https://idp/jwks\"\nscope_prefix = \"quiver:\"\njwks_refresh = \"2m\"\n",
        )
        .unwrap();
        let cfg = Config::load(&flags, &env_of(&[])).unwrap();
        assert_eq!(cfg.online_store.backend, Backend::Redis);
        assert_eq!(
            cfg.online_store.redis_tls().ca_file,
            Some(PathBuf::from("ca.pem"))
        );
        assert!(cfg
            .archive
            .store_options()
            .contains(&("ca_file".to_owned(), "s3-ca.pem".to_owned())));
        let jwt = cfg.auth.settings().jwt.unwrap();
        assert_eq!(
            (
                jwt.scope_prefix.as_str(),
                jwt.jwks_refresh,
                jwt.name_claim.as_str()
            ),
            ("quiver:", Duration::from_secs(120), "sub")
        );
        std::fs::write(
            &file,
            "[online_store]\nredis_url = \"rediss://r:6380\"\ntls_cert_file = \"c.pem\"\n",
        )
        .unwrap();
        let e = Config::load(&flags, &env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("tls_cert_file and tls_key_file"), "{e}");
        std::fs::write(&file, "[auth.jwt]\nissuer = \"x\"\nbogus = 1\n").unwrap();
        let e = Config::load(&flags, &env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn a_redis_url_in_the_file_selects_redis() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        std::fs::write(&file, "[online_store]\nredis_url = \"redis://r:1\"\n").unwrap();
        let cfg = Config::load(&flags, &env_of(&[])).unwrap();
        assert_eq!(cfg.online_store.backend, Backend::Redis);
        std::fs::write(
            &file,
            "[online_store]\nbackend = \"embedded\"\nredis_url = \"redis://r:1\"\n",
        )
        .unwrap();
        let cfg = Config::load(&flags, &env_of(&[])).unwrap();
        assert_eq!(cfg.online_store.backend, Backend::Embedded);
        std::fs::write(
            &file,
            "[online_store]\ncluster_nodes = [\"redis://a:1\"]\n[kafka]\nbrokers = \"k:9092\"\n[archive]\nlocation = \"s3://lake/q\"\n",
        )
        .unwrap();
        let cfg = Config::load(&flags, &env_of(&[])).unwrap();
        assert_eq!(cfg.online_store.backend, Backend::RedisCluster);
        assert_eq!(cfg.kafka.brokers, "k:9092");
        assert_eq!(cfg.kafka("k:9092").topic, "quiver-events");
        std::fs::write(&file, "[archive]\nlocation = \"ftp://x\"\n").unwrap();
        let e = Config::load(&flags, &env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("archive.location"), "{e}");
    }

    #[test]
    fn bad_settings_are_rejected_with_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(&file, "[server]\ngrpc_adr = \"x\"\n").unwrap();
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        let e = Config::load(&flags, &env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("unknown field `grpc_adr`"), "{e}");
        std::fs::write(&file, "[online_store]\ntimeout = \"soon\"\n").unwrap();
        let e = Config::load(&flags, &env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("invalid duration \"soon\""), "{e}");
        let e = Config::load(
            &Overrides::default(),
            &env_of(&[("QUIVER_GRPC_ADDR", "nope")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("QUIVER_GRPC_ADDR"), "{e}");
        let e = Config::load(
            &Overrides::default(),
            &env_of(&[("QUIVER_REDIS_URL", "http://x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("redis_url"), "{e}");
    }

    #[test]
    fn event_time_bounds_come_from_the_ingest_section() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::load(&flags, &env_of(&[]))
        };
        let d = load("").unwrap().event_time_bounds();
        assert_eq!(d, EventTimeBounds::default());
        assert_eq!(d.max_future_skew, Duration::from_secs(3600));
        let b = load("[ingest]\nmax_future_skew = \"5m\"\nmax_event_age = \"30d\"\n")
            .unwrap()
            .event_time_bounds();
        assert_eq!(b.max_future_skew, Duration::from_secs(300));
        assert_eq!(b.max_age, Some(Duration::from_secs(30 * 86_400)));
        let none = load("[ingest]\nmax_event_age = \"\"\n").unwrap();
        assert_eq!(none.event_time_bounds().max_age, None);
        for (text, needle) in [
            (
                "[ingest]\nmax_future_skew = \"8d\"\n",
                "ingest.max_future_skew",
            ),
            ("[ingest]\nmax_event_age = \"0s\"\n", "ingest.max_event_age"),
            (
                "[ingest]\nmax_event_age = \"old\"\n",
                "invalid duration \"old\"",
            ),
        ] {
            let e = format!("{:#}", load(text).unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn malformed_broker_lists_are_refused_at_start() {
        let load = |brokers: &str| {
            Config::load(
                &Overrides::default(),
                &env_of(&[("QUIVER_KAFKA_BROKERS", brokers)]),
            )
        };
        for ok in [
            "localhost:9092",
            "kafka-1:9092, kafka-2:9092",
            "kafka",
            "SASL_SSL://broker.example.com:9093",
            "[::1]:9092",
        ] {
            load(ok).unwrap();
        }
        for (bad, needle) in [
            (":::,,", "has no valid host"),
            ("a:9092,,b:9092", "an entry is empty"),
            ("kafka:99999", "invalid port \"99999\""),
            ("kafka:", "invalid port \"\""),
            ("[::1:9092", "unclosed"),
            ("[::1]x", "not :port"),
        ] {
            let e = format!("{:#}", load(bad).unwrap_err());
            assert!(
                e.contains("kafka.brokers") && e.contains(needle),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_demo_binds_loopback_unless_told_otherwise() {
        let loopback = |c: &Config| {
            (
                c.server.grpc_addr.ip().is_loopback(),
                c.server.http_addr.ip().is_loopback(),
            )
        };
        let cfg = Config::load_demo(&Overrides::default(), &env_of(&[])).unwrap();
        assert_eq!(loopback(&cfg), (true, true));
        assert_eq!(cfg.server.http_addr.port(), 8000);
        // serve keeps listening on every interface (containers) and warns.
        let cfg = Config::load(&Overrides::default(), &env_of(&[])).unwrap();
        assert_eq!(loopback(&cfg), (false, false));
        let env = env_of(&[("QUIVER_HTTP_ADDR", "0.0.0.0:9000")]);
        let cfg = Config::load_demo(&Overrides::default(), &env).unwrap();
        assert_eq!(loopback(&cfg), (true, false));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(&file, "[server]\ngrpc_addr = \"0.0.0.0:7000\"\n").unwrap();
        let flags = Overrides {
            config: Some(file),
            ..Overrides::default()
        };
        let cfg = Config::load_demo(&flags, &env_of(&[])).unwrap();
        assert_eq!(loopback(&cfg), (false, true));
    }

    #[test]
    fn tls_and_auth_settings() {
        let env = env_of(&[("QUIVER_TLS_CERT", "/c.pem")]);
        let e = format!(
            "{:#}",
            Config::load(&Overrides::default(), &env).unwrap_err()
        );
        assert!(e.contains("both cert_file and key_file"), "{e}");
        let env = env_of(&[
            ("QUIVER_TLS_CERT", "/c.pem"),
            ("QUIVER_TLS_KEY", "/k.pem"),
            ("QUIVER_AUTH_KEYS_FILE", "/keys.toml"),
        ]);
        let cfg = Config::load(&Overrides::default(), &env).unwrap();
        let tls = cfg.server.tls.settings().unwrap();
        assert_eq!(tls.key_file, PathBuf::from("/k.pem"));
        assert!(tls.client_ca_file.is_none());
        assert!(cfg.auth.settings().enabled());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(
            &file,
            "[[auth.api_keys]]\nname = \"a\"\nkey = \"plain\"\nscopes = [\"read\"]\n",
        )
        .unwrap();
        // A key in plain text loads as a config but is refused by the
        // server's checks (tested in quiver_server::auth).
        let cfg = Config::from_file(&file).unwrap();
        let e = quiver_server::auth::Authenticator::new(
            cfg.auth.settings(),
            std::sync::Arc::new(quiver_core::SystemClock),
        )
        .unwrap_err();
        assert!(
            e.contains("not stored in plain text") && !e.contains("plain\""),
            "{e}"
        );
    }
}
