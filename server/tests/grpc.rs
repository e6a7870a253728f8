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

/// Caller input quoted in an error is cut (with its length), so that a
/// huge name cannot push the gRPC message past what clients accept in a
/// trailer (they would see RESOURCE_EXHAUSTED "Stream removed" instead).
async fn huge_input_is_quoted_within_bounds(server: &TestServer) {
    let mut client = server.client().await;
    let long = "x".repeat(100_000);
    let view_ref = format!("{long}:f");
    let feature_ref = format!("user_activity:{long}");
    let check = |status: tonic::Status, code: Code, needle: &str| {
        assert_eq!(status.code(), code, "{needle}: {}", status.message());
        let m = status.message();
        assert!(m.len() < 2_300, "{needle}: message of {} bytes", m.len());
        assert!(m.contains(needle), "{needle} not in {m}");
        assert!(m.contains("(100000 bytes)"), "{m}");
    };
    let online = [
        (
            request(&[&view_ref], &["u1"]),
            Code::NotFound,
            "unknown feature view",
        ),
        (
            request(&[&feature_ref], &["u1"]),
            Code::NotFound,
            "unknown feature",
        ),
        (
            request(&[&long], &["u1"]),
            Code::InvalidArgument,
            "invalid feature reference",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                kind: Some(Sel::FeatureService(long.clone())),
                ..request(&[], &["u1"])
            },
            Code::NotFound,
            "unknown feature service",
        ),
        (
            pb::GetOnlineFeaturesRequest {
                entities: HashMap::from([(long.clone(), pb::RepeatedValue { val: vec![s("x")] })]),
                ..request(&["user_activity:sessions_7d"], &[])
            },
            Code::InvalidArgument,
            "unknown join key",
        ),
    ];
    for (req, code, needle) in online {
        let status = client.get_online_features(req).await.unwrap_err();
        check(status, code, needle);
    }
    let mut row = activity_row("u1", 1_700_000_000_000_000, 1);
    row.features.insert(long.clone(), i(1));
    let status = client
        .write_features(pb::WriteFeaturesRequest {
            feature_view: "user_activity".into(),
            rows: vec![row],
        })
        .await
        .unwrap_err();
    check(status, Code::InvalidArgument, "unknown feature");
}

async fn suite(server: TestServer) {
    writes_then_reads_with_statuses(&server).await;
    feature_services_and_many_entities(&server).await;
    bad_requests_get_clear_statuses(&server).await;
    huge_input_is_quoted_within_bounds(&server).await;
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
        ..Limits::default()
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

/// The older `grpc.reflection.v1alpha`, which grpcio-reflection's
/// descriptor database and several GUI clients still speak, lists the same
/// services and serves the same file descriptors.
#[tokio::test]
async fn reflection_v1alpha_is_served_too() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let server = TestServer::embedded().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "quiver.v1.FeatureService".into(),
            )),
        },
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "quiver.v1.FeatureService"
        ],
    );
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    // The first descriptor is the file declaring the symbol; it starts with
    // its name (field 1).
    let name = b"quiver/v1/feature_service.proto";
    let first = &files.file_descriptor_proto[0];
    assert_eq!(&first[2..2 + name.len()], name);
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

/// Sends `body` (bytes that are not a valid message of the RPC) as the
/// request of `method`; returns the error status.
async fn send_raw(server: &TestServer, method: &'static str, body: Vec<u8>) -> tonic::Status {
    use quiver_proto::tonic::codec::ProstCodec;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let codec: ProstCodec<Raw, pb::GetRegistryResponse> = ProstCodec::default();
    grpc.unary(tonic::Request::new(Raw(body)), path, codec)
        .await
        .unwrap_err()
}

/// A message whose encoding is exactly its bytes.
#[derive(Debug, Clone, Default, PartialEq)]
struct Raw(Vec<u8>);

