//! Every value a client sends comes back exactly: times with UTC offsets,
//! NaN and infinities, ids typed by the registry, ties on event time, and
//! error messages that name what is wrong. Real gRPC and HTTP against a
//! server over a real Redis, with an offline store on local disk.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::offline::{doubles as f64s, historical, pb_s, put_table, refs as features};
use common::{redis_store, Backend, Recorder, TestServer};
use quiver_batch::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int32Array, LargeStringArray, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use quiver_batch::arrow::datatypes::{DataType, Field, Float64Type, Schema};
use quiver_batch::materialize::MaterializeOptions;
use quiver_batch::retrieve::to_ipc;
use quiver_batch::Offline;
use quiver_core::columnar::timestamp_type;
use quiver_core::time::parse_rfc3339;
use quiver_core::wire::{micros_to_ts, value_from_pb};
use quiver_core::{OnlineStore, Registry, Value};
use quiver_proto::prost_types::Timestamp;
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_online_features_request::Kind as Sel;
use quiver_server::Limits;
use quiver_testkit::RedisServer;
use serde_json::{json, Value as Json};
use tonic::Code;

const REGISTRY: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[entities]]
name = "shop"
join_key = "shop_id"
value_type = "int64"

[[tables]]
name = "ratios"
path = "tables/ratios"

[[tables]]
name = "ties"
path = "tables/ties"

[[tables]]
name = "halves"
path = "tables/halves"

[[feature_views]]
name = "half_bad"
entities = ["user"]
source = { sql = "SELECT user_id, event_timestamp, ratio AS n FROM halves" }
features = [{ name = "n", dtype = "int64" }]

[[event_types]]
name = "visit"
entities = ["user"]
attributes = [{ name = "amount", dtype = "double" }]

[[feature_views]]
name = "user_nottl"
entities = ["user"]
features = [
  { name = "v", dtype = "int64" },
  { name = "seen_at", dtype = "timestamp" },
  { name = "score", dtype = "double" },
  { name = "scores", dtype = "double_list" },
  { name = "emb", dtype = "float_list" },
  { name = "tags", dtype = "string_list" },
]

[[feature_views]]
name = "user_ratio"
entities = ["user"]
source = { sql = "SELECT user_id, event_timestamp, ratio FROM ratios" }
features = [{ name = "ratio", dtype = "double" }]

[[feature_views]]
name = "user_big_ratio"
entities = ["user"]
source = { sql = "SELECT user_id, event_timestamp, ratio AS big FROM ratios WHERE ratio > 3" }
features = [{ name = "big", dtype = "double" }]

[[feature_views]]
name = "user_tie"
entities = ["user"]
source = { sql = "SELECT user_id, event_timestamp, x, label FROM ties" }
features = [{ name = "x", dtype = "double" }, { name = "label", dtype = "string" }]

[[feature_views]]
name = "user_tie_online"
entities = ["user"]
features = [{ name = "x", dtype = "double" }, { name = "label", dtype = "string" }]

[[feature_views]]
name = "user_recent"
entities = ["user"]
ttl = "1h"
features = [{ name = "n", dtype = "int64" }]

[[feature_views]]
name = "user_last_visit"
entities = ["user"]
source = { events = ["visit"] }
features = [{ name = "amount", dtype = "double" }]

[[feature_views]]
name = "big_spenders"
entities = ["user"]
source = { sql = "SELECT user_id, event_time AS event_timestamp, amount FROM events WHERE amount > 100" }
features = [{ name = "amount", dtype = "double" }]

[[feature_views]]
name = "fraction_to_int"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, 1.7 AS n" }
features = [{ name = "n", dtype = "int64" }]

[[feature_views]]
name = "text_to_int_key"
entities = ["shop"]
source = { sql = "SELECT '007' AS shop_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, 'gold' AS tier" }
features = [{ name = "tier", dtype = "string" }]

[[feature_views]]
name = "inexact_double"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, 9007199254740993 AS d" }
features = [{ name = "d", dtype = "double" }]

[[feature_views]]
name = "float32_overflow"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, make_array(1.0, 1e300) AS e" }
features = [{ name = "e", dtype = "float_list" }]

[[feature_views]]
name = "exact_casts"
entities = ["shop"]
source = { sql = """
SELECT CAST(7 AS INT) AS shop_id, CAST('2026-11-01T00:00:00Z' AS TIMESTAMP) AS event_timestamp,
  2.0 AS n, 7 AS d, make_array(0.1, 2.5) AS e, '7' AS t, NULL AS late, round(-0.3) AS z,
  arrow_cast(make_array(1.0, 2.0), 'LargeList(Float64)') AS big,
  arrow_cast(make_array(1.5, 2.5), 'FixedSizeList(2, Float64)') AS fixed, NULL AS nothing,
  arrow_cast(1, 'Timestamp(Nanosecond, Some("UTC"))') AS ns_text, '2016-12-31T23:59:60.5Z' AS leap
""" }
features = [
  { name = "n", dtype = "int64" },
  { name = "d", dtype = "double" },
  { name = "e", dtype = "float_list" },
  { name = "t", dtype = "int64" },
  { name = "late", dtype = "timestamp" },
  { name = "z", dtype = "int64" },
  { name = "big", dtype = "float_list" },
  { name = "fixed", dtype = "float_list" },
  { name = "nothing", dtype = "float_list" },
  { name = "ns_text", dtype = "string" },
  { name = "leap", dtype = "timestamp" },
]

