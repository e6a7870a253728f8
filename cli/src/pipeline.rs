//! The speed-layer subcommands: `ingest`, `generate` and `demo`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::event::{Event, EventSink};
use quiver_core::time::{duration_micros, parse_rfc3339, Micros};
use quiver_core::wire::event_to_pb;
use quiver_core::{Clock, OnlineStore, Registry, SystemClock};
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::{
    Applier, Generator, GeneratorConfig, IngestConfig, IngestStats, Ingestor, KafkaConfig,
    KafkaEventSink,
};
use quiver_proto::v1 as pb;
use quiver_server::Metrics;
use rdkafka::mocking::MockCluster;

use crate::config::{Config, Overrides};
use crate::{load_registry, open_online_store, serve, shutdown_signal, DemoData};

/// Flags of `quiver generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Where events go: `kafka` (the configured brokers and topic) or `grpc` (PushEvents).
    #[arg(long, default_value = "kafka")]
    pub to: String,
    /// gRPC endpoint for `--to grpc`.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub grpc_url: String,
    /// Events to produce; 0 runs until interrupted.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Events per second; 0 is as fast as the target accepts.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Seed: the same seed produces the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Distinct users (user_0 ...).
    #[arg(long, default_value_t = 5_000)]
    pub users: u64,
    /// Distinct products (product_0 ...).
    #[arg(long, default_value_t = 1_000)]
    pub products: u64,
    /// Event time of the first event (RFC 3339); default now.
    #[arg(long)]
    pub start: Option<String>,
    /// Event-time step between events (e.g. `10ms`); default 1 s / rate, or 1ms.
    #[arg(long)]
    pub time_step: Option<humantime::Duration>,
    /// Events per produce call.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// API key for `--to grpc` when the server requires one (sent as
    /// `authorization: Bearer <key>`).
    #[arg(long, env = "QUIVER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

fn err(e: quiver_core::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn kafka_of(cfg: &Config) -> Result<KafkaConfig> {
    if cfg.kafka.brokers.is_empty() {
        bail!("no Kafka brokers configured: pass --kafka-brokers host:port (or QUIVER_KAFKA_BROKERS), or run `quiver demo` for an in-process one");
    }
    Ok(cfg.kafka(&cfg.kafka.brokers))
}

fn archiver(cfg: &Config, registry: &Arc<Registry>) -> Result<Option<Archiver>> {
    let a = &cfg.archive;
    if a.location.is_empty() {
        tracing::warn!("archive.location is empty: raw events are not archived and the batch layer will not see them");
        return Ok(None);
    }
    let (store, root) = open_store(&a.location, &a.store_options()).map_err(err)?;
    tracing::info!(location = %a.location, "raw-event archive");
    Ok(Some(Archiver::new(
        store,
        root,
        registry.clone(),
        ArchiveConfig {
            roll_bytes: a.roll_bytes,
            roll_interval: a.roll_interval,
        },
    )))
}

fn ingestor(
    cfg: &Config,
    kafka: &KafkaConfig,
    registry: &Arc<Registry>,
    store: Arc<dyn OnlineStore>,
) -> Result<Ingestor> {
    let applier = Applier::new(registry.clone(), store, cfg.online_store.expiry_grace);
    Ingestor::new(
        kafka,
        IngestConfig {
            batch_max: cfg.ingest.batch_max,
            batch_wait: cfg.ingest.batch_wait,
            dead_letter_topic: cfg.kafka.dead_letter_topic.clone(),
            event_time_bounds: cfg.event_time_bounds(),
            ..IngestConfig::default()
        },
        registry.clone(),
        applier,
        archiver(cfg, registry)?,
    )
    .map_err(err)
}

/// Logs ingest progress at most every 10 s.
fn progress_logger() -> impl FnMut(&IngestStats) {
    let started = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(60);
    move |s: &IngestStats| {
        if last.elapsed() >= Duration::from_secs(10) {
            last = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                events = s.events,
                dead_letters = s.dead_letters,
                out_of_range = s.out_of_range,
                too_late = s.online.events_too_late,
                duplicates = s.online.events_duplicate,
                replayed = s.online.tiles_replayed,
                events_per_s = (s.events as f64 / secs).round(),
                tiles = s.online.tiles_written,
                rows = s.online.rows_written,
                archived = s.archived.events,
                files = s.archived.files,
                "ingesting"
            );
        }
    }
}

/// The HTTP endpoints of a process without the REST gateway (`quiver
/// ingest`), answering as the server's do: `GET /metrics` (Prometheus text
/// format), `GET /health` (liveness: 200 `{"status":"ok"}`) and `GET
/// /ready` (200 `{"status":"ready"}` while the consume loop runs, else 503
/// `{"status":"not_ready"}`).
fn ops_router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let m = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            quiver_core::metrics::TEXT_CONTENT_TYPE,
                        )],
                        m.render(),
                    )
                }
            }),
        )
        // The server's own liveness handler: the same answer.
        .route("/health", get(quiver_server::rest::health))
        .route(
            "/ready",
            get(move || {
                let up = metrics.ingest.is_up();
                async move {
                    if up {
                        (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"status": "ready"})),
                        )
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({"status": "not_ready"})),
                        )
                    }
                }
            }),
        )
}

