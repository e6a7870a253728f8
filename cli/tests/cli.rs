//! The `quiver` binary as users run it.

use std::process::Command;

fn quiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn validate(path: &std::path::Path) -> std::process::Output {
    quiver()
        .args(["registry", "validate"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn validates_the_sample_registry() {
    for path in ["registry", "benches/registry.toml"] {
        let out = validate(&repo(path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{path}: {stderr}");
    }
    let stdout = String::from_utf8_lossy(&validate(&repo("registry")).stdout).into_owned();
    assert!(
        stdout.contains("ok (2 entities, 4 event types, 11 feature views, 4 feature services)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SQL views planned: user_daily, product_daily"),
        "{stdout}"
    );
}

/// SQL feature views are planned (no data read): a misspelt column, a
/// missing feature column and a type that cannot become the declared one
/// are reported by view; views over declared tables are planned against
/// their files' schemas when the offline store is given.
#[test]
fn validate_plans_sql_views() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sql.toml");
    let registry = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[event_types]]
name = "buy"
entities = ["user"]
attributes = [{ name = "amount", dtype = "double" }]

[[tables]]
name = "profiles"
path = "tables/profiles"

[[feature_views]]
name = "typo"
entities = ["user"]
source = { sql = "SELECT user_id, event_time AS event_timestamp, amountt AS x FROM events" }
features = [{ name = "x", dtype = "double" }]

[[feature_views]]
name = "missing"
entities = ["user"]
source = { sql = "SELECT user_id, event_time AS event_timestamp FROM events" }
features = [{ name = "x", dtype = "double" }]

[[feature_views]]
name = "wrong_type"
entities = ["user"]
source = { sql = "SELECT user_id, event_time AS event_timestamp, make_array(amount) AS x FROM events" }
features = [{ name = "x", dtype = "double" }]

[[feature_views]]
name = "from_table"
entities = ["user"]
source = { sql = "SELECT user_id, updated AS event_timestamp, age FROM profiles" }
features = [{ name = "age", dtype = "int64" }]
"#;
    std::fs::write(&file, registry).unwrap();
    let out = validate(&file);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "sql.toml: feature view \"typo\": SQL: Schema error: No field named amountt",
        "sql.toml: feature view \"missing\": SQL: the query returns no column x",
        "sql.toml: feature view \"wrong_type\": SQL: column \"x\" is List(Float64), which does not convert to double",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }

    // Only the view over a declared table: skipped without the offline
    // store, planned against its file with it.
    let good: String = registry
        .split("[[feature_views]]")
        .enumerate()
        .filter(|(i, _)| *i == 0 || *i == 4)
        .map(|(_, s)| s)
        .collect::<Vec<_>>()
        .join("[[feature_views]]");
    std::fs::write(&file, &good).unwrap();
    let out = validate(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("SQL view from_table not planned: it reads declared tables (profiles)"),
        "{stdout}"
    );
    std::fs::create_dir_all(dir.path().join("offline/tables/profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles.csv"),
        "user_id,updated,age\nu1,2026-01-01T00:00:00Z,30\n",
    )
    .unwrap();
    // A Parquet file of the table, written by the batch layer's own writer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let table = rt
        .block_on(quiver_batch::entities::read_file(
            &quiver_core::Registry::from_toml("x.toml", "").unwrap(),
            &dir.path().join("profiles.csv"),
        ))
        .unwrap();
    quiver_batch::retrieve::write_parquet_file(
        &table,
        &dir.path().join("offline/tables/profiles/p.parquet"),
    )
    .unwrap();
    let out = quiver()
        .args(["registry", "validate"])
        .arg(&file)
        .args(["--archive", "offline"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SQL views planned: from_table"), "{stdout}");
}

#[test]
fn reports_every_registry_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[feature_views]]\nname = \"v\"\nentities = [\"ghost\"]\nfeatures = [{ name = \"x\", dtype = \"float128\" }]\n",
    )
    .unwrap();
    let out = validate(&file);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml: feature view \"v\": unknown entity \"ghost\""),
        "{stderr}"
    );
    assert!(stderr.contains("unknown dtype \"float128\""), "{stderr}");
}

