//! Batch-layer benchmarks, each against DuckDB on the same Parquet in the
//! same run:
//!
//! 1. **Feature-view SQL**: the sample registry's `user_daily` query over
//!    `--events` archived events (written by the real archiver), run by
//!    DataFusion the way `quiver batch run` runs it, and by DuckDB.
//! 2. **Point-in-time join**: `--entity-rows` entity rows against a feature
//!    table of `--feature-rows` rows (committed by `quiver batch run`'s
//!    code), through `Offline::historical` (what GetHistoricalFeatures and
//!    `quiver batch retrieve` call), and DuckDB's `ASOF LEFT JOIN` (no TTL)
//!    for reference.
//!
//! Each timing is the median of `--runs` runs after one warm-up. DuckDB
//! runs in `--python` (a Python with the `duckdb` package) and materializes
//! results into a temporary table, as DataFusion collects them in memory.
//!
//! ```text
//! cargo run --release -p quiver-bench --bin quiver-batch-bench -- --python target/py-venv/bin/python
//! ```

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use quiver_batch::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use quiver_batch::arrow::datatypes::{DataType, Field, Schema};
use quiver_batch::retrieve::write_parquet_file;
use quiver_batch::Offline;
use quiver_core::columnar::timestamp_type;
use quiver_core::registry::ViewSource;
use quiver_core::time::system_time_to_micros;
use quiver_core::Registry;
use quiver_ingest::apply::Record;
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::generate::Rng;
use quiver_ingest::{Generator, GeneratorConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SAMPLE: &str = include_str!("../../registry/features.toml");
const PIT_VIEW: &str = r#"
[[tables]]
name = "pit_source"
path = "tables/pit_source"

[[feature_views]]
name = "pit_features"
entities = ["user"]
ttl = "7d"
source = { sql = "SELECT user_id, event_timestamp, f_double, f_int, f_str FROM pit_source" }
features = [
  { name = "f_double", dtype = "double" },
  { name = "f_int", dtype = "int64" },
  { name = "f_str", dtype = "string" },
]
"#;
const DAY: i64 = 86_400_000_000;

#[derive(Debug, Parser)]
struct Args {
    /// Raw events for the feature-view query.
    #[arg(long, default_value_t = 5_000_000)]
    events: usize,
    /// Users of the generated events and feature rows.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Entity rows of the point-in-time join.
    #[arg(long, default_value_t = 1_000_000)]
    entity_rows: usize,
    /// Feature rows of the point-in-time join.
    #[arg(long, default_value_t = 10_000_000)]
    feature_rows: usize,
    /// Entity rows for the windowed-aggregation retrieval (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    agg_rows: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python with the `duckdb` package; empty skips DuckDB.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Run this SQL over `events` instead of the `user_daily` view's query.
    #[arg(long)]
    sql: Option<String>,
    /// Only the feature-view query (skip the point-in-time join).
    #[arg(long)]
    skip_pit: bool,
    /// Keep the data here instead of a temporary directory.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

async fn timed<F, Fut, T>(runs: usize, mut f: F) -> (f64, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = f().await; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        out = f().await;
        times.push(t.elapsed().as_secs_f64());
    }
    (median(times), out)
}

/// Archives `n` generated events through the real archiver.
async fn archive_events(reg: &Arc<Registry>, dir: &Path, n: usize, users: u64) {
    let (store, root) = open_store(dir.to_str().unwrap(), &[]).unwrap();
    let mut archiver = Archiver::new(
        store,
        root,
        reg.clone(),
        ArchiveConfig {
            roll_bytes: 256 * 1024 * 1024,
            roll_interval: Duration::from_secs(3600),
        },
    );
    let now = system_time_to_micros(std::time::SystemTime::now());
    let span = 30 * DAY;
    let mut generator = Generator::new(
        GeneratorConfig {
            seed: 3,
            users,
            products: users / 10,
            start: now - span,
            time_step: span / n as i64,
        },
        reg,
    )
    .unwrap();
    let sources: Vec<Arc<str>> = (0..4).map(|p| Arc::from(format!("events:{p}"))).collect();
    let mut offsets = [0i64; 4];
    let mut done = 0;
    while done < n {
        let k = (n - done).min(250_000);
        for (i, event) in generator.batch(k).into_iter().enumerate() {
            let p = i % 4;
            archiver
                .add(
                    "events",
                    p as i32,
                    Record {
                        source: sources[p].clone(),
                        offset: offsets[p],
                        event,
                    },
                )
                .await
                .unwrap();
            offsets[p] += 1;
        }
        done += k;
        archiver.flush(true).await.unwrap();
    }
}

/// Writes the point-in-time source table: `rows` rows over 30 days, in
/// files of a million rows.
fn write_feature_source(dir: &Path, rows: usize, users: u64) {
    let out = dir.join("tables/pit_source");
    std::fs::create_dir_all(&out).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("event_timestamp", timestamp_type(), false),
        Field::new("f_double", DataType::Float64, true),
        Field::new("f_int", DataType::Int64, true),
        Field::new("f_str", DataType::Utf8, true),
    ]));
    let mut rng = Rng(11);
    let start = 1_790_000_000_000_000i64;
    let tiers = ["bronze", "silver", "gold", "platinum"];
    let mut written = 0;
    let mut part = 0;
    while written < rows {
        let n = (rows - written).min(1_000_000);
        let users_col: Vec<String> = (0..n)
            .map(|_| format!("user_{}", rng.below(users)))
            .collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(users_col)),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|_| start + rng.below(30 * DAY as u64) as i64),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|_| rng.below(1_000_000) as f64 / 100.0),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|_| rng.below(1000) as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|_| tiers[rng.below(4) as usize]),
            )),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
        write_parquet_file(&batch, &out.join(format!("part-{part:03}.parquet"))).unwrap();
        written += n;
        part += 1;
    }
}

