//! `quiver batch run`: runs the SQL of batch feature views and commits
//! their feature tables.

use std::time::{Duration, Instant};

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, TimestampMicrosecondArray};
use arrow::compute::{can_cast_types, cast as cast_array, cast_with_options, CastOptions};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, TimeUnit, TimestampMicrosecondType, TimestampNanosecondType,
};
use arrow::row::{RowConverter, SortField};
use arrow::util::display::array_value_to_string;
use datafusion::dataframe::{DataFrame, DataFrameWriteOptions};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ident, ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use quiver_core::columnar::arrow_type;
use quiver_core::registry::{FeatureView, ViewSource, TIMESTAMP_COLUMN};
use quiver_core::telemetry;
use quiver_core::time::{check_range, format_rfc3339, parse_rfc3339, Micros};
use quiver_core::{Error, Result, ValueType};
use tracing::field::Empty;

use crate::offline::{df_error, feature_table_columns, CommittedRun, Offline};

/// What planning the SQL views found, see [`Offline::plan_all`].
#[derive(Debug, Default)]
pub struct PlanReport {
    /// Views whose SQL planned.
    pub planned: Vec<String>,
    /// Views not planned, with the declared tables they read.
    pub skipped: Vec<(String, String)>,
    /// One error per view that does not plan.
    pub problems: Vec<Error>,
}

/// What one view's run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// View name.
    pub view: String,
    /// Run directory committed.
    pub run: String,
    /// Rows written.
    pub rows: u64,
    /// Wall time of query and write.
    pub elapsed: Duration,
}

/// Converts a feature-table column to its declared type as the run writes
/// it, and checks that every value committed is the value the SQL computed
/// and can be served and written back as it is:
/// - the conversion must not change a value: `1.7` is not the int64 `1`,
///   the text `"007"` is not the int64 `7`, and an integer a double (or
///   float32) cannot hold is not rounded. Numbers that are not integers may
///   round to the nearest double or float32 (the declared precision), but
///   not overflow to an infinity; times lose digits past the microsecond
///   toward the past, and text times are read by quiver's one RFC 3339
///   parser ([`quiver_core::time::parse_rfc3339`]);
/// - times lie within the supported range
///   ([`quiver_core::time::check_range`]);
/// - lists hold no null elements, and have the declared dimension.
///
/// The argument is the column as the SQL returned it; the result is the
/// column in the declared type. A violation (or a value the conversion
/// cannot take) fails the run before anything is committed, naming the
/// view, the column and the value.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Checked {
    view: String,
    column: String,
    ty: ValueType,
    dimension: Option<u32>,
    signature: Signature,
}

impl ScalarUDFImpl for Checked {
    fn name(&self) -> &str {
        "quiver_checked"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(arrow_type(self.ty))
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let original = args.args[0].to_array(args.number_rows)?;
        let fail = |m: String| {
            DataFusionError::Execution(format!(
                "feature view {:?}, column {:?}: {m}",
                self.view, self.column
            ))
        };
        let a = convert(&original, self.ty).map_err(fail)?;
        unchanged(&original, &a, self.ty).map_err(fail)?;
        if self.ty == ValueType::Timestamp {
            for t in a
                .as_primitive::<TimestampMicrosecondType>()
                .iter()
                .flatten()
            {
                check_range(t).map_err(fail)?;
            }
        } else if self.ty.is_list() {
            let lists = a.as_list::<i32>();
            if lists.values().null_count() > 0 {
                if let Some(l) = lists.iter().flatten().find(|l| l.null_count() > 0) {
                    let j = (0..l.len()).find(|&j| l.is_null(j)).unwrap_or(0);
                    return Err(fail(format!(
                        "a {} value has a null element (index {j}); quiver's lists cannot hold nulls, so remove them in the SQL",
                        self.ty
                    )));
                }
            }
            if let Some(dim) = self.dimension {
                if let Some(l) = lists.iter().flatten().find(|l| l.len() != dim as usize) {
                    return Err(fail(format!(
                        "a value has {} elements; the feature's dimension is {dim}",
                        l.len()
                    )));
                }
            }
        }
        Ok(ColumnarValue::Array(a))
    }
}

