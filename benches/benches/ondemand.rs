//! Criterion benchmarks of request-time (on-demand) features as
//! GetOnlineFeatures computes them: the request's values into Arrow
//! columns, the compiled expressions of the sample registry's
//! `checkout_context` view (a ratio against a 7-day mean, a string
//! comparison, the haversine distance), and the results back into values.
//! Beside it, for scale in the same run, decoding the stored rows the same
//! request reads (the per-row work of every online read).

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quiver_batch::arrow::array::{ArrayRef, TimestampMicrosecondArray};
use quiver_batch::ondemand;
use quiver_core::codec::{decode_row, encode_row, RowBlob};
use quiver_core::columnar::{value_array, value_at};
use quiver_core::registry::{Registry, ViewSource};
use quiver_core::Value;

const T: i64 = 1_764_000_000_000_000;

fn bench_checkout(c: &mut Criterion) {
    let reg = Registry::from_toml(
        "features.toml",
        include_str!("../../registry/features.toml"),
    )
    .unwrap();
    let (compiled, problems) = ondemand::compile(&reg);
    assert!(problems.is_empty(), "{problems:?}");
    let vi = reg.view_index("checkout_context").unwrap();
    let view = reg.view(vi);
    let ViewSource::OnDemand {
        request, inputs, ..
    } = &view.source
    else {
        unreachable!()
    };
    let mut g = c.benchmark_group("on_demand");
    for rows in [1usize, 100] {
        // Request data and input values as the server holds them.
        let request_values: Vec<Vec<Value>> = request
            .iter()
            .map(|r| match r.name.as_str() {
                "ship_country" => vec![Value::String("NL".into()); rows],
                _ => (0..rows).map(|i| Value::Double(10.0 + i as f64)).collect(),
            })
            .collect();
        let input_values: Vec<Vec<Value>> = inputs
            .iter()
            .map(
                |i| match reg.view(i.view).features[i.feature].name.as_str() {
                    "login_at" => vec![Value::Timestamp(T - 3_600_000_000); rows],
                    "login_country" => vec![Value::String("DE".into()); rows],
                    "purchases_7d" => vec![Value::Int64(3); rows],
                    _ => vec![Value::Double(42.5); rows],
                },
            )
            .collect();
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(
            BenchmarkId::new("checkout_context", rows),
            &rows,
            |b, &rows| {
                b.iter(|| {
                    let req: Vec<ArrayRef> = request
                        .iter()
                        .zip(&request_values)
                        .map(|(r, vs)| {
                            let refs: Vec<Option<&Value>> = vs.iter().map(Some).collect();
                            value_array(r.value_type, &refs)
                        })
                        .collect();
                    let inp: Vec<ArrayRef> = inputs
                        .iter()
                        .zip(&input_values)
                        .map(|(i, vs)| {
                            let refs: Vec<Option<&Value>> = vs.iter().map(Some).collect();
                            value_array(reg.view(i.view).features[i.feature].value_type, &refs)
                        })
                        .collect();
                    let time: ArrayRef = Arc::new(
                        TimestampMicrosecondArray::from(vec![T; rows]).with_timezone("UTC"),
                    );
                    let out = compiled
                        .evaluate(&reg, vi, black_box(&req), &time, &inp)
                        .unwrap();
                    let values: Vec<Value> = out
                        .iter()
                        .zip(&view.features)
                        .flat_map(|(a, f)| {
                            (0..rows).map(move |r| value_at(a.as_ref(), f.value_type, r))
                        })
                        .collect::<Result<_, _>>()
                        .unwrap();
                    black_box(values)
                })
            },
        );
        // The stored rows such a request reads: two views per entity row.
        let blob = encode_row(&RowBlob {
            event_ts: T,
            expire_at: None,
            features: (0..6)
                .map(|i| (format!("feature_{i}"), Value::Double(i as f64)))
                .collect(),
        });
        g.bench_with_input(
            BenchmarkId::new("decode_stored_rows", rows),
            &rows,
            |b, &rows| {
                b.iter(|| {
                    for _ in 0..2 * rows {
                        black_box(decode_row(black_box(&blob)).unwrap());
                    }
                })
            },
        );
    }
    g.finish();
}

/// The fixed cost of one evaluation: a view with one arithmetic expression
/// over one request field, one row.
fn bench_minimal(c: &mut Criterion) {
    let reg = Registry::from_toml(
        "minimal.toml",
        r#"
[[on_demand_feature_views]]
name = "v"
request = [{ name = "x", dtype = "double" }]
features = [{ name = "y", dtype = "double", expr = "x * 2" }]
"#,
    )
    .unwrap();
    let (compiled, problems) = ondemand::compile(&reg);
    assert!(problems.is_empty(), "{problems:?}");
    let mut g = c.benchmark_group("on_demand");
    g.bench_function("minimal/1", |b| {
        b.iter(|| {
            let x = value_array(quiver_core::ValueType::Double, &[Some(&Value::Double(1.5))]);
            let time: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(vec![T]).with_timezone("UTC"));
            let out = compiled
                .evaluate(&reg, 0, black_box(&[x]), &time, &[])
                .unwrap();
            black_box(value_at(out[0].as_ref(), quiver_core::ValueType::Double, 0).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_checkout, bench_minimal);
criterion_main!(benches);
