//! Request-time (on-demand) features: the same value online (GetOnlineFeatures
//! with request data beside the entities) and offline (historical retrieval
//! with request columns in the entity table) for generated rows; registry
//! validation of the expressions; request mistakes named.

mod common;

use std::sync::Arc;

use common::offline::{historical, pb_s, put_table, refs};
use common::{Backend, TestServer};
use quiver_batch::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use quiver_batch::arrow::datatypes::Float64Type;
use quiver_batch::materialize::MaterializeOptions;
use quiver_batch::retrieve::to_ipc;
use quiver_batch::Offline;
use quiver_core::registry::Registry;
use quiver_core::wire::value_from_pb;
use quiver_core::{Clock, OnlineStore, Value};
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_online_features_request::Kind as Sel;
use quiver_server::Limits;
use tonic::Code;

const REGISTRY: &str = r#"
[[entities]]
name = "user"
join_key = "user_id"

[[tables]]
name = "profile"
path = "tables/profile"

[[feature_views]]
name = "user_profile"
entities = ["user"]
source = { sql = "SELECT user_id, event_timestamp, avg_order, signup_ts, country FROM profile" }
features = [
  { name = "avg_order", dtype = "double" },
  { name = "signup_ts", dtype = "timestamp" },
  { name = "country", dtype = "string" },
]

[[on_demand_feature_views]]
name = "checkout"
inputs = ["user_profile:*"]
request = [
  { name = "amount", dtype = "double" },
  { name = "lat", dtype = "double" },
  { name = "lon", dtype = "double" },
  { name = "ship_lat", dtype = "double" },
  { name = "ship_lon", dtype = "double" },
  { name = "ship_country", dtype = "string" },
]
features = [
  { name = "amount_vs_avg", dtype = "double", expr = "amount / NULLIF(avg_order, 0)" },
  { name = "days_since_signup", dtype = "double", expr = "CAST(to_unixtime(event_timestamp) - to_unixtime(signup_ts) AS DOUBLE) / 86400" },
  { name = "distance_km", dtype = "double", expr = "2 * 6371 * asin(sqrt(power(sin(radians(ship_lat - lat) / 2), 2) + cos(radians(lat)) * cos(radians(ship_lat)) * power(sin(radians(ship_lon - lon) / 2), 2)))" },
  { name = "abroad", dtype = "bool", expr = "ship_country <> user_profile__country" },
  { name = "big", dtype = "bool", expr = "coalesce(amount, 0) > 100" },
]

[[on_demand_feature_views]]
name = "basket"
request = [{ name = "items", dtype = "int64" }]
features = [{ name = "many_items", dtype = "bool", expr = "items >= 10" }]
"#;

const N: usize = 40;

/// Deterministic pseudo-random numbers in [0, 1) (a 64-bit LCG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Rows {
    users: Vec<String>,
    amount: Vec<f64>,
    lat: Vec<f64>,
    lon: Vec<f64>,
    ship_lat: Vec<f64>,
    ship_lon: Vec<f64>,
    ship_country: Vec<&'static str>,
}

fn generate() -> Rows {
    let mut r = Lcg(7);
    let mut rows = Rows {
        users: Vec::new(),
        amount: Vec::new(),
        lat: Vec::new(),
        lon: Vec::new(),
        ship_lat: Vec::new(),
        ship_lon: Vec::new(),
        ship_country: Vec::new(),
    };
    for i in 0..N {
        // Every fifth user has no profile (inputs null); one has avg_order 0.
        rows.users.push(format!("u{i}"));
        rows.amount.push((r.next() * 300.0 * 100.0).round() / 100.0);
        rows.lat.push(r.next() * 180.0 - 90.0);
        rows.lon.push(r.next() * 360.0 - 180.0);
        rows.ship_lat.push(r.next() * 180.0 - 90.0);
        rows.ship_lon.push(r.next() * 360.0 - 180.0);
        rows.ship_country.push(["NL", "DE", "FR"][i % 3]);
    }
    rows
}