[[feature_views]]
name = "wrong_dimension"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, make_array(1.0, 2.0) AS e" }
features = [{ name = "e", dtype = "float_list", dimension = 3 }]

[[feature_views]]
name = "text_overflow"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, '1e400' AS d" }
features = [{ name = "d", dtype = "double" }]

[[feature_views]]
name = "float_id"
entities = ["user"]
source = { sql = "SELECT 1.5 AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, 1.0 AS y" }
features = [{ name = "y", dtype = "double" }]

[[feature_views]]
name = "u64_overflow"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, arrow_cast(18446744073709551615, 'UInt64') AS n" }
features = [{ name = "n", dtype = "int64" }]

[[feature_views]]
name = "scalar_to_list"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, 'x' AS tags" }
features = [{ name = "tags", dtype = "string_list" }]

[[feature_views]]
name = "number_time"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, 1700000000 AS event_timestamp, 1.0 AS y" }
features = [{ name = "y", dtype = "double" }]

[[feature_views]]
name = "ns_time"
entities = ["user"]
source = { sql = '''SELECT 'u1' AS user_id, arrow_cast(-1, 'Timestamp(Nanosecond, Some("UTC"))') AS event_timestamp, 1.0 AS y''' }
features = [{ name = "y", dtype = "double" }]

[[feature_views]]
name = "bad_list"
entities = ["user"]
source = { sql = "SELECT 'u1' AS user_id, TIMESTAMP '2026-11-01T00:00:00Z' AS event_timestamp, make_array(1, NULL) AS xs" }
features = [{ name = "xs", dtype = "int64_list" }]

[[feature_views]]
name = "far_future"
entities = ["user"]
source = { sql = '''SELECT 'u1' AS user_id, arrow_cast(253402300800000000, 'Timestamp(Microsecond, Some("UTC"))') AS event_timestamp, 1.0 AS y''' }
features = [{ name = "y", dtype = "double" }]

[[feature_views]]
name = "shop_tier"
entities = ["shop"]
features = [{ name = "tier", dtype = "string" }]
"#;

/// 2026-11-01T00:00:00Z, the feature time of the offline tables.
const T0: i64 = 1_793_491_200_000_000;

struct Stack {
    server: TestServer,
    offline: Arc<Offline>,
    store: Arc<dyn OnlineStore>,
    events: Arc<Recorder>,
    _dir: tempfile::TempDir,
}

async fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(Registry::from_toml("trust.toml", REGISTRY).unwrap());
    let offline = Arc::new(Offline::open(reg.clone(), dir.path().to_str().unwrap(), &[]).unwrap());
    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let events = Arc::new(Recorder::default());
    let server = TestServer::start_full(
        reg,
        store.clone(),
        Backend::Redis(redis),
        Limits::default(),
        Some(events.clone()),
        Some(offline.clone()),
    )
    .await;
    Stack {
        server,
        offline,
        store,
        events,
        _dir: dir,
    }
}

async fn post(s: &TestServer, path: &str, body: Json) -> (u16, Json) {
    let resp = reqwest::Client::new()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Json::Null))
}

async fn get(s: &TestServer, path: &str) -> (u16, Json) {
    let resp = reqwest::get(s.url(path)).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Json::Null))
}

async fn write(s: &TestServer, rows: Json) -> (u16, Json) {
    post(
        s,
        "/api/v1/features/write",
        json!({"feature_view": "user_nottl", "rows": rows}),
    )
    .await
}

