//! Request-time (on-demand) features: the one evaluator of the registry's
//! `[[on_demand_feature_views]]`, used by GetOnlineFeatures (on the values
//! just read and the request's data) and by historical retrieval (on the
//! point-in-time values and the entity table's columns), so that a model
//! sees the same value in training and in serving.
//!
//! Each feature is a DataFusion SQL expression (scalar: arithmetic, `CASE`,
//! casts, string, date/time and math functions) over:
//! - the view's request fields, by name;
//! - `event_timestamp`: the time the values are computed as of (the
//!   request's time online, the entity row's `event_timestamp` offline);
//! - its input features, as `view__feature`, and as `feature` alone where
//!   that name is unique among the inputs and not a request field.
//!
//! Expressions are parsed and type-checked once, by [`compile`]; the
//! physical expressions are then evaluated over Arrow columns of the rows
//! at hand, without a query plan. Functions whose result depends on when
//! or how often they run (`now()`, `random()`, ...) and aggregate or
//! window functions are refused: they would differ between the online and
//! offline paths.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::DFSchema;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{Cast, Expr};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use quiver_core::columnar::{arrow_type, timestamp_type};
use quiver_core::error::{Error, Result};
use quiver_core::registry::{Registry, ViewSource, TIMESTAMP_COLUMN};
use quiver_core::value::ValueType;

/// Functions whose value depends on when they run; offline they would not
/// be as of the entity row's time. `event_timestamp` is the time to use.
const TIME_DEPENDENT: [&str; 5] = [
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "today",
];

/// Where a column of an on-demand view's evaluation batch comes from.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Request(usize),
    Time,
    Input(usize),
}

/// One on-demand view, compiled.
struct Compiled {
    schema: SchemaRef,
    slots: Vec<Slot>,
    exprs: Vec<Arc<dyn PhysicalExpr>>,
}

/// The compiled on-demand views of a registry (see the module doc).
#[derive(Default)]
pub struct OnDemand {
    views: HashMap<usize, Compiled>,
    problems: HashMap<usize, Vec<String>>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("views", &self.views.len())
            .field("problems", &self.problems)
            .finish()
    }
}

/// Compiles every on-demand view of `reg`. The second value lists each
/// problem as `on-demand feature view "v": feature "f": what is wrong`
/// (unknown columns, type mismatches, refused functions); views with
/// problems cannot be evaluated. `quiver registry validate` and every
/// command that loads a registry refuse one with problems.
pub fn compile(reg: &Registry) -> (OnDemand, Vec<String>) {
    let ctx = SessionContext::new();
    let mut out = OnDemand::default();
    let mut all = Vec::new();
    for (vi, view) in reg.views().iter().enumerate() {
        let ViewSource::OnDemand {
            request,
            inputs,
            expressions,
        } = &view.source
        else {
            continue;
        };
        let at = format!("on-demand feature view {:?}", view.name);
        // The evaluation batch: request fields, the time, the inputs by
        // full name, then by short name where unambiguous.
        let mut fields = Vec::new();
        let mut slots = Vec::new();
        for (i, r) in request.iter().enumerate() {
            fields.push(Field::new(&r.name, arrow_type(r.value_type), true));
            slots.push(Slot::Request(i));
        }
        fields.push(Field::new(TIMESTAMP_COLUMN, timestamp_type(), true));
        slots.push(Slot::Time);
        let mut short_count: HashMap<&str, usize> = HashMap::new();
        for i in inputs {
            *short_count
                .entry(reg.view(i.view).features[i.feature].name.as_str())
                .or_default() += 1;
        }
        let taken: HashSet<&str> = request
            .iter()
            .map(|r| r.name.as_str())
            .chain([TIMESTAMP_COLUMN])
            .collect();
        for (j, i) in inputs.iter().enumerate() {
            let v = reg.view(i.view);
            let f = &v.features[i.feature];
            fields.push(Field::new(
                format!("{}__{}", v.name, f.name),
                arrow_type(f.value_type),
                true,
            ));
            slots.push(Slot::Input(j));
        }
        for (j, i) in inputs.iter().enumerate() {
            let f = &reg.view(i.view).features[i.feature];
            if short_count[f.name.as_str()] == 1 && !taken.contains(f.name.as_str()) {
                fields.push(Field::new(&f.name, arrow_type(f.value_type), true));
                slots.push(Slot::Input(j));
            }
        }
        let schema = Arc::new(Schema::new(fields));
        let df_schema = match DFSchema::try_from(schema.as_ref().clone()) {
            Ok(s) => s,
            Err(e) => {
                let p = format!("{at}: {}", e.find_root());
                out.problems.insert(vi, vec![p.clone()]);
                all.push(p);
                continue;
            }
        };
        let mut exprs = Vec::new();
        let mut problems = Vec::new();
        for (feature, text) in view.features.iter().zip(expressions) {
            let fat = format!("{at}: feature {:?}", feature.name);
            match compile_one(&ctx, &df_schema, &schema, text, feature.value_type) {
                Ok(e) => exprs.push(e),
                Err(m) => problems.push(format!("{fat}: {m}")),
            }
        }
        if problems.is_empty() {
            out.views.insert(
                vi,
                Compiled {
                    schema,
                    slots,
                    exprs,
                },
            );
        } else {
            all.extend(problems.iter().cloned());
            out.problems.insert(vi, problems);
        }
    }
    (out, all)
}