fn profile_table(rows: &Rows, t0: i64) -> RecordBatch {
    let mut r = Lcg(11);
    let with_profile: Vec<usize> = (0..N).filter(|i| i % 5 != 4).collect();
    let users: Vec<&str> = with_profile
        .iter()
        .map(|&i| rows.users[i].as_str())
        .collect();
    let avg: Vec<f64> = with_profile
        .iter()
        .map(|&i| if i == 3 { 0.0 } else { 5.0 + r.next() * 200.0 })
        .collect();
    let signup: Vec<i64> = with_profile
        .iter()
        .map(|_| t0 - (r.next() * 1000.0 * 86_400e6) as i64)
        .collect();
    let country: Vec<&str> = with_profile.iter().map(|&i| ["NL", "DE"][i % 2]).collect();
    let n = users.len();
    RecordBatch::try_from_iter(vec![
        ("user_id", Arc::new(StringArray::from(users)) as ArrayRef),
        (
            "event_timestamp",
            Arc::new(
                TimestampMicrosecondArray::from(vec![t0 - 3_600_000_000; n]).with_timezone("UTC"),
            ),
        ),
        ("avg_order", Arc::new(Float64Array::from(avg))),
        (
            "signup_ts",
            Arc::new(TimestampMicrosecondArray::from(signup).with_timezone("UTC")),
        ),
        ("country", Arc::new(StringArray::from(country))),
    ])
    .unwrap()
}

fn doubles(v: &[f64]) -> pb::RepeatedValue {
    pb::RepeatedValue {
        val: v
            .iter()
            .map(|x| pb::Value {
                kind: Some(pb::value::Kind::DoubleVal(*x)),
            })
            .collect(),
    }
}

fn strings(v: &[&str]) -> pb::RepeatedValue {
    pb::RepeatedValue {
        val: v.iter().map(|s| pb_s(s)).collect(),
    }
}

const FEATURES: [&str; 5] = [
    "checkout:amount_vs_avg",
    "checkout:days_since_signup",
    "checkout:distance_km",
    "checkout:abroad",
    "checkout:big",
];

struct Stack {
    server: TestServer,
    offline: Arc<Offline>,
    store: Arc<dyn OnlineStore>,
    _dir: tempfile::TempDir,
}

async fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(Registry::from_toml("on_demand.toml", REGISTRY).unwrap());
    let offline = Arc::new(Offline::open(reg.clone(), dir.path().to_str().unwrap(), &[]).unwrap());
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn OnlineStore> = Arc::new(
        quiver_core::store::EmbeddedStore::open(
            &store_dir.path().join("online.redb"),
            Arc::new(quiver_core::SystemClock),
        )
        .unwrap(),
    );
    let server = TestServer::start_full(
        reg,
        store.clone(),
        Backend::Embedded(store_dir),
        Limits::default(),
        None,
        Some(offline.clone()),
    )
    .await;
    Stack {
        server,
        offline,
        store,
        _dir: dir,
    }
}

fn online_request(rows: &Rows, users: &[String]) -> pb::GetOnlineFeaturesRequest {
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    pb::GetOnlineFeaturesRequest {
        kind: Some(Sel::Features(pb::FeatureList {
            val: FEATURES.iter().map(|f| f.to_string()).collect(),
        })),
        entities: [
            ("user_id".to_owned(), strings(&users)),
            ("amount".to_owned(), doubles(&rows.amount)),
            ("lat".to_owned(), doubles(&rows.lat)),
            ("lon".to_owned(), doubles(&rows.lon)),
            ("ship_lat".to_owned(), doubles(&rows.ship_lat)),
            ("ship_lon".to_owned(), doubles(&rows.ship_lon)),
            ("ship_country".to_owned(), strings(&rows.ship_country)),
        ]
        .into(),
        full_feature_names: false,
    }
}