/// Binds `addr` and serves [`ops_router`] there in the background; returns
/// the bound address.
async fn serve_ops(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for metrics on {addr} (ingest.metrics_addr, --metrics-addr)")
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, ops_router(metrics)).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

/// `quiver ingest`.
pub async fn ingest_cmd(overrides: Overrides, metrics_addr: Option<SocketAddr>) -> Result<()> {
    let mut cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
    if let Some(a) = metrics_addr {
        cfg.ingest.metrics_addr = a;
    }
    let registry = Arc::new(load_registry(&cfg)?);
    let store = open_online_store(&cfg, Arc::new(SystemClock))?;
    let kafka = kafka_of(&cfg)?;
    let metrics = Arc::new(Metrics::new());
    let ops = serve_ops(cfg.ingest.metrics_addr, metrics.clone()).await?;
    // One machine-readable line on stdout, as serve prints its listeners.
    println!("quiver ingest metrics={ops}");
    tracing::info!(brokers = %kafka.brokers, topic = %kafka.topic, group = %kafka.group_id, metrics = %ops, "ingesting; /metrics, /health and /ready on {ops}");
    let ing = ingestor(&cfg, &kafka, &registry, store)?.with_metrics(metrics);
    let stats = ing
        .run(shutdown_signal(), progress_logger())
        .await
        .map_err(err)?;
    tracing::info!(?stats, "ingest stopped");
    Ok(())
}

/// Where generated events go.
enum Target {
    Sink(Arc<dyn EventSink>),
    Grpc(
        Box<quiver_proto::FeatureServiceClient<quiver_proto::tonic::transport::Channel>>,
        Option<quiver_proto::tonic::metadata::MetadataValue<quiver_proto::tonic::metadata::Ascii>>,
    ),
}

impl Target {
    async fn send(&mut self, events: &[Event]) -> Result<u64> {
        match self {
            Target::Sink(s) => {
                let results = s.publish(events).await.map_err(err)?;
                if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                    bail!("the event log refused events: {e}");
                }
                Ok(results.len() as u64)
            }
            Target::Grpc(c, key) => {
                let mut req = quiver_proto::tonic::Request::new(pb::PushEventsRequest {
                    events: events.iter().map(event_to_pb).collect(),
                });
                if let Some(k) = key {
                    req.metadata_mut().insert("authorization", k.clone());
                }
                let resp = c
                    .push_events(req)
                    .await
                    .context("PushEvents failed")?
                    .into_inner();
                if let Some(r) = resp.rejected.first() {
                    bail!("PushEvents rejected event {:?}: {}", r.event_id, r.reason);
                }
                Ok(resp.accepted)
            }
        }
    }
}

/// Produces `n` events (0: until `stop`), paced to `rate` per second.
async fn generate(
    mut gen: Generator,
    mut target: Target,
    n: u64,
    rate: f64,
    batch: usize,
    bar: ProgressBar,
    stop: impl std::future::Future<Output = ()>,
) -> Result<u64> {
    tokio::pin!(stop);
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        if n > 0 && sent >= n {
            break;
        }
        let want = if n > 0 {
            (n - sent).min(batch as u64)
        } else {
            batch as u64
        };
        let want = if rate > 0.0 {
            want.min((rate / 10.0).ceil().max(1.0) as u64)
        } else {
            want
        };
        let events = gen.batch(want as usize);
        sent += target.send(&events).await?;
        bar.set_position(sent);
        // Pace to `rate`; without one, only look whether to stop.
        let due = if rate > 0.0 {
            started + Duration::from_secs_f64(sent as f64 / rate)
        } else {
            Instant::now()
        };
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
    }
    bar.finish();
    Ok(sent)
}

