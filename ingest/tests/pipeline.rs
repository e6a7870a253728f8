//! The speed layer end to end over librdkafka's mock cluster (the real
//! Kafka protocol, in process): events produced by the idempotent sink are
//! consumed by a consumer group, applied to a real online store (a
//! `redis-server` started on an ephemeral port, or the embedded store) and
//! archived as Parquet; bad messages land in the dead-letter topic. A crash
//! in the middle of ingesting loses nothing and counts nothing twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use quiver_core::aggregate::{finish_row, tile_of, window_first_tile, AggState};
use quiver_core::codec::{entity_key, row_key};
use quiver_core::event::{Event, EventSink, EventTimeBounds};
use quiver_core::registry::ViewSource;
use quiver_core::store::{
    EmbeddedStore, Lookup, RedisConfig, RedisStore, StoredRow, TileWrite, WriteOutcome, WriteRow,
};
use quiver_core::time::{system_time_to_micros, Micros};
use quiver_core::{ErrorKind, OnlineStore, Registry, SystemClock, Value};
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::{
    Applier, Generator, GeneratorConfig, IngestConfig, IngestStats, Ingestor, KafkaConfig,
    KafkaEventSink,
};
use quiver_testkit::{MockKafka, RedisServer};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "events";
const DLQ: &str = "events-dlq";
const HOUR: Micros = 3_600_000_000;

/// Logs of the code under test, shown for failing tests
/// (`QUIVER_LOG=debug`; warnings by default).
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn registry() -> Arc<Registry> {
    logs();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
    Arc::new(Registry::load(&path).unwrap())
}

/// Event times the test ingestors accept: an hour ahead, 30 days back.
const BOUNDS: EventTimeBounds = EventTimeBounds {
    max_future_skew: Duration::from_secs(3600),
    max_age: Some(Duration::from_secs(30 * 86_400)),
};

fn now() -> Micros {
    system_time_to_micros(std::time::SystemTime::now())
}

fn kafka(brokers: &str, group: &str) -> KafkaConfig {
    KafkaConfig {
        topic: TOPIC.into(),
        group_id: group.into(),
        // A crashed member's partitions move after the session timeout;
        // keep it short so the restart test does not wait the default 45 s.
        extra: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "500".into()),
        ],
        ..KafkaConfig::new(brokers)
    }
}

fn events(n: usize, start: Micros) -> Vec<Event> {
    events_seeded(7, n, start)
}

/// `n` generated events from `start`; seeds give distinct event ids.
fn events_seeded(seed: u64, n: usize, start: Micros) -> Vec<Event> {
    let cfg = GeneratorConfig {
        seed,
        users: 200,
        products: 50,
        start,
        time_step: 2_000_000,
    };
    Generator::new(cfg, &registry()).unwrap().batch(n)
}

/// Generates `n` events from `start` and produces them, as `PushEvents` would.
async fn produce_events(brokers: &str, n: usize, start: Micros) -> Vec<Event> {
    produce_seeded(brokers, 7, n, start).await
}

async fn produce_seeded(brokers: &str, seed: u64, n: usize, start: Micros) -> Vec<Event> {
    let evs = events_seeded(seed, n, start);
    let sink = KafkaEventSink::new(&kafka(brokers, "unused"), registry()).unwrap();
    for chunk in evs.chunks(500) {
        let out = sink.publish(chunk).await.unwrap();
        assert!(out.iter().all(Result::is_ok));
    }
    evs
}