async fn online(s: &TestServer, refs: &[&str], users: &[&str]) -> pb::GetOnlineFeaturesResponse {
    s.client()
        .await
        .get_online_features(pb::GetOnlineFeaturesRequest {
            kind: Some(Sel::Features(pb::FeatureList {
                val: refs.iter().map(|f| f.to_string()).collect(),
            })),
            entities: [(
                "user_id".to_owned(),
                pb::RepeatedValue {
                    val: users.iter().map(|u| pb_s(u)).collect(),
                },
            )]
            .into(),
            full_feature_names: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Finding 1: a UTC offset names an instant; it is converted, never
/// ignored or refused, on every online path.
#[tokio::test]
async fn times_with_utc_offsets_are_the_instants_they_name() {
    let st = stack().await;
    let s = &st.server;
    // The issue's case: 15:30+05:30 is 10:00Z, an hour before 11:00Z.
    let (status, out) = write(
        s,
        json!([{"entity_key": {"user_id": "u_tz"}, "event_timestamp": "2026-11-29T15:30:00.000+05:30",
                "features": {"v": 1, "seen_at": "2026-06-01T12:00:00.5+02:00"}}]),
    )
    .await;
    assert_eq!(
        (status, out),
        (200, json!({"written": 1, "stale": 0, "expired": 0}))
    );
    let (status, out) = write(
        s,
        json!([{"entity_key": {"user_id": "u_tz"}, "event_timestamp": "2026-11-29T11:00:00Z",
                "features": {"v": 2, "seen_at": "2026-06-01T12:00:00.5+02:00"}}]),
    )
    .await;
    assert_eq!(
        (status, out),
        (200, json!({"written": 1, "stale": 0, "expired": 0}))
    );
    let (_, body) = get(
        s,
        "/api/v1/features/user/u_tz?features=user_nottl:v,user_nottl:seen_at",
    )
    .await;
    assert_eq!(
        body["features"]["user_nottl__v"]["value"],
        json!(2),
        "{body}"
    );
    assert_eq!(
        body["features"]["user_nottl__v"]["event_timestamp"],
        json!("2026-11-29T11:00:00.000000Z")
    );
    assert_eq!(
        body["features"]["user_nottl__seen_at"]["value"],
        json!("2026-06-01T10:00:00.500000Z")
    );
    // The same instant over gRPC.
    let r = online(s, &["user_nottl:seen_at"], &["u_tz"]).await;
    assert_eq!(
        value_from_pb(r.results[1].values[0].clone()).unwrap(),
        Value::Timestamp(parse_rfc3339("2026-06-01T10:00:00.5Z").unwrap())
    );
    // Every RFC 3339 form is taken: no fraction, a negative offset.
    for (i, text) in [
        "2026-11-29T15:30:00+05:30",
        "2026-11-29T05:00:00.000-05:00",
        "2026-11-29 10:00:00z",
    ]
    .iter()
    .enumerate()
    {
        let (status, out) = write(
            s,
            json!([{"entity_key": {"user_id": format!("u_form{i}")}, "event_timestamp": text, "features": {"v": 1}}]),
        )
        .await;
        assert_eq!(status, 200, "{text}: {out}");
        let (_, body) = get(
            s,
            &format!("/api/v1/features/user/u_form{i}?features=user_nottl:v"),
        )
        .await;
        assert_eq!(
            body["features"]["user_nottl__v"]["event_timestamp"],
            json!("2026-11-29T10:00:00.000000Z"),
            "{text}"
        );
    }
    // Pushed events: the event time is converted before it reaches the log
    // (it decides the tile an aggregate counts the event in).
    let (status, out) = post(
        s,
        "/api/v1/events",
        json!({"events": [{"event_id": "e1", "event_type": "visit", "event_time": "2026-11-29T15:30:00+05:30",
                           "entities": {"user_id": "u_tz"}, "attributes": {"amount": 1.5}}]}),
    )
    .await;
    assert_eq!((status, &out["accepted"]), (200, &json!(1)), "{out}");
    assert_eq!(
        st.events.0.lock().unwrap()[0].event_time,
        parse_rfc3339("2026-11-29T10:00:00Z").unwrap()
    );
    // Outside the range every form can write back: refused, with the range.
    let (status, out) = write(
        s,
        json!([{"entity_key": {"user_id": "u_x"}, "event_timestamp": "0001-01-01T00:30:00+01:00", "features": {}}]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the supported range"),
        "{out}"
    );
    let e = s
        .client()
        .await
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_nottl".into(),
            rows: vec![pb::FeatureRow {
                entity_key: [("user_id".to_owned(), pb_s("u_x"))].into(),
                event_timestamp: Some(Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                }),
                features: Default::default(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains(
            "row 0: event_timestamp: +10000-01-01T00:00:00.000000Z is outside the supported range"
        ),
        "{e:?}"
    );
    st.server.shutdown().await;
}

/// Finding 3: what the JSON API writes for doubles it reads back, for
/// features (write, then read) and for events.
#[tokio::test]
async fn rest_takes_back_what_it_gives() {
    let st = stack().await;
    let s = &st.server;
    let features = json!({
        "score": "NaN",
        "scores": ["Infinity", "-Infinity", 1.5, "NaN"],
        "emb": ["NaN", -0.0, "Infinity"],
        "seen_at": "2026-06-01T10:00:00.500000Z",
        "v": "9223372036854775807",
        "tags": ["a", ""],
    });
    let (status, out) = write(
        s,
        json!([{"entity_key": {"user_id": "u_special"}, "event_timestamp": "2026-11-29T10:00:00Z", "features": features}]),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (_, body) = get(s, "/api/v1/features/user/u_special?features=user_nottl:*").await;
    let read: serde_json::Map<String, Json> = ["score", "scores", "emb", "seen_at", "v", "tags"]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                body["features"][format!("user_nottl__{f}")]["value"].clone(),
            )
        })
        .collect();
    assert_eq!(read["score"], json!("NaN"));
    assert_eq!(read["scores"], json!(["Infinity", "-Infinity", 1.5, "NaN"]));
    assert_eq!(read["emb"], json!(["NaN", -0.0, "Infinity"]));
    assert_eq!(read["v"], json!(9_223_372_036_854_775_807i64));
    // What was read is written back as is, and reads back the same.
    let (status, out) = write(
        s,
        json!([{"entity_key": {"user_id": "u_again"}, "event_timestamp": "2026-11-29T10:00:00Z", "features": read}]),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (_, again) = get(s, "/api/v1/features/user/u_again?features=user_nottl:*").await;
    assert_eq!(again["features"], body["features"]);
    // Events take the same spellings.
    let (status, out) = post(
        s,
        "/api/v1/events",
        json!({"events": [{"event_id": "e2", "event_type": "visit", "event_time": "2026-11-29T10:00:00Z",
                           "entities": {"user_id": "u1"}, "attributes": {"amount": "Infinity"}}]}),
    )
    .await;
    assert_eq!((status, &out["accepted"]), (200, &json!(1)), "{out}");
    assert_eq!(
        st.events.0.lock().unwrap()[0].attribute("amount"),
        Some(&Value::Double(f64::INFINITY))
    );
    st.server.shutdown().await;
}

fn ratios() -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("event_timestamp", timestamp_type(), false),
            Field::new("ratio", DataType::Float64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["u_nan", "u_a", "u_b"])),
            Arc::new(TimestampMicrosecondArray::from(vec![T0; 3]).with_timezone("UTC")),
            Arc::new(Float64Array::from(vec![f64::NAN, 2.5, 2.5])),
        ],
    )
    .unwrap()
}