/// One expression: parsed against the view's columns, checked, and cast to
/// the declared type where that widens (integers to double, string and
/// timestamp representations to quiver's).
fn compile_one(
    ctx: &SessionContext,
    df_schema: &DFSchema,
    schema: &Schema,
    text: &str,
    declared: ValueType,
) -> std::result::Result<Arc<dyn PhysicalExpr>, String> {
    let expr = ctx
        .parse_sql_expr(text, df_schema)
        .map_err(|e| format!("expr {text:?}: {}", e.find_root()))?;
    let mut refused = None;
    let _ = expr.apply(|e| {
        let why = match e {
            Expr::AggregateFunction(_) => Some(
                "aggregate functions are not allowed: a request-time feature is computed per row",
            ),
            Expr::WindowFunction(_) => Some("window functions are not allowed"),
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {
                Some("subqueries are not allowed")
            }
            Expr::ScalarFunction(f) if TIME_DEPENDENT.contains(&f.name()) => Some(
                "functions of the current time are not allowed (offline they would not be as of the entity row's time); use event_timestamp, the time the features are computed as of",
            ),
            _ if e.is_volatile_node() => Some(
                "volatile functions (random, uuid) are not allowed: online and offline values would differ",
            ),
            _ => None,
        };
        match why {
            Some(w) => {
                refused = Some(w);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    if let Some(why) = refused {
        return Err(format!("expr {text:?}: {why}"));
    }
    // Simplified as a query's expressions are (some functions, such as
    // coalesce, exist only in simplified form).
    let simplifier = ExprSimplifier::new(
        SimplifyContext::builder()
            .with_schema(Arc::new(df_schema.clone()))
            .build(),
    );
    let expr = simplifier
        .simplify(expr)
        .map_err(|e| format!("expr {text:?}: {}", e.find_root()))?;
    let physical = ctx
        .create_physical_expr(expr.clone(), df_schema)
        .map_err(|e| format!("expr {text:?}: {}", e.find_root()))?;
    let got = physical
        .data_type(schema)
        .map_err(|e| format!("expr {text:?}: {}", e.find_root()))?;
    let want = arrow_type(declared);
    if got == want {
        return Ok(physical);
    }
    if !widens(&got, declared) {
        return Err(format!(
            "expr {text:?} gives {got}, the feature is declared {declared}; cast it (CAST(... AS {})) or change the dtype",
            sql_type(declared)
        ));
    }
    ctx.create_physical_expr(Expr::Cast(Cast::new(Box::new(expr), want)), df_schema)
        .map_err(|e| format!("expr {text:?}: {}", e.find_root()))
}

/// Whether a value of Arrow type `got` becomes a `declared` value without
/// loss of meaning: any number to double, any integer to int64, any string
/// to string, any timestamp to a UTC microsecond timestamp, NULL to any.
fn widens(got: &DataType, declared: ValueType) -> bool {
    use DataType::*;
    matches!(
        (got, declared),
        (Null, _)
            | (
                Int8 | Int16
                    | Int32
                    | Int64
                    | UInt8
                    | UInt16
                    | UInt32
                    | Float16
                    | Float32
                    | Float64,
                ValueType::Double
            )
            | (
                Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32,
                ValueType::Int64
            )
            | (Utf8View | LargeUtf8, ValueType::String)
            | (BinaryView | LargeBinary, ValueType::Bytes)
            | (Timestamp(_, _) | Date32 | Date64, ValueType::Timestamp)
    )
}

fn sql_type(t: ValueType) -> &'static str {
    match t {
        ValueType::Int64 => "BIGINT",
        ValueType::Double => "DOUBLE",
        ValueType::String => "VARCHAR",
        ValueType::Bool => "BOOLEAN",
        ValueType::Bytes => "BYTEA",
        ValueType::Timestamp => "TIMESTAMP",
        _ => "the list type",
    }
}

impl OnDemand {
    /// Evaluates on-demand view `view` over `rows` rows: `request` holds
    /// its request fields' columns (in declaration order, typed as
    /// [`arrow_type`] of their dtype), `time` the time per row (UTC
    /// microseconds), `inputs` its input features' columns (in the view's
    /// input order, typed likewise). Returns one column per feature, of
    /// the feature's Arrow type. An expression that fails on these rows
    /// (integer division by zero, a failing cast) is INVALID_ARGUMENT
    /// naming the feature.
    pub fn evaluate(
        &self,
        reg: &Registry,
        view: usize,
        request: &[ArrayRef],
        time: &ArrayRef,
        inputs: &[ArrayRef],
    ) -> Result<Vec<ArrayRef>> {
        let v = reg.view(view);
        let Some(c) = self.views.get(&view) else {
            let why = self
                .problems
                .get(&view)
                .map(|p| p.join("; "))
                .unwrap_or_else(|| "not an on-demand view".to_owned());
            return Err(Error::internal(format!(
                "on-demand feature view {:?} cannot be evaluated: {why}",
                v.name
            )));
        };
        let columns: Vec<ArrayRef> = c
            .slots
            .iter()
            .map(|s| match *s {
                Slot::Request(i) => request[i].clone(),
                Slot::Time => time.clone(),
                Slot::Input(j) => inputs[j].clone(),
            })
            .collect();
        let rows = time.len();
        let batch = RecordBatch::try_new(c.schema.clone(), columns).map_err(|e| {
            Error::internal(format!(
                "on-demand feature view {:?}: its columns: {e}",
                v.name
            ))
        })?;
        c.exprs
            .iter()
            .zip(&v.features)
            .map(|(e, f)| {
                let array = e
                    .evaluate(&batch)
                    .and_then(|r| r.into_array(rows))
                    .map_err(|err| {
                        Error::invalid(format!(
                            "on-demand feature {}:{}: {}",
                            v.name,
                            f.name,
                            err.find_root()
                        ))
                    })?;
                // quiver's lists hold no nulls (online values could not
                // carry them): refused alike on both paths.
                if let Some(list) = array.as_list_opt::<i32>() {
                    if let Some(row) = (0..list.len())
                        .find(|&i| list.is_valid(i) && list.value(i).null_count() > 0)
                    {
                        return Err(Error::invalid(format!(
                            "on-demand feature {}:{}: row {row} is a list with a null element; lists cannot hold nulls (filter them with array_remove or coalesce the elements)",
                            v.name, f.name
                        )));
                    }
                }
                Ok(array)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, TimestampMicrosecondArray};

    #[test]
    fn lists_with_null_elements_are_refused() {
        let reg = Registry::from_toml(
            "r.toml",
            r#"
[[on_demand_feature_views]]
name = "v"
request = [{ name = "x", dtype = "double" }]
features = [{ name = "l", dtype = "double_list", expr = "make_array(x, x * 2)" }]
"#,
        )
        .unwrap();
        let (od, problems) = compile(&reg);
        assert!(problems.is_empty(), "{problems:?}");
        let time: ArrayRef =
            Arc::new(TimestampMicrosecondArray::from(vec![0, 0]).with_timezone("UTC"));
        let x: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.5), None]));
        let err = od.evaluate(&reg, 0, &[x], &time, &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("row 1 is a list with a null element"),
            "{err}"
        );
        let x: ArrayRef = Arc::new(Float64Array::from(vec![1.5, 2.0]));
        let out = od.evaluate(&reg, 0, &[x], &time, &[]).unwrap();
        assert_eq!(out[0].as_list::<i32>().value(1).len(), 2);
    }
}
