//! The batch layer through the server: GetHistoricalFeatures over real gRPC
//! against feature tables on local disk and on S3 (moto on loopback),
//! point-in-time cases (ties, missing entities, TTL, several views, late
//! data), materialization into Redis, and the proof that windowed
//! aggregations computed offline from the archive equal the ones ingest
//! maintains online (and that materializing latest values from the archive
//! gives the rows ingest wrote).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::offline::{column, doubles, historical, pb_i, pb_s, pb_t, put_table, refs};
use common::{now, redis_store, Backend, TestServer};
use quiver_batch::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use quiver_batch::arrow::datatypes::{DataType, Field, Schema};
use quiver_batch::materialize::MaterializeOptions;
use quiver_batch::retrieve::to_ipc;
use quiver_batch::Offline;
use quiver_core::columnar::{timestamp_type, value_at};
use quiver_core::event::EventSink;
use quiver_core::wire::value_from_pb;
use quiver_core::{OnlineStore, Registry, Value};
use quiver_ingest::archive::{open_store, ArchiveConfig, Archiver};
use quiver_ingest::{
    Applier, Generator, GeneratorConfig, IngestConfig, IngestStats, Ingestor, KafkaConfig,
    KafkaEventSink,
};
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_online_features_request::Kind as Sel;
use quiver_server::Limits;
use quiver_testkit::{MockKafka, RedisServer, S3Server};
use tonic::Code;

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// A column of a result as typed values.
fn values(batch: &RecordBatch, name: &str, ty: quiver_core::ValueType) -> Vec<Value> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", batch.schema()));
    (0..col.len())
        .map(|i| value_at(col.as_ref(), ty, i).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Online equals offline

/// Runs an ingestor until it has consumed `total` messages, `dead` of
/// them dead-lettered.
async fn ingest_all(ing: Ingestor, total: u64, dead: u64) -> IngestStats {
    let seen = Arc::new(Mutex::new(0u64));
    let counter = seen.clone();
    let shutdown = async move {
        let started = Instant::now();
        while *counter.lock().unwrap() < total {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "ingest stalled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stats = ing
        .run(shutdown, move |s| *seen.lock().unwrap() = s.messages)
        .await
        .unwrap();
    assert_eq!(stats.archived.events, total - dead, "{stats:?}");
    assert_eq!(stats.dead_letters, dead, "{stats:?}");
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_aggregates_equal_offline_ones_at_every_as_of_time() {
    let reg = Arc::new(Registry::from_toml("registry/features.toml", common::REGISTRY).unwrap());
    let cluster = MockKafka::with_topics(&[("events", 3), ("events-dlq", 1)]);
    let kafka = KafkaConfig {
        topic: "events".into(),
        group_id: "historical-test".into(),
        ..KafkaConfig::new(cluster.bootstrap_servers())
    };
    // ~22 hours of shop traffic ending within the last hour, off the hour
    // (Redis expires tile rows by the real clock, so the data is recent;
    // the server's clock then moves forward through the windows).
    let start = (now() / HOUR - 23) * HOUR + 17 * MINUTE;
    let n = 4_000;
    let events = Generator::new(
        GeneratorConfig {
            seed: 5,
            users: 60,
            products: 20,
            start,
            time_step: 20_000_000,
        },
        &reg,
    )
    .unwrap()
    .batch(n);
    // Logins of one user at the same event time with different values, in
    // both orders, in one ingest batch and across batches: ingest, the
    // archive (retrieval, materialization) and the rule agree on the row.
    let mut events = events;
    let t_tie = events.iter().map(|e| e.event_time).max().unwrap() + MINUTE;
    let login = |u: usize, k: &str, device: &str, country: &str| quiver_core::event::Event {
        event_id: format!("tie-{u}-{k}"),
        event_type: "login".into(),
        entities: vec![("user_id".into(), Value::String(format!("user_{u}")))],
        event_time: t_tie,
        attributes: vec![
            ("country".into(), Value::String(country.into())),
            ("device".into(), Value::String(device.into())),
        ],
    };
    for u in 0..8 {
        let (a, b) = (login(u, "a", "ios", "NL"), login(u, "b", "android", "DE"));
        let (first, second) = if u % 2 == 0 { (a, b) } else { (b, a) };
        if u < 4 {
            events.insert(1_000 + 3 * u, first);
        } else {
            events.push(first);
        }
        events.push(second);
    }
    // Events that arrive out of order, too late, too old, ahead of the
    // clock, and histories longer than the longest window (7 days):
    // - published first, 8 days before their copies: applied, then their
    //   tiles are deleted as newer events arrive;
    // - published last: 5 hours late (counted), 9 days late (too late:
    //   counted by no read at or after the clock), 5 hours ahead of the
    //   stream's end (within the 6 h skew: kept, read once the clock gets
    //   there), 2 days ahead and 40 days old (dead-lettered: in neither the
    //   online store nor the archive).
    let last_generated = events.iter().map(|e| e.event_time).max().unwrap();
    let (mut early, mut late) = (Vec::new(), Vec::new());
    let mut dead = 0u64;
    for (k, e) in events
        .iter()
        .filter(|e| e.event_type != "login")
        .step_by(97)
        .take(60)
        .enumerate()
    {
        let mut x = e.clone();
        x.event_id = format!("{}-x{k}", e.event_id);
        match k % 6 {
            0 => {
                x.event_time -= 8 * DAY;
                early.push(x);
                continue;
            }
            1 => x.event_time -= 5 * HOUR,
            2 => x.event_time -= 9 * DAY,
            3 => x.event_time = last_generated + 5 * HOUR,
            4 => {
                x.event_time = now() + 2 * DAY;
                dead += 1;
            }
            _ => {
                x.event_time = now() - 40 * DAY;
                dead += 1;
            }
        }
        late.push(x);
    }
    // Client retries: events sent again (same ids) after everything else,
    // and a few twice within one chunk; each counts once, online and
    // offline.
    let mut retries: Vec<quiver_core::event::Event> = events
        .iter()
        .chain(&late)
        .filter(|e| e.event_type != "login")
        .step_by(53)
        .take(70)
        .cloned()
        .collect();
    retries.extend(retries[..5].to_vec());
    let n = early.len() + events.len() + late.len() + retries.len();
    let sink = KafkaEventSink::new(&kafka, reg.clone()).unwrap();
    for chunk in early
        .chunks(500)
        .chain(events.chunks(500))
        .chain(late.chunks(500))
        .chain(retries.chunks(500))
    {
        assert!(sink.publish(chunk).await.unwrap().iter().all(Result::is_ok));
    }

    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_owned();
    let (obj, root) = open_store(&location, &[]).unwrap();
    let archiver = Archiver::new(
        obj,
        root,
        reg.clone(),
        ArchiveConfig {
            roll_bytes: 100_000,
            roll_interval: Duration::from_secs(3600),
        },
    );
    let ingestor = Ingestor::new(
        &kafka,
        IngestConfig {
            batch_max: 700,
            batch_wait: Duration::from_millis(20),
            dead_letter_topic: "events-dlq".into(),
            event_time_bounds: quiver_core::event::EventTimeBounds {
                max_future_skew: Duration::from_secs(6 * 3600),
                max_age: Some(Duration::from_secs(30 * 86_400)),
            },
            ..IngestConfig::default()
        },
        reg.clone(),
        Applier::new(reg.clone(), store.clone(), Duration::from_secs(86_400)),
        Some(archiver),
    )
    .unwrap();
    // Retries of dead-lettered events are dead-lettered again.
    let out_of_range = |e: &quiver_core::event::Event| {
        e.event_time > now() + DAY || e.event_time < now() - 30 * DAY
    };
    let dead = dead + retries.iter().filter(|e| out_of_range(e)).count() as u64;
    let stats = ingest_all(ingestor, n as u64, dead).await;
    assert_eq!(stats.out_of_range, dead, "{stats:?}");
    // Every retry of an ordinary event is skipped (in one view at least).
    let ordinary = retries
        .iter()
        .filter(|r| events.iter().any(|e| e.event_id == r.event_id))
        .count() as u64;
    assert!(ordinary > 50, "{ordinary}");
    assert!(stats.online.events_duplicate >= ordinary, "{stats:?}");
    assert!(stats.online.events_too_late > 0, "{stats:?}");
    // A second copy of one archive file, as an evicted ingest process's
    // overlapping roll would leave (the archive's fencing prevents that;
    // offline reads de-duplicate on (source, offset) all the same).
    let dates: Vec<_> = std::fs::read_dir(dir.path().join("events"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .collect();
    let biggest = dates
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|f| f.unwrap().path()))
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    std::fs::copy(&biggest, biggest.with_file_name("zombie-copy.parquet")).unwrap();

    let offline = Arc::new(Offline::open(reg.clone(), &location, &[]).unwrap());
    let ingest_store = store.clone();
    let server = TestServer::start_full(
        reg.clone(),
        store,
        Backend::Redis(redis),
        Limits::default(),
        None,
        Some(offline),
    )
    .await;
    let mut client = server.client().await;
    let last = events.iter().map(|e| e.event_time).max().unwrap();
    let users: Vec<String> = (0..60).map(|u| format!("user_{u}")).collect();
    let products: Vec<String> = (0..20).map(|p| format!("product_{p}")).collect();
    let mut compared = 0;
    let mut non_trivial = 0;
    for at in [
        last,
        last + 10 * MINUTE,
        last + 2 * HOUR,
        last + 23 * HOUR,
        last + 30 * HOUR,
        last + 6 * DAY + 12 * HOUR,
    ] {
        server.clock.set(at);
        for (view, jk, ids) in [
            ("user_stream", "user_id", &users),
            ("product_stream", "product_id", &products),
        ] {
            let v = reg.view(reg.view_index(view).unwrap());
            let keys: Vec<pb::Value> = ids.iter().map(|k| pb_s(k)).collect();
            let online = client
                .get_online_features(pb::GetOnlineFeaturesRequest {
                    kind: Some(Sel::Features(pb::FeatureList {
                        val: vec![format!("{view}:*")],
                    })),
                    entities: [(jk.to_owned(), column(keys.clone()))].into(),
                    full_feature_names: false,
                })
                .await
                .unwrap()
                .into_inner();
            let offline = historical(
                &server,
                pb::GetHistoricalFeaturesRequest {
                    kind: refs(&[&format!("{view}:*")]),
                    entities: [
                        (jk.to_owned(), column(keys)),
                        (
                            "event_timestamp".to_owned(),
                            column(vec![pb_t(at); ids.len()]),
                        ),
                    ]
                    .into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let names = online.metadata.unwrap().feature_names.unwrap().val;
            for f in &v.features {
                let col = names.iter().position(|n| *n == f.name).unwrap();
                let on: Vec<Value> = online.results[col]
                    .values
                    .iter()
                    .map(|p| value_from_pb(p.clone()).unwrap())
                    .collect();
                let off = values(&offline, &f.name, f.value_type);
                for (i, (a, b)) in on.iter().zip(&off).enumerate() {
                    assert_eq!(
                        a, b,
                        "{view}:{} of {} at {at} (last event {last}): online {a:?}, offline {b:?}",
                        f.name, ids[i]
                    );
                    compared += 1;
                    let trivial = matches!(a, Value::Null | Value::Int64(0) | Value::Double(0.0))
                        || matches!(a, Value::StringList(l) if l.is_empty());
                    non_trivial += usize::from(!trivial);
                }
            }
        }
    }
    assert_eq!(compared, 6 * (60 * 9 + 20 * 6));
    assert!(
        non_trivial > 1_000,
        "only {non_trivial} non-trivial values compared"
    );

    // Materializing the latest-value view from the archive into an empty
    // store gives exactly the rows ingest wrote.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh: Arc<dyn OnlineStore> = Arc::new(
        quiver_core::store::EmbeddedStore::open(
            &fresh_dir.path().join("online.redb"),
            Arc::new(quiver_core::SystemClock),
        )
        .unwrap(),
    );
    let offline = Offline::open(reg.clone(), &location, &[]).unwrap();
    let report = offline
        .materialize(
            fresh.clone(),
            &MaterializeOptions {
                views: vec!["user_last_login".into()],
                start: None,
                end: now() + HOUR,
                expiry_grace: Duration::from_secs(86_400),
                now: now(),
            },
            &|_: &str, _: u64, _: u64| {},
        )
        .await
        .unwrap();
    assert!(report[0].written > 30, "{report:?}");
    let view = reg.view(reg.view_index("user_last_login").unwrap());
    let names: Vec<&str> = view.features.iter().map(|f| f.name.as_str()).collect();
    let keys: Vec<String> = users
        .iter()
        .map(|u| {
            let user = Value::String(u.clone());
            quiver_core::codec::row_key(
                &quiver_core::codec::entity_key(&[("user_id", &user)]).unwrap(),
                "user_last_login",
            )
        })
        .collect();
    let lookups: Vec<quiver_core::store::Lookup<'_>> = keys
        .iter()
        .map(|k| quiver_core::store::Lookup::row(k, &names))
        .collect();
    let ingested = ingest_store.read(&lookups).await.unwrap();
    let materialized = fresh.read(&lookups).await.unwrap();
    assert_eq!(ingested.iter().flatten().count() as u64, report[0].written);
    assert_eq!(ingested, materialized);

    // The tied logins: online, historical and the rule pick the same row.
    let tied: Vec<String> = (0..8).map(|u| format!("user_{u}")).collect();
    let keys: Vec<pb::Value> = tied.iter().map(|k| pb_s(k)).collect();
    server.clock.set(t_tie + MINUTE);
    let online = client
        .get_online_features(pb::GetOnlineFeaturesRequest {
            kind: Some(Sel::Features(pb::FeatureList {
                val: vec!["user_last_login:device".into()],
            })),
            entities: [("user_id".to_owned(), column(keys.clone()))].into(),
            full_feature_names: false,
        })
        .await
        .unwrap()
        .into_inner();
    let offline = historical(
        &server,
        pb::GetHistoricalFeaturesRequest {
            kind: refs(&["user_last_login:device"]),
            entities: [
                ("user_id".to_owned(), column(keys)),
                (
                    "event_timestamp".to_owned(),
                    column(vec![pb_t(t_tie + MINUTE); tied.len()]),
                ),
            ]
            .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let off = values(&offline, "device", quiver_core::ValueType::String);
    let row = |device: &str, country: &str| {
        vec![
            ("device".to_owned(), Value::String(device.into())),
            ("login_country".to_owned(), Value::String(country.into())),
            ("login_at".to_owned(), Value::Timestamp(t_tie)),
        ]
    };
    let (a, b) = (row("ios", "NL"), row("android", "DE"));
    let want = if quiver_core::store::replaces(t_tie, &b, t_tie, &a) {
        &b
    } else {
        &a
    };
    for (i, u) in tied.iter().enumerate() {
        let on = value_from_pb(online.results[1].values[i].clone()).unwrap();
        assert_eq!(on, want[0].1, "{u} online");
        assert_eq!(off[i], want[0].1, "{u} offline");
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Point in time over SQL feature views

const PIT_REGISTRY: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[entities]]
name = "merchant"
join_key = "merchant_id"
value_type = "int64"

[[tables]]
name = "scores"
path = "tables/scores"

[[tables]]
name = "limits"
path = "tables/limits"

[[feature_views]]
name = "user_score"
entities = ["user"]
ttl = "1h"
source = { sql = "SELECT user_id, event_timestamp, score, tier FROM scores" }
features = [
  { name = "score", dtype = "double" },
  { name = "tier", dtype = "string" },
]

[[feature_views]]
name = "merchant_limit"
entities = ["merchant"]
source = { sql = "SELECT merchant_id, valid_from AS event_timestamp, credit_limit FROM limits" }
features = [{ name = "credit_limit", dtype = "int64" }]

[[feature_views]]
name = "online_only"
entities = ["user"]
features = [{ name = "x", dtype = "int64" }]
"#;

fn scores(rows: &[(&str, i64, f64, &str)]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("event_timestamp", timestamp_type(), false),
        Field::new("score", DataType::Float64, true),
        Field::new("tier", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                .with_timezone("UTC"),
        ),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

fn limits(rows: &[(i64, i64, i64)]) -> RecordBatch {
    // Deliberately another timestamp unit: SQL casts it to the feature time.
    let schema = Arc::new(Schema::new(vec![
        Field::new("merchant_id", DataType::Int64, false),
        Field::new(
            "valid_from",
            DataType::Timestamp(quiver_batch::arrow::datatypes::TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("credit_limit", DataType::Int64, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(
            quiver_batch::arrow::array::TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.1 / 1000),
            ),
        ),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

struct Pit {
    server: TestServer,
    offline: Arc<Offline>,
    store: Arc<dyn OnlineStore>,
    t: i64,
}

async fn pit_stack(location: &str, options: &[(String, String)]) -> Pit {
    let reg = Arc::new(Registry::from_toml("pit.toml", PIT_REGISTRY).unwrap());
    let offline = Arc::new(Offline::open(reg.clone(), location, options).unwrap());
    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let server = TestServer::start_full(
        reg,
        store.clone(),
        Backend::Redis(redis),
        Limits::default(),
        None,
        Some(offline.clone()),
    )
    .await;
    Pit {
        server,
        offline,
        store,
        t: (now() / MINUTE - 40) * MINUTE,
    }
}

/// Entity rows: (user, merchant, time offset from T).
fn entity_request(t: i64, rows: &[(&str, i64, i64)]) -> pb::GetHistoricalFeaturesRequest {
    pb::GetHistoricalFeaturesRequest {
        kind: refs(&["user_score:*", "merchant_limit:credit_limit"]),
        entities: [
            (
                "user_id".to_owned(),
                column(rows.iter().map(|r| pb_s(r.0)).collect()),
            ),
            (
                "merchant_id".to_owned(),
                column(rows.iter().map(|r| pb_i(r.1)).collect()),
            ),
            (
                "event_timestamp".to_owned(),
                column(rows.iter().map(|r| pb_t(t + r.2)).collect()),
            ),
            (
                "label".to_owned(),
                column((0..rows.len() as i64).map(pb_i).collect()),
            ),
        ]
        .into(),
        ..Default::default()
    }
}

/// Of u1's two rows at T+20m, (3.0, "c") and (4.0, "a"), the one the
/// online store keeps (and so retrieval and materialization pick).
fn tie_winner() -> (f64, &'static str) {
    let row = |score: f64, tier: &str| {
        vec![
            ("score".to_owned(), Value::Double(score)),
            ("tier".to_owned(), Value::String(tier.into())),
        ]
    };
    if quiver_core::store::replaces(0, &row(4.0, "a"), 0, &row(3.0, "c")) {
        (4.0, "a")
    } else {
        (3.0, "c")
    }
}

async fn point_in_time_suite(p: Pit) {
    let t = p.t;
    let srv = &p.server;
    let req = || {
        entity_request(
            t,
            &[
                ("u1", 7, -MINUTE),                // before any row
                ("u1", 7, 0),                      // exactly at a row
                ("u1", 7, 15 * MINUTE),            // between rows
                ("u1", 8, 20 * MINUTE),            // a tie on time
                ("u1", 7, 20 * MINUTE + HOUR),     // exactly TTL old: kept
                ("u1", 7, 20 * MINUTE + HOUR + 1), // 1 µs past TTL: gone
                ("u2", 7, 5 * MINUTE),             // other entity
                ("u3", 7, 5 * MINUTE),             // unknown entity
                ("u2", 7, 40 * MINUTE + 2 * DAY),  // no TTL on limits, TTL on scores
            ],
        )
    };

    // Before `batch run` there is no feature table: a clear precondition.
    let e = historical(srv, req()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("quiver batch run"), "{e:?}");

    put_table(
        &p.offline,
        "tables/scores/part-0.parquet",
        &scores(&[
            ("u1", t, 1.0, "a"),
            ("u1", t + 10 * MINUTE, 2.0, "b"),
            ("u1", t + 20 * MINUTE, 3.0, "c"),
            ("u2", t, 5.0, "z"),
        ]),
    )
    .await;
    // The tie's other half sits in another file, before the first one.
    put_table(
        &p.offline,
        "tables/scores/part-00.parquet",
        &scores(&[("u1", t + 20 * MINUTE, 4.0, "a")]),
    )
    .await;
    put_table(
        &p.offline,
        "tables/limits/l.parquet",
        &limits(&[
            (7, t - 30 * DAY, 100),
            (7, t + DAY, 200),
            (8, t + 30 * MINUTE, 1),
        ]),
    )
    .await;
    let reports = p.offline.run(&[], t).await.unwrap();
    assert_eq!(
        reports
            .iter()
            .map(|r| (r.view.as_str(), r.rows))
            .collect::<Vec<_>>(),
        vec![("user_score", 5), ("merchant_limit", 3)]
    );

    let out = historical(srv, req()).await.unwrap();
    assert_eq!(
        out.schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>(),
        vec![
            "event_timestamp",
            "label",
            "merchant_id",
            "user_id",
            "score",
            "tier",
            "credit_limit"
        ]
    );
    // The tie at T+20m goes to the row the online store would keep
    // (`store::replaces`), whatever the file order.
    let (tie_score, tie_tier) = tie_winner();
    assert_eq!(
        doubles(&out, "score"),
        vec![
            None,
            Some(1.0),
            Some(2.0),
            Some(tie_score),
            Some(tie_score),
            None,
            Some(5.0),
            None,
            None
        ]
    );
    assert_eq!(
        values(&out, "tier", quiver_core::ValueType::String)[3],
        Value::String(tie_tier.into())
    );
    // The tie goes to the same row whatever is selected: asking for `tier`
    // alone still gives the same row.
    let tier_only = historical(
        srv,
        pb::GetHistoricalFeaturesRequest {
            kind: refs(&["user_score:tier"]),
            entities: [
                ("user_id".to_owned(), column(vec![pb_s("u1")])),
                (
                    "event_timestamp".to_owned(),
                    column(vec![pb_t(t + 20 * MINUTE)]),
                ),
            ]
            .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        values(&tier_only, "tier", quiver_core::ValueType::String),
        vec![Value::String(tie_tier.into())]
    );
    let limit = values(&out, "credit_limit", quiver_core::ValueType::Int64);
    assert_eq!(limit[0], Value::Int64(100)); // 30 days old, no TTL
    assert_eq!(limit[3], Value::Null); // merchant 8's row is 10 min in the future
    assert_eq!(limit[8], Value::Int64(200));
    assert_eq!(
        values(&out, "label", quiver_core::ValueType::Int64),
        (0..9).map(Value::Int64).collect::<Vec<_>>()
    );

    // Late data: a row for u2 at T+2m lands after the run. Readers keep
    // seeing the committed run until the next run commits.
    put_table(
        &p.offline,
        "tables/scores/part-1.parquet",
        &scores(&[("u2", t + 2 * MINUTE, 6.0, "late")]),
    )
    .await;
    let late = || entity_request(t, &[("u2", 7, MINUTE), ("u2", 7, 5 * MINUTE)]);
    assert_eq!(
        doubles(&historical(srv, late()).await.unwrap(), "score"),
        vec![Some(5.0), Some(5.0)]
    );
    p.offline.run(&["user_score".into()], t + 1).await.unwrap();
    assert_eq!(
        doubles(&historical(srv, late()).await.unwrap(), "score"),
        vec![Some(5.0), Some(6.0)]
    );

    // The entity table as Arrow IPC, with string timestamps and another
    // column order (what the Python client sends).
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_timestamp", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
    ]));
    let table = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![quiver_core::time::format_rfc3339(
                t + 11 * MINUTE,
            )])),
            Arc::new(StringArray::from(vec!["u1"])),
        ],
    )
    .unwrap();
    let out = historical(
        srv,
        pb::GetHistoricalFeaturesRequest {
            kind: refs(&["user_score:score"]),
            entities_arrow: to_ipc(&table).unwrap(),
            full_feature_names: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(doubles(&out, "user_score__score"), vec![Some(2.0)]);

    // Bad requests get the right status and a message to act on.
    let bad = |kind, entities: Vec<(&str, Vec<pb::Value>)>| pb::GetHistoricalFeaturesRequest {
        kind,
        entities: entities
            .into_iter()
            .map(|(k, v)| (k.to_owned(), column(v)))
            .collect(),
        ..Default::default()
    };
    for (req, code, text) in [
        (
            bad(
                refs(&["user_score:score"]),
                vec![("user_id", vec![pb_s("u1")])],
            ),
            Code::InvalidArgument,
            "no \"event_timestamp\" column",
        ),
        (
            bad(
                refs(&["merchant_limit:credit_limit"]),
                vec![
                    ("user_id", vec![pb_s("u1")]),
                    ("event_timestamp", vec![pb_t(t)]),
                ],
            ),
            Code::InvalidArgument,
            "no column \"merchant_id\"",
        ),
        (
            bad(
                refs(&["user_score:score"]),
                vec![
                    (
                        "user_id",
                        vec![pb::Value {
                            kind: Some(pb::value::Kind::DoubleVal(1.5)),
                        }],
                    ),
                    ("event_timestamp", vec![pb_t(t)]),
                ],
            ),
            Code::InvalidArgument,
            "join key column \"user_id\" is Float64, but entity \"user\" has string ids",
        ),
        (
            bad(
                refs(&["online_only:x"]),
                vec![
                    ("user_id", vec![pb_s("u1")]),
                    ("event_timestamp", vec![pb_t(t)]),
                ],
            ),
            Code::FailedPrecondition,
            "no offline history",
        ),
        (
            bad(
                refs(&["user_score:nope"]),
                vec![
                    ("user_id", vec![pb_s("u1")]),
                    ("event_timestamp", vec![pb_t(t)]),
                ],
            ),
            Code::NotFound,
            "unknown feature",
        ),
        (
            bad(None, vec![("user_id", vec![pb_s("u1")])]),
            Code::InvalidArgument,
            "feature_service",
        ),
        (
            pb::GetHistoricalFeaturesRequest {
                kind: refs(&["user_score:score"]),
                entities_arrow: b"not arrow".to_vec(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "not an Arrow IPC stream",
        ),
    ] {
        let e = historical(srv, req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(text), "{text}: {e:?}");
    }

    materialization(&p).await;
    p.server.shutdown().await;
}

/// Latest values into Redis: incremental from the watermark, idempotent,
/// never over a newer online value.
async fn materialization(p: &Pit) {
    let t = p.t;
    let opts = |start: Option<i64>, end: i64| MaterializeOptions {
        views: vec!["user_score".into()],
        start,
        end,
        expiry_grace: Duration::from_secs(86_400),
        now: now(),
    };
    let read = |at: i64| {
        p.server.clock.set(at);
        async move {
            let mut c = p.server.client().await;
            let r = c
                .get_online_features(pb::GetOnlineFeaturesRequest {
                    kind: Some(Sel::Features(pb::FeatureList {
                        val: vec!["user_score:score".into()],
                    })),
                    entities: [("user_id".to_owned(), column(vec![pb_s("u1"), pb_s("u2")]))].into(),
                    full_feature_names: false,
                })
                .await
                .unwrap()
                .into_inner();
            r.results[1]
                .values
                .iter()
                .map(|v| value_from_pb(v.clone()).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let noop = |_: &str, _: u64, _: u64| {};
    // First run: incremental with no watermark yet, up to T+15m.
    let r = p
        .offline
        .materialize(p.store.clone(), &opts(None, t + 15 * MINUTE), &noop)
        .await
        .unwrap();
    assert_eq!((r[0].start, r[0].entities, r[0].written), (None, 2, 2));
    assert_eq!(
        read(t + 16 * MINUTE).await,
        vec![Value::Double(2.0), Value::Double(6.0)]
    );
    // Second run continues at the watermark: only u1 changed since.
    let r = p
        .offline
        .materialize(p.store.clone(), &opts(None, t + 30 * MINUTE), &noop)
        .await
        .unwrap();
    assert_eq!(
        (r[0].start, r[0].entities, r[0].written),
        (Some(t + 15 * MINUTE), 1, 1)
    );
    let tie_score = tie_winner().0;
    assert_eq!(
        read(t + 31 * MINUTE).await,
        vec![Value::Double(tie_score), Value::Double(6.0)]
    );
    // Re-running an old range never goes back in time: u1's row from
    // T+10m is stale, u2's (same event time as stored) rewrites the same
    // value.
    let r = p
        .offline
        .materialize(
            p.store.clone(),
            &opts(Some(t - HOUR), t + 12 * MINUTE),
            &noop,
        )
        .await
        .unwrap();
    assert_eq!((r[0].entities, r[0].written, r[0].stale), (2, 1, 1));
    assert_eq!(
        read(t + 31 * MINUTE).await,
        vec![Value::Double(tie_score), Value::Double(6.0)]
    );
    // Aggregation-free, online-only views cannot be materialized.
    let mut bad = opts(None, t);
    bad.views = vec!["online_only".into()];
    let e = p
        .offline
        .materialize(p.store.clone(), &bad, &noop)
        .await
        .unwrap_err();
    assert!(e.message().contains("no offline source"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_retrieval_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = pit_stack(dir.path().to_str().unwrap(), &[]).await;
    point_in_time_suite(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_retrieval_on_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let p = pit_stack("s3://lake/offline", &s3.options()).await;
    point_in_time_suite(p).await;
    // The feature tables are really in the bucket.
    let (store, _) = open_store("s3://lake/offline", &s3.options()).unwrap();
    use futures::TryStreamExt;
    let keys: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("offline/features/user_score/run-") && k.ends_with(".parquet")),
        "{keys:?}"
    );
    assert!(keys.contains(&"offline/features/user_score/_current.json".to_owned()));
}

#[tokio::test]
async fn a_server_without_offline_store_says_so() {
    let server = TestServer::embedded().await;
    let e = historical(
        &server,
        pb::GetHistoricalFeaturesRequest {
            kind: refs(&["user_daily:spend_1d"]),
            entities: [
                ("user_id".to_owned(), column(vec![pb_s("user_1")])),
                ("event_timestamp".to_owned(), column(vec![pb_t(now())])),
            ]
            .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no offline store"), "{e:?}");
    server.shutdown().await;
}
