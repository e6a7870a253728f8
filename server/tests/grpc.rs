//! gRPC integration tests: a real tonic client against a real server on an
//! ephemeral port, over Redis (started by the harness) and the embedded store.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{now, TestServer};
use quiver_proto::v1 as pb;
use quiver_proto::v1::get_online_features_request::Kind as Sel;
use quiver_proto::v1::value::Kind;
use quiver_server::convert::micros_to_ts;
use quiver_server::Limits;
use tonic::Code;

const HOUR: i64 = 3_600_000_000;

fn s(v: &str) -> pb::Value {
    pb::Value {
        kind: Some(Kind::StringVal(v.into())),
    }
}
fn i(v: i64) -> pb::Value {
    pb::Value {
        kind: Some(Kind::Int64Val(v)),
    }
}
fn d(v: f64) -> pb::Value {
    pb::Value {
        kind: Some(Kind::DoubleVal(v)),
    }
}
fn null() -> pb::Value {
    pb::Value { kind: None }
}

fn activity_row(user: &str, ts: i64, sessions: i64) -> pb::FeatureRow {
    pb::FeatureRow {
        entity_key: HashMap::from([("user_id".into(), s(user))]),
        event_timestamp: Some(micros_to_ts(ts)),
        features: HashMap::from([
            ("sessions_7d".into(), i(sessions)),
            ("total_spend_30d".into(), d(12.5)),
            ("avg_order_value_30d".into(), null()),
            (
                "favorite_categories".into(),
                pb::Value {
                    kind: Some(Kind::StringListVal(pb::StringList {
                        val: vec!["books".into()],
                    })),
                },
            ),
        ]),
    }
}

fn request(features: &[&str], users: &[&str]) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        kind: Some(Sel::Features(pb::FeatureList {
            val: features.iter().map(|f| f.to_string()).collect(),
        })),
        entities: HashMap::from([(
            "user_id".into(),
            pb::RepeatedValue {
                val: users.iter().map(|u| s(u)).collect(),
            },
        )]),
        full_feature_names: false,
    }
}

fn statuses(resp: &pb::GetOnlineFeaturesResponse, col: usize) -> Vec<pb::FieldStatus> {
    resp.results[col]
        .statuses
        .iter()
        .map(|&s| pb::FieldStatus::try_from(s).unwrap())
        .collect()
}

fn names(resp: &pb::GetOnlineFeaturesResponse) -> Vec<String> {
    resp.metadata.clone().unwrap().feature_names.unwrap().val
}