#[tokio::test]
async fn request_time_features_are_the_same_online_and_offline() {
    let Stack {
        server,
        offline,
        store,
        _dir,
    } = stack().await;
    let t = server.clock.now_micros();
    let rows = generate();
    put_table(
        &offline,
        "tables/profile/part-0.parquet",
        &profile_table(&rows, t),
    )
    .await;
    offline.run(&["user_profile".into()], t).await.unwrap();
    let opts = MaterializeOptions {
        views: vec!["user_profile".into()],
        start: None,
        end: t,
        expiry_grace: std::time::Duration::from_secs(86_400),
        now: t,
    };
    offline
        .materialize(store.clone(), &opts, &|_: &str, _: u64, _: u64| {})
        .await
        .unwrap();

    // Online: request data beside the entities, computed as of the
    // server's clock.
    let resp = server
        .client()
        .await
        .get_online_features(online_request(&rows, &rows.users))
        .await
        .unwrap()
        .into_inner();
    let names = resp.metadata.unwrap().feature_names.unwrap().val;
    let column = |name: &str| -> Vec<Value> {
        let i = names.iter().position(|n| n == name).unwrap();
        resp.results[i]
            .values
            .iter()
            .map(|v| value_from_pb(v.clone()).unwrap())
            .collect()
    };

    // Offline: the same rows as an entity table at the same time.
    let users: Vec<&str> = rows.users.iter().map(String::as_str).collect();
    let table = RecordBatch::try_from_iter(vec![
        ("user_id", Arc::new(StringArray::from(users)) as ArrayRef),
        (
            "event_timestamp",
            Arc::new(TimestampMicrosecondArray::from(vec![t; N]).with_timezone("UTC")),
        ),
        ("amount", Arc::new(Float64Array::from(rows.amount.clone()))),
        ("lat", Arc::new(Float64Array::from(rows.lat.clone()))),
        ("lon", Arc::new(Float64Array::from(rows.lon.clone()))),
        (
            "ship_lat",
            Arc::new(Float64Array::from(rows.ship_lat.clone())),
        ),
        (
            "ship_lon",
            Arc::new(Float64Array::from(rows.ship_lon.clone())),
        ),
        (
            "ship_country",
            Arc::new(StringArray::from(rows.ship_country.clone())),
        ),
    ])
    .unwrap();
    let req = pb::GetHistoricalFeaturesRequest {
        kind: refs(&FEATURES),
        entities_arrow: to_ipc(&table).unwrap(),
        ..Default::default()
    };
    let out = historical(&server, req).await.unwrap();

    let mut nulls = 0;
    for f in ["amount_vs_avg", "days_since_signup", "distance_km"] {
        let on = column(f);
        let off = out.column_by_name(f).unwrap().as_primitive::<Float64Type>();
        assert_eq!((on.len(), off.len()), (N, N));
        for (row, value) in on.iter().enumerate() {
            match (value, off.is_valid(row)) {
                (Value::Double(a), true) => {
                    assert_eq!(a.to_bits(), off.value(row).to_bits(), "{f} row {row}")
                }
                (Value::Null, false) => nulls += 1,
                (a, _) => panic!(
                    "{f} row {row}: online {a:?}, offline {:?}",
                    off.slice(row, 1)
                ),
            }
        }
    }
    for f in ["abroad", "big"] {
        let on = column(f);
        let off = out.column_by_name(f).unwrap().as_boolean();
        assert_eq!((on.len(), off.len()), (N, N));
        for (row, value) in on.iter().enumerate() {
            match (value, off.is_valid(row)) {
                (Value::Bool(a), true) => assert_eq!(*a, off.value(row), "{f} row {row}"),
                (Value::Null, false) => nulls += 1,
                (a, _) => panic!(
                    "{f} row {row}: online {a:?}, offline {:?}",
                    off.slice(row, 1)
                ),
            }
        }
    }
    // Users without a profile (8) have null ratios, ages and countries; the
    // user with avg_order 0 a null ratio; distance and `big` need only the
    // request.
    assert_eq!(nulls, 8 * 3 + 1);
    // Spot checks of the values themselves.
    let amount_vs_avg = column("amount_vs_avg");
    assert_eq!(amount_vs_avg[3], Value::Null);
    let big = column("big");
    for (row, b) in big.iter().enumerate() {
        assert_eq!(*b, Value::Bool(rows.amount[row] > 100.0));
    }
    let distance = column("distance_km");
    let Value::Double(d) = distance[0] else {
        panic!()
    };
    assert!((0.0..=20_016.0).contains(&d), "{d}");
    // Statuses: present where a value was computed, null otherwise.
    let i = names.iter().position(|n| n == "amount_vs_avg").unwrap();
    assert_eq!(
        resp.results[i].statuses[3],
        pb::FieldStatus::NullValue as i32
    );
    assert_eq!(resp.results[i].statuses[0], pb::FieldStatus::Present as i32);
    server.shutdown().await;
}

