//! Historical retrieval: a point-in-time correct training set for an
//! entity table.
//!
//! The entity table has the join keys of the selected views, an
//! `event_timestamp` column and any other columns (labels), which pass
//! through unchanged. Per view:
//! - SQL views read their committed feature table;
//! - latest-value event views read the archived events of their types
//!   (every event is a feature row at its event time);
//! - aggregation views compute their windows as of each row's time
//!   ([`crate::aggregate`]).
//!
//! Feature rows and entity rows meet in the as-of join of [`crate::pit`]:
//! feature time `<=` row time, within the view's TTL, newest wins.
//! Views written only through `WriteFeatures` have no offline history and
//! are refused.

use std::sync::Arc;

use arrow::array::BinaryBuilder;
use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::DataType;
use arrow::datatypes::{Field, Schema};
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::functions_window::expr_fn::{rank, row_number};
use datafusion::logical_expr::{cast as cast_expr, col, ident, lit, Expr, ExprFunctionExt};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use quiver_core::codec::{digest_order, tie_digest};
use quiver_core::columnar::{arrow_type, timestamp_type, value_at};
use quiver_core::registry::{
    EventField, FeatureRef, FeatureView, Selection, ViewSource, TIMESTAMP_COLUMN,
};
use quiver_core::time::{duration_micros, Micros};
use quiver_core::{Error, Result, Value, ValueType};

use crate::aggregate::aggregations_asof;
use crate::offline::{df_error, ts_lit, typed, Offline, EVENTS_TABLE};
use crate::pit::{asof_join, FeatureRows, KeyIndex};

/// Rows per record batch of a streamed result.
pub const STREAM_BATCH_ROWS: usize = 65_536;

/// The view's join-key columns of the entity table (already in their
/// entities' types, see [`crate::entities::typed`]).
fn entity_keys(entities: &RecordBatch, view: &FeatureView) -> Result<Vec<ArrayRef>> {
    view.join_keys
        .iter()
        .map(|k| {
            entities.column_by_name(k).cloned().ok_or_else(|| {
                Error::invalid(format!(
                    "the entity table has no column {k:?}, the join key of feature view {:?}",
                    view.name
                ))
            })
        })
        .collect()
}

/// Feature rows of a latest-value or SQL view, in the layout of
/// [`FeatureRows`]: keys, `event_timestamp`, every feature in declared
/// order (all of them: ties are broken by all features, so the answer for
/// one feature does not depend on which others were asked for).
async fn feature_frame(
    offline: &Offline,
    ctx: &SessionContext,
    view: &FeatureView,
) -> Result<DataFrame> {
    let at = |what: &str| format!("feature view {:?}: {what}", view.name);
    let keys = view
        .join_keys
        .iter()
        .zip(&view.key_types)
        .map(|(k, t)| typed(k, arrow_type(*t)));
    match &view.source {
        ViewSource::Sql { .. } => {
            let df = offline.feature_table(ctx, view).await?.ok_or_else(|| {
                Error::precondition(format!(
                    "feature view {:?} has no feature table yet; run `quiver batch run --views {}` first",
                    view.name, view.name
                ))
            })?;
            let mut select: Vec<Expr> = keys.collect();
            select.push(typed(TIMESTAMP_COLUMN, timestamp_type()));
            select.extend(
                view.features
                    .iter()
                    .map(|f| typed(&f.name, arrow_type(f.value_type))),
            );
            df.select(select).map_err(|e| df_error(&at("query"), e))
        }
        ViewSource::Events {
            event_types,
            fields,
        } => {
            let mut select: Vec<Expr> = keys.collect();
            select.push(cast_expr(ident("event_time"), timestamp_type()).alias(TIMESTAMP_COLUMN));
            for (feat, field) in view.features.iter().zip(fields) {
                let src = match field {
                    EventField::Attribute(a) => ident(a),
                    EventField::EventTime => ident("event_time"),
                };
                select.push(cast_expr(src, arrow_type(feat.value_type)).alias(&feat.name));
            }
            ctx.table(EVENTS_TABLE)
                .await
                .map_err(|e| df_error(&at("events"), e))?
                .filter(col("event_type").in_list(
                    event_types.iter().map(|t| lit(t.as_str())).collect(),
                    false,
                ))
                .and_then(|df| df.select(select))
                .map_err(|e| df_error(&at("query"), e))
        }
        ViewSource::Batch => Err(Error::precondition(format!(
            "feature view {:?} is written online only (WriteFeatures) and has no offline history; give it source = {{ sql = \"...\" }} to compute it in the batch layer",
            view.name
        ))),
        ViewSource::Aggregations { .. } => Err(Error::internal("aggregation views have no frame")),
        ViewSource::OnDemand { .. } => Err(Error::internal("on-demand views have no frame")),
    }
}