async fn writes_then_reads_with_statuses(server: &TestServer) {
    let mut client = server.client().await;
    let t = now();
    let written = client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows: vec![
                activity_row("u1", t, 7),
                activity_row("u_old", t - 60 * HOUR, 1),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((written.written, written.stale), (2, 0));

    let resp = client
        .get_online_features(request(
            &[
                "user_activity:sessions_7d",
                "user_activity:avg_order_value_30d",
                "user_activity:favorite_categories",
            ],
            &["u1", "nobody", "u_old"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(&resp),
        [
            "user_id",
            "sessions_7d",
            "avg_order_value_30d",
            "favorite_categories"
        ]
    );
    assert_eq!(
        resp.results[0].values,
        vec![s("u1"), s("nobody"), s("u_old")]
    );
    assert_eq!(resp.results[1].values, vec![i(7), null(), i(1)]);
    use pb::FieldStatus::*;
    // user_activity has a 2-day TTL: the 2.5-day-old row is served but flagged
    // (it is kept for TTL + 1 day of grace).
    assert_eq!(statuses(&resp, 1), [Present, NotFound, OutsideMaxAge]);
    assert_eq!(statuses(&resp, 2), [NullValue, NotFound, NullValue]);
    assert_eq!(resp.results[1].event_timestamps[0], micros_to_ts(t));
    assert_eq!(
        resp.results[3].values[0].kind,
        Some(Kind::StringListVal(pb::StringList {
            val: vec!["books".into()]
        }))
    );

    // Older writes never replace newer ones.
    let stale = client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows: vec![activity_row("u1", t - HOUR, 99)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stale.written, stale.stale), (0, 1));

    // The clock moves past the TTL: the same row is now outside max age.
    server.clock.set(t + 3 * 24 * HOUR);
    let resp = client
        .get_online_features(request(&["user_activity:sessions_7d"], &["u1"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statuses(&resp, 1), [OutsideMaxAge]);
    assert_eq!(resp.results[1].values, vec![i(7)]);
    server.clock.set(t);
}

async fn feature_services_and_many_entities(server: &TestServer) {
    let mut client = server.client().await;
    let t = now();
    let rows: Vec<_> = (0..100)
        .map(|n| activity_row(&format!("m{n}"), t, n))
        .collect();
    client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows,
        })
        .await
        .unwrap();
    let users: Vec<String> = (0..100).map(|n| format!("m{n}")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut req = request(&[], &user_refs);
    req.kind = Some(Sel::FeatureService("user_service".into()));
    req.full_feature_names = true;
    let resp = client.get_online_features(req).await.unwrap().into_inner();
    let n = names(&resp);
    assert_eq!(n.len(), 13);
    assert_eq!(n[1], "user_profile__age");
    let col = n
        .iter()
        .position(|c| c == "user_activity__sessions_7d")
        .unwrap();
    assert_eq!(
        resp.results[col].values,
        (0..100).map(i).collect::<Vec<_>>()
    );
    assert!(statuses(&resp, 1)
        .iter()
        .all(|s| *s == pb::FieldStatus::NotFound));
}

async fn bad_requests_get_clear_statuses(server: &TestServer) {
    let mut client = server.client().await;
    let cases: Vec<(pb::GetOnlineFeaturesRequest, Code, &str)> = vec![
        (
            request(&["nope:x"], &["u1"]),
            Code::NotFound,
            "unknown feature view \"nope\"",
        ),
        (
            request(&["user_activity:nope"], &["u1"]),
            Code::NotFound,
            "its features: sessions_7d",
        ),
        (
            request(&["sessions_7d"], &["u1"]),
            Code::InvalidArgument,
            "view:feature",
        ),
        (
            request(&[], &["u1"]),
            Code::InvalidArgument,
            "no features requested",
        ),
        (
            request(&["user_activity:sessions_7d"], &[]),
            Code::InvalidArgument,
            "at least one entity row",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                kind: Some(Sel::FeatureService("ghost".into())),
                ..request(&[], &["u1"])
            },
            Code::NotFound,
            "known services: user_service",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                kind: None,
                ..request(&[], &["u1"])
            },
            Code::InvalidArgument,
            "set either feature_service or features",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::from([(
                    "user_id".into(),
                    pb::RepeatedValue { val: vec![i(5)] },
                )]),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "join key \"user_id\" takes string values; row 0 has int64",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::from([(
                    "customer".into(),
                    pb::RepeatedValue { val: vec![s("x")] },
                )]),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "unknown join key \"customer\"",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::new(),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "no entities given",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::from([
                    (
                        "user_id".into(),
                        pb::RepeatedValue {
                            val: vec![s("a"), s("b")],
                        },
                    ),
                    ("product_id".into(), pb::RepeatedValue { val: vec![s("p")] }),
                ]),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "entity columns differ in length",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::from([(
                    "product_id".into(),
                    pb::RepeatedValue { val: vec![s("p")] },
                )]),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "the request has no \"user_id\" column",
        ),
        (
            request(
                &[
                    "user_profile:country",
                    "user_embedding:embedding",
                    "user_profile:country",
                ],
                &["u"],
            )
            .clone(),
            Code::Ok,
            "",
        ),
    ];
    for (req, code, needle) in cases {
        match client.get_online_features(req.clone()).await {
            Ok(_) => assert_eq!(code, Code::Ok, "expected {code:?} for {req:?}"),
            Err(status) => {
                assert_eq!(status.code(), code, "{req:?}: {status:?}");
                assert!(
                    status.message().contains(needle),
                    "{:?} lacks {needle:?}",
                    status.message()
                );
            }
        }
    }

    let write_cases: Vec<(pb::WriteFeaturesRequest, Code, &str)> = vec![
        (
            pb::WriteFeaturesRequest {
                feature_view: "ghost".into(),
                rows: vec![activity_row("u", now(), 1)],
            },
            Code::NotFound,
            "unknown feature view",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_activity".into(),
                rows: vec![],
            },
            Code::InvalidArgument,
            "no rows",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_activity".into(),
                rows: vec![pb::FeatureRow {
                    event_timestamp: None,
                    ..activity_row("u", now(), 1)
                }],
            },
            Code::InvalidArgument,
            "row 0: event_timestamp is required",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_activity".into(),
                rows: vec![pb::FeatureRow {
                    features: HashMap::from([("sessions_7d".into(), s("many"))]),
                    ..activity_row("u", now(), 1)
                }],
            },
            Code::InvalidArgument,
            "feature \"sessions_7d\": expected int64, got string",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_embedding".into(),
                rows: vec![pb::FeatureRow {
                    features: HashMap::from([(
                        "embedding".into(),
                        pb::Value {
                            kind: Some(Kind::FloatListVal(pb::FloatList { val: vec![0.1; 3] })),
                        },
                    )]),
                    ..activity_row("u", now(), 1)
                }],
            },
            Code::InvalidArgument,
            "needs exactly 16 elements, got 3",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_activity".into(),
                rows: vec![pb::FeatureRow {
                    entity_key: HashMap::from([("product_id".into(), s("p"))]),
                    ..activity_row("u", now(), 1)
                }],
            },
            Code::InvalidArgument,
            "keyed by user_id",
        ),
        (
            pb::WriteFeaturesRequest {
                feature_view: "user_activity".into(),
                rows: vec![pb::FeatureRow {
                    event_timestamp: Some(quiver_proto::prost_types::Timestamp {
                        seconds: 1,
                        nanos: -5,
                    }),
                    ..activity_row("u", now(), 1)
                }],
            },
            Code::InvalidArgument,
            "nanos",
        ),
    ];
    for (req, code, needle) in write_cases {
        let status = client.write_features(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{req:?}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
    }
}

