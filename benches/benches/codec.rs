//! Criterion benchmarks of the online-store codec: the per-value work on
//! every read (decode) and write (encode), and key building per lookup.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quiver_core::codec::{
    decode_row, decode_value, encode_row, encode_value, entity_key, row_key, RowBlob,
};
use quiver_core::Value;

fn values() -> Vec<(&'static str, Value)> {
    vec![
        ("int64", Value::Int64(1_234_567)),
        ("double", Value::Double(3.25)),
        ("string_16", Value::String("electronics-0001".into())),
        (
            "string_list_4",
            Value::StringList(vec![
                "books".into(),
                "toys".into(),
                "home".into(),
                "sports".into(),
            ]),
        ),
        (
            "embedding_384",
            Value::FloatList((0..384).map(|i| i as f32 / 384.0).collect()),
        ),
    ]
}

fn bench_values(c: &mut Criterion) {
    let mut g = c.benchmark_group("value");
    for (name, v) in values() {
        let enc = encode_value(&v);
        g.throughput(Throughput::Bytes(enc.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &v, |b, v| {
            b.iter(|| encode_value(black_box(v)))
        });
        g.bench_with_input(BenchmarkId::new("decode", name), &enc, |b, e| {
            b.iter(|| decode_value(black_box(e)).unwrap())
        });
    }
    g.finish();
}

fn bench_rows(c: &mut Criterion) {
    let mut g = c.benchmark_group("row_blob");
    for n in [10usize, 100] {
        let row = RowBlob {
            event_ts: 1_764_000_000_000_000,
            expire_at: Some(1_765_000_000_000_000),
            features: (0..n)
                .map(|i| (format!("feature_{i}"), Value::Double(i as f64)))
                .collect(),
        };
        let enc = encode_row(&row);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("encode", format!("{n}_features")),
            &row,
            |b, r| b.iter(|| encode_row(black_box(r))),
        );
        g.bench_with_input(
            BenchmarkId::new("decode", format!("{n}_features")),
            &enc,
            |b, e| b.iter(|| decode_row(black_box(e)).unwrap()),
        );
    }
    g.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");
    g.throughput(Throughput::Elements(1));
    let id = Value::String("user_123456".into());
    g.bench_function("row_key/1_join_key", |b| {
        b.iter(|| {
            row_key(
                &entity_key(&[("user_id", black_box(&id))]).unwrap(),
                "user_activity",
            )
        })
    });
    let pid = Value::Int64(987_654);
    g.bench_function("row_key/2_join_keys", |b| {
        b.iter(|| {
            row_key(
                &entity_key(&[("user_id", black_box(&id)), ("product_id", black_box(&pid))])
                    .unwrap(),
                "user_product",
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench_values, bench_rows, bench_keys);
criterion_main!(benches);
