//! PushEvents end to end: gRPC and REST push into Kafka (librdkafka's mock
//! cluster), `quiver-ingest` consumes into Redis, and GetOnlineFeatures
//! serves the streaming aggregates that the events produce.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{now, redis_store, Backend, TestServer};
use quiver_core::event::EventSink;
use quiver_core::wire::micros_to_ts;
use quiver_core::Registry;
use quiver_ingest::{Applier, IngestConfig, Ingestor, KafkaConfig, KafkaEventSink};
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_online_features_request::Kind as Sel;
use quiver_server::Limits;
use quiver_testkit::{MockKafka, RedisServer};
use serde_json::{json, Value};

fn s(v: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringVal(v.into())),
    }
}

fn d(v: f64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::DoubleVal(v)),
    }
}

fn page_view(id: &str, user: &str, product: &str, at: i64) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        event_type: "page_view".into(),
        entities: [
            ("user_id".into(), s(user)),
            ("product_id".into(), s(product)),
        ]
        .into(),
        event_time: Some(micros_to_ts(at)),
        attributes: [
            ("session_id".into(), s("s1")),
            ("category".into(), s("books")),
            ("dwell_seconds".into(), d(3.5)),
        ]
        .into(),
    }
}

struct Stack {
    server: TestServer,
    stop: tokio::sync::watch::Sender<bool>,
    ingest: tokio::task::JoinHandle<()>,
    _kafka: MockKafka,
}

/// Mock Kafka + Redis + an ingest loop + a server whose PushEvents appends
/// to that Kafka.
async fn stack() -> Stack {
    let mock = MockKafka::with_topics(&[("events", 2), ("events-dlq", 1)]);
    let kafka = KafkaConfig {
        topic: "events".into(),
        group_id: "server-test".into(),
        ..KafkaConfig::new(mock.bootstrap_servers())
    };
    let registry = Arc::new(Registry::from_toml("r", common::REGISTRY).unwrap());
    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let sink: Arc<dyn EventSink> = Arc::new(KafkaEventSink::new(&kafka, registry.clone()).unwrap());
    let ingestor = Ingestor::new(
        &kafka,
        IngestConfig {
            batch_wait: Duration::from_millis(20),
            dead_letter_topic: "events-dlq".into(),
            ..IngestConfig::default()
        },
        registry.clone(),
        Applier::new(registry, store.clone(), Duration::from_secs(3600)),
        None,
    )
    .unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let ingest = tokio::spawn(async move {
        ingestor
            .run(
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
                |_| {},
            )
            .await
            .unwrap();
    });
    let server =
        TestServer::start_with_events(store, Backend::Redis(redis), Limits::default(), Some(sink))
            .await;
    Stack {
        server,
        stop,
        ingest,
        _kafka: mock,
    }
}