impl quiver_proto::prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl quiver_proto::prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        _tag: u32,
        _wire_type: quiver_proto::prost::encoding::WireType,
        _buf: &mut impl quiver_proto::prost::bytes::Buf,
        _ctx: quiver_proto::prost::encoding::DecodeContext,
    ) -> Result<(), quiver_proto::prost::DecodeError> {
        Ok(())
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// `quiver_requests_total` of a gRPC method and code in a /metrics text.
fn requests(metrics: &str, method: &str, code: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("quiver_requests_total{")
                && l.contains(&format!("code=\"{code}\""))
                && l.contains(&format!("method=\"{method}\""))
                && l.contains("protocol=\"grpc\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Malformed protobuf is the caller's error: INVALID_ARGUMENT, counted in
/// `quiver_requests_total` like any other request.
#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_and_counted() {
    let server = TestServer::embedded().await;
    // Field 1 (feature_service, a string), 3 bytes of invalid UTF-8.
    let invalid_utf8 = vec![0x0a, 0x03, 0xff, 0xfe, 0xfd];
    let cases: [(&'static str, Vec<u8>); 4] = [
        ("/quiver.v1.FeatureService/GetOnlineFeatures", invalid_utf8),
        // Field 3 (entities) with a length varint that never ends.
        (
            "/quiver.v1.FeatureService/GetOnlineFeatures",
            vec![0x1a, 0xff, 0xff],
        ),
        // Wire type 7 does not exist.
        ("/quiver.v1.FeatureService/WriteFeatures", vec![0x0f, 0x01]),
        // A length past the end of the message.
        (
            "/quiver.v1.FeatureService/PushEvents",
            vec![0x0a, 0x7f, 0x01],
        ),
    ];
    for (method, body) in cases {
        let status = send_raw(&server, method, body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(
            status.message().contains("malformed protobuf"),
            "{status:?}"
        );
    }
    let metrics = server.metrics().await;
    assert_eq!(
        requests(&metrics, "GetOnlineFeatures", "INVALID_ARGUMENT"),
        2,
        "{metrics}"
    );
    assert_eq!(
        requests(&metrics, "WriteFeatures", "INVALID_ARGUMENT"),
        1,
        "{metrics}"
    );
    assert_eq!(
        requests(&metrics, "PushEvents", "INVALID_ARGUMENT"),
        1,
        "{metrics}"
    );
    // A handler's own error is counted once, not again by the layer.
    let mut client = server.client().await;
    let status = client
        .get_online_features(request(&["nope:x"], &["u1"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let metrics = server.metrics().await;
    assert_eq!(
        requests(&metrics, "GetOnlineFeatures", "NOT_FOUND"),
        1,
        "{metrics}"
    );
    server.shutdown().await;
}

/// Appends `n` as a protobuf varint.
fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A `GetOnlineFeaturesRequest` of about `bytes` whose entity column holds
/// millions of one-letter ids: small on the wire, ~10x that decoded.
fn many_entities_request(bytes: usize) -> Vec<u8> {
    // Value { string_val = "u" }, as a RepeatedValue element (field 1).
    let string_val = pb::Value {
        kind: Some(Kind::StringVal("u".into())),
    };
    let value = quiver_proto::prost::Message::encode_to_vec(&string_val);
    let mut repeated = Vec::with_capacity(bytes);
    while repeated.len() < bytes {
        repeated.push(0x0a);
        varint(value.len(), &mut repeated);
        repeated.extend_from_slice(&value);
    }
    // map entry { key = "user_id", value = RepeatedValue }
    let mut entry = vec![0x0a, 7];
    entry.extend_from_slice(b"user_id");
    entry.push(0x12);
    varint(repeated.len(), &mut entry);
    entry.extend_from_slice(&repeated);
    drop(repeated);
    let mut body = vec![0x1a];
    varint(entry.len(), &mut body);
    body.extend_from_slice(&entry);
    body
}

/// An oversized request is refused from its length prefix, at default
/// settings, for every RPC limited to `limits.max_request_bytes`: the
/// status says which limit, and memory stays near where it was (the old
/// behaviour decoded the 40 MB into ~1.4 GB first).
#[tokio::test]
async fn oversized_requests_are_refused_before_they_are_read() {
    let server = TestServer::embedded().await;
    let body = many_entities_request(40 << 20);
    for method in [
        "/quiver.v1.FeatureService/GetOnlineFeatures",
        "/quiver.v1.FeatureService/WriteFeatures",
        "/quiver.v1.FeatureService/PushEvents",
        "/quiver.v1.FeatureService/GetRegistry",
    ] {
        quiver_testkit::reset_peak_rss();
        let (before, _) = quiver_testkit::rss();
        let status = send_raw(&server, method, body.clone()).await;
        let (_, peak) = quiver_testkit::rss();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{method}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains("the limit is 4194304 (limits.max_request_bytes)"),
            "{method}: {status:?}"
        );
        // The client's copy and encode buffer of the 40 MB are in this
        // process too; the server's decoded form would add ~1 GB.
        let grown = peak.saturating_sub(before);
        assert!(
            grown < 300 << 20,
            "{method}: peak RSS grew {} MB",
            grown >> 20
        );
    }
    // Training-set requests have their own, larger decode limit: 5 MiB
    // passes the transport (and is then answered on its merits).
    let status = send_raw(
        &server,
        "/quiver.v1.FeatureService/GetHistoricalFeatures",
        many_entities_request(5 << 20),
    )
    .await;
    assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    server.shutdown().await;
}