fn entity_rows(users: &[&str], times: &[&str]) -> pb::GetHistoricalFeaturesRequest {
    let ts: Vec<pb::Value> = times
        .iter()
        .map(|t| pb::Value {
            kind: Some(pb::value::Kind::TimestampVal(micros_to_ts(
                parse_rfc3339(t).unwrap(),
            ))),
        })
        .collect();
    pb::GetHistoricalFeaturesRequest {
        entities: [
            (
                "user_id".to_owned(),
                pb::RepeatedValue {
                    val: users.iter().map(|u| pb_s(u)).collect(),
                },
            ),
            ("event_timestamp".to_owned(), pb::RepeatedValue { val: ts }),
        ]
        .into(),
        ..Default::default()
    }
}

/// Finding 2: a NaN feature value stays NaN through `batch run`, historical
/// retrieval, materialization and serving, whatever the Parquet statistics
/// of its file say (they leave NaN out).
#[tokio::test]
async fn nan_stays_nan_offline_and_online() {
    let st = stack().await;
    let s = &st.server;
    put_table(&st.offline, "tables/ratios/part-0.parquet", &ratios()).await;
    st.offline
        .run(
            &["user_ratio".into(), "user_big_ratio".into()],
            common::now(),
        )
        .await
        .unwrap();
    let mut req = entity_rows(&["u_nan", "u_a", "u_b"], &["2026-11-02T00:00:00Z"; 3]);
    req.kind = features(&["user_ratio:ratio", "user_big_ratio:big"]);
    let out = historical(s, req).await.unwrap();
    let ratio = f64s(&out, "ratio");
    assert!(ratio[0].unwrap().is_nan(), "{ratio:?}");
    assert_eq!(&ratio[1..], &[Some(2.5), Some(2.5)]);
    // `WHERE ratio > 3` keeps the NaN row (NaN sorts above every number in
    // DataFusion) although the file's statistics say max = 2.5.
    let big = f64s(&out, "big");
    assert!(big[0].unwrap().is_nan(), "{big:?}");
    assert_eq!(&big[1..], &[None, None]);

    let opts = MaterializeOptions {
        views: vec!["user_ratio".into()],
        start: None,
        end: common::now(),
        expiry_grace: Duration::from_secs(86_400),
        now: common::now(),
    };
    let r = st
        .offline
        .materialize(st.store.clone(), &opts, &|_: &str, _: u64, _: u64| {})
        .await
        .unwrap();
    assert_eq!(r[0].written, 3);
    let (_, body) = get(s, "/api/v1/features/user/u_nan?features=user_ratio:ratio").await;
    assert_eq!(
        body["features"]["user_ratio__ratio"]["value"],
        json!("NaN"),
        "{body}"
    );
    let (_, body) = get(s, "/api/v1/features/user/u_a?features=user_ratio:ratio").await;
    assert_eq!(body["features"]["user_ratio__ratio"]["value"], json!(2.5));

    // The same over the raw-event archive: a file whose amounts are
    // [NaN, 50] has max = 50 in its statistics, yet its NaN row matches
    // `amount > 100` and must not be skipped with the row group.
    let reg = st.offline.registry().clone();
    let schema = quiver_core::columnar::archive_schema(&reg);
    let n = 2;
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match f.name().as_str() {
                "event_id" => Arc::new(StringArray::from(vec!["e1", "e2"])),
                "event_type" => Arc::new(StringArray::from(vec!["visit"; n])),
                "event_time" => {
                    Arc::new(TimestampMicrosecondArray::from(vec![T0; n]).with_timezone("UTC"))
                }
                "user_id" => Arc::new(StringArray::from(vec!["u_nan", "u_50"])),
                "amount" => Arc::new(Float64Array::from(vec![f64::NAN, 50.0])),
                "_source" => Arc::new(StringArray::from(vec!["events:0"; n])),
                "_offset" => Arc::new(quiver_batch::arrow::array::Int64Array::from(vec![0, 1])),
                _ => quiver_batch::arrow::array::new_null_array(f.data_type(), n),
            }
        })
        .collect();
    let events = RecordBatch::try_new(schema, columns).unwrap();
    put_table(
        &st.offline,
        "events/date=2026-11-01/events-0-0-1.parquet",
        &events,
    )
    .await;
    st.offline
        .run(&["big_spenders".into()], common::now())
        .await
        .unwrap();
    let mut req = entity_rows(&["u_nan", "u_50"], &["2026-11-02T00:00:00Z"; 2]);
    req.kind = features(&["big_spenders:amount"]);
    let amount = f64s(&historical(s, req).await.unwrap(), "amount");
    assert!(amount[0].is_some_and(f64::is_nan), "{amount:?}");
    assert_eq!(amount[1], None);

    // An entity file's labels pass through: [NaN, 1, 1] is not [1, 1, 1].
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entities.parquet");
    let table = RecordBatch::try_from_iter(vec![
        (
            "user_id",
            Arc::new(StringArray::from(vec!["u_nan", "u_a", "u_b"])) as ArrayRef,
        ),
        (
            "event_timestamp",
            Arc::new(StringArray::from(vec!["2026-11-02T00:00:00Z"; 3])),
        ),
        (
            "label",
            Arc::new(Float64Array::from(vec![f64::NAN, 1.0, 1.0])),
        ),
    ])
    .unwrap();
    quiver_batch::retrieve::write_parquet_file(&table, &path).unwrap();
    let reg = st.offline.registry().clone();
    let read = quiver_batch::entities::read_file(&reg, &path)
        .await
        .unwrap();
    let sel = reg.resolve_refs(&["user_ratio:ratio"]).unwrap();
    let out = st.offline.historical(read, &sel, false).await.unwrap();
    let label = f64s(&out, "label");
    assert!(label[0].unwrap().is_nan(), "{label:?}");
    assert!(f64s(&out, "ratio")[0].unwrap().is_nan());
    st.server.shutdown().await;
}