/// librdkafka's in-process cluster with the event topic and the DLQ; keep
/// the cluster alive for the test.
fn mock_kafka(partitions: i32) -> (MockKafka, String) {
    let cluster = MockKafka::with_topics(&[(TOPIC, partitions), (DLQ, 1)]);
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

fn redis_store(redis: &RedisServer) -> Arc<dyn OnlineStore> {
    Arc::new(
        RedisStore::new(&RedisConfig {
            url: redis.url(),
            pool_size: 4,
            timeout: Duration::from_secs(5),
            tls: Default::default(),
        })
        .unwrap(),
    )
}

fn embedded_store(dir: &Path) -> Arc<dyn OnlineStore> {
    Arc::new(EmbeddedStore::open(&dir.join("online.redb"), Arc::new(SystemClock)).unwrap())
}

/// Feature values straight from the definition: fold every event of the
/// window into one state, in event-time order, each event id once (a
/// retried send is the same event).
fn expected(reg: &Registry, events: &[Event], view: &str, key: &str, at: Micros) -> Vec<Value> {
    let v = reg.view(reg.view_index(view).unwrap());
    let ViewSource::Aggregations { tile, aggregations } = &v.source else {
        panic!("{view} is not an aggregation view");
    };
    let jk = &v.join_keys[0];
    aggregations
        .iter()
        .map(|a| {
            let mut s = AggState::new(a.function);
            let mut seen = HashSet::new();
            for e in events {
                if !seen.insert(e.event_id.as_str()) {
                    continue;
                }
                let in_window = tile_of(e.event_time, *tile)
                    >= window_first_tile(at, *tile, a.window)
                    && e.event_time <= at;
                let mine = e.entity(jk) == Some(&Value::String(key.into()));
                if in_window && mine && a.event_types.contains(&e.event_type) {
                    let attr = a.attribute.as_deref();
                    let value = attr.and_then(|n| e.attribute(n).or_else(|| e.entity(n)));
                    s.update(e.event_time, &e.event_id, value);
                }
            }
            s.finish()
        })
        .collect()
}

async fn online(
    store: &dyn OnlineStore,
    reg: &Registry,
    view: &str,
    jk: &str,
    key: &str,
    at: Micros,
) -> Vec<Value> {
    let v = reg.view(reg.view_index(view).unwrap());
    let ViewSource::Aggregations { tile, aggregations } = &v.source else {
        panic!("{view} is not an aggregation view");
    };
    let k = row_key(
        &entity_key(&[(jk, &Value::String(key.into()))]).unwrap(),
        view,
    );
    let row = store
        .read(&[Lookup::tiles(&k, &[])])
        .await
        .unwrap()
        .pop()
        .unwrap();
    let raw = row.map(|r| r.raw).unwrap_or_default();
    let all: Vec<usize> = (0..aggregations.len()).collect();
    finish_row(aggregations, *tile, at, &all, &raw)
        .unwrap()
        .map(|r| r.1)
        .unwrap_or_default()
}

fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

/// Every user and product: online aggregates equal the definition.
async fn check_aggregates(store: &dyn OnlineStore, reg: &Registry, evs: &[Event], at: Micros) {
    let mut users = HashSet::new();
    let mut products = HashSet::new();
    for e in evs {
        if let Some(Value::String(u)) = e.entity("user_id") {
            users.insert(u.clone());
        }
        if let Some(Value::String(p)) = e.entity("product_id") {
            products.insert(p.clone());
        }
    }
    for (view, jk, keys) in [
        ("user_stream", "user_id", &users),
        ("product_stream", "product_id", &products),
    ] {
        for key in keys {
            let want = expected(reg, evs, view, key, at);
            let mut got = online(store, reg, view, jk, key, at).await;
            if got.is_empty() {
                // No row: none of the entity's events feeds the view's
                // windows at `at` (e.g. only logins), as for no events.
                got = expected(reg, &[], view, key, at);
            }
            let ok = want.len() == got.len() && want.iter().zip(&got).all(|(a, b)| close(a, b));
            assert!(ok, "{view} {key}: online {got:?} != definition {want:?}");
        }
    }
}

/// Every archived row: (source, offset) and event ids are unique.
fn archived_rows(dir: &Path) -> Vec<(String, i64, String)> {
    let mut rows = Vec::new();
    let events_dir = dir.join("events");
    let Ok(dates) = std::fs::read_dir(&events_dir) else {
        return rows;
    };
    for d in dates {
        let d = d.unwrap().path();
        assert!(d
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("date="));
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            let file = std::fs::File::open(&f).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let b = batch.unwrap();
                let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
                let src = col("_source");
                let src = src.as_any().downcast_ref::<StringArray>().unwrap();
                let off = col("_offset");
                let off = off.as_any().downcast_ref::<Int64Array>().unwrap();
                let ids = col("event_id");
                let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
                for i in 0..b.num_rows() {
                    rows.push((
                        src.value(i).to_owned(),
                        off.value(i),
                        ids.value(i).to_owned(),
                    ));
                }
            }
        }
    }
    rows
}

/// The archive holds every message sent (`evs`, retried sends included,
/// and `extra_ids`) once: one row per offset, the ids as sent.
fn assert_archive_exact(dir: &Path, evs: &[Event], extra_ids: &[&str]) {
    let rows = archived_rows(dir);
    let offsets: HashSet<(String, i64)> = rows.iter().map(|r| (r.0.clone(), r.1)).collect();
    assert_eq!(offsets.len(), rows.len(), "an offset was archived twice");
    let mut ids: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let mut want: Vec<&str> = evs
        .iter()
        .map(|e| e.event_id.as_str())
        .chain(extra_ids.iter().copied())
        .collect();
    assert_eq!(
        rows.len(),
        want.len(),
        "archived {} rows for {} events",
        rows.len(),
        want.len()
    );
    ids.sort_unstable();
    want.sort_unstable();
    assert_eq!(ids, want);
    // Nothing half-written is visible, staging is empty after clean shutdown.
    let staging = dir.join("_quiver/staging");
    let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "staging files left behind");
}

