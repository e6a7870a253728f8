//! `quiver`: the feature store's one binary.
//!
//! Subcommands: `serve` (gRPC + REST over the configured online store),
//! `ingest` (Kafka consumer: online features and the raw-event archive),
//! `generate` (sample events to Kafka or the API), `demo` (the whole speed
//! layer in one process on the embedded default), `batch run` and `batch
//! retrieve` (feature tables and training sets from the offline store),
//! `materialize` (offline to online), and `registry validate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use quiver_core::event::EventSink;
use quiver_core::store::{EmbeddedStore, RedisClusterStore, RedisConfig, RedisStore};
use quiver_core::{Clock, OnlineStore, Registry, SystemClock};
use quiver_server::{FeatureServer, Metrics};
use tokio::net::TcpListener;

mod auth;
mod batch;
mod config;
mod demo;
mod pipeline;

use config::{Backend, Config, Overrides};

// Serving allocates many small, short-lived buffers per request (protobuf,
// HTTP/2 frames, Redis replies); mimalloc handles that better than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The sample registry shipped in `registry/`, used when none is configured.
const SAMPLE_REGISTRY: &str = include_str!("../../registry/features.toml");

#[derive(Debug, Parser)]
#[command(name = "quiver", version, about = "gRPC-first feature store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve features over gRPC (default :50051) and REST (default :8000).
    Serve {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Consume events from Kafka into the online store and the raw-event archive.
    Ingest {
        #[command(flatten)]
        overrides: Overrides,
        /// Where /metrics, /health and /ready are served (default 0.0.0.0:8001).
        /// [env: QUIVER_INGEST_METRICS_ADDR]
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Produce realistic sample events (logins, page views, carts, purchases).
    Generate {
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        args: pipeline::GenerateArgs,
    },
    /// Run the whole pipeline in one process: sample features, an
    /// in-process Kafka, the event generator, ingest, the batch layer on a
    /// timer, and the server.
    Demo {
        #[command(flatten)]
        overrides: Overrides,
        /// Sample users (user_0 ... user_N-1 for events, user_1 ... user_N for batch features).
        #[arg(long, default_value_t = 5000)]
        users: u64,
        /// Sample products.
        #[arg(long, default_value_t = 1000)]
        products: u64,
        /// Seed of the sample data and events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Generated events per second (0 disables the generator).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Run the batch layer this often: SQL views over the archived
        /// events, then incremental materialization online ("0s" disables).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        batch_every: std::time::Duration,
    },
    /// Batch layer: SQL feature views and point-in-time training sets.
    Batch {
        #[command(subcommand)]
        command: batch::BatchCommand,
    },
    /// Write the latest offline values of SQL and event views into the online store.
    Materialize {
        #[command(flatten)]
        overrides: Overrides,
        #[command(flatten)]
        args: batch::MaterializeArgs,
    },
    /// API keys: make one, or hash one made elsewhere.
    Auth {
        #[command(subcommand)]
        command: auth::AuthCommand,
    },
    /// Work with registry files.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Check a registry file or directory and report every problem,
    /// including SQL feature views that do not plan (DataFusion, against
    /// the archive's schema and the declared tables' schemas, no data read).
    Validate {
        /// Registry `.toml` file or directory.
        path: PathBuf,
        /// Offline store whose declared tables' schemas SQL views are
        /// planned against (directory or s3://bucket/prefix; S3 options from
        /// --config). Without it, views reading declared tables are skipped.
        #[arg(long)]
        archive: Option<String>,
        /// Configuration file (TOML), for the offline store's options. [env: QUIVER_CONFIG]
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (settings, service) = telemetry_of(&cli.command);
    // The OTLP exporter's gRPC channel runs on the runtime.
    let telemetry = match rt.block_on(async { quiver_core::telemetry::init(&settings, service) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}", e.message());
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Registry {
            command:
                RegistryCommand::Validate {
                    path,
                    archive,
                    config,
                },
        } => rt.block_on(validate(&path, archive, config)),
        Command::Auth { command } => auth::auth_cmd(command),
        Command::Serve { overrides } => rt.block_on(serve_cmd(overrides)),
        Command::Ingest {
            overrides,
            metrics_addr,
        } => rt.block_on(pipeline::ingest_cmd(overrides, metrics_addr)),
        Command::Batch { command } => rt.block_on(batch::batch_cmd(command)),
        Command::Materialize { overrides, args } => {
            rt.block_on(batch::materialize_cmd(overrides, args))
        }
        Command::Generate { overrides, args } => {
            rt.block_on(pipeline::generate_cmd(overrides, args))
        }
        Command::Demo {
            overrides,
            users,
            products,
            seed,
            rate,
            batch_every,
        } => rt.block_on(pipeline::demo_cmd(
            overrides,
            DemoData {
                users,
                products,
                seed,
                rate,
                batch_every,
            },
        )),
    };
    // Exports the spans still buffered, while the runtime still runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A log pipeline reading JSON lines gets the reason as one too.
        Err(e) if settings.log_format == quiver_core::telemetry::LogFormat::Json => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `[telemetry]` settings of a command's configuration and its
/// default `service.name`. A configuration that does not load gives the
/// defaults here (with `QUIVER_LOG_FORMAT`, so that the reason is written
/// as asked): the command itself then reports why.
fn telemetry_of(command: &Command) -> (quiver_core::telemetry::TelemetrySettings, &'static str) {
    let load = |o: &Overrides| {
        Config::load(o, &|k| std::env::var(k).ok())
            .map(|c| c.telemetry)
            .unwrap_or_else(|_| quiver_core::telemetry::TelemetrySettings {
                log_format: std::env::var("QUIVER_LOG_FORMAT")
                    .ok()
                    .and_then(|f| f.parse().ok())
                    .unwrap_or_default(),
                ..Default::default()
            })
    };
    match command {
        Command::Serve { overrides } => (load(overrides), "quiver-serve"),
        Command::Ingest { overrides, .. } => (load(overrides), "quiver-ingest"),
        Command::Generate { overrides, .. } => (load(overrides), "quiver-generate"),
        Command::Demo { overrides, .. } => (load(overrides), "quiver-demo"),
        Command::Materialize { overrides, .. } => (load(overrides), "quiver-materialize"),
        Command::Batch { command } => (load(command.overrides()), "quiver-batch"),
        Command::Registry { .. } | Command::Auth { .. } => (load(&Overrides::default()), "quiver"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn validate(
    path: &std::path::Path,
    archive: Option<String>,
    config: Option<PathBuf>,
) -> Result<()> {
    let reg =
        Arc::new(Registry::load(path).map_err(|e| anyhow::anyhow!("registry is invalid:\n{e}"))?);
    check_on_demand(&reg, &path.display().to_string())?;
    // SQL views are planned against the registry's archive schema and, with
    // an offline store, its declared tables; without one, against an empty
    // archive directory.
    let empty = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (offline, with_tables) = match &archive {
        Some(location) => {
            let overrides = Overrides {
                config,
                archive: Some(location.clone()),
                ..Default::default()
            };
            let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
            (batch::offline(&cfg, reg.clone())?, true)
        }
        None => {
            let dir = empty
                .path()
                .to_str()
                .context("temporary directory is not UTF-8")?;
            let off = quiver_batch::Offline::open(reg.clone(), dir, &[])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (off, false)
        }
    };
    let report = offline
        .plan_all(with_tables)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !report.problems.is_empty() {
        let lines: Vec<String> = report
            .problems
            .iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect();
        bail!("registry is invalid:\n{}", lines.join("\n"));
    }
    println!(
        "{}: ok ({} entities, {} event types, {} feature views, {} feature services)",
        path.display(),
        reg.entities().len(),
        reg.event_types().len(),
        reg.views().len(),
        reg.services().len()
    );
    if !report.planned.is_empty() {
        println!("SQL views planned: {}", report.planned.join(", "));
    }
    for (view, tables) in &report.skipped {
        println!(
            "SQL view {view} not planned: it reads declared tables ({tables}) whose schemas are in the offline store; pass --archive to check it"
        );
    }
    Ok(())
}

/// What `quiver demo` generates.
#[derive(Debug, Clone, Copy)]
struct DemoData {
    users: u64,
    products: u64,
    seed: u64,
    rate: f64,
    batch_every: std::time::Duration,
}

fn load_registry(cfg: &Config) -> Result<Registry> {
    let (reg, name) = match &cfg.registry.path {
        Some(p) => (
            Registry::load(p).map_err(|e| anyhow::anyhow!("registry is invalid:\n{e}"))?,
            p.display().to_string(),
        ),
        None => {
            tracing::info!("no registry configured; using the bundled sample registry (registry/features.toml)");
            let name = "bundled registry/features.toml";
            (
                Registry::from_toml(name, SAMPLE_REGISTRY).map_err(|e| anyhow::anyhow!("{e}"))?,
                name.to_owned(),
            )
        }
    };
    check_on_demand(&reg, &name)?;
    Ok(reg)
}

/// Refuses a registry whose on-demand expressions do not compile, each
/// problem on a line (see `quiver_batch::ondemand::compile`).
fn check_on_demand(reg: &Registry, name: &str) -> Result<()> {
    let (_, problems) = quiver_batch::ondemand::compile(reg);
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems.iter().map(|p| format!("{name}: {p}")).collect();
    bail!("registry is invalid:\n{}", lines.join("\n"))
}

async fn serve_cmd(overrides: Overrides) -> Result<()> {
    let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
    let registry = Arc::new(load_registry(&cfg)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = open_online_store(&cfg, clock.clone())?;
    let sink: Option<Arc<dyn EventSink>> = if cfg.kafka.brokers.is_empty() {
        tracing::info!("no kafka.brokers configured: PushEvents answers UNAVAILABLE");
        None
    } else {
        let kafka = cfg.kafka(&cfg.kafka.brokers);
        Some(Arc::new(
            quiver_ingest::KafkaEventSink::new(&kafka, registry.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ))
    };
    let offline = batch::offline_if_configured(&cfg, registry.clone())?;
    serve(
        &cfg,
        registry,
        store,
        Arc::new(Metrics::new()),
        clock,
        sink,
        offline,
        None,
    )
    .await
}

/// Opens the configured online store (and, for the embedded one, starts
/// its periodic sweep of expired rows).
fn open_online_store(cfg: &Config, clock: Arc<dyn Clock>) -> Result<Arc<dyn OnlineStore>> {
    let s = &cfg.online_store;
    Ok(match s.backend {
        Backend::Embedded => {
            let store =
                Arc::new(EmbeddedStore::open(&s.path, clock).map_err(|e| anyhow::anyhow!("{e}"))?);
            tracing::info!(path = %s.path.display(), "online store: embedded");
            let sweeper = store.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
                loop {
                    every.tick().await;
                    match sweeper.sweep_expired().await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(rows = n, "removed expired rows from the embedded store")
                        }
                        Err(e) => tracing::warn!(error = %e, "sweeping expired rows failed"),
                    }
                }
            });
            store
        }
        Backend::RedisCluster => {
            let nodes: Vec<String> = s
                .cluster_nodes
                .iter()
                .map(|u| quiver_core::store::redis_url_redacted(u))
                .collect();
            tracing::info!(nodes = ?nodes, "online store: redis cluster");
            Arc::new(
                RedisClusterStore::new(&s.cluster_nodes, s.timeout, &s.redis_tls())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
        }
        Backend::Redis => {
            tracing::info!(url = %quiver_core::store::redis_url_redacted(&s.redis_url), "online store: redis");
            Arc::new(
                RedisStore::new(&RedisConfig {
                    url: s.redis_url.clone(),
                    pool_size: s.pool_size,
                    timeout: s.timeout,
                    tls: s.redis_tls(),
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
        }
    })
}

/// Serves `registry` over `store` until SIGTERM/ctrl-c; `demo` seeds
/// sample batch features first.
// serve and demo each pass their own parts; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &Config,
    registry: Arc<Registry>,
    store: Arc<dyn OnlineStore>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    sink: Option<Arc<dyn EventSink>>,
    offline: Option<Arc<quiver_batch::Offline>>,
    demo: Option<DemoData>,
) -> Result<()> {
    let s = &cfg.online_store;
    let mut service = FeatureServer::new(
        registry,
        store,
        clock.clone(),
        cfg.limits(),
        s.expiry_grace,
        metrics,
    );
    if let Some(sink) = sink {
        service = service
            .with_event_sink(sink)
            .with_event_time_bounds(cfg.event_time_bounds());
    }
    match offline {
        Some(off) => service = service.with_offline(off),
        None => {
            tracing::info!("no archive.location: GetHistoricalFeatures answers FAILED_PRECONDITION")
        }
    }
    let settings = cfg.auth.settings();
    if settings.enabled() {
        let auth = quiver_server::auth::Authenticator::new(settings, clock.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(?auth, "authentication on: API keys required");
        service = service.with_auth(Arc::new(auth));
    } else {
        for addr in [cfg.server.grpc_addr, cfg.server.http_addr] {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "listening beyond this machine WITHOUT AUTHENTICATION: anyone who reaches {addr} can read every feature, overwrite values and push events; configure API keys ([auth] keys_file, --auth-keys-file) or bind to 127.0.0.1"
                );
            }
        }
    }
    let service = Arc::new(service);

    if let Some(d) = demo {
        let started = std::time::Instant::now();
        let seeded = demo::seed(&service, d.users, d.products, d.seed, clock.now_micros())
            .await
            .context("writing sample features")?;
        tracing::info!(
            rows = seeded.rows,
            users = d.users,
            products = d.products,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "wrote sample features"
        );
    }

    let tls = match cfg.server.tls.settings() {
        None => None,
        Some(settings) => {
            let tls = quiver_server::tls::Tls::new(settings).map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(?tls, "TLS on both listeners");
            Some(Arc::new(tls))
        }
    };
    let grpc = TcpListener::bind(cfg.server.grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", cfg.server.grpc_addr))?;
    let http = TcpListener::bind(cfg.server.http_addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", cfg.server.http_addr))?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    // One machine-readable line on stdout, for scripts and tests that bind port 0.
    let signal = shutdown_signal();
    println!("quiver listening grpc={grpc_addr} http={http_addr}");
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%grpc_addr, %http_addr, "serving; try: curl {scheme}://{http_addr}/api/v1/features/user/user_123");

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        signal.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stopping_tx.send(());
    };
    let options = quiver_server::RunOptions {
        health_interval: cfg.server.health_interval,
        tls,
    };
    let server = quiver_server::run_with(service, grpc, http, options, shutdown);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(cfg.server.shutdown_timeout).await;
        } => {
            tracing::warn!(timeout = ?cfg.server.shutdown_timeout, "in-flight requests did not finish in time; exiting");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    // Registered now, not when first polled: a SIGTERM right after the
    // "listening" line must stop the process gracefully, not kill it.
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