/// Of the same kind as findings 1 and 2: what `batch run` commits can be
/// served and written back exactly, so a list with a null element (read
/// elsewhere as a zero) and a time outside the supported range fail the
/// run, before anything is committed.
#[tokio::test]
async fn batch_run_commits_only_values_that_come_back_exactly() {
    let st = stack().await;
    for (view, needle) in [
        ("bad_list", "has a null element (index 1)"),
        ("far_future", "outside the supported range"),
        (
            "fraction_to_int",
            "converting Float64 to int64 (its declared type) would change the value 1.7 into 1",
        ),
        (
            "text_to_int_key",
            "converting Utf8 to int64 (its declared type) would change the value 007 into 7",
        ),
        (
            "inexact_double",
            "converting Int64 to double (its declared type) would change the value 9007199254740993",
        ),
        ("float32_overflow", "1e300 is out of range for the declared type"),
        ("scalar_to_list", "string_list is a list; return one"),
        ("number_time", "a number does not say its unit"),
        ("wrong_dimension", "a value has 2 elements; the feature's dimension is 3"),
        ("text_overflow", "1e400 is out of range for the declared type"),
        ("float_id", "a string id from a float"),
        ("u64_overflow", "column \"n\": converting UInt64 to int64 (its declared type)"),
    ] {
        let e = st
            .offline
            .run(&[view.into()], common::now())
            .await
            .unwrap_err();
        assert!(e.message().contains(needle), "{view}: {e}");
        assert!(e.message().contains(view), "{view}: {e}");
        assert_eq!(st.offline.committed(view).await.unwrap(), None);
        // What the failed run wrote is gone.
        assert_eq!(st.offline.run_dirs(view).await.unwrap(), Vec::<String>::new());
    }
    // Conversions that keep every value are fine: Int32 ids, 2.0 as an
    // int64, 7 as a double, 0.1 rounded to float32, "7" as an int64, text
    // times, nulls.
    let r = st
        .offline
        .run(&["exact_casts".into()], common::now())
        .await
        .unwrap();
    assert_eq!(r[0].rows, 1);
    // Text times in SQL output go through the same parser as everywhere:
    // a leap second with a fraction is the next minute's first instant.
    let reg = st.offline.registry().clone();
    let view = reg.view(reg.view_index("exact_casts").unwrap());
    let ctx = st.offline.session().await.unwrap();
    let table = st.offline.feature_table(&ctx, view).await.unwrap().unwrap();
    let rows = table.collect().await.unwrap();
    let leap = rows[0].column_by_name("leap").unwrap();
    let leap = leap
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(
        leap.value(0),
        parse_rfc3339("2017-01-01T00:00:00Z").unwrap()
    );
    // Nanoseconds become microseconds toward the past, before 1970 too:
    // -1 ns is -1 us, so a row at -1 us sees the value.
    st.offline
        .run(&["ns_time".into()], common::now())
        .await
        .unwrap();
    let mut req = entity_rows(&["u1"], &["1969-12-31T23:59:59.999999Z"]);
    req.kind = features(&["ns_time:y"]);
    assert_eq!(
        f64s(&historical(&st.server, req).await.unwrap(), "y"),
        vec![Some(1.0)]
    );
    st.server.shutdown().await;
}