fn ingestor(
    brokers: &str,
    store: Arc<dyn OnlineStore>,
    archive_dir: &Path,
    batch_max: usize,
    roll_bytes: usize,
) -> Ingestor {
    ingestor_for(
        &kafka(brokers, "ingest"),
        store,
        archive_dir.to_str().unwrap(),
        &[],
        batch_max,
        roll_bytes,
        Duration::from_secs(3600),
    )
}

fn ingestor_for(
    kafka: &KafkaConfig,
    store: Arc<dyn OnlineStore>,
    location: &str,
    options: &[(String, String)],
    batch_max: usize,
    roll_bytes: usize,
    roll_interval: Duration,
) -> Ingestor {
    let reg = registry();
    let (obj, root) = open_store(location, options).unwrap();
    let archiver = Archiver::new(
        obj,
        root,
        reg.clone(),
        ArchiveConfig {
            roll_bytes,
            roll_interval,
        },
    );
    let applier = Applier::new(reg.clone(), store, Duration::from_secs(86_400));
    Ingestor::new(
        kafka,
        IngestConfig {
            batch_max,
            batch_wait: Duration::from_millis(50),
            dead_letter_topic: DLQ.into(),
            max_backoff: Duration::from_millis(500),
            event_time_bounds: BOUNDS,
        },
        reg,
        applier,
        Some(archiver),
    )
    .unwrap()
}

/// Runs an ingestor until it has seen `total` messages or has been idle
/// (caught up) for a second after at least one batch.
async fn run_until_caught_up(ing: Ingestor, total: Option<u64>) -> IngestStats {
    let last = Arc::new(Mutex::new((Instant::now(), 0u64)));
    let seen = last.clone();
    let shutdown = async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (at, n) = *seen.lock().unwrap();
            let done = match total {
                Some(t) => n >= t,
                None => n > 0 && at.elapsed() > Duration::from_secs(1),
            };
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "ingest did not finish: {n} messages"
            );
            if done {
                break;
            }
        }
    };
    ing.run(shutdown, move |s| {
        *last.lock().unwrap() = (Instant::now(), s.messages);
    })
    .await
    .unwrap()
}

/// The sum of the samples of `name` whose labels contain every one of
/// `labels` (`key="value"`), in Prometheus text format.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|x| rest.contains(x)))
                .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// The exported metrics agree with the ingest totals.
