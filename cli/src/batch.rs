//! The batch-layer subcommands: `batch run`, `batch retrieve` and
//! `materialize`. They read and write the offline store at
//! `archive.location` (where `quiver ingest` archives raw events).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_batch::materialize::MaterializeOptions;
use quiver_batch::{retrieve, Offline};
use quiver_core::metrics::{BatchJob, BatchMetrics};
use quiver_core::registry::ViewSource;
use quiver_core::telemetry;
use quiver_core::time::{format_rfc3339, parse_rfc3339, Micros};
use quiver_core::{Clock, OnlineStore, Registry, SystemClock};
use tracing::field::Empty;

use crate::config::{Config, Overrides};
use crate::{load_registry, open_online_store};

fn err(e: quiver_core::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// `quiver batch ...`
#[derive(Debug, clap::Subcommand)]
pub enum BatchCommand {
    /// Run SQL feature views over the offline store and commit their feature tables.
    Run {
        #[command(flatten)]
        overrides: Overrides,
        /// Views to run, comma-separated; default every SQL view.
        #[arg(long, value_delimiter = ',')]
        views: Vec<String>,
    },
    /// Build a point-in-time correct training set for an entity table.
    Retrieve {
        #[command(flatten)]
        overrides: Overrides,
        /// Entity table: .parquet or .csv with the join keys and event_timestamp.
        #[arg(long)]
        entities: PathBuf,
        /// Feature references, comma-separated ("view:feature", "view:*").
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "feature_service"
        )]
        features: Vec<String>,
        /// A feature service of the registry instead of --features.
        #[arg(long, conflicts_with = "features")]
        feature_service: Option<String>,
        /// Name columns "view__feature".
        #[arg(long)]
        full_feature_names: bool,
        /// Output Parquet file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Flags of `quiver materialize`.
#[derive(Debug, Clone, clap::Args)]
pub struct MaterializeArgs {
    /// Views to materialize, comma-separated; default every SQL and event view.
    #[arg(long, value_delimiter = ',')]
    pub views: Vec<String>,
    /// Start of the range (RFC 3339); default each view's watermark (incremental).
    #[arg(long)]
    pub start: Option<String>,
    /// End of the range, exclusive (RFC 3339); default now.
    #[arg(long)]
    pub end: Option<String>,
}

/// The offline store of the configuration.
pub fn offline(cfg: &Config, registry: Arc<Registry>) -> Result<Offline> {
    let a = &cfg.archive;
    if a.location.is_empty() {
        bail!("archive.location is empty: set it (or --archive / QUIVER_ARCHIVE) to the offline store");
    }
    Offline::open(registry, &a.location, &a.store_options()).map_err(err)
}

/// The offline store of the configuration, or `None` when `archive.location`
/// is empty (the server then answers historical requests FAILED_PRECONDITION).
pub fn offline_if_configured(
    cfg: &Config,
    registry: Arc<Registry>,
) -> Result<Option<Arc<Offline>>> {
    if cfg.archive.location.is_empty() {
        return Ok(None);
    }
    offline(cfg, registry).map(|o| Some(Arc::new(o)))
}

impl BatchCommand {
    /// The flags naming the configuration.
    pub fn overrides(&self) -> &Overrides {
        match self {
            BatchCommand::Run { overrides, .. } | BatchCommand::Retrieve { overrides, .. } => {
                overrides
            }
        }
    }
}

/// Pushes one run's metrics ([`BatchMetrics`]) to `metrics.pushgateway_url`
/// under `job` (POST: metrics of an earlier push that this one does not
/// carry, such as the last success of a failed run, are kept). A push that
/// fails is reported on stderr and does not fail the run: the data is
/// committed either way.
async fn push_metrics(
    cfg: &Config,
    job: BatchJob,
    views: &[(String, u64, Duration)],
    elapsed: Duration,
    ok: bool,
) {
    let base = cfg.metrics.pushgateway_url.trim_end_matches('/');
    if base.is_empty() {
        return;
    }
    let ended = SystemClock.now_micros() as f64 / 1e6;
    let body = BatchMetrics::of_run(views, elapsed, ok, ended).render();
    let url = format!("{base}/metrics/job/{}", job.job());
    let sent = async {
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?
            .post(&url)
            .header("content-type", "text/plain; version=0.0.4")
            .body(body)
            .send()
            .await?;
        resp.error_for_status().map(|_| ())
    };
    match sent.await {
        Ok(()) => eprintln!("metrics pushed to {url}"),
        Err(e) => eprintln!("warning: pushing metrics to {url} failed: {e}"),
    }
}

fn parse_time(flag: &str, s: &str) -> Result<Micros> {
    parse_rfc3339(s).map_err(|m| anyhow::anyhow!("--{flag}: {m}"))
}

/// Runs `quiver batch ...`.
pub async fn batch_cmd(cmd: BatchCommand) -> Result<()> {
    match cmd {
        BatchCommand::Run { overrides, views } => {
            let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
            let registry = Arc::new(load_registry(&cfg)?);
            let off = offline(&cfg, registry)?;
            let started = Instant::now();
            let span =
                telemetry::span(|| tracing::info_span!("batch run", otel.name = "batch run"));
            let result = telemetry::in_span(&span, off.run(&views, SystemClock.now_micros())).await;
            let elapsed = started.elapsed();
            let (reports, failure) = match result {
                Ok(r) => (r, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            let mut ran = Vec::with_capacity(reports.len());
            for r in reports {
                println!(
                    "{}: {} rows committed as {} in {:.2}s",
                    r.view,
                    r.rows,
                    r.run,
                    r.elapsed.as_secs_f64()
                );
                ran.push((r.view, r.rows, r.elapsed));
            }
            push_metrics(&cfg, BatchJob::Run, &ran, elapsed, failure.is_none()).await;
            if let Some(e) = failure {
                return Err(err(e));
            }
            println!(
                "batch run: {} views, {} rows in {:.2}s",
                ran.len(),
                ran.iter().map(|(_, n, _)| n).sum::<u64>(),
                elapsed.as_secs_f64()
            );
            Ok(())
        }
        BatchCommand::Retrieve {
            overrides,
            entities,
            features,
            feature_service,
            full_feature_names,
            out,
        } => {
            let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
            let registry = Arc::new(load_registry(&cfg)?);
            let sel = match &feature_service {
                Some(s) => registry.resolve_service(s),
                None => registry.resolve_refs(&features),
            }
            .map_err(err)?;
            let off = offline(&cfg, registry.clone())?;
            let started = Instant::now();
            let span = telemetry::span(|| {
                tracing::info_span!(
                    "batch retrieve",
                    otel.name = "get_historical_features",
                    quiver.entity_rows = Empty,
                )
            });
            let retrieve = async {
                let table = quiver_batch::entities::read_file(&registry, &entities).await?;
                let rows = table.num_rows();
                tracing::Span::current().record("quiver.entity_rows", telemetry::int(rows));
                let result = off.historical(table, &sel, full_feature_names).await?;
                Ok::<_, quiver_core::Error>((rows, result))
            };
            let (rows, result) = telemetry::in_span(&span, retrieve).await.map_err(err)?;
            retrieve::write_parquet_file(&result, &out).map_err(err)?;
            println!(
                "{}: {rows} entity rows x {} features in {:.2}s",
                out.display(),
                sel.columns.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Runs `quiver materialize`.
pub async fn materialize_cmd(overrides: Overrides, args: MaterializeArgs) -> Result<()> {
    let cfg = Config::load(&overrides, &|k| std::env::var(k).ok())?;
    let registry = Arc::new(load_registry(&cfg)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_micros();
    let opts = MaterializeOptions {
        views: args.views,
        start: args
            .start
            .as_deref()
            .map(|s| parse_time("start", s))
            .transpose()?,
        end: match args.end.as_deref() {
            Some(s) => parse_time("end", s)?,
            None => now,
        },
        expiry_grace: cfg.online_store.expiry_grace,
        now,
    };
    let off = offline(&cfg, registry)?;
    let store = open_online_store(&cfg, clock)?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let progress = |view: &str, entities: u64, written: u64| {
        bar.set_message(format!(
            "{view}: {entities} entities read, {written} written"
        ));
    };
    let started = Instant::now();
    let span = telemetry::span(|| tracing::info_span!("materialize", otel.name = "materialize"));
    let result = telemetry::in_span(&span, off.materialize(store, &opts, &progress)).await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            push_metrics(&cfg, BatchJob::Materialize, &[], elapsed, false).await;
            return Err(err(e));
        }
    };
    let ran: Vec<(String, u64, Duration)> = reports
        .iter()
        .map(|r| (r.view.clone(), r.written, r.elapsed))
        .collect();
    for r in reports {
        println!(
            "{}: [{} .. {}) {} entities: {} written, {} stale (online already newer), {} expired; {:.2}s",
            r.view,
            r.start.map_or("beginning".to_owned(), format_rfc3339),
            format_rfc3339(r.end),
            r.entities,
            r.written,
            r.stale,
            r.expired,
            r.elapsed.as_secs_f64()
        );
    }
    println!(
        "materialize: {} views, {} rows written in {:.2}s",
        ran.len(),
        ran.iter().map(|(_, n, _)| n).sum::<u64>(),
        elapsed.as_secs_f64()
    );
    push_metrics(&cfg, BatchJob::Materialize, &ran, elapsed, true).await;
    Ok(())
}

/// The batch layer on a timer, as `quiver demo` runs it next to ingest and
/// the server: every `every`, run the SQL views over what has been archived
/// so far and commit their tables, then materialize every SQL and event view
/// incrementally (from its watermark to now) into `store`. A failed round is
/// logged and the next one tries again; `stop` ends the loop between rounds
/// (a round in progress finishes, so no commit or watermark is cut short).
pub async fn schedule(
    off: Arc<Offline>,
    store: Arc<dyn OnlineStore>,
    clock: Arc<dyn Clock>,
    every: Duration,
    expiry_grace: Duration,
    stop: impl Future<Output = ()>,
) {
    let has_sql = off
        .registry()
        .views()
        .iter()
        .any(|v| matches!(v.source, ViewSource::Sql { .. }));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => {}
        }
        let now = clock.now_micros();
        if has_sql {
            match off.run(&[], now).await {
                Ok(reports) => {
                    for r in reports {
                        tracing::info!(
                            view = %r.view,
                            rows = r.rows,
                            run = %r.run,
                            elapsed_ms = r.elapsed.as_millis() as u64,
                            "batch run committed"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "batch run failed; retrying next round"),
            }
        }
        let opts = MaterializeOptions {
            views: Vec::new(),
            start: None,
            end: now,
            expiry_grace,
            now,
        };
        match off.materialize(store.clone(), &opts, &|_, _, _| {}).await {
            Ok(reports) => {
                for r in reports.into_iter().filter(|r| r.entities > 0) {
                    tracing::info!(
                        view = %r.view,
                        start = %r.start.map_or("beginning".to_owned(), format_rfc3339),
                        end = %format_rfc3339(r.end),
                        entities = r.entities,
                        written = r.written,
                        stale = r.stale,
                        expired = r.expired,
                        "materialized"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "materialization failed; retrying next round"),
        }
    }
}
