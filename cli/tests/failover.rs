//! `kill -9` of one of two `quiver ingest` processes (no group leave): the
//! survivor takes over the dead member's partitions once the group
//! coordinator gives up on it, which quiver's consumer settings bound at
//! 10 s (librdkafka's default session timeout is 45 s). Kafka is
//! librdkafka's mock cluster, in this process, reached over TCP by the two
//! ingest processes; the online store is a real Redis. Also: an ingest
//! process's own `/metrics`, `/health` and `/ready`.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_core::event::EventSink;
use quiver_core::Registry;
use quiver_ingest::{Generator, GeneratorConfig, KafkaConfig, KafkaEventSink};
use quiver_testkit::{MockKafka, RedisServer};

/// Kills the process when dropped (also when an assertion fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_ingest(config: &std::path::Path) -> (Killed, Receiver<String>) {
    let (k, rx, _) = spawn_ingest_with_metrics(config);
    (k, rx)
}

/// [`spawn_ingest`], also returning the address of its `/metrics` (from
/// the line it prints on stdout).
fn spawn_ingest_with_metrics(
    config: &std::path::Path,
) -> (Killed, Receiver<String>, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["ingest", "--metrics-addr", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("QUIVER_LOG", "info")
        .env_remove("QUIVER_ARCHIVE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("quiver ingest metrics=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    (Killed(child), rx, addr)
}

/// Waits for a "partitions assigned" line with `count` partitions.
fn wait_assigned(rx: &Receiver<String>, count: usize, deadline: Instant) -> bool {
    let want = format!("partitions assigned count={count}");
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&want) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|x| rest.contains(x)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

/// Kafka (the mock cluster, `partitions` partitions), Redis, a config
/// file for `quiver ingest` (archive in `offline/` when `archive`) and a
/// sink producing to the topic.
struct Stack {
    _kafka: MockKafka,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    reg: Arc<Registry>,
    sink: KafkaEventSink,
}

fn stack(partitions: i32, archive: bool) -> Stack {
    let kafka = MockKafka::with_topics(&[("quiver-events", partitions), ("quiver-events-dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("q.toml");
    let registry =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    let location = if archive {
        format!("{:?}", dir.path().join("offline"))
    } else {
        "\"\"".to_owned()
    };
    std::fs::write(
        &config,
        format!(
            "[registry]\npath = {registry:?}\n[kafka]\nbrokers = \"{brokers}\"\n[online_store]\nredis_url = \"{}\"\n[archive]\nlocation = {location}\nroll_interval = \"1s\"\n[ingest]\nbatch_wait = \"50ms\"\n",
            redis.url(),
        ),
    )
    .unwrap();
    let reg = Arc::new(Registry::load(&registry).unwrap());
    let sink = KafkaEventSink::new(&KafkaConfig::new(brokers), reg.clone()).unwrap();
    Stack {
        _kafka: kafka,
        _redis: redis,
        _dir: dir,
        config,
        reg,
        sink,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_process_serves_its_metrics_and_health() {
    let Stack {
        config, reg, sink, ..
    } = &stack(2, true);
    let mut gen = Generator::new(
        GeneratorConfig {
            users: 50,
            start: quiver_core::time::system_time_to_micros(std::time::SystemTime::now())
                - 60_000_000,
            ..GeneratorConfig::default()
        },
        reg,
    )
    .unwrap();
    assert!(sink
        .publish(&gen.batch(800))
        .await
        .unwrap()
        .iter()
        .all(Result::is_ok));
    let (_ingest, _log, addr) = spawn_ingest_with_metrics(config);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
    // Until everything is applied and archived, and librdkafka's
    // statistics (every 5 s) have reported each partition's lag.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = get("/metrics").await.unwrap().text().await.unwrap();
        let applied = sample_sum(&text, "quiver_ingest_events_applied_total", &[]);
        let archived = sample_sum(&text, "quiver_archive_events_total", &[]);
        let lag = sample_sum(&text, "quiver_ingest_consumer_lag_messages", &[]);
        if applied == Some(800.0) && archived == Some(800.0) && lag == Some(0.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "applied {applied:?}, archived {archived:?}, lag {lag:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for p in ["0", "1"] {
        let part = format!("partition=\"{p}\"");
        let labels = ["topic=\"quiver-events\"", part.as_str()];
        assert!(
            sample_sum(&text, "quiver_ingest_messages_total", &labels).unwrap() > 0.0,
            "{text}"
        );
        assert!(
            sample_sum(&text, "quiver_ingest_consumer_lag_messages", &labels).is_some(),
            "{text}"
        );
    }
    assert_eq!(
        sample_sum(&text, "quiver_ingest_messages_total", &[]),
        Some(800.0)
    );
    assert_eq!(sample_sum(&text, "quiver_ingest_up", &[]), Some(1.0));
    assert!(sample_sum(&text, "quiver_archive_bytes_total", &[]).unwrap() > 0.0);
    // Events about a minute old: freshness about a minute, newest event
    // time within the last two minutes.
    let view = ["feature_view=\"user_stream\""];
    let n = sample_sum(&text, "quiver_feature_freshness_seconds_count", &view).unwrap();
    let mean = sample_sum(&text, "quiver_feature_freshness_seconds_sum", &view).unwrap() / n;
    assert!((30.0..600.0).contains(&mean), "mean freshness {mean} s");
    let newest = sample_sum(
        &text,
        "quiver_feature_newest_event_timestamp_seconds",
        &view,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - newest < 120.0 && newest < now + 1.0,
        "{newest} vs {now}"
    );
    let health = get("/health").await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), r#"{"status":"ok"}"#);
    let ready = get("/ready").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.unwrap(), r#"{"status":"ready"}"#);
    assert_eq!(get("/nope").await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ingest_process_partitions_move_to_the_survivor() {
    let Stack {
        config, reg, sink, ..
    } = &stack(4, false);
    let mut gen = Generator::new(
        GeneratorConfig {
            users: 100,
            ..GeneratorConfig::default()
        },
        reg,
    )
    .unwrap();
    assert!(sink
        .publish(&gen.batch(500))
        .await
        .unwrap()
        .iter()
        .all(Result::is_ok));

    let (a, a_log) = spawn_ingest(config);
    let start = Instant::now() + Duration::from_secs(60);
    assert!(
        wait_assigned(&a_log, 4, start),
        "the first member never got the partitions"
    );
    let (b, b_log) = spawn_ingest(config);
    assert!(
        wait_assigned(&b_log, 2, start),
        "the second member never joined"
    );

    drop(a); // SIGKILL: no leave-group, no commit
    let killed = Instant::now();
    assert!(sink
        .publish(&gen.batch(500))
        .await
        .unwrap()
        .iter()
        .all(Result::is_ok));
    // Within librdkafka's default session timeout (45 s) only if quiver's
    // shorter one is in effect.
    let took_over = wait_assigned(&b_log, 4, killed + Duration::from_secs(40));
    let stall = killed.elapsed();
    drop(b);
    assert!(
        took_over,
        "the survivor did not get the dead member's partitions"
    );
    eprintln!(
        "partitions moved {:.1} s after SIGKILL",
        stall.as_secs_f64()
    );
}