/// The entity table: random users (5% unknown) at random times.
fn entity_table(rows: usize, users: u64) -> RecordBatch {
    let mut rng = Rng(17);
    let start = 1_790_000_000_000_000i64;
    let ids: Vec<String> = (0..rows)
        .map(|_| format!("user_{}", rng.below(users + users / 20)))
        .collect();
    let times = TimestampMicrosecondArray::from_iter_values(
        (0..rows).map(|_| start + DAY + rng.below(30 * DAY as u64) as i64),
    )
    .with_timezone("UTC");
    let labels = Int64Array::from_iter_values((0..rows).map(|_| rng.below(2) as i64));
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("event_timestamp", timestamp_type(), false),
        Field::new("label", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(times),
            Arc::new(labels),
        ],
    )
    .unwrap()
}

const DUCKDB: &str = r#"
import duckdb, json, statistics, sys, time
root, runs, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sql = sys.stdin.read()
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute("SET enable_progress_bar = false")
if kind == "view":
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{root}/events/*/*.parquet', hive_partitioning = true)")
else:
    feat, ents = sys.argv[4], sys.argv[5]
    con.execute(f"CREATE VIEW f AS SELECT * FROM read_parquet('{feat}/*.parquet')")
    con.execute(f"CREATE VIEW e AS SELECT * FROM read_parquet('{ents}')")
times = []
for i in range(runs + 1):
    t = time.perf_counter()
    con.execute(f"CREATE OR REPLACE TEMP TABLE out AS {sql}")
    if i:
        times.append(time.perf_counter() - t)
rows = con.execute("SELECT count(*) FROM out").fetchone()[0]
print(json.dumps({"median": statistics.median(times), "rows": rows, "threads": con.execute("SELECT current_setting('threads')").fetchone()[0], "version": duckdb.__version__}))
"#;

/// Runs the DuckDB side; `None` when no Python with duckdb is available.
fn duckdb(args: &Args, sql: &str, extra: &[&str]) -> Option<serde_json::Value> {
    if args.python.is_empty() {
        return None;
    }
    let mut child = Command::new(&args.python)
        .arg("-c")
        .arg(DUCKDB)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| eprintln!("cannot run {}: {e}", args.python))
        .ok()?;
    use std::io::Write;
    child.stdin.take()?.write_all(sql.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        eprintln!("duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    match serde_json::from_slice(&out.stdout) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!(
                "duckdb: unreadable answer ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            );
            None
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let reg = Arc::new(
        Registry::from_sources(&[
            ("registry/features.toml".into(), SAMPLE.into()),
            ("bench.toml".into(), PIT_VIEW.into()),
        ])
        .unwrap(),
    );
    let offline = Offline::open(reg.clone(), dir.to_str().unwrap(), &[]).unwrap();
    let runs = args.runs.to_string();
    let root = dir.to_str().unwrap().to_owned();

    // 1. Feature-view SQL.
    let t = Instant::now();
    archive_events(&reg, &dir, args.events, args.users).await;
    eprintln!(
        "archived {} events in {:.1}s",
        args.events,
        t.elapsed().as_secs_f64()
    );
    let view = reg.view(reg.view_index("user_daily").unwrap());
    let ViewSource::Sql { query } = &view.source else {
        unreachable!()
    };
    let query = args.sql.as_ref().unwrap_or(query);
    let ctx = offline.session().await.unwrap();
    let (df_secs, df_rows) = timed(args.runs, || async {
        let batches = ctx.sql(query).await.unwrap().collect().await.unwrap();
        batches.iter().map(|b| b.num_rows()).sum::<usize>()
    })
    .await;
    let duck = duckdb(&args, query, &[&root, &runs, "view"]);
    println!(
        "\n## Feature-view SQL (user_daily over {} events, median of {})\n",
        args.events, args.runs
    );
    println!("| engine | seconds | rows | events/s |");
    println!("|---|---|---|---|");
    println!(
        "| quiver (DataFusion) | {df_secs:.3} | {df_rows} | {:.0} |",
        args.events as f64 / df_secs
    );
    if let Some(d) = &duck {
        let secs = d["median"].as_f64().unwrap();
        println!(
            "| DuckDB {} ({} threads) | {secs:.3} | {} | {:.0} |",
            d["version"].as_str().unwrap_or("?"),
            d["threads"],
            d["rows"],
            args.events as f64 / secs
        );
        println!("\nratio quiver / DuckDB: **{:.2}x**", df_secs / secs);
    }

    if args.agg_rows > 0 {
        // Windowed aggregations as of entity rows over the same events.
        let now = system_time_to_micros(std::time::SystemTime::now());
        let mut rng = Rng(23);
        let ids: Vec<String> = (0..args.agg_rows)
            .map(|_| format!("user_{}", rng.below(args.users)))
            .collect();
        let times = TimestampMicrosecondArray::from_iter_values(
            (0..args.agg_rows).map(|_| now - rng.below(29 * DAY as u64) as i64),
        )
        .with_timezone("UTC");
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("event_timestamp", timestamp_type(), false),
        ]));
        let table = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(ids)), Arc::new(times)],
        )
        .unwrap();
        let sel = reg.resolve_refs(&["user_stream:*"]).unwrap();
        let (secs, out) = timed(args.runs, || async {
            offline
                .historical(table.clone(), &sel, false)
                .await
                .unwrap()
        })
        .await;
        println!(
            "\n## Windowed aggregations as of {} entity rows (user_stream: 9 aggregations, windows 1h-7d, over {} events, median of {})\n",
            args.agg_rows, args.events, args.runs
        );
        println!("| seconds | rows | rows/s |");
        println!("|---|---|---|");
        println!(
            "| {secs:.2} | {} | {:.0} |",
            out.num_rows(),
            args.agg_rows as f64 / secs
        );
    }
    if args.skip_pit {
        return;
    }
    // 2. Point-in-time join.
    let t = Instant::now();
    write_feature_source(&dir, args.feature_rows, args.users);
    eprintln!(
        "wrote {} source rows in {:.1}s",
        args.feature_rows,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let report = offline
        .run(
            &["pit_features".into()],
            system_time_to_micros(std::time::SystemTime::now()),
        )
        .await
        .unwrap();
    let run_secs = t.elapsed().as_secs_f64();
    let entities = entity_table(args.entity_rows, args.users);
    let sel = reg.resolve_refs(&["pit_features:*"]).unwrap();
    let (pit_secs, joined) = timed(args.runs, || async {
        offline
            .historical(entities.clone(), &sel, false)
            .await
            .unwrap()
    })
    .await;
    let found = args.entity_rows - joined.column_by_name("f_int").unwrap().null_count();
    let ents_path = dir.join("entities.parquet");
    write_parquet_file(&entities, &ents_path).unwrap();
    let committed = offline.committed("pit_features").await.unwrap().unwrap();
    let run_dir = dir.join("features/pit_features").join(&committed.run);
    let asof = "SELECT e.*, f.f_double, f.f_int, f.f_str FROM e ASOF LEFT JOIN f \
                ON e.user_id = f.user_id AND e.event_timestamp >= f.event_timestamp";
    let duck = duckdb(
        &args,
        asof,
        &[
            &root,
            &runs,
            "asof",
            run_dir.to_str().unwrap(),
            ents_path.to_str().unwrap(),
        ],
    );
    println!(
        "\n## Point-in-time join ({} entity rows x {} feature rows, {} users, median of {})\n",
        args.entity_rows, args.feature_rows, args.users, args.runs
    );
    println!("| step | seconds | rows |");
    println!("|---|---|---|");
    println!(
        "| quiver batch run (feature table commit) | {run_secs:.2} | {} |",
        report[0].rows
    );
    println!(
        "| quiver historical retrieval (TTL 7d) | {pit_secs:.2} | {} ({found} with values) |",
        joined.num_rows()
    );
    if let Some(d) = &duck {
        println!(
            "| DuckDB {} ASOF LEFT JOIN (no TTL) | {:.2} | {} |",
            d["version"].as_str().unwrap_or("?"),
            d["median"].as_f64().unwrap(),
            d["rows"]
        );
        println!(
            "\nratio quiver / DuckDB: **{:.2}x**",
            pit_secs / d["median"].as_f64().unwrap()
        );
    }
}