async fn suite(server: TestServer) {
    writes_then_reads_with_statuses(&server).await;
    feature_services_and_many_entities(&server).await;
    bad_requests_get_clear_statuses(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn redis_backed_grpc() {
    suite(TestServer::redis().await).await;
}

#[tokio::test]
async fn redis_cluster_backed_grpc() {
    suite(TestServer::redis_cluster().await).await;
}

#[tokio::test]
async fn embedded_backed_grpc() {
    suite(TestServer::embedded().await).await;
}

#[tokio::test]
async fn limits_are_enforced() {
    let server = TestServer::redis_with(Limits {
        max_entity_rows: 10,
        max_features: 3,
        max_write_rows: 5,
        max_request_bytes: 64 * 1024,
        max_historical_rows: 100,
        max_historical_bytes: 1024 * 1024,
    })
    .await;
    let mut client = server.client().await;
    let users: Vec<String> = (0..11).map(|n| format!("u{n}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let e = client
        .get_online_features(request(&["user_activity:sessions_7d"], &refs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .contains("too many entity rows: 11, the limit is 10"),
        "{e:?}"
    );
    let e = client
        .get_online_features(request(&["user_activity:*"], &["u"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows: (0..6).map(|n| activity_row("u", now(), n)).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // An oversize message is refused by the decoder, not by a crash.
    let big = "x".repeat(100 * 1024);
    let e = client
        .get_online_features(request(&["user_activity:sessions_7d"], &[&big]))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{e:?}"
    );
    // The server is still fine.
    client
        .get_online_features(request(&["user_activity:sessions_7d"], &["u"]))
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn health_follows_redis_and_recovers_without_restart() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mut server = TestServer::redis().await;
    let health = HealthClient::new(server.channel().await);
    let check = |svc: &str| HealthCheckRequest {
        service: svc.into(),
    };
    let wait_for = |want: ServingStatus| {
        let mut health = health.clone();
        async move {
            for _ in 0..200 {
                let got = health
                    .check(check("quiver.v1.FeatureService"))
                    .await
                    .map(|r| r.into_inner().status);
                if got.as_ref().ok() == Some(&(want as i32)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("health never became {want:?}");
        }
    };
    wait_for(ServingStatus::Serving).await;
    let root = health
        .clone()
        .check(check(""))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(root, ServingStatus::Serving as i32);

    let mut client = server.client().await;
    server.redis_server().stop();
    let started = std::time::Instant::now();
    let e = client
        .get_online_features(request(&["user_activity:sessions_7d"], &["u"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    wait_for(ServingStatus::NotServing).await;
    let ready = reqwest::get(server.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);

    server.redis_server().restart();
    wait_for(ServingStatus::Serving).await;
    client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows: vec![activity_row("back", now(), 3)],
        })
        .await
        .unwrap();
    let resp = client
        .get_online_features(request(&["user_activity:sessions_7d"], &["back"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results[1].values, vec![i(3)]);
    assert_eq!(
        reqwest::get(server.url("/ready")).await.unwrap().status(),
        200
    );
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_the_feature_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::embedded().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"quiver.v1.FeatureService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn registry_is_discoverable() {
    let server = TestServer::embedded().await;
    let reg = server
        .client()
        .await
        .get_registry(pb::GetRegistryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.entities.len(), 2);
    let emb = reg
        .feature_views
        .iter()
        .find(|v| v.name == "user_embedding")
        .unwrap();
    assert_eq!(emb.features[0].value_type, pb::ValueType::FloatList as i32);
    assert_eq!(emb.features[0].dimension, 16);
    assert_eq!(emb.ttl_seconds, 7 * 86_400);
    assert!(reg
        .feature_services
        .iter()
        .any(|s| s.name == "user_service"));
    server.shutdown().await;
}