/// `original` in the declared type `ty`: Arrow's cast, refusing values it
/// cannot take (instead of making them null), except that nanoseconds
/// become microseconds toward the past and text becomes a time through
/// quiver's RFC 3339 parser.
fn convert(original: &ArrayRef, ty: ValueType) -> std::result::Result<ArrayRef, String> {
    let target = arrow_type(ty);
    match (original.data_type(), ty) {
        (from, _) if from == &target => Ok(original.clone()),
        (DataType::Timestamp(TimeUnit::Nanosecond, _), ValueType::Timestamp) => Ok(Arc::new(
            original
                .as_primitive::<TimestampNanosecondType>()
                .unary::<_, TimestampMicrosecondType>(|ns| ns.div_euclid(1_000))
                .with_timezone("UTC"),
        )),
        (DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View, ValueType::Timestamp) => {
            let text = cast_array(original, &DataType::Utf8).map_err(|e| e.to_string())?;
            let times: TimestampMicrosecondArray = text
                .as_string::<i32>()
                .iter()
                .map(|t| t.map(parse_rfc3339).transpose())
                .collect::<std::result::Result<_, String>>()?;
            Ok(Arc::new(times.with_timezone("UTC")))
        }
        _ => {
            let options = CastOptions {
                safe: false,
                ..CastOptions::default()
            };
            cast_with_options(original, &target, &options).map_err(|e| {
                format!(
                    "converting {} to {ty} (its declared type): {e}",
                    original.data_type()
                )
            })
        }
    }
}

/// Whether values of type `t` are integers (also in lists, dictionaries
/// and decimals without fractional digits).
fn integral(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            integral(f.data_type())
        }
        DataType::Dictionary(_, v) => integral(v),
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s) => *s <= 0,
        t => t.is_integer(),
    }
}

/// Whether a query column of type `from` may become the declared type `ty`
/// at all: lists stay lists, and a time comes from a timestamp, a date or
/// text (a number does not say its unit). `None` if so, else why not.
fn convertible(from: &DataType, ty: ValueType, key: bool) -> Option<String> {
    let is_list = matches!(
        from,
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..)
    );
    let float =
        |t: &DataType| matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64);
    match (from, ty) {
        (DataType::Null, _) => None,
        (DataType::Dictionary(_, v), ty) => convertible(v, ty, key),
        (from, ValueType::String) if key && float(from) => Some(
            "a string id from a float (NaN, -0, 1e300 as text) is not an id; convert it in the SQL"
                .to_owned(),
        ),
        (_, ty) if ty.is_list() && !is_list => Some(format!(
            "{ty} is a list; return one (e.g. make_array(...))"
        )),
        (_, ty) if !ty.is_list() && is_list => Some(format!("{ty} is not a list")),
        (
            DataType::Timestamp(..)
            | DataType::Date32
            | DataType::Date64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View,
            ValueType::Timestamp,
        ) => None,
        (_, ValueType::Timestamp) => Some(
            "a time comes from a timestamp, a date or RFC 3339 text; a number does not say its unit (use to_timestamp_seconds, to_timestamp_millis or to_timestamp_micros)"
                .to_owned(),
        ),
        _ => None,
    }
}

/// `a` with every -0.0 (also inside lists) made +0.0: a conversion to an
/// integer may lose the sign of zero, which is not a value.
fn positive_zero(a: &ArrayRef) -> ArrayRef {
    use arrow::array::{FixedSizeListArray, LargeListArray, ListArray};
    use std::sync::Arc;
    match a.data_type() {
        DataType::Float64 => Arc::new(
            a.as_primitive::<Float64Type>()
                .unary::<_, Float64Type>(|x| x + 0.0),
        ),
        DataType::Float32 => Arc::new(
            a.as_primitive::<Float32Type>()
                .unary::<_, Float32Type>(|x| x + 0.0),
        ),
        DataType::List(f) => {
            let l = a.as_list::<i32>();
            Arc::new(ListArray::new(
                f.clone(),
                l.offsets().clone(),
                positive_zero(l.values()),
                l.nulls().cloned(),
            ))
        }
        DataType::LargeList(f) => {
            let l = a.as_list::<i64>();
            Arc::new(LargeListArray::new(
                f.clone(),
                l.offsets().clone(),
                positive_zero(l.values()),
                l.nulls().cloned(),
            ))
        }
        DataType::FixedSizeList(f, n) => {
            let l = a.as_fixed_size_list();
            Arc::new(FixedSizeListArray::new(
                f.clone(),
                *n,
                positive_zero(l.values()),
                l.nulls().cloned(),
            ))
        }
        _ => a.clone(),
    }
}