/// Finding 4: entity tables sent as Arrow are typed by the registry (any
/// string type, integer ids of another width) and their string times are
/// read with the one RFC 3339 parser, offsets included.
#[tokio::test]
async fn arrow_entity_tables_are_typed_by_the_registry() {
    let st = stack().await;
    let s = &st.server;
    put_table(&st.offline, "tables/ratios/part-0.parquet", &ratios()).await;
    st.offline
        .run(&["user_ratio".into()], common::now())
        .await
        .unwrap();
    let table = RecordBatch::try_from_iter(vec![
        (
            "user_id",
            Arc::new(LargeStringArray::from(vec!["u_a", "u_a", "u_b"])) as ArrayRef,
        ),
        (
            "event_timestamp",
            // 2026-10-31T23:00Z (before T0), 2026-11-01T01:00Z, T0 exactly.
            Arc::new(StringArray::from(vec![
                "2026-11-01T04:00:00+05:00",
                "2026-10-31T20:00:00-05:00",
                "2026-11-01T05:30:00+05:30",
            ])),
        ),
        ("shop_id", Arc::new(Int32Array::from(vec![1, 2, 3]))),
    ])
    .unwrap();
    let out = historical(
        s,
        pb::GetHistoricalFeaturesRequest {
            kind: features(&["user_ratio:ratio"]),
            entities_arrow: to_ipc(&table).unwrap(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(f64s(&out, "ratio"), vec![None, Some(2.5), Some(2.5)]);
    assert_eq!(
        out.column_by_name("user_id").unwrap().data_type(),
        &DataType::Utf8
    );
    assert_eq!(
        out.column_by_name("shop_id").unwrap().data_type(),
        &DataType::Int64
    );
    let times = out.column_by_name("event_timestamp").unwrap();
    let times = times
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(times.value(2), T0);
    st.server.shutdown().await;
}

fn tied_rows() -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("event_timestamp", timestamp_type(), false),
            Field::new("x", DataType::Float64, true),
            Field::new("label", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["u_t"; 4])),
            Arc::new(TimestampMicrosecondArray::from(vec![T0; 4]).with_timezone("UTC")),
            Arc::new(Float64Array::from(vec![1.0, 7.0, 3.0, 5.0])),
            Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
        ],
    )
    .unwrap()
}

/// Finding 5: rows with the same event time resolve by one rule on every
/// path. Offline (historical retrieval, materialization) and online
/// (WriteFeatures over REST, in every order) pick the same row.
#[tokio::test]
async fn ties_resolve_the_same_online_and_offline() {
    let st = stack().await;
    let s = &st.server;
    let rows = tied_rows();
    // Two files, so that the tie spans files in both orders.
    put_table(&st.offline, "tables/ties/part-0.parquet", &rows.slice(0, 2)).await;
    put_table(&st.offline, "tables/ties/part-1.parquet", &rows.slice(2, 2)).await;
    st.offline
        .run(&["user_tie".into()], common::now())
        .await
        .unwrap();
    let mut req = entity_rows(&["u_t"], &["2026-11-02T00:00:00Z"]);
    req.kind = features(&["user_tie:x", "user_tie:label"]);
    let out = historical(s, req).await.unwrap();
    let offline_label = out
        .column_by_name("label")
        .unwrap()
        .as_string::<i32>()
        .value(0)
        .to_owned();
    let offline_x = f64s(&out, "x")[0].unwrap();

    // The rule itself decides the same row.
    let candidates: Vec<Vec<(String, Value)>> = (0..4)
        .map(|i| {
            vec![
                (
                    "x".to_owned(),
                    Value::Double(rows.column(2).as_primitive::<Float64Type>().value(i)),
                ),
                (
                    "label".to_owned(),
                    Value::String(rows.column(3).as_string::<i32>().value(i).to_owned()),
                ),
            ]
        })
        .collect();
    let winner = candidates
        .iter()
        .cloned()
        .reduce(|cur, new| {
            if quiver_core::store::replaces(T0, &new, T0, &cur) {
                new
            } else {
                cur
            }
        })
        .unwrap();
    assert_eq!(Value::String(offline_label.clone()), winner[1].1);
    // The data is chosen so that the rule's row is neither the greatest
    // value (7.0, "b": the old offline rule) nor, in two of the three write
    // orders below, the last written (the old online rule).
    assert_eq!(offline_label, "d");

    // Materialization writes that row.
    let opts = MaterializeOptions {
        views: vec!["user_tie".into()],
        start: None,
        end: common::now(),
        expiry_grace: Duration::from_secs(86_400),
        now: common::now(),
    };
    let r = st
        .offline
        .materialize(st.store.clone(), &opts, &|_: &str, _: u64, _: u64| {})
        .await
        .unwrap();
    assert_eq!((r[0].entities, r[0].written), (1, 1));
    let (_, body) = get(s, "/api/v1/features/user/u_t?features=user_tie:label").await;
    assert_eq!(
        body["features"]["user_tie__label"]["value"],
        json!(offline_label)
    );

    // WriteFeatures of the four rows, forwards and backwards: the same row
    // stays, whatever the order, and it is the offline one.
    for (user, order) in [
        ("u_fwd", [0, 1, 2, 3]),
        ("u_bwd", [3, 2, 1, 0]),
        ("u_mid", [2, 0, 3, 1]),
    ] {
        for i in order {
            let row = json!([{"entity_key": {"user_id": user}, "event_timestamp": "2026-11-01T00:00:00Z",
                              "features": {"x": quiver_core::json::value_to_json(&candidates[i][0].1),
                                           "label": quiver_core::json::value_to_json(&candidates[i][1].1)}}]);
            let (status, out) = post(
                s,
                "/api/v1/features/write",
                json!({"feature_view": "user_tie_online", "rows": row}),
            )
            .await;
            assert_eq!(status, 200, "{out}");
        }
        let (_, body) = get(
            s,
            &format!("/api/v1/features/user/{user}?features=user_tie_online:*"),
        )
        .await;
        assert_eq!(
            body["features"]["user_tie_online__label"]["value"],
            json!(offline_label),
            "{user}"
        );
        let x = &body["features"]["user_tie_online__x"]["value"];
        if offline_x.is_nan() {
            assert_eq!(x, &json!("NaN"));
        } else {
            assert_eq!(x, &json!(offline_x));
        }
    }
    st.server.shutdown().await;
}

