//! `quiver materialize`: the latest value per entity of SQL and
//! latest-value event views, from the offline store into the online store.
//!
//! For a time range `[start, end)` the newest feature row per entity with
//! a feature time in the range is written through the online store's
//! event-time last-write-wins write, in pipelined chunks: running it twice,
//! or over overlapping ranges, or after ingest has written newer values,
//! never replaces a newer value with an older one.
//!
//! Without a start time the run is incremental: it starts at the view's
//! watermark (`_quiver/materialize/{view}.json`, the `end` of the last
//! successful run) and the watermark moves to `end` once every row is
//! written. Rows that arrive later with a feature time before the
//! watermark are not picked up incrementally; materialize that range
//! explicitly. Aggregation views are kept online by `quiver ingest`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use quiver_core::codec::{entity_key, row_key};
use quiver_core::columnar::value_at;
use quiver_core::registry::{FeatureView, ViewSource, TIMESTAMP_COLUMN};
use quiver_core::storage::{child, INTERNAL_DIR};
use quiver_core::store::{WriteOutcome, WriteRow};
use quiver_core::telemetry;
use quiver_core::time::{duration_micros, format_rfc3339, Micros};
use quiver_core::{Error, OnlineStore, Result, Value};
use serde::{Deserialize, Serialize};
use tracing::field::Empty;

use crate::offline::{df_error, Offline};
use crate::retrieve::latest_frame;

/// Rows per online write call.
const CHUNK_ROWS: usize = 500;
/// Record batches being written at once (each in calls of `CHUNK_ROWS`).
const IN_FLIGHT: usize = 8;

/// How a materialization run is bounded and written.
#[derive(Debug, Clone)]
pub struct MaterializeOptions {
    /// Views to materialize; empty: every SQL and latest-value event view.
    pub views: Vec<String>,
    /// Start of the range; `None`: each view's watermark (or the
    /// beginning of time on its first run).
    pub start: Option<Micros>,
    /// End of the range (exclusive).
    pub end: Micros,
    /// Online rows live this long after their TTL (as `WriteFeatures`).
    pub expiry_grace: Duration,
    /// The time now, for skipping rows that would expire at once.
    pub now: Micros,
}

/// What one view's materialization did.
#[derive(Debug, Clone, PartialEq)]
pub struct MaterializeReport {
    /// View name.
    pub view: String,
    /// Range start used (`None`: from the beginning).
    pub start: Option<Micros>,
    /// Range end.
    pub end: Micros,
    /// Entities with a row in the range.
    pub entities: u64,
    /// Rows the online store took.
    pub written: u64,
    /// Rows it already held newer values for.
    pub stale: u64,
    /// Rows not written because they would have expired already.
    pub expired: u64,
    /// Wall time.
    pub elapsed: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
struct Watermark {
    through: Micros,
    at: String,
}

impl Offline {
    fn watermark_path(&self, view: &str) -> object_store::path::Path {
        child(
            self.root(),
            &[INTERNAL_DIR, "materialize", &format!("{view}.json")],
        )
    }

    /// The end of the view's last successful materialization.
    pub async fn watermark(&self, view: &str) -> Result<Option<Micros>> {
        let w: Option<Watermark> = self
            .read_json(
                &self.watermark_path(view),
                &format!("materialization watermark of {view:?}"),
            )
            .await?;
        Ok(w.map(|w| w.through))
    }

    /// Materializes the selected views one after the other; `progress` is
    /// called with each view's name and the rows written so far.
    pub async fn materialize(
        &self,
        store: Arc<dyn OnlineStore>,
        opts: &MaterializeOptions,
        progress: &(dyn Fn(&str, u64, u64) + Sync),
    ) -> Result<Vec<MaterializeReport>> {
        let reg = self.registry().clone();
        let views: Vec<&FeatureView> = if opts.views.is_empty() {
            reg.views()
                .iter()
                .filter(|v| matches!(v.source, ViewSource::Sql { .. } | ViewSource::Events { .. }))
                .collect()
        } else {
            opts.views
                .iter()
                .map(|n| reg.require_view(n).map(|i| reg.view(i)))
                .collect::<Result<_>>()?
        };
        for v in &views {
            match v.source {
                ViewSource::Sql { .. } | ViewSource::Events { .. } => {}
                ViewSource::Aggregations { .. } => {
                    return Err(Error::invalid(format!(
                        "feature view {:?} aggregates events; `quiver ingest` keeps it online",
                        v.name
                    )))
                }
                ViewSource::Batch => {
                    return Err(Error::invalid(format!(
                    "feature view {:?} has no offline source (it is written through WriteFeatures)",
                    v.name
                )))
                }
                ViewSource::OnDemand { .. } => {
                    return Err(Error::invalid(format!(
                        "feature view {:?} is computed at request time; nothing of it is stored",
                        v.name
                    )))
                }
            }
        }
        let ctx = self.session().await?;
        let mut out = Vec::with_capacity(views.len());
        for v in views {
            let span = telemetry::span(|| {
                tracing::info_span!(
                    "materialize view",
                    otel.name = format!("materialize {}", v.name),
                    quiver.feature_view = v.name.as_str(),
                    quiver.rows = Empty,
                )
            });
            let report = telemetry::in_span(
                &span,
                self.materialize_view(&ctx, v, &store, opts, progress),
            )
            .await?;
            span.record("quiver.rows", telemetry::int(report.written));
            out.push(report);
        }
        Ok(out)
    }