async fn stream_features(server: &TestServer, user: &str) -> pb::GetOnlineFeaturesResponse {
    let mut c = server.client().await;
    c.get_online_features(pb::GetOnlineFeaturesRequest {
        kind: Some(Sel::Features(pb::FeatureList {
            val: vec![
                "user_stream:page_views_1h".into(),
                "user_stream:recent_products".into(),
                "user_last_login:device".into(),
            ],
        })),
        entities: [("user_id".into(), pb::RepeatedValue { val: vec![s(user)] })].into(),
        full_feature_names: false,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Polls until `check` holds (ingest is asynchronous), at most 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_events_become_streaming_features() {
    let st = stack().await;
    let mut c = st.server.client().await;
    let t = now() - 60_000_000;
    let mut events: Vec<pb::Event> = (0..5)
        .map(|i| page_view(&format!("pv{i}"), "user_p", &format!("product_{i}"), t + i))
        .collect();
    // Rejected one by one, with the reason; the rest go through.
    let mut unknown = page_view("bad0", "user_p", "product_0", t);
    unknown.event_type = "teleport".into();
    let mut no_key = page_view("bad1", "user_p", "product_0", t);
    no_key.entities.remove("product_id");
    let mut wrong_type = page_view("bad2", "user_p", "product_0", t);
    wrong_type.attributes.insert("category".into(), d(1.0));
    let mut no_time = page_view("bad3", "user_p", "product_0", t);
    no_time.event_time = None;
    // Past the accepted future skew (1h by default) of the server's clock.
    let ahead = page_view("bad4", "user_p", "product_0", now() + 2 * 86_400_000_000);
    events.insert(1, unknown);
    events.extend([no_key, wrong_type, no_time, ahead]);
    let resp = c
        .push_events(pb::PushEventsRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.accepted, 5);
    let rejected: Vec<(u32, &str, &str)> = resp
        .rejected
        .iter()
        .map(|r| (r.index, r.event_id.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 5, "{rejected:?}");
    assert_eq!(rejected[0].0, 1);
    assert!(
        rejected[0].2.contains("unknown event_type \"teleport\""),
        "{rejected:?}"
    );
    assert!(
        rejected[1].2.contains("missing join key \"product_id\""),
        "{rejected:?}"
    );
    assert!(
        rejected[2]
            .2
            .contains("attribute \"category\" is string, got double"),
        "{rejected:?}"
    );
    assert!(
        rejected[3].2.contains("event_time is required"),
        "{rejected:?}"
    );
    assert!(
        rejected[4].2.contains("ahead of the clock")
            && rejected[4].2.contains("ingest.max_future_skew"),
        "{rejected:?}"
    );

    eventually("5 page views in user_stream", || async {
        let r = stream_features(&st.server, "user_p").await;
        r.results[1].values[0].kind == Some(pb::value::Kind::Int64Val(5))
    })
    .await;
    let r = stream_features(&st.server, "user_p").await;
    assert_eq!(r.results[1].statuses[0], pb::FieldStatus::Present as i32);
    let recent = r.results[2].values[0].kind.clone();
    assert_eq!(
        recent,
        Some(pb::value::Kind::StringListVal(pb::StringList {
            val: [
                "product_4",
                "product_3",
                "product_2",
                "product_1",
                "product_0"
            ]
            .map(String::from)
            .to_vec()
        })),
        "last_n: newest first"
    );
    // No login pushed: the latest-value view has nothing for this user.
    assert_eq!(r.results[3].statuses[0], pb::FieldStatus::NotFound as i32);

    // Aggregation views are fed by events only.
    let err = c
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_stream".into(),
            rows: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("aggregates events"),
        "{}",
        err.message()
    );

    // REST: the same contract in JSON.
    let body = json!({"events": [
        {"event_id": "l1", "event_type": "login", "event_time": quiver_core::time::format_rfc3339(t),
         "entities": {"user_id": "user_p"}, "attributes": {"device": "ios", "country": "NL"}},
        {"event_id": "l2", "event_type": "login", "event_time": "yesterday",
         "entities": {"user_id": "user_p"}, "attributes": {"device": "ios", "country": "NL"}},
        {"event_id": "l3", "event_type": "login", "event_time": quiver_core::time::format_rfc3339(t),
         "entities": {"user_id": "user_p"}, "attributes": {"device": 7, "country": "NL"}},
        {"event_id": "l4", "event_type": "login", "event_time": "9999-12-31T23:59:59Z",
         "entities": {"user_id": "user_p"}, "attributes": {"device": "ios", "country": "NL"}},
    ]});
    let http = reqwest::Client::new();
    let resp = http
        .post(st.server.url("/api/v1/events"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["accepted"], 1, "{out}");
    assert_eq!(out["rejected"][0]["index"], 1);
    assert!(
        out["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("RFC 3339"),
        "{out}"
    );
    assert!(
        out["rejected"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("device takes string"),
        "{out}"
    );
    assert!(
        out["rejected"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("ingest.max_future_skew"),
        "{out}"
    );
    let bad = http
        .post(st.server.url("/api/v1/events"))
        .header("content-type", "application/json")
        .body("{\"events\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);

    eventually("the REST login in user_last_login", || async {
        let v: Value = reqwest::get(st.server.url("/api/v1/features/user/user_p"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["features"]["user_last_login__device"]["value"] == "ios"
    })
    .await;
    let v: Value = reqwest::get(st.server.url("/api/v1/features/user/user_p"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["features"]["user_stream__page_views_24h"]["value"], 5,
        "{v}"
    );
    assert_eq!(
        v["features"]["user_stream__distinct_products_24h"]["value"], 5,
        "{v}"
    );

    let metrics = st.server.metrics().await;
    assert!(
        metrics.contains("quiver_events_total{outcome=\"accepted\"} 6"),
        "{metrics}"
    );
    let _ = st.stop.send(true);
    st.ingest.await.unwrap();
}

#[tokio::test]
async fn without_an_event_log_push_is_unavailable() {
    let server = TestServer::embedded().await;
    let mut c = server.client().await;
    let err = c
        .push_events(pb::PushEventsRequest {
            events: vec![page_view("x", "u", "p", now())],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("no event log"), "{}", err.message());
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/events"))
        .json(&json!({"events": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
}

#[tokio::test]
async fn the_registry_describes_event_types_and_aggregations() {
    let server = TestServer::embedded().await;
    let mut c = server.client().await;
    let reg = c
        .get_registry(pb::GetRegistryRequest {})
        .await
        .unwrap()
        .into_inner();
    let purchase = reg
        .event_types
        .iter()
        .find(|e| e.name == "purchase")
        .unwrap();
    assert_eq!(purchase.entities, vec!["user", "product"]);
    assert!(purchase
        .attributes
        .iter()
        .any(|a| a.name == "amount" && !a.optional));
    let stream = reg
        .feature_views
        .iter()
        .find(|v| v.name == "user_stream")
        .unwrap();
    assert_eq!(
        (stream.source.as_str(), stream.tile_seconds),
        ("aggregations", 3600)
    );
    let spend = stream
        .aggregations
        .iter()
        .find(|a| a.name == "spend_7d")
        .unwrap();
    assert_eq!(
        (spend.function.as_str(), spend.attribute.as_str()),
        ("sum", "amount")
    );
    assert_eq!(spend.window_seconds, 7 * 86_400);
    let login = reg
        .feature_views
        .iter()
        .find(|v| v.name == "user_last_login")
        .unwrap();
    assert_eq!(
        (login.source.as_str(), login.event_types.clone()),
        ("events", vec!["login".to_owned()])
    );

    let v: Value = reqwest::get(server.url("/api/v1/registry"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let views = v["feature_views"].as_array().unwrap();
    let stream = views.iter().find(|x| x["name"] == "user_stream").unwrap();
    assert_eq!(stream["source"], "aggregations");
    assert_eq!(stream["aggregations"][7]["function"], "last_n");
    assert_eq!(stream["aggregations"][7]["n"], 5);
    let types = v["event_types"].as_array().unwrap();
    assert_eq!(types.len(), 4);
}