fn check_metrics(text: &str, stats: &IngestStats) {
    let sum = |name: &str, labels: &[&str]| sample_sum(text, name, labels);
    assert_eq!(
        sum("quiver_ingest_messages_total", &[]),
        stats.messages as f64
    );
    for p in 0..3 {
        let part = format!("partition=\"{p}\"");
        let key = format!("{TOPIC}:{p}");
        assert_eq!(
            sum("quiver_ingest_messages_total", &[&part, "topic=\"events\""]),
            stats.partitions[key.as_str()].messages as f64,
            "{text}"
        );
    }
    assert_eq!(
        sum("quiver_ingest_events_applied_total", &[]),
        stats.events as f64
    );
    assert_eq!(
        sum(
            "quiver_ingest_dead_letters_total",
            &["reason=\"out_of_range\""]
        ),
        stats.out_of_range as f64
    );
    assert_eq!(
        sum("quiver_ingest_dead_letters_total", &["reason=\"invalid\""]),
        (stats.dead_letters - stats.out_of_range) as f64
    );
    assert_eq!(
        sum("quiver_ingest_tile_rows_total", &["outcome=\"written\""]),
        stats.online.tiles_written as f64
    );
    assert_eq!(
        sum("quiver_ingest_rows_total", &["outcome=\"written\""]),
        stats.online.rows_written as f64
    );
    assert_eq!(
        sum("quiver_ingest_events_too_late_total", &[]),
        stats.online.events_too_late as f64
    );
    assert_eq!(
        sum("quiver_archive_files_total", &[]),
        stats.archived.files as f64
    );
    assert_eq!(
        sum("quiver_archive_events_total", &[]),
        stats.archived.events as f64
    );
    assert_eq!(
        sum("quiver_archive_bytes_total", &[]),
        stats.archived.bytes as f64
    );
    assert!(stats.archived.bytes > 1000, "{stats:?}");
    assert_eq!(
        sum("quiver_ingest_batch_duration_seconds_count", &[]),
        stats.batches as f64
    );
    assert!(sum("quiver_ingest_commit_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(sum("quiver_ingest_up", &[]), 0.0, "the loop has ended");
    // Freshness of the views the events feed: one observation per event
    // and view.
    let logins = sum(
        "quiver_feature_freshness_seconds_count",
        &["feature_view=\"user_last_login\""],
    );
    assert!(logins > 0.0, "{text}");
    assert!(
        sum(
            "quiver_feature_freshness_seconds_count",
            &["feature_view=\"user_stream\""]
        ) > 0.0
    );
    // The events are hours old: freshness is at least that, and the
    // newest event time is the newest applied login's (within a second).
    let fresh_sum = sum(
        "quiver_feature_freshness_seconds_sum",
        &["feature_view=\"user_stream\""],
    );
    assert!(fresh_sum > 3600.0, "{text}");
    let newest = sum(
        "quiver_feature_newest_event_timestamp_seconds",
        &["feature_view=\"user_last_login\""],
    );
    let now_s = now() as f64 / 1e6;
    assert!(
        newest > now_s - 4.0 * 3600.0 && newest < now_s + 3600.0,
        "{newest} vs {now_s}"
    );
}

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

async fn dead_letters(brokers: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dlq-reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(DLQ, 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), c.recv()).await {
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for x in h.iter() {
                headers.insert(
                    x.key.to_owned(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        out.push((payload, headers));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_online_store_the_archive_and_the_dead_letter_topic() {
    let (_cluster, brokers) = mock_kafka(3);
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let reg = registry();
    let start = now() - 3 * HOUR;
    let evs = produce_events(&brokers, 3_000, start).await;

    // Any producer may write JSON; undecodable messages go to the DLQ.
    let json_event = serde_json::json!({
        "event_id": "json-1", "event_type": "login",
        "event_time": quiver_core::time::format_rfc3339(start + HOUR),
        "entities": {"user_id": "user_json"},
        "attributes": {"device": "web", "country": "NL"},
    })
    .to_string();
    // Event times out of bounds are dead-lettered with the reason; one
    // within the accepted future skew is ingested.
    let login_at = |id: &str, t: Micros| {
        serde_json::json!({
            "event_id": id, "event_type": "login",
            "event_time": quiver_core::time::format_rfc3339(t),
            "entities": {"user_id": format!("user_{id}")},
            "attributes": {"device": "web", "country": "NL"},
        })
        .to_string()
    };
    let soon = login_at("soon", now() + 30 * 60_000_000);
    let future = login_at("future", now() + 2 * 24 * HOUR);
    let old = login_at("old", now() - 31 * 24 * HOUR);
    let raw = raw_producer(&brokers);
    for (key, payload) in [
        ("k1", json_event.as_str()),
        ("k4", soon.as_str()),
        ("k5", future.as_str()),
        ("k6", old.as_str()),
        ("k2", "\u{1}\u{2}garbage"),
        (
            "k3",
            r#"{"event_id":"x","event_type":"teleport","event_time":"2026-01-01T00:00:00Z"}"#,
        ),
    ] {
        raw.send(
            FutureRecord::to(TOPIC).key(key).payload(payload),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(quiver_core::metrics::Metrics::new());
    let ing =
        ingestor(&brokers, store.clone(), dir.path(), 700, 16 * 1024).with_metrics(metrics.clone());
    let stats = run_until_caught_up(ing, Some(3_006)).await;
    check_metrics(&metrics.render(), &stats);
    assert_eq!(stats.messages, 3_006);
    assert_eq!(stats.events, 3_002);
    assert_eq!(stats.dead_letters, 4);
    assert_eq!(stats.out_of_range, 2);
    // The same outcomes per partition, adding up to the totals.
    let parts = &stats.partitions;
    assert_eq!(parts.len(), 3, "{parts:?}");
    let sum = |f: fn(&quiver_ingest::PartitionStats) -> u64| parts.values().map(f).sum::<u64>();
    assert_eq!(sum(|p| p.messages), 3_006);
    assert_eq!(sum(|p| p.events), 3_002);
    assert_eq!(sum(|p| p.dead_letters), 4);
    assert_eq!(sum(|p| p.out_of_range), 2);
    assert_eq!(sum(|p| p.tiles_written), stats.online.tiles_written);
    assert_eq!(sum(|p| p.too_late), stats.online.events_too_late);
    assert!(parts.keys().all(|k| k.starts_with(&format!("{TOPIC}:"))));
    assert!(stats.archived.files > 3, "rolled by size: {stats:?}");
    assert_eq!(stats.archived.events, 3_002);

    check_aggregates(&*store, &reg, &evs, now()).await;
    // Latest values: the newest login per user.
    let mut last_login: HashMap<String, &Event> = HashMap::new();
    for e in evs.iter().filter(|e| e.event_type == "login") {
        if let Some(Value::String(u)) = e.entity("user_id") {
            last_login.insert(u.clone(), e);
        }
    }
    for (user, e) in last_login.iter().take(20) {
        let user = Value::String(user.clone());
        let k = row_key(
            &entity_key(&[("user_id", &user)]).unwrap(),
            "user_last_login",
        );
        let feats = ["device", "login_at"];
        let row = store
            .read(&[Lookup::row(&k, &feats)])
            .await
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(row.event_ts, e.event_time);
        assert_eq!(row.values[0].as_ref(), e.attribute("device"));
        assert_eq!(row.values[1], Some(Value::Timestamp(e.event_time)));
    }
    assert_archive_exact(dir.path(), &evs, &["json-1", "soon"]);

    let dl = dead_letters(&brokers).await;
    assert_eq!(dl.len(), 4, "{dl:?}");
    let reasons: Vec<&str> = dl.iter().map(|(_, h)| h["quiver.error"].as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a quiver.v1.Event")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown event_type \"teleport\"")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("event time out of range: ")
                && r.contains("ahead of the clock")
                && r.contains("ingest.max_future_skew")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("older than the clock") && r.contains("ingest.max_event_age")),
        "{reasons:?}"
    );
    for (_, h) in &dl {
        assert_eq!(h["quiver.source.topic"], TOPIC);
        assert!(h.contains_key("quiver.source.offset"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_ingest_loses_nothing_and_counts_nothing_twice() {
    let (_cluster, brokers) = mock_kafka(4);
    let db = tempfile::tempdir().unwrap();
    let store = embedded_store(db.path());
    let reg = registry();
    let mut evs = produce_events(&brokers, 6_000, now() - 4 * HOUR).await;
    // Clients that retried PushEvents after a timeout: every 9th event
    // sent again (same ids), some of them twice.
    let retries: Vec<Event> = evs
        .iter()
        .step_by(9)
        .chain(evs.iter().step_by(90))
        .cloned()
        .collect();
    let sink = KafkaEventSink::new(&kafka(&brokers, "unused"), registry()).unwrap();
    for chunk in retries.chunks(500) {
        assert!(sink.publish(chunk).await.unwrap().iter().all(Result::is_ok));
    }
    evs.extend(retries);
    let dir = tempfile::tempdir().unwrap();

    // First run: killed at an arbitrary await point once a few batches are in.
    let first = ingestor(&brokers, store.clone(), dir.path(), 250, 8 * 1024);
    let progress = Arc::new(Mutex::new(0u64));
    let p = progress.clone();
    let task = tokio::spawn(first.run(futures::future::pending(), move |s| {
        *p.lock().unwrap() = s.batches;
    }));
    let started = Instant::now();
    while *progress.lock().unwrap() < 6 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "first run made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    let _ = task.await;
    let partial = archived_rows(dir.path()).len();
    assert!(
        partial < evs.len(),
        "the crash came too late to test anything"
    );

    // Restart with the same group: resumes from committed offsets, replays
    // what was not committed, skips what was already applied.
    let second = ingestor(&brokers, store.clone(), dir.path(), 250, 8 * 1024);
    let stats = run_until_caught_up(second, None).await;
    eprintln!("after restart: {stats:?}, archived before: {partial}");
    assert!(stats.online.events_duplicate > 0, "{stats:?}");
    assert!(
        stats.online.tiles_replayed > 0 || stats.messages < evs.len() as u64,
        "{stats:?}"
    );
    check_aggregates(&*store, &reg, &evs, now()).await;
    assert_archive_exact(dir.path(), &evs, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_writes_to_s3() {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;

    let s3 = quiver_testkit::S3Server::start();
    s3.create_bucket("lake");
    let (_cluster, brokers) = mock_kafka(2);
    let db = tempfile::tempdir().unwrap();
    let store = embedded_store(db.path());
    let evs = produce_events(&brokers, 1_500, now() - 2 * HOUR).await;

    let ing = ingestor_for(
        &kafka(&brokers, "ingest"),
        store,
        "s3://lake/offline",
        &s3.options(),
        400,
        32 * 1024,
        Duration::from_secs(3600),
    );
    let stats = run_until_caught_up(ing, Some(1_500)).await;
    assert_eq!(stats.archived.events, 1_500);

    let (obj, root) = open_store("s3://lake/offline", &s3.options()).unwrap();
    let files: Vec<object_store::ObjectMeta> = obj.list(Some(&root)).try_collect().await.unwrap();
    let mut rows = 0;
    let mut offsets = HashSet::new();
    let mut parquet_files = 0;
    for f in &files {
        let name = f.location.to_string();
        assert!(!name.contains("/staging/"), "staging file left: {name}");
        if !name.ends_with(".parquet") {
            assert!(
                name.contains("/_quiver/archive/"),
                "unexpected object {name}"
            );
            continue;
        }
        assert!(name.starts_with("offline/events/date="), "{name}");
        parquet_files += 1;
        let bytes = obj.get(&f.location).await.unwrap().bytes().await.unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let src = b.column(b.schema().index_of("_source").unwrap()).clone();
            let src = src.as_any().downcast_ref::<StringArray>().unwrap().clone();
            let off = b.column(b.schema().index_of("_offset").unwrap()).clone();
            let off = off.as_any().downcast_ref::<Int64Array>().unwrap().clone();
            for i in 0..b.num_rows() {
                offsets.insert((src.value(i).to_owned(), off.value(i)));
            }
            rows += b.num_rows();
        }
    }
    assert!(parquet_files > 1, "rolled by size into several files");
    assert_eq!(rows, evs.len());
    assert_eq!(offsets.len(), evs.len(), "an offset was archived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_processes_share_the_topic_through_a_rebalance() {
    let (_cluster, brokers) = mock_kafka(4);
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let reg = registry();
    // Event times end well before now: the definition counts no future
    // events. Two thirds go out before A starts, the rest while B joins.
    let evs = events(9_000, now() - 6 * HOUR);
    let sink = KafkaEventSink::new(&kafka(&brokers, "unused"), reg.clone()).unwrap();
    let (early, late) = evs.split_at(6_000);
    for chunk in early.chunks(500) {
        assert!(sink.publish(chunk).await.unwrap().iter().all(Result::is_ok));
    }
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_owned();
    let member = || {
        ingestor_for(
            &kafka(&brokers, "ingest"),
            store.clone(),
            &location,
            &[],
            200,
            8 * 1024,
            Duration::from_millis(300),
        )
    };

    // A starts alone; B joins once A is busy, so partitions move mid-stream.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let a_batches = Arc::new(Mutex::new(0u64));
    let ab = a_batches.clone();
    let a = tokio::spawn(member().run(stopped(stop_rx.clone()), move |s| {
        *ab.lock().unwrap() = s.batches
    }));
    let started = Instant::now();
    while *a_batches.lock().unwrap() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "A made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b_events = Arc::new(Mutex::new(0u64));
    let be = b_events.clone();
    let b = tokio::spawn(member().run(stopped(stop_rx.clone()), move |s| {
        *be.lock().unwrap() = s.events
    }));
    // Keep events coming until B has some: on a busy machine A may drain
    // the early ones before the group has rebalanced.
    let mut rest = late.chunks(300);
    while *b_events.lock().unwrap() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "B never got a partition"
        );
        match rest.next() {
            Some(chunk) => {
                assert!(sink.publish(chunk).await.unwrap().iter().all(Result::is_ok));
            }
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for chunk in rest {
        assert!(sink.publish(chunk).await.unwrap().iter().all(Result::is_ok));
    }
    // Done when every event is in a visible archive file (rolled by age).
    while archived_rows(dir.path()).len() < evs.len() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_tx.send(true).unwrap();
    let (sa, sb) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    eprintln!("A: {sa:?}\nB: {sb:?}");
    assert!(sb.events > 0, "B never got a partition");
    check_aggregates(&*store, &reg, &evs, now()).await;
    assert_archive_exact(dir.path(), &evs, &[]);
}

/// An online store that fails every call with `fault` while it is set.
struct FaultyStore {
    inner: Arc<dyn OnlineStore>,
    fault: Mutex<Option<ErrorKind>>,
}

impl FaultyStore {
    fn check(&self) -> quiver_core::Result<()> {
        match *self.fault.lock().unwrap() {
            Some(kind) => Err(quiver_core::Error::new(kind, "injected store fault")),
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl OnlineStore for FaultyStore {
    fn backend(&self) -> &'static str {
        "faulty"
    }
    async fn read(&self, l: &[Lookup<'_>]) -> quiver_core::Result<Vec<Option<StoredRow>>> {
        self.check()?;
        self.inner.read(l).await
    }
    async fn write(&self, rows: &[WriteRow]) -> quiver_core::Result<WriteOutcome> {
        self.check()?;
        self.inner.write(rows).await
    }
    async fn write_tiles(&self, w: &[TileWrite]) -> quiver_core::Result<Vec<bool>> {
        self.check()?;
        self.inner.write_tiles(w).await
    }
    async fn ping(&self) -> quiver_core::Result<()> {
        self.check()?;
        self.inner.ping().await
    }
}

/// An ingestor whose consumer must poll at least every 6 s
/// (`max.poll.interval.ms`) to stay in the group.
fn strict_ingestor(brokers: &str, store: Arc<dyn OnlineStore>, archive_dir: &Path) -> Ingestor {
    let reg = registry();
    let (obj, root) = open_store(archive_dir.to_str().unwrap(), &[]).unwrap();
    let archiver = Archiver::new(
        obj,
        root,
        reg.clone(),
        ArchiveConfig {
            roll_bytes: 64 * 1024,
            roll_interval: Duration::from_secs(3600),
        },
    );
    let mut kafka = kafka(brokers, "ingest");
    kafka.extra = vec![
        // The shortest session the broker allows (group.min.session.timeout.ms).
        ("session.timeout.ms".into(), "6000".into()),
        ("heartbeat.interval.ms".into(), "500".into()),
        ("max.poll.interval.ms".into(), "6000".into()),
    ];
    Ingestor::new(
        &kafka,
        IngestConfig {
            batch_max: 500,
            batch_wait: Duration::from_millis(50),
            dead_letter_topic: DLQ.into(),
            max_backoff: Duration::from_millis(400),
            event_time_bounds: BOUNDS,
        },
        reg.clone(),
        Applier::new(reg, store, Duration::from_secs(86_400)),
        Some(archiver),
    )
    .unwrap()
}

/// A store outage longer than `max.poll.interval.ms`: the batch is retried
/// with the partitions paused while the consumer keeps polling, so it keeps
/// its partitions (no rebalance, no zombie); the dead letter of the batch is
/// sent once however many retries; afterwards everything is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_retried_without_losing_the_partitions() {
    let (_cluster, brokers) = mock_kafka(2);
    let db = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore {
        inner: embedded_store(db.path()),
        fault: Mutex::new(Some(ErrorKind::Unavailable)),
    });
    let reg = registry();
    let evs = produce_events(&brokers, 1_500, now() - 2 * HOUR).await;
    raw_producer(&brokers)
        .send(
            FutureRecord::to(TOPIC).key("k").payload("garbage"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ing = strict_ingestor(&brokers, store.clone(), dir.path());
    let heal = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            *store.fault.lock().unwrap() = None;
        })
    };
    let stats = run_until_caught_up(ing, Some(1_501)).await;
    heal.await.unwrap();
    assert!(stats.retries >= 10, "{stats:?}");
    let retried: u64 = stats.partitions.values().map(|p| p.retries).sum();
    assert!(retried >= 10, "{:?}", stats.partitions);
    assert_eq!(stats.partitions_revoked, 0, "{stats:?}");
    assert_eq!(
        (stats.messages, stats.dead_letters),
        (1_501, 1),
        "{stats:?}"
    );
    check_aggregates(&*store, &reg, &evs, now()).await;
    assert_archive_exact(dir.path(), &evs, &[]);
    assert_eq!(dead_letters(&brokers).await.len(), 1, "sent once");
}

/// A failure that retrying cannot fix stops ingest with the error instead
/// of looping; nothing is committed, so a healthy restart loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_store_failure_stops_ingest_and_loses_nothing() {
    let (_cluster, brokers) = mock_kafka(2);
    let db = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore {
        inner: embedded_store(db.path()),
        fault: Mutex::new(Some(ErrorKind::Internal)),
    });
    let reg = registry();
    let evs = produce_events(&brokers, 1_000, now() - 2 * HOUR).await;
    let dir = tempfile::tempdir().unwrap();
    let ing = strict_ingestor(&brokers, store.clone(), dir.path());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        ing.run(futures::future::pending(), |_| {}),
    )
    .await
    .expect("ingest stops by itself")
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(
        err.message()
            .starts_with("ingest stopped: injected store fault")
            && err.message().contains("retrying cannot help"),
        "{err}"
    );
    *store.fault.lock().unwrap() = None;
    let ing = strict_ingestor(&brokers, store.clone(), dir.path());
    let stats = run_until_caught_up(ing, Some(1_000)).await;
    assert_eq!(stats.messages, 1_000);
    check_aggregates(&*store, &reg, &evs, now()).await;
    assert_archive_exact(dir.path(), &evs, &[]);
}

/// A topic deleted and recreated under the same name restarts its offsets
/// at 0: ingest must not skip its events as replays of the old topic's.
/// Consumer offsets reset on the same topic replay harmlessly; a recreated
/// topic (shorter than what was applied, or longer with other messages at
/// the last applied offset) stops ingest before anything of it is applied,
/// saying what to do; with `kafka.topic_epoch` raised it is a new source
/// and every event counts exactly once, online and in the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_stops_ingest_until_its_epoch_is_raised() {
    let db = tempfile::tempdir().unwrap();
    let store = embedded_store(db.path());
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_owned();
    let start = now() - 3 * HOUR;
    let build = |k: &KafkaConfig| {
        ingestor_for(
            k,
            store.clone(),
            &location,
            &[],
            250,
            8 * 1024,
            Duration::from_secs(3600),
        )
    };

    let (first_cluster, brokers) = mock_kafka(2);
    let first = produce_seeded(&brokers, 11, 600, start).await;
    let stats = run_until_caught_up(build(&kafka(&brokers, "ingest")), Some(600)).await;
    assert_eq!(stats.events, 600);
    // The same topic read again from the start (a new group, or offsets
    // reset): every tile row is a replay.
    let stats = run_until_caught_up(build(&kafka(&brokers, "replay")), Some(600)).await;
    assert_eq!(stats.online.tiles_written, 0, "{stats:?}");
    assert!(stats.online.tiles_replayed > 0, "{stats:?}");
    // A raised epoch while the group still has the old offsets would skip
    // everything before them: refused, nothing applied.
    produce_seeded(&brokers, 13, 50, start).await;
    let mut raised = kafka(&brokers, "ingest");
    raised.topic_epoch = 1;
    let err = stops(build(&raised)).await;
    assert!(
        err.message().contains("--reset-offsets --to-earliest"),
        "{err}"
    );
    drop(first_cluster);

    for n in [100, 900] {
        // Recreated: a new cluster's topic of the same name.
        let (cluster, brokers) = mock_kafka(2);
        let second = produce_seeded(&brokers, 12, n, start + HOUR).await;
        let err = stops(build(&kafka(&brokers, "ingest"))).await;
        let msg = err.message();
        assert!(
            msg.contains("recreated") && msg.contains("kafka.topic_epoch = 1"),
            "{msg}"
        );
        if n == 100 {
            assert!(msg.contains("now ends at offset"), "{msg}");
        } else {
            assert!(msg.contains("holds another message"), "{msg}");
        }
        // Nothing of the new topic was applied or archived.
        check_aggregates(&*store, &reg, &first, now()).await;
        assert_archive_exact(dir.path(), &first, &[]);
        if n == 900 {
            // The operator raises the epoch: a new source, applied exactly.
            let mut k = kafka(&brokers, "ingest");
            k.topic_epoch = 1;
            let stats = run_until_caught_up(build(&k), Some(900)).await;
            assert_eq!(stats.events, 900, "{stats:?}");
            assert!(
                stats.partitions.keys().all(|p| p.starts_with("events@1:")),
                "{stats:?}"
            );
            let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
            check_aggregates(&*store, &reg, &all, now()).await;
            assert_archive_exact(dir.path(), &all, &[]);
            // A replay of epoch 1 checks its own markers: nothing new.
            k.group_id = "ingest-again".into();
            let stats = run_until_caught_up(build(&k), Some(900)).await;
            assert_eq!(stats.online.tiles_written, 0, "{stats:?}");
            // A process left on the old epoch is refused.
            let err = stops(build(&kafka(&brokers, "left-behind"))).await;
            assert!(
                err.message()
                    .contains("epoch 1 of topic events is already in use"),
                "{err}"
            );
        }
        drop(cluster);
    }
}

/// Runs `ing` until it fails; the error must be a refusal to go on.
async fn stops(ing: Ingestor) -> quiver_core::Error {
    let run = ing.run(futures::future::pending(), |_| {});
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("ingest did not stop")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    err
}