/// Whether a conversion to floats (`converted`: doubles, or lists of
/// doubles or float32) kept finite numbers finite: rounding to the declared
/// precision is fine, an overflow to an infinity is not.
fn not_overflowed(original: &ArrayRef, converted: &ArrayRef) -> std::result::Result<(), String> {
    // Element arrays of both sides (the lists' values, or the columns).
    let (before, after): (ArrayRef, ArrayRef) = match converted.as_list_opt::<i32>() {
        Some(after) => {
            let element = match original.data_type() {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    f.data_type().clone()
                }
                _ => return Ok(()),
            };
            let as_list = DataType::List(Arc::new(arrow::datatypes::Field::new(
                "item", element, true,
            )));
            let before = cast_array(original, &as_list).map_err(|e| e.to_string())?;
            let before = before.as_list::<i32>().values().clone();
            (before, after.values().clone())
        }
        None => (original.clone(), converted.clone()),
    };
    let after = cast_array(&after, &DataType::Float64).map_err(|e| e.to_string())?;
    let after = after.as_primitive::<Float64Type>();
    let text = matches!(
        before.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    let before_text = if text {
        Some(cast_array(&before, &DataType::Utf8).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let before_num = if text {
        None
    } else {
        Some(cast_array(&before, &DataType::Float64).map_err(|e| e.to_string())?)
    };
    for i in 0..after.len().min(before.len()) {
        if after.is_null(i) || after.value(i).is_finite() || after.value(i).is_nan() {
            continue;
        }
        let (was_infinite, shown) = match (&before_text, &before_num) {
            (Some(t), _) => {
                let t = t.as_string::<i32>().value(i);
                let spelled = t.trim().trim_start_matches(['+', '-']).to_ascii_lowercase();
                (spelled == "inf" || spelled == "infinity", t.to_owned())
            }
            (_, Some(n)) => {
                let n = n.as_primitive::<Float64Type>().value(i);
                (n.is_infinite(), format!("{n:?}"))
            }
            _ => continue,
        };
        if !was_infinite {
            return Err(format!(
                "{shown} is out of range for the declared type; it would become an infinity"
            ));
        }
    }
    Ok(())
}

/// Whether converting `original` to `converted` (type `ty`) kept every
/// value, by the rules of [`Checked`]; otherwise the first value it
/// changed.
fn unchanged(
    original: &ArrayRef,
    converted: &ArrayRef,
    ty: ValueType,
) -> std::result::Result<(), String> {
    let from = original.data_type();
    if from == converted.data_type() || from == &DataType::Null || ty == ValueType::Timestamp {
        return Ok(());
    }
    let rounds = matches!(
        ty,
        ValueType::Double | ValueType::DoubleList | ValueType::FloatList
    );
    if rounds && !integral(from) {
        return not_overflowed(original, converted);
    }
    // Back to the original type: a conversion that kept every value comes
    // back as it was.
    let back = cast_array(converted, from).map_err(|_| {
        format!(
            "converting {from} to {ty} (its declared type) cannot be checked to keep every value; convert it in the SQL"
        )
    })?;
    let converter =
        RowConverter::new(vec![SortField::new(from.clone())]).map_err(|e| e.to_string())?;
    let (a, b) = (
        converter
            .convert_columns(&[positive_zero(original)])
            .map_err(|e| e.to_string())?,
        converter
            .convert_columns(&[positive_zero(&back)])
            .map_err(|e| e.to_string())?,
    );
    match (0..a.num_rows()).find(|&i| a.row(i) != b.row(i)) {
        None => Ok(()),
        Some(i) => {
            let shown =
                |arr: &ArrayRef| array_value_to_string(arr, i).unwrap_or_else(|_| "?".into());
            Err(format!(
                "converting {from} to {ty} (its declared type) would change the value {} into {}; convert it in the SQL the way you mean it, or declare the type it has",
                shown(original),
                if converted.is_null(i) { "null".to_owned() } else { shown(converted) }
            ))
        }
    }
}

/// Column `name` (of type `from` in the query's result) in the declared
/// type `ty` (with the feature's `dimension`, if any), through [`Checked`]
/// where a conversion or the type needs it.
fn checked(view: &str, name: &str, from: &DataType, ty: ValueType, dimension: Option<u32>) -> Expr {
    let plain = from == &arrow_type(ty) && ty != ValueType::Timestamp && !ty.is_list();
    if plain {
        return ident(name);
    }
    ScalarUDF::new_from_impl(Checked {
        view: view.to_owned(),
        column: name.to_owned(),
        ty,
        dimension,
        signature: Signature::any(1, Volatility::Immutable),
    })
    .call(vec![ident(name)])
}

/// The query of a SQL view, or an error naming the view's actual source.
pub fn view_query(view: &FeatureView) -> Result<&str> {
    match &view.source {
        ViewSource::Sql { query } => Ok(query),
        _ => Err(Error::invalid(format!(
            "feature view {:?} has no SQL source; `quiver batch run` runs views declared with source = {{ sql = \"...\" }}",
            view.name
        ))),
    }
}

impl Offline {
    /// Plans one SQL view's query without running it: the SQL parses and
    /// plans against the archive's schema (`events`, from the registry) and
    /// the declared tables' schemas (from their files' metadata); it
    /// returns the join keys, `event_timestamp` and every feature, each of a
    /// type that casts to the declared one. The plan casts, checks (see
    /// [`Checked`]) and drops rows without keys or time.
    pub async fn plan_view(&self, ctx: &SessionContext, view: &FeatureView) -> Result<DataFrame> {
        let query = view_query(view)?;
        let at = |what: &str| format!("feature view {:?}: {what}", view.name);
        self.register_tables(ctx, query).await?;
        let df = ctx.sql(query).await.map_err(|e| df_error(&at("SQL"), e))?;
        let got: Vec<String> = df
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let cols = feature_table_columns(view);
        let missing: Vec<&str> = cols
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !got.iter().any(|g| g == n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "{}: the query returns no column {}; it must return the join keys, {TIMESTAMP_COLUMN} and every feature (it returns: {})",
                at("SQL"),
                missing.join(", "),
                got.join(", ")
            )));
        }
        let mut exprs = Vec::with_capacity(cols.len());
        for (n, t) in &cols {
            let from = df
                .schema()
                .field_with_unqualified_name(n)
                .map_err(|e| df_error(&at("SQL"), e))?
                .data_type()
                .clone();
            let key = cols[..view.join_keys.len()].iter().any(|(k, _)| k == n);
            if let Some(why) = convertible(&from, *t, key) {
                return Err(Error::invalid(format!(
                    "{}: column {n:?} is {from}, which does not convert to {t} (its declared type): {why}",
                    at("SQL")
                )));
            }
            if !can_cast_types(&from, &arrow_type(*t)) {
                return Err(Error::invalid(format!(
                    "{}: column {n:?} is {from}, which does not convert to {t} (its declared type)",
                    at("SQL")
                )));
            }
            let dimension = view
                .features
                .iter()
                .find(|f| f.name == *n)
                .and_then(|f| f.dimension);
            exprs.push(checked(&view.name, n, &from, *t, dimension).alias(*n));
        }
        // Rows without keys or time cannot be joined or materialized, so
        // they are left out (before any check of their values).
        let mut df = df;
        for (n, _) in &cols[..view.join_keys.len() + 1] {
            df = df
                .filter(ident(*n).is_not_null())
                .map_err(|e| df_error(&at("filter"), e))?;
        }
        // Every column in its declared type, checked (see `Checked`).
        let df = df
            .select(exprs)
            .map_err(|e| df_error(&at("casting the query's columns"), e))?;
        Ok(df)
    }

    /// Runs one SQL view's query and commits its result as the view's
    /// feature table. `now` names the run.
    pub async fn run_view(
        &self,
        ctx: &SessionContext,
        view: &FeatureView,
        now: Micros,
    ) -> Result<RunReport> {
        let started = Instant::now();
        let at = |what: &str| format!("feature view {:?}: {what}", view.name);
        let df = self.plan_view(ctx, view).await?;
        let run = format!("run-{now:020}");
        let url = self.dir_url(&self.run_dir(&view.name, &run));
        let written = match df
            .write_parquet(&url, DataFrameWriteOptions::new(), None)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                self.discard_run(&view.name, &run).await;
                return Err(df_error(&at("writing the feature table"), e));
            }
        };
        let rows = written
            .first()
            .and_then(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::UInt64Array>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0);
        if let Err(e) = self
            .commit(
                &view.name,
                CommittedRun {
                    run: run.clone(),
                    rows,
                    committed_at: format_rfc3339(now),
                },
            )
            .await
        {
            // Only when the pointer was not written is the run unreferenced.
            if self
                .committed(&view.name)
                .await
                .is_ok_and(|c| c.is_none_or(|c| c.run != run))
            {
                self.discard_run(&view.name, &run).await;
            }
            return Err(e);
        }
        Ok(RunReport {
            view: view.name.clone(),
            run,
            rows,
            elapsed: started.elapsed(),
        })
    }

    /// Plans every SQL view (see [`Offline::plan_view`]) without running
    /// any, for `quiver registry validate`. Problems are reported per view.
    /// `with_tables`: whether declared tables can be read here (their
    /// schemas live in their files); if not, views that read them are
    /// skipped rather than reported.
    pub async fn plan_all(&self, with_tables: bool) -> Result<PlanReport> {
        let ctx = self.session().await?;
        let mut report = PlanReport::default();
        for view in self.registry().views() {
            let ViewSource::Sql { query } = &view.source else {
                continue;
            };
            let tables: Vec<&str> = self
                .tables_in(query)
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            if !with_tables && !tables.is_empty() {
                report.skipped.push((view.name.clone(), tables.join(", ")));
                continue;
            }
            match self.plan_view(&ctx, view).await {
                Ok(df) => match df.create_physical_plan().await {
                    Ok(_) => report.planned.push(view.name.clone()),
                    Err(e) => report
                        .problems
                        .push(df_error(&format!("feature view {:?}: SQL", view.name), e)),
                },
                Err(e) => report.problems.push(e),
            }
        }
        Ok(report)
    }

    /// Runs the SQL views named in `views` (every SQL view when empty), one
    /// after the other, each committed on its own.
    pub async fn run(&self, views: &[String], now: Micros) -> Result<Vec<RunReport>> {
        let reg = self.registry().clone();
        let selected: Vec<&FeatureView> = if views.is_empty() {
            reg.views()
                .iter()
                .filter(|v| matches!(v.source, ViewSource::Sql { .. }))
                .collect()
        } else {
            views
                .iter()
                .map(|n| reg.require_view(n).map(|i| reg.view(i)))
                .collect::<Result<_>>()?
        };
        if selected.is_empty() {
            return Err(Error::invalid(
                "the registry declares no SQL feature views (source = { sql = \"...\" })",
            ));
        }
        let ctx = self.session().await?;
        let mut out = Vec::with_capacity(selected.len());
        for v in selected {
            let span = telemetry::span(|| {
                tracing::info_span!(
                    "batch view",
                    otel.name = format!("run {}", v.name),
                    quiver.feature_view = v.name.as_str(),
                    quiver.rows = Empty,
                )
            });
            let report = telemetry::in_span(&span, self.run_view(&ctx, v, now)).await?;
            span.record("quiver.rows", telemetry::int(report.rows));
            out.push(report);
        }
        Ok(out)
    }
}