#[test]
fn bad_configuration_fails_before_starting() {
    for (var, value, want) in [
        (
            "QUIVER_REDIS_URL",
            "http://not-redis",
            "redis_url (http://not-redis) must start with redis:// or rediss://",
        ),
        (
            "QUIVER_OTLP_ENDPOINT",
            "collector:4317",
            "telemetry.otlp_endpoint: \"collector:4317\" must be http://host:port or https://host:port",
        ),
        (
            "QUIVER_TRACE_SAMPLING_RATIO",
            "2",
            "telemetry.sampling_ratio must be between 0.0 and 1.0, got 2",
        ),
        (
            "QUIVER_LOG_FORMAT",
            "yaml",
            "unknown log format \"yaml\"; use \"text\" or \"json\"",
        ),
        ("QUIVER_LOG", "info,=[", "QUIVER_LOG=\"info,=[\""),
    ] {
        let out = quiver()
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .env(var, value)
            .env_remove("QUIVER_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{var}={value}: {stderr}");
    }
}

#[test]
fn speed_layer_commands_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["ingest"], "no Kafka brokers configured"),
        (
            vec!["generate", "--events", "1"],
            "no Kafka brokers configured",
        ),
        (
            vec![
                "generate",
                "--to",
                "carrier-pigeon",
                "--kafka-brokers",
                "127.0.0.1:1",
            ],
            "--to \"carrier-pigeon\": use kafka or grpc",
        ),
        (
            vec!["generate", "--rate=-5"],
            "--rate must be a non-negative",
        ),
        (
            vec!["ingest", "--archive", "ftp://lake"],
            "archive.location",
        ),
    ] {
        let out = quiver()
            .args(&args)
            .current_dir(dir.path())
            .env_remove("QUIVER_KAFKA_BROKERS")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// One SQL view of three rows for two users (shared with tests/traces.rs).
const BATCH_REGISTRY: &str = include_str!("batch_registry.toml");

fn run_ok(dir: &std::path::Path, args: &[&str]) -> String {
    let out = quiver()
        .args(args)
        .current_dir(dir)
        .env_remove("QUIVER_ARCHIVE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn batch_run_retrieve_and_materialize() {
    use quiver_batch::arrow::array::{Array, Float64Array};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reg.toml"), BATCH_REGISTRY).unwrap();
    let common = ["--registry", "reg.toml", "--archive", "offline"];
    let with = |cmd: &[&'static str]| -> Vec<&str> {
        cmd.iter().copied().chain(common.iter().copied()).collect()
    };

    let out = run_ok(dir.path(), &with(&["batch", "run"]));
    assert!(out.contains("scores: 3 rows committed"), "{out}");

    std::fs::write(
        dir.path().join("entities.csv"),
        "user_id,event_timestamp,label\n\
         u1,2025-12-31T00:00:00Z,0\n\
         u1,2026-01-01T06:00:00Z,1\n\
         u1,2026-01-03T00:00:00Z,1\n\
         u2,2026-01-03T00:00:00Z,0\n\
         u3,2026-01-03T00:00:00Z,0\n",
    )
    .unwrap();
    let mut args = with(&["batch", "retrieve", "--entities", "entities.csv"]);
    args.extend(["--features", "scores:score", "--out", "train.parquet"]);
    let out = run_ok(dir.path(), &args);
    assert!(out.contains("5 entity rows x 1 features"), "{out}");
    let reg = quiver_core::Registry::from_toml("reg.toml", BATCH_REGISTRY).unwrap();
    let table = quiver_batch::entities::read_file(&reg, &dir.path().join("train.parquet"))
        .await
        .unwrap();
    let score = table.column_by_name("score").unwrap();
    let score = score.as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(
        score.iter().collect::<Vec<_>>(),
        vec![None, Some(1.0), Some(2.0), Some(5.0), None]
    );
    assert!(table.column_by_name("label").is_some());

    let mut args = with(&["materialize", "--store-path", "online.redb"]);
    args.extend(["--end", "2026-01-05T00:00:00Z"]);
    let out = run_ok(dir.path(), &args);
    assert!(
        out.contains("scores: [beginning .. 2026-01-05T00:00:00.000000Z) 2 entities: 2 written"),
        "{out}"
    );
    // Incremental: the next run starts at the watermark and finds nothing new.
    let mut args = with(&["materialize", "--store-path", "online.redb"]);
    args.extend(["--end", "2026-01-06T00:00:00Z"]);
    let out = run_ok(dir.path(), &args);
    assert!(
        out.contains(
            "scores: [2026-01-05T00:00:00.000000Z .. 2026-01-06T00:00:00.000000Z) 0 entities"
        ),
        "{out}"
    );

    // Range flags with a UTC offset name the same instants as in UTC:
    // [00:00Z, 12:00Z) holds u1's first row but not u2's row at 12:00Z.
    let mut args = with(&["materialize", "--store-path", "online2.redb"]);
    args.extend(["--start", "2026-01-01T05:30:00+05:30"]);
    args.extend(["--end", "2026-01-01T07:00:00-05:00"]);
    let out = run_ok(dir.path(), &args);
    assert!(
        out.contains(
            "scores: [2026-01-01T00:00:00.000000Z .. 2026-01-01T12:00:00.000000Z) 1 entities: 1 written"
        ),
        "{out}"
    );

    // Mistakes are explained.
    for (args, needle) in [
        (
            with(&[
                "batch",
                "retrieve",
                "--entities",
                "nope.csv",
                "--features",
                "scores:score",
                "--out",
                "x.parquet",
            ]),
            "nope.csv: no such file",
        ),
        (
            with(&["materialize", "--start", "yesterday"]),
            "--start: \"yesterday\" is not an RFC 3339 timestamp",
        ),
        (
            with(&["batch", "run", "--views", "nope"]),
            "unknown feature view \"nope\"",
        ),
    ] {
        let out = quiver()
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// A Prometheus Pushgateway (Debian's `prometheus-pushgateway`, which
/// scripts/test.sh installs) on an ephemeral port; killed when dropped.
struct Pushgateway(std::process::Child, String);

impl Pushgateway {
    fn start() -> Pushgateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = ["prometheus-pushgateway", "pushgateway"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("prometheus-pushgateway is not installed: apt-get install prometheus-pushgateway (scripts/test.sh does)");
        let child = Command::new(bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let gw = Pushgateway(child, format!("http://127.0.0.1:{port}"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return gw;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the pushgateway did not start on {port}");
    }

    /// Its /metrics: what Prometheus scrapes.
    async fn scrape(&self) -> String {
        reqwest::get(format!("{}/metrics", self.1))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Pushgateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the one sample of `name` whose labels contain all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|x| rest.contains(x))).then(|| value.parse().unwrap())
    })
}

#[tokio::test]
async fn batch_run_and_materialize_push_their_metrics() {
    let gw = Pushgateway::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reg.toml"), BATCH_REGISTRY).unwrap();
    let run_to = |gateway: &str, args: &[&str]| {
        quiver()
            .args(args)
            .args(["--registry", "reg.toml", "--archive", "offline"])
            .current_dir(dir.path())
            .env("QUIVER_PUSHGATEWAY_URL", gateway)
            .output()
            .unwrap()
    };
    let run = |args: &[&str]| run_to(&gw.1, args);
    let out = run(&["batch", "run"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("batch run: 1 views, 3 rows in "),
        "{stdout}"
    );
    let out = run(&[
        "materialize",
        "--store-path",
        "online.redb",
        "--end",
        "2026-01-05T00:00:00Z",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("materialize: 1 views, 2 rows written in "),
        "{stdout}"
    );

    let text = gw.scrape().await;
    let batch = "job=\"quiver_batch\"";
    let mat = "job=\"quiver_materialize\"";
    let view = "feature_view=\"scores\"";
    assert_eq!(
        sample(&text, "quiver_batch_view_rows", &[batch, view]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "quiver_batch_view_rows", &[mat, view]),
        Some(2.0),
        "{text}"
    );
    assert!(sample(&text, "quiver_batch_view_duration_seconds", &[batch, view]).is_some());
    assert_eq!(sample(&text, "quiver_batch_success", &[batch]), Some(1.0));
    assert_eq!(sample(&text, "quiver_batch_success", &[mat]), Some(1.0));
    let success = sample(
        &text,
        "quiver_batch_last_success_timestamp_seconds",
        &[batch],
    )
    .unwrap();

    // A failed run says so and keeps the last success.
    std::fs::write(
        dir.path().join("reg.toml"),
        BATCH_REGISTRY.replace(", 1.0)", ", CAST(1 / (SELECT 0) AS DOUBLE))"),
    )
    .unwrap();
    let out = run(&["batch", "run"]);
    assert!(!out.status.success(), "{out:?}");
    let text = gw.scrape().await;
    assert_eq!(
        sample(&text, "quiver_batch_success", &[batch]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "quiver_batch_last_success_timestamp_seconds",
            &[batch]
        ),
        Some(success)
    );
    let last_run = sample(&text, "quiver_batch_last_run_timestamp_seconds", &[batch]).unwrap();
    assert!(last_run >= success);

    // An unreachable Pushgateway is a warning, not a failed run.
    std::fs::write(dir.path().join("reg.toml"), BATCH_REGISTRY).unwrap();
    let out = run_to("http://127.0.0.1:9", &["batch", "run"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warning: pushing metrics to http://127.0.0.1:9/metrics/job/quiver_batch failed"
        ),
        "{stderr}"
    );
    // A URL that is not one is refused before anything runs.
    let out = run_to("pushgateway:9091", &["batch", "run"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics.pushgateway_url"));
}

const ACCOUNT_REGISTRY: &str = r#"
[[entities]]
name = "account"
join_key = "account_id"

[[feature_views]]
name = "balances"
entities = ["account"]
source = { sql = """
SELECT * FROM (VALUES
  ('007', TIMESTAMP '2026-11-01T00:00:00Z', 7.0),
  ('7', TIMESTAMP '2026-11-01T00:00:00Z', 70.0)
) AS t(account_id, event_timestamp, balance)
""" }
features = [{ name = "balance", dtype = "double" }]
"#;

/// A CSV entity file is typed by the registry, not by guessing: string ids
/// "007" and "7" stay two accounts, whatever the other rows hold, and
/// times with UTC offsets are the instants they name.
#[tokio::test]
async fn csv_entity_files_are_typed_by_the_registry() {
    use quiver_batch::arrow::array::{Array, AsArray};
    use quiver_batch::arrow::datatypes::Float64Type;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("reg.toml"), ACCOUNT_REGISTRY).unwrap();
    let common = ["--registry", "reg.toml", "--archive", "offline"];
    let with = |cmd: &[&'static str]| -> Vec<&str> {
        cmd.iter().copied().chain(common.iter().copied()).collect()
    };
    run_ok(dir.path(), &with(&["batch", "run"]));
    std::fs::write(
        dir.path().join("entities.csv"),
        "account_id,event_timestamp,label\n\
         007,2026-11-02T00:00:00Z,1\n\
         7,2026-11-02T05:30:00+05:30,0\n\
         7,2026-10-31T23:00:00-01:30,0\n",
    )
    .unwrap();
    let mut args = with(&["batch", "retrieve", "--entities", "entities.csv"]);
    args.extend(["--features", "balances:balance", "--out", "train.parquet"]);
    run_ok(dir.path(), &args);
    let reg = quiver_core::Registry::from_toml("reg.toml", ACCOUNT_REGISTRY).unwrap();
    let table = quiver_batch::entities::read_file(&reg, &dir.path().join("train.parquet"))
        .await
        .unwrap();
    let ids: Vec<&str> = table
        .column_by_name("account_id")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(ids, vec!["007", "7", "7"]);
    let balance = table.column_by_name("balance").unwrap();
    let balance = balance.as_primitive::<Float64Type>();
    // The last row is 2026-11-01T00:30:00Z: after the feature time.
    assert_eq!(
        balance.iter().collect::<Vec<_>>(),
        vec![Some(7.0), Some(70.0), Some(70.0)]
    );
    let times = table.column_by_name("event_timestamp").unwrap();
    assert!(times.is_valid(2));

    // A time without an offset is refused with the row and a valid form.
    std::fs::write(
        dir.path().join("naive.csv"),
        "account_id,event_timestamp\n007,2026-11-02 00:00:00\n",
    )
    .unwrap();
    let mut args = with(&["batch", "retrieve", "--entities", "naive.csv"]);
    args.extend(["--features", "balances:balance", "--out", "x.parquet"]);
    let out = quiver()
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "entity row 0: event_timestamp: \"2026-11-02 00:00:00\" is not an RFC 3339 timestamp"
        ),
        "{stderr}"
    );
}

/// The number after `name=` in a log line.
fn log_field(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(&format!(" {name}="))? + name.len() + 2..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn demo_runs_the_batch_layer_on_a_timer() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.toml"),
        "[archive]\nroll_interval = \"1s\"\n",
    )
    .unwrap();
    let mut child = quiver()
        .args([
            "demo",
            "--users",
            "200",
            "--products",
            "20",
            "--config",
            "q.toml",
        ])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--store-path", "online.redb", "--archive", "offline"])
        .args(["--batch-every", "1s"])
        .current_dir(dir.path())
        .env("QUIVER_LOG", "info")
        .env_remove("QUIVER_ARCHIVE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    // Wait for a committed user_daily table with rows (SQL over archived
    // events) and for user_last_login rows materialized from the archive.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let (mut committed, mut materialized) = (0, 0);
    let mut log = Vec::new();
    while committed == 0 || materialized == 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!(
                "no batch round with data within 90 s; log:\n{}",
                log.join("\n")
            );
        };
        if line.contains("batch run committed") && line.contains("view=user_daily") {
            committed = committed.max(log_field(&line, "rows").unwrap_or(0));
        }
        if line.contains("materialized") && line.contains("view=user_last_login") {
            materialized += log_field(&line, "entities").unwrap_or(0);
        }
        assert!(!line.contains("failed"), "{line}");
        log.push(line);
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exited with {status}");
    assert!(dir
        .path()
        .join("offline/features/user_daily/_current.json")
        .exists());
}