/// Finding 6: messages name what is wrong.
#[tokio::test]
async fn messages_name_what_is_wrong() {
    let st = stack().await;
    let s = &st.server;
    let (status, body) = get(s, "/api/v1/features/shop/9223372036854775808").await;
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("out of range for int64"), "{msg}");
    let (status, body) = get(s, "/api/v1/features/shop/12x").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not an integer"),
        "{body}"
    );
    for (features, needle) in [
        (
            json!({"tags": ["a", null]}),
            "features.tags: null element at index 1",
        ),
        (
            json!({"v": 9_223_372_036_854_775_808u64}),
            "out of range for int64",
        ),
        (json!({"scores": [1, "x"]}), "element 1: expected double"),
        (
            json!({"score": "nan"}),
            "\"NaN\", \"Infinity\", \"-Infinity\"",
        ),
    ] {
        let (status, body) = write(
            s,
            json!([{"entity_key": {"user_id": "u1"}, "event_timestamp": "2026-11-29T10:00:00Z", "features": features}]),
        )
        .await;
        assert_eq!(status, 400, "{needle}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // Views quiver computes are not written from outside: training sets
    // would not see the values serving does.
    for (view, needle) in [
        (
            "user_ratio",
            "computed by SQL in the batch layer; run `quiver batch run` and `quiver materialize`",
        ),
        ("user_last_visit", "computed from visit events; push events"),
    ] {
        let (status, body) = post(
            s,
            "/api/v1/features/write",
            json!({"feature_view": view, "rows": [{"entity_key": {"user_id": "u1"}, "event_timestamp": "2026-11-29T10:00:00Z", "features": {}}]}),
        )
        .await;
        assert_eq!(status, 400, "{view}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{view}: {msg}");
    }
    // A row that would be expired on arrival is counted as such, not as
    // written (a read would not find it).
    let old = quiver_core::time::format_rfc3339(common::now() - 3 * 86_400_000_000);
    let (status, body) = post(
        s,
        "/api/v1/features/write",
        json!({"feature_view": "user_recent", "rows": [{"entity_key": {"user_id": "u1"}, "event_timestamp": old, "features": {"n": 1}}]}),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"written": 0, "stale": 0, "expired": 1}))
    );
    // A body of the wrong shape says where.
    let (status, body) = write(
        s,
        json!([{"entity_key": {"user_id": "u1"}, "event_timestamp": 5}]),
    )
    .await;
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("rows[0].event_timestamp"), "{msg}");
    // A key twice in one object is refused, not settled silently.
    let resp = reqwest::Client::new()
        .post(s.url("/api/v1/features/write"))
        .header("content-type", "application/json")
        .body(r#"{"feature_view": "user_nottl", "rows": [{"entity_key": {"user_id": "x", "user_id": "y"}, "event_timestamp": "2026-11-29T10:00:00Z"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Json = resp.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("the key \"user_id\" appears twice"), "{msg}");
    // An event not of the event shape (a field events do not have) refuses
    // the body whole, naming where, as malformed protobuf does on gRPC.
    let (status, out) = post(
        s,
        "/api/v1/events",
        json!({"events": [{"event_id": "e9", "event_type": "visit", "event_time": "2026-11-29T10:00:00Z",
                           "entities": {"user_id": "u1"}, "attributes": {"amount": 1.0}, "bogus": 1}]}),
    )
    .await;
    assert_eq!(status, 400, "{out}");
    let msg = out["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("events[0]") && msg.contains("unknown field `bogus`"),
        "{msg}"
    );
    // JSON numbers: an integer a double cannot hold, a fraction for int64.
    for (features, needle) in [
        (
            json!({"score": 9_007_199_254_740_993i64}),
            "has no exact double",
        ),
        (json!({"v": 3.0}), "without a fraction or exponent"),
    ] {
        let (status, body) = write(
            s,
            json!([{"entity_key": {"user_id": "u1"}, "event_timestamp": "2026-11-29T10:00:00Z", "features": features}]),
        )
        .await;
        assert_eq!(status, 400, "{needle}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // An int64 sent for a double feature is taken only when exact.
    let write_score = |score: i64| pb::WriteFeaturesRequest {
        feature_view: "user_nottl".into(),
        rows: vec![pb::FeatureRow {
            entity_key: [("user_id".to_owned(), pb_s("u1"))].into(),
            event_timestamp: Some(micros_to_ts(T0)),
            features: [(
                "score".to_owned(),
                pb::Value {
                    kind: Some(pb::value::Kind::Int64Val(score)),
                },
            )]
            .into(),
        }],
    };
    let mut client = s.client().await;
    client.write_features(write_score(3)).await.unwrap();
    let e = client
        .write_features(write_score(9_007_199_254_740_993))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("the integer 9007199254740993 has no exact double"),
        "{e:?}"
    );
    // Ids of int64 entities may come as decimal strings; string ids stay text.
    let (status, body) = post(
        s,
        "/api/v1/features/online",
        json!({"features": ["shop_tier:tier"], "entities": {"shop_id": ["7", 8]}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        s,
        "/api/v1/features/online",
        json!({"features": ["user_nottl:v"], "entities": {"user_id": [7]}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected string"),
        "{body}"
    );
    st.server.shutdown().await;
}

/// A run that fails after part of its output is written (one input file
/// converts, the other has 1.7 for an int64 feature at its end) leaves no
/// run directory behind.
#[tokio::test]
async fn a_failed_batch_run_leaves_nothing_behind() {
    let st = stack().await;
    let table = |n: usize, last: f64| {
        let mut v = vec![1.0; n];
        v[n - 1] = last;
        RecordBatch::try_new(
            ratios().schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("u{i}")),
                )),
                Arc::new(TimestampMicrosecondArray::from(vec![T0; n]).with_timezone("UTC")),
                Arc::new(Float64Array::from(v)),
            ],
        )
        .unwrap()
    };
    put_table(&st.offline, "tables/halves/part-0.parquet", &table(10, 1.0)).await;
    put_table(
        &st.offline,
        "tables/halves/part-1.parquet",
        &table(300_000, 1.7),
    )
    .await;
    let e = st
        .offline
        .run(&["half_bad".into()], common::now())
        .await
        .unwrap_err();
    assert!(
        e.message().contains("would change the value 1.7 into 1"),
        "{e}"
    );
    assert_eq!(st.offline.committed("half_bad").await.unwrap(), None);
    assert_eq!(
        st.offline.run_dirs("half_bad").await.unwrap(),
        Vec::<String>::new()
    );
}

/// Issue 10, finding 4: a commit deletes only runs that are neither the
/// committed one nor the one before it *and* whose files are all older
/// than the grace period: a concurrent run's files (being written) and a
/// reader's run superseded twice in quick succession survive; an abandoned
/// old run goes.
#[tokio::test]
async fn a_commit_keeps_what_concurrent_runs_and_readers_use() {
    let st = stack().await;
    let view = "exact_casts";
    st.offline.run(&[view.into()], common::now()).await.unwrap();
    let first = st.offline.committed(view).await.unwrap().unwrap().run;
    // A reader resolves the committed table now and reads it later.
    let ctx = st.offline.session().await.unwrap();
    let v = st
        .offline
        .registry()
        .view(st.offline.registry().view_index(view).unwrap())
        .clone();
    let reader = st.offline.feature_table(&ctx, &v).await.unwrap().unwrap();
    // Another run of the view is writing its files; an abandoned run's
    // files are two hours old.
    let dir = st._dir.path().join("features").join(view);
    let in_flight = dir.join("run-00000000000000000001");
    std::fs::create_dir_all(&in_flight).unwrap();
    std::fs::write(in_flight.join("part-0.parquet"), b"being written").unwrap();
    let abandoned = dir.join("run-00000000000000000002");
    std::fs::create_dir_all(&abandoned).unwrap();
    let old = abandoned.join("part-0.parquet");
    std::fs::write(&old, b"left by a crash").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    // Two more commits: `first` is neither current nor previous now.
    for i in 1..=2 {
        st.offline
            .run(&[view.into()], common::now() + i)
            .await
            .unwrap();
    }
    let runs = st.offline.run_dirs(view).await.unwrap();
    assert!(runs.contains(&first), "{runs:?}");
    assert!(
        runs.contains(&"run-00000000000000000001".to_owned()),
        "{runs:?}"
    );
    assert!(
        !runs.contains(&"run-00000000000000000002".to_owned()),
        "{runs:?}"
    );
    assert_eq!(runs.len(), 4, "{runs:?}");
    let rows: usize = reader
        .collect()
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 1, "the reader's run is intact");
}