/// [`quiver_core::codec::tie_digest`] of a row's feature values as a
/// DataFusion function: arguments are the feature columns in the byte
/// order of their names, the result is the 20-byte digest.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TieDigest {
    types: Vec<ValueType>,
    signature: Signature,
}

impl ScalarUDFImpl for TieDigest {
    fn name(&self) -> &str {
        "quiver_tie_digest"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Binary)
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let n = args.number_rows;
        let columns = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let mut out = BinaryBuilder::with_capacity(n, n * 20);
        for row in 0..n {
            let values = columns
                .iter()
                .zip(&self.types)
                .map(|(c, ty)| value_at(c.as_ref(), *ty, row))
                .collect::<Result<Vec<Value>>>()
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
            out.append_value(tie_digest(values.iter().map(Some)));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// The tie digest of a view's feature row, see [`TieDigest`].
fn tie_digest_expr(view: &FeatureView) -> Expr {
    let features: Vec<_> = digest_order(&view.features, |f| f.name.as_str())
        .into_iter()
        .map(|i| &view.features[i])
        .collect();
    ScalarUDF::new_from_impl(TieDigest {
        types: features.iter().map(|f| f.value_type).collect(),
        signature: Signature::variadic_any(Volatility::Immutable),
    })
    .call(features.iter().map(|f| ident(&f.name)).collect())
}

/// The newest feature row per entity of a SQL or latest-value event view
/// with a feature time in `[start, end)`: keys, `event_timestamp`, every
/// feature in view order.
pub async fn latest_frame(
    offline: &Offline,
    ctx: &SessionContext,
    view: &FeatureView,
    start: Option<Micros>,
    end: Micros,
) -> Result<DataFrame> {
    let at = format!("feature view {:?}", view.name);
    let mut range = ident(TIMESTAMP_COLUMN).lt(ts_lit(end));
    if let Some(start) = start {
        range = range.and(ident(TIMESTAMP_COLUMN).gt_eq(ts_lit(start)));
    }
    let keys: Vec<Expr> = view.join_keys.iter().map(ident).collect();
    // Every row at its entity's newest feature time...
    let newest = rank()
        .partition_by(keys.clone())
        .order_by(vec![ident(TIMESTAMP_COLUMN).sort(false, false)])
        .build()
        .map_err(|e| df_error(&at, e))?
        .alias("_newest");
    // ...and of those the one the online store keeps (the greatest tie
    // digest, `quiver_core::store::replaces`), the rule of the point-in-time
    // join too. The digest is computed for these few rows only.
    let pick = row_number()
        .partition_by(keys.clone())
        .order_by(vec![tie_digest_expr(view).sort(false, false)])
        .build()
        .map_err(|e| df_error(&at, e))?
        .alias("_pick");
    let mut columns = keys;
    columns.push(ident(TIMESTAMP_COLUMN));
    columns.extend(view.features.iter().map(|f| ident(&f.name)));
    feature_frame(offline, ctx, view)
        .await?
        .filter(range)
        .and_then(|df| df.window(vec![newest]))
        .and_then(|df| df.filter(ident("_newest").eq(lit(1u64))))
        .and_then(|df| df.window(vec![pick]))
        .and_then(|df| df.filter(ident("_pick").eq(lit(1u64))))
        .and_then(|df| df.select(columns))
        .map_err(|e| df_error(&at, e))
}

impl Offline {
    /// Point-in-time correct values of the selected features for every
    /// row of `entities`; the result has the entity columns (join keys in
    /// their entities' types, `event_timestamp` as UTC microseconds, see
    /// [`crate::entities`]) followed by one column per selected feature,
    /// named `feature` or `view__feature`.
    pub async fn historical(
        &self,
        entities: RecordBatch,
        sel: &Selection,
        full_feature_names: bool,
    ) -> Result<RecordBatch> {
        let reg = self.registry().clone();
        let (entities, times) = crate::entities::typed(&reg, entities)?;
        // Output names first: a collision fails before any data is read.
        let names = reg.output_names(
            sel,
            entities.schema().fields().iter().map(|f| f.name().clone()),
            full_feature_names,
        )?;
        let ctx = self.session().await?;
        let (min_t, max_t) = (
            times.iter().flatten().min().unwrap_or(0),
            times.iter().flatten().max().unwrap_or(0),
        );

        // Per stored view (selected, or read by a selected on-demand view):
        // its feature arrays, in the view's `wanted` order.
        let stored = reg.stored_selection(sel);
        let mut per_view: Vec<(usize, Vec<usize>, Vec<ArrayRef>)> = Vec::new();
        for (vi, wanted) in &stored.by_view {
            let view = reg.view(*vi);
            let keys = entity_keys(&entities, view)?;
            let index = KeyIndex::new(&keys)?;
            let arrays = if let ViewSource::Aggregations { .. } = view.source {
                aggregations_asof(&ctx, view, &index, &times, wanted).await?
            } else {
                let ttl: Option<Micros> = view.ttl.map(duration_micros);
                let mut range = ident(TIMESTAMP_COLUMN).lt_eq(ts_lit(max_t));
                if let Some(ttl) = ttl {
                    range =
                        range.and(ident(TIMESTAMP_COLUMN).gt_eq(ts_lit(min_t.saturating_sub(ttl))));
                }
                let read_started = std::time::Instant::now();
                let batches = feature_frame(self, &ctx, view)
                    .await?
                    .filter(range)
                    .map_err(|e| df_error(&format!("feature view {:?}", view.name), e))?
                    .collect()
                    .await
                    .map_err(|e| df_error(&format!("feature view {:?}: reading", view.name), e))?;
                let rows = FeatureRows {
                    batches: &batches,
                    n_keys: view.join_keys.len(),
                    features: view
                        .features
                        .iter()
                        .map(|f| (f.name.clone(), f.value_type))
                        .collect(),
                };
                let read = read_started.elapsed();
                let joined = asof_join(&index, &times, &rows, ttl)?;
                tracing::debug!(
                    view = %view.name,
                    feature_rows = batches.iter().map(|b| b.num_rows()).sum::<usize>(),
                    read_ms = read.as_millis() as u64,
                    join_ms = (read_started.elapsed() - read).as_millis() as u64,
                    "point-in-time join"
                );
                wanted.iter().map(|&f| joined[f].clone()).collect()
            };
            per_view.push((*vi, wanted.clone(), arrays));
        }

        let joined = |r: &FeatureRef| -> ArrayRef {
            let (_, wanted, arrays) = per_view
                .iter()
                .find(|(vi, _, _)| *vi == r.view)
                .expect("every stored view was joined");
            let pos = wanted
                .iter()
                .position(|&f| f == r.feature)
                .expect("selected feature");
            arrays[pos].clone()
        };
        // On-demand views: evaluated on the joined values, the entity
        // table's request columns and each row's time.
        let time: ArrayRef = Arc::new(times.clone());
        let mut computed: Vec<(usize, Vec<ArrayRef>)> = Vec::new();
        for vi in reg.on_demand_views(sel) {
            let ViewSource::OnDemand {
                request, inputs, ..
            } = &reg.view(vi).source
            else {
                continue;
            };
            let request = request
                .iter()
                .map(|r| crate::entities::request_column(&entities, &reg.view(vi).name, r))
                .collect::<Result<Vec<_>>>()?;
            let inputs: Vec<ArrayRef> = inputs.iter().map(joined).collect();
            computed.push((
                vi,
                self.on_demand()
                    .evaluate(&reg, vi, &request, &time, &inputs)?,
            ));
        }

        let schema = entities.schema();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| (**f).clone()).collect();
        let mut columns: Vec<ArrayRef> = entities.columns().to_vec();
        for (r, name) in sel.columns.iter().zip(names) {
            let array = match computed.iter().find(|(vi, _)| *vi == r.view) {
                Some((_, arrays)) => arrays[r.feature].clone(),
                None => joined(r),
            };
            fields.push(Field::new(name, array.data_type().clone(), true));
            columns.push(array);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| Error::internal(format!("building the result: {e}")))
    }
}

/// Splits a result into batches of at most [`STREAM_BATCH_ROWS`] rows.
pub fn chunks(batch: &RecordBatch) -> Vec<RecordBatch> {
    let n = batch.num_rows();
    if n == 0 {
        return vec![batch.clone()];
    }
    (0..n)
        .step_by(STREAM_BATCH_ROWS)
        .map(|off| batch.slice(off, STREAM_BATCH_ROWS.min(n - off)))
        .collect()
}

/// Encodes a record batch as one complete Arrow IPC stream.
pub fn to_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
        .map_err(|e| Error::internal(format!("Arrow IPC: {e}")))?;
    w.write(batch)
        .and_then(|()| w.finish())
        .map_err(|e| Error::internal(format!("Arrow IPC: {e}")))?;
    drop(w);
    Ok(out)
}

/// Writes a result as one Parquet file (zstd).
pub fn write_parquet_file(batch: &RecordBatch, path: &std::path::Path) -> Result<()> {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::basic::{Compression, ZstdLevel};
    use datafusion::parquet::file::properties::WriterProperties;
    let file = std::fs::File::create(path)
        .map_err(|e| Error::invalid(format!("cannot create {}: {e}", path.display())))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(|e| Error::internal(format!("Parquet: {e}")))?;
    w.write(batch)
        .and_then(|()| w.close().map(|_| ()))
        .map_err(|e| Error::unavailable(format!("writing {}: {e}", path.display())))
}