    /// One view of [`Offline::materialize`].
    async fn materialize_view(
        &self,
        ctx: &SessionContext,
        v: &FeatureView,
        store: &Arc<dyn OnlineStore>,
        opts: &MaterializeOptions,
        progress: &(dyn Fn(&str, u64, u64) + Sync),
    ) -> Result<MaterializeReport> {
        let started = Instant::now();
        let start = match opts.start {
            Some(s) => Some(s),
            None => self.watermark(&v.name).await?,
        };
        if start.is_some_and(|s| s >= opts.end) {
            return Err(Error::invalid(format!(
                "feature view {:?}: the range starts at {} and ends at {}; the end must be later",
                v.name,
                format_rfc3339(start.unwrap_or(0)),
                format_rfc3339(opts.end)
            )));
        }
        let df = latest_frame(self, ctx, v, start, opts.end).await?;
        let mut report = MaterializeReport {
            view: v.name.clone(),
            start,
            end: opts.end,
            entities: 0,
            written: 0,
            stale: 0,
            expired: 0,
            elapsed: Duration::ZERO,
        };
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| df_error(&format!("feature view {:?}", v.name), e))?;
        let grace = duration_micros(opts.expiry_grace);
        let mut chunks = stream
            .map_err(|e| df_error(&format!("feature view {:?}: reading", v.name), e))
            .map(|b| b.and_then(|b| to_rows(v, &b, grace, opts.now)))
            .map_ok(|(rows, expired)| {
                let store = store.clone();
                async move {
                    let mut outcome = WriteOutcome::default();
                    for c in rows.chunks(CHUNK_ROWS) {
                        let o = store.write(c).await?;
                        outcome.written += o.written;
                        outcome.stale += o.stale;
                    }
                    Ok::<_, Error>((outcome, rows.len() as u64 + expired, expired))
                }
            })
            .try_buffered(IN_FLIGHT);
        while let Some((o, entities, expired)) = chunks.try_next().await? {
            report.written += o.written;
            report.stale += o.stale;
            report.expired += expired;
            report.entities += entities;
            progress(&v.name, report.entities, report.written);
        }
        let w = Watermark {
            through: opts.end,
            at: format_rfc3339(opts.now),
        };
        self.write_json(
            &self.watermark_path(&v.name),
            &w,
            &format!("materialization watermark of {:?}", v.name),
        )
        .await?;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

/// Online rows of one batch of latest rows (keys, `event_timestamp`,
/// every feature in view order), and how many were skipped as expired.
fn to_rows(
    view: &FeatureView,
    b: &RecordBatch,
    grace: Micros,
    now: Micros,
) -> Result<(Vec<WriteRow>, u64)> {
    let nk = view.join_keys.len();
    let ts = b.column(nk).as_primitive::<TimestampMicrosecondType>();
    let mut rows = Vec::with_capacity(b.num_rows());
    let mut expired = 0;
    for r in 0..b.num_rows() {
        let event_ts = ts.value(r);
        let expire_at = view.online_expiry(event_ts, grace);
        if expire_at.is_some_and(|e| e <= now) {
            expired += 1;
            continue;
        }
        let keys: Vec<Value> = (0..nk)
            .map(|k| value_at(b.column(k).as_ref(), view.key_types[k], r))
            .collect::<Result<_>>()?;
        let pairs: Vec<(&str, &Value)> = view
            .join_keys
            .iter()
            .map(String::as_str)
            .zip(keys.iter())
            .collect();
        let features = view
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                value_at(b.column(nk + 1 + i).as_ref(), f.value_type, r)
                    .map(|v| (f.name.clone(), v))
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!(
                                "feature view {:?}, feature {:?}, entity {}: {}",
                                view.name,
                                f.name,
                                entity_key(&pairs).unwrap_or_default(),
                                e.message()
                            ),
                        )
                    })
            })
            .collect::<Result<_>>()?;
        rows.push(WriteRow {
            key: row_key(&entity_key(&pairs)?, &view.name),
            event_ts,
            expire_at,
            features,
        });
    }
    debug_assert!(
        b.column(nk).null_count() == 0,
        "{TIMESTAMP_COLUMN} is never null"
    );
    Ok((rows, expired))
}