fn progress_bar(n: u64) -> ProgressBar {
    let bar = if n > 0 {
        ProgressBar::new(n)
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn generator_config(a: &GenerateArgs, now: Micros) -> Result<GeneratorConfig> {
    let start = match &a.start {
        Some(s) => parse_rfc3339(s).map_err(|m| anyhow::anyhow!("--start: {m}"))?,
        None => now,
    };
    let step = match a.time_step {
        Some(d) => duration_micros(d.into()),
        None if a.rate > 0.0 => (1e6 / a.rate) as i64,
        None => 1_000,
    };
    Ok(GeneratorConfig {
        seed: a.seed,
        users: a.users,
        products: a.products,
        start,
        time_step: step.max(2),
    })
}

/// `quiver generate`.
pub async fn generate_cmd(overrides: Overrides, args: GenerateArgs) -> Result<()> {
    let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
    let registry = Arc::new(load_registry(&cfg)?);
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a non-negative number of events per second");
    }
    let gen = Generator::new(
        generator_config(&args, SystemClock.now_micros())?,
        &registry,
    )
    .map_err(err)?;
    let target = match args.to.as_str() {
        "kafka" => {
            let kafka = kafka_of(&cfg)?;
            Target::Sink(Arc::new(
                KafkaEventSink::new(&kafka, registry.clone()).map_err(err)?,
            ))
        }
        "grpc" => Target::Grpc(
            Box::new(
                quiver_proto::FeatureServiceClient::connect(args.grpc_url.clone())
                    .await
                    .with_context(|| format!("cannot connect to {}", args.grpc_url))?,
            ),
            match &args.api_key {
                None => None,
                Some(k) => Some(
                    format!("Bearer {k}")
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--api-key: not a valid header value"))?,
                ),
            },
        ),
        other => bail!("--to {other:?}: use kafka or grpc"),
    };
    let started = Instant::now();
    let sent = generate(
        gen,
        target,
        args.events,
        args.rate,
        args.batch,
        progress_bar(args.events),
        shutdown_signal(),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "generated {sent} events in {secs:.1} s ({:.0} events/s)",
        sent as f64 / secs.max(1e-3)
    );
    Ok(())
}

/// `quiver demo`: an in-process Kafka (librdkafka's mock cluster), the
/// event generator pushing through the same path as `PushEvents`, the
/// ingest loop into the embedded store and local archive, and the server.
pub async fn demo_cmd(overrides: Overrides, demo: DemoData) -> Result<()> {
    let mut cfg = Config::load_demo(&overrides, &|k| std::env::var(k).ok())?;
    let registry = Arc::new(load_registry(&cfg)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = open_online_store(&cfg, clock.clone())?;

    // The mock cluster lives as long as this function; it keeps events in
    // memory, so it is for trying quiver out, not for keeping data.
    let cluster = if cfg.kafka.brokers.is_empty() {
        // Each run's in-process topic is a new topic whose offsets start at
        // 0, while the online store and the archive persist: a topic name
        // of its own per run keeps its events from being taken for replays
        // of an earlier run's (see `KafkaConfig::topic_epoch`).
        cfg.kafka.topic = format!("{}-demo-{}", cfg.kafka.topic, clock.now_micros());
        let c = MockCluster::new(1).context("starting the in-process Kafka")?;
        c.create_topic(&cfg.kafka.topic, 3, 1)
            .context("creating the event topic")?;
        c.create_topic(&cfg.kafka.dead_letter_topic, 1, 1)
            .context("creating the dead-letter topic")?;
        cfg.kafka.brokers = c.bootstrap_servers();
        tracing::info!(brokers = %cfg.kafka.brokers, "in-process Kafka (mock cluster) started");
        Some(c)
    } else {
        None
    };
    let kafka = cfg.kafka(&cfg.kafka.brokers);
    let sink: Arc<dyn EventSink> =
        Arc::new(KafkaEventSink::new(&kafka, registry.clone()).map_err(err)?);

    // One registry for the whole process: the server's /metrics shows
    // ingest and freshness too.
    let metrics = Arc::new(Metrics::new());
    let ing = ingestor(&cfg, &kafka, &registry, store.clone())?.with_metrics(metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ingest = tokio::spawn(ing.run(stopped(stop_rx.clone()), progress_logger()));
    let generator = if demo.rate > 0.0 {
        let gen = Generator::new(
            GeneratorConfig {
                seed: demo.seed,
                users: demo.users,
                products: demo.products,
                start: clock.now_micros(),
                time_step: ((1e6 / demo.rate) as i64).max(2),
            },
            &registry,
        )
        .map_err(err)?;
        tracing::info!(rate = demo.rate, "generating sample events");
        Some(tokio::spawn(generate(
            gen,
            Target::Sink(sink.clone()),
            0,
            demo.rate,
            500,
            ProgressBar::hidden(),
            stopped(stop_rx.clone()),
        )))
    } else {
        None
    };

    let offline = crate::batch::offline_if_configured(&cfg, registry.clone())?;
    let batch = match &offline {
        Some(off) if !demo.batch_every.is_zero() => {
            tracing::info!(every = ?demo.batch_every, "running the batch layer (SQL views, materialization) on a timer");
            Some(tokio::spawn(crate::batch::schedule(
                off.clone(),
                store.clone(),
                clock.clone(),
                demo.batch_every,
                cfg.online_store.expiry_grace,
                stopped(stop_rx.clone()),
            )))
        }
        _ => None,
    };

    let served = serve(
        &cfg,
        registry,
        store,
        metrics,
        clock,
        Some(sink),
        offline,
        Some(demo),
    )
    .await;
    let _ = stop_tx.send(true);
    if let Some(b) = batch {
        if let Err(e) = b.await {
            tracing::warn!(error = %e, "batch layer task failed");
        }
    }
    if let Some(g) = generator {
        match g.await {
            Ok(Ok(n)) => tracing::info!(events = n, "generator stopped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "generator failed"),
            Err(e) => tracing::warn!(error = %e, "generator task failed"),
        }
    }
    match ingest.await {
        Ok(Ok(stats)) => tracing::info!(?stats, "ingest stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "ingest failed"),
        Err(e) => tracing::warn!(error = %e, "ingest task failed"),
    }
    drop(cluster);
    served
}