#[tokio::test]
async fn request_data_mistakes_are_named() {
    let st = stack().await;
    let server = &st.server;
    let rows = generate();
    let call = |req: pb::GetOnlineFeaturesRequest| async move {
        server.client().await.get_online_features(req).await
    };
    // Missing request data.
    let mut req = online_request(&rows, &rows.users);
    req.entities.remove("ship_country");
    let e = call(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("needs request data \"ship_country\" (string)"),
        "{}",
        e.message()
    );
    // Wrong type.
    let mut req = online_request(&rows, &rows.users);
    req.entities
        .insert("amount".into(), strings(&vec!["a lot"; N]));
    let e = call(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("request data \"amount\" takes double values; row 0"),
        "{}",
        e.message()
    );
    // A column neither a join key nor request data.
    let mut req = online_request(&rows, &rows.users);
    req.entities
        .insert("colour".into(), strings(&vec!["red"; N]));
    let e = call(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("unknown column \"colour\""),
        "{}",
        e.message()
    );
    assert!(e.message().contains("amount"), "{}", e.message());
    // Request-only features need no entity key; an integer request field
    // takes integers.
    let req = pb::GetOnlineFeaturesRequest {
        kind: Some(Sel::Features(pb::FeatureList {
            val: vec!["basket:many_items".into()],
        })),
        entities: [(
            "items".to_owned(),
            pb::RepeatedValue {
                val: [3, 12]
                    .iter()
                    .map(|n| pb::Value {
                        kind: Some(pb::value::Kind::Int64Val(*n)),
                    })
                    .collect(),
            },
        )]
        .into(),
        full_feature_names: false,
    };
    let resp = call(req).await.unwrap().into_inner();
    let got: Vec<Value> = resp.results[1]
        .values
        .iter()
        .map(|v| value_from_pb(v.clone()).unwrap())
        .collect();
    assert_eq!(got, vec![Value::Bool(false), Value::Bool(true)]);
    // REST takes request data typed as the view declares it.
    let body: serde_json::Value = reqwest::Client::new()
        .post(server.url("/api/v1/features/online"))
        .json(&serde_json::json!({
            "features": ["basket:many_items", "checkout:big"],
            "entities": {"user_id": ["u1"], "items": [11], "amount": [100.5], "lat": [0.5],
                         "lon": [1], "ship_lat": [2], "ship_lon": [3], "ship_country": ["NL"]},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = body["metadata"]["feature_names"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let value = |name: &str| {
        let i = names.iter().position(|n| *n == name).unwrap();
        body["results"][i]["values"][0].clone()
    };
    assert_eq!(value("many_items"), serde_json::json!(true), "{body}");
    assert_eq!(value("big"), serde_json::json!(true), "{body}");
    assert_eq!(value("lat"), serde_json::json!(0.5), "{body}");
    // The registry describes on-demand views over both APIs.
    let reg = server
        .client()
        .await
        .get_registry(pb::GetRegistryRequest {})
        .await
        .unwrap()
        .into_inner();
    let checkout = reg
        .feature_views
        .iter()
        .find(|v| v.name == "checkout")
        .unwrap();
    assert_eq!(checkout.source, "on_demand");
    assert_eq!(
        checkout.inputs,
        [
            "user_profile:avg_order",
            "user_profile:signup_ts",
            "user_profile:country"
        ]
    );
    assert_eq!(checkout.request.len(), 6);
    assert_eq!(checkout.request[0].name, "amount");
    assert_eq!(
        checkout.features[0].expression,
        "amount / NULLIF(avg_order, 0)"
    );
    let body: serde_json::Value = reqwest::get(server.url("/api/v1/registry"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let view = body["feature_views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "basket")
        .unwrap()
        .clone();
    assert_eq!(view["source"], "on_demand");
    assert_eq!(view["request"][0]["name"], "items");
    assert_eq!(view["request"][0]["value_type"], "int64");
    assert_eq!(view["features"][0]["expression"], "items >= 10");
    // Nothing of an on-demand view can be written.
    let e = server
        .client()
        .await
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "basket".into(),
            rows: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("computed at request time"),
        "{}",
        e.message()
    );
    // Offline: a missing request column is named.
    let t = server.clock.now_micros();
    let table = RecordBatch::try_from_iter(vec![
        (
            "user_id",
            Arc::new(StringArray::from(vec!["u1"])) as ArrayRef,
        ),
        (
            "event_timestamp",
            Arc::new(TimestampMicrosecondArray::from(vec![t]).with_timezone("UTC")),
        ),
    ])
    .unwrap();
    let req = pb::GetHistoricalFeaturesRequest {
        kind: refs(&["basket:many_items"]),
        entities_arrow: to_ipc(&table).unwrap(),
        ..Default::default()
    };
    let e = historical(server, req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("reads request data \"items\""),
        "{}",
        e.message()
    );
    // Offline request data converts only without loss, as online: 1.7
    // items is refused, not cut to 1.
    let table = RecordBatch::try_from_iter(vec![
        (
            "user_id",
            Arc::new(StringArray::from(vec!["u1"])) as ArrayRef,
        ),
        (
            "event_timestamp",
            Arc::new(TimestampMicrosecondArray::from(vec![t]).with_timezone("UTC")),
        ),
        ("items", Arc::new(Float64Array::from(vec![1.7]))),
    ])
    .unwrap();
    let req = pb::GetHistoricalFeaturesRequest {
        kind: refs(&["basket:many_items"]),
        entities_arrow: to_ipc(&table).unwrap(),
        ..Default::default()
    };
    let e = historical(server, req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains(
            "column \"items\" is Float64, but on-demand feature view \"basket\" reads it as int64"
        ),
        "{}",
        e.message()
    );
    st.server.shutdown().await;
}

/// Registry validation type-checks every expression and reports each
/// problem by view and feature.
#[test]
fn expressions_are_checked_by_item() {
    let base = REGISTRY
        .split("[[on_demand_feature_views]]")
        .next()
        .unwrap();
    let with = |odfv: &str| format!("{base}\n[[on_demand_feature_views]]\n{odfv}");
    let problems = |odfv: &str| -> Vec<String> {
        let reg = Registry::from_toml("r.toml", &with(odfv)).unwrap();
        quiver_batch::ondemand::compile(&reg).1
    };
    let cases = [
        (
            r#"name = "v"
inputs = ["user_profile:avg_order"]
features = [{ name = "f", dtype = "double", expr = "avg_order * nope" }]"#,
            "on-demand feature view \"v\": feature \"f\": expr \"avg_order * nope\"",
        ),
        (
            r#"name = "v"
inputs = ["user_profile:country"]
features = [{ name = "f", dtype = "double", expr = "upper(country)" }]"#,
            "gives Utf8, the feature is declared double; cast it",
        ),
        (
            r#"name = "v"
inputs = ["user_profile:signup_ts"]
features = [{ name = "f", dtype = "bool", expr = "signup_ts < now()" }]"#,
            "functions of the current time are not allowed",
        ),
        (
            r#"name = "v"
request = [{ name = "x", dtype = "double" }]
features = [{ name = "f", dtype = "double", expr = "x * random()" }]"#,
            "volatile functions",
        ),
        (
            r#"name = "v"
request = [{ name = "x", dtype = "double" }]
features = [{ name = "f", dtype = "double", expr = "sum(x)" }]"#,
            "aggregate functions are not allowed",
        ),
    ];
    for (odfv, want) in cases {
        let got = problems(odfv);
        assert!(got.len() == 1 && got[0].contains(want), "{odfv}\n{got:?}");
    }
    // Widening casts are implicit: an integer expression for a double.
    assert!(problems(
        r#"name = "v"
request = [{ name = "n", dtype = "int64" }]
features = [{ name = "f", dtype = "double", expr = "n + 1" }]"#
    )
    .is_empty());

    // Structural mistakes are found when the registry loads, each by item.
    let err = Registry::from_toml(
        "r.toml",
        &with(
            r#"name = "v"
inputs = ["user_profile:nope", "ghost:x", "checkout"]
request = [{ name = "user_id", dtype = "string" }, { name = "event_timestamp", dtype = "timestamp" }, { name = "q", dtype = "decimal" }]
features = [{ name = "f", dtype = "double", expr = " " }]"#,
        ),
    )
    .unwrap_err()
    .to_string();
    for want in [
        "r.toml: on-demand feature view \"v\": input \"user_profile:nope\": view \"user_profile\" has no feature \"nope\"",
        "input \"ghost:x\": \"ghost\" is not a declared feature view",
        "input \"checkout\": write \"view:feature\"",
        "request field \"user_id\": is a join key",
        "request field \"event_timestamp\": `event_timestamp` is the request time",
        "request field \"q\": unknown dtype \"decimal\"",
        "feature \"f\": `expr` is empty",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    let err = Registry::from_toml(
        "r.toml",
        &with(
            r#"name = "v"
request = [{ name = "f", dtype = "double" }]
features = [{ name = "f", dtype = "double", expr = "f * 2" }]"#,
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("request field \"f\" has the name of a feature of this view"),
        "{err}"
    );
}
