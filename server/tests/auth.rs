//! API keys on both APIs over real gRPC and HTTP: every scope against every
//! RPC and route (a table), keys limited to feature views, services and
//! event types, expired and unknown keys, protected health and metrics,
//! and keys rotated while serving.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{redis_store, Backend, Recorder, TestServer, REGISTRY};
use quiver_core::Registry;
use quiver_proto::v1 as pb;
use quiver_server::auth::{key_digest, AuthSettings, KeySpec, Scope};
use quiver_server::Limits;
use quiver_testkit::RedisServer;
use serde_json::json;
use tonic::Code;

fn key(name: &str, scopes: &[Scope]) -> KeySpec {
    KeySpec::new(name, &key_digest(&secret(name)), scopes)
}

/// The key of the key named `name` (test keys are derived from names).
fn secret(name: &str) -> String {
    format!("qv_test_secret_of_{name}_0123456789")
}

fn keys() -> Vec<KeySpec> {
    let mut limited = key("limited", &[Scope::Read, Scope::Write]);
    limited.feature_views = Some(vec!["user_profile".into()]);
    limited.feature_services = Some(vec!["product_service".into()]);
    limited.event_types = Some(vec!["login".into()]);
    let mut expired = key("expired", &[Scope::Read, Scope::Write, Scope::Admin]);
    expired.expires = Some("2020-01-01T00:00:00Z".into());
    vec![
        key("reader", &[Scope::Read]),
        key("writer", &[Scope::Write]),
        key("admin", &[Scope::Admin]),
        key("all", &[Scope::Read, Scope::Write]),
        limited,
        expired,
    ]
}

async fn server(settings: AuthSettings) -> (TestServer, Arc<Recorder>) {
    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let registry = Arc::new(Registry::from_toml("r", REGISTRY).unwrap());
    let sink = Arc::new(Recorder::default());
    let server = TestServer::start_with_auth(
        registry,
        store,
        Backend::Redis(redis),
        Limits::default(),
        Some(sink.clone()),
        None,
        Some(settings),
    )
    .await;
    (server, sink)
}

fn with_key<T>(msg: T, name: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(n) = name {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", secret(n)).parse().unwrap(),
        );
    }
    req
}

fn s(v: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringVal(v.into())),
    }
}

fn int(v: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64Val(v)),
    }
}

fn online(features: &[&str], service: Option<&str>) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        kind: Some(match service {
            Some(svc) => pb::get_online_features_request::Kind::FeatureService(svc.into()),
            None => pb::get_online_features_request::Kind::Features(pb::FeatureList {
                val: features.iter().map(|f| f.to_string()).collect(),
            }),
        }),
        entities: [(
            if service == Some("product_service") {
                "product_id"
            } else {
                "user_id"
            }
            .to_owned(),
            pb::RepeatedValue { val: vec![s("u1")] },
        )]
        .into(),
        full_feature_names: false,
    }
}

fn write(view: &str, feature: &str, value: pb::Value) -> pb::WriteFeaturesRequest {
    pb::WriteFeaturesRequest {
        feature_view: view.into(),
        rows: vec![pb::FeatureRow {
            entity_key: [("user_id".to_owned(), s("u1"))].into(),
            event_timestamp: Some(quiver_proto::prost_types::Timestamp {
                seconds: common::now() / 1_000_000,
                nanos: 0,
            }),
            features: [(feature.to_owned(), value)].into(),
        }],
    }
}

fn login(id: &str) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        event_type: "login".into(),
        event_time: Some(quiver_proto::prost_types::Timestamp {
            seconds: common::now() / 1_000_000,
            nanos: 0,
        }),
        entities: [("user_id".to_owned(), s("u1"))].into(),
        attributes: [
            ("device".to_owned(), s("ios")),
            ("country".to_owned(), s("DE")),
        ]
        .into(),
    }
}

/// The gRPC code of each operation for the key named `who`.
async fn grpc_codes(server: &TestServer, who: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut c = server.client().await;
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
    let mut out = Vec::new();
    out.push((
        "GetOnlineFeatures",
        code(
            c.get_online_features(with_key(online(&["user_profile:age"], None), who))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "GetHistoricalFeatures",
        code(
            c.get_historical_features(with_key(
                pb::GetHistoricalFeaturesRequest {
                    kind: Some(pb::get_historical_features_request::Kind::Features(
                        pb::FeatureList {
                            val: vec!["user_profile:age".into()],
                        },
                    )),
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "GetRegistry",
        code(
            c.get_registry(with_key(pb::GetRegistryRequest {}, who))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "WriteFeatures",
        code(
            c.write_features(with_key(write("user_profile", "age", int(30)), who))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "PushEvents",
        code(
            c.push_events(with_key(
                pb::PushEventsRequest {
                    events: vec![login("e1")],
                },
                who,
            ))
            .await
            .map(|r| assert!(r.into_inner().rejected.is_empty())),
        ),
    ));
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    out.push((
        "grpc.health.v1.Health/Check",
        code(
            health
                .check(with_key(
                    tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    },
                    who,
                ))
                .await
                .map(|_| ()),
        ),
    ));
    out
}

/// The HTTP status of each route for the key named `who`.
async fn http_codes(server: &TestServer, who: Option<&str>) -> Vec<(&'static str, u16)> {
    let http = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match who {
        Some(n) => r.bearer_auth(secret(n)),
        None => r,
    };
    let now = quiver_core::time::format_rfc3339(common::now());
    let calls: Vec<(&'static str, reqwest::RequestBuilder)> = vec![
        ("GET /api/v1/features/user/u1", http.get(server.url("/api/v1/features/user/u1?features=user_profile:age"))),
        (
            "POST /api/v1/features/online",
            http.post(server.url("/api/v1/features/online")).json(&json!({
                "features": ["user_profile:age"], "entities": {"user_id": ["u1"]}
            })),
        ),
        ("GET /api/v1/registry", http.get(server.url("/api/v1/registry"))),
        (
            "POST /api/v1/features/write",
            http.post(server.url("/api/v1/features/write")).json(&json!({
                "feature_view": "user_profile",
                "rows": [{"entity_key": {"user_id": "u1"}, "event_timestamp": now, "features": {"age": 31}}]
            })),
        ),
        (
            "POST /api/v1/events",
            http.post(server.url("/api/v1/events")).json(&json!({"events": [{
                "event_id": "e2", "event_type": "login", "event_time": now,
                "entities": {"user_id": "u1"}, "attributes": {"device": "web", "country": "FR"}
            }]})),
        ),
        ("GET /health", http.get(server.url("/health"))),
        ("GET /ready", http.get(server.url("/ready"))),
        ("GET /metrics", http.get(server.url("/metrics"))),
        ("GET /openapi.json", http.get(server.url("/openapi.json"))),
        ("GET /docs", http.get(server.url("/docs"))),
        ("GET /nowhere", http.get(server.url("/nowhere"))),
    ];
    let mut out = Vec::new();
    for (name, req) in calls {
        let resp = auth(req).send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            // Refusals are the JSON error format, 401s with a challenge.
            if status == 401 {
                assert_eq!(
                    resp.headers()["www-authenticate"],
                    "Bearer realm=\"quiver\"",
                    "{name}"
                );
            }
            let body: serde_json::Value = resp.json().await.unwrap();
            let code = body["error"]["code"].as_str().unwrap().to_owned();
            assert_eq!(
                code,
                if status == 401 {
                    "unauthenticated"
                } else {
                    "permission_denied"
                },
                "{name}: {body}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            if let Some(n) = who {
                assert!(!message.contains(&secret(n)), "{name}: {message}");
            }
        }
        out.push((name, status));
    }
    out
}

#[tokio::test]
async fn every_scope_against_every_rpc_and_route() {
    let (server, sink) = server(AuthSettings {
        api_keys: keys(),
        protect_metrics: true,
        ..Default::default()
    })
    .await;
    use Code::*;
    // Admitted calls reach the service: GetHistoricalFeatures without an
    // entity table is INVALID_ARGUMENT, the others succeed.
    let admitted_grpc = [Ok, InvalidArgument, Ok, Ok, Ok, Ok];
    let grpc_table: Vec<(Option<&str>, [Code; 6])> = vec![
        (
            None,
            [
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Ok,
            ],
        ),
        (
            Some("nobody"),
            [
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Ok,
            ],
        ),
        (
            Some("expired"),
            [
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Unauthenticated,
                Ok,
            ],
        ),
        (
            Some("reader"),
            [
                Ok,
                InvalidArgument,
                Ok,
                PermissionDenied,
                PermissionDenied,
                Ok,
            ],
        ),
        (
            Some("writer"),
            [
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                Ok,
                Ok,
                Ok,
            ],
        ),
        (
            Some("admin"),
            [
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                Ok,
            ],
        ),
        (Some("all"), admitted_grpc),
        (Some("limited"), admitted_grpc),
    ];
    for (who, want) in &grpc_table {
        let got = grpc_codes(&server, *who).await;
        for ((op, code), want) in got.iter().zip(want) {
            assert_eq!(code, want, "{op} with key {who:?}");
        }
    }
    // Every write and push above that was admitted arrived, the others not.
    assert_eq!(
        sink.0.lock().unwrap().len(),
        3,
        "writer, all and limited pushed"
    );

    let (ok, unauth, denied, missing) = (200u16, 401u16, 403u16, 404u16);
    let open = [ok, ok, ok]; // /health, /ready (open), then /metrics
    let http_table: Vec<(Option<&str>, Vec<u16>)> = vec![
        (
            None,
            [vec![unauth; 5], vec![ok, ok, unauth, ok, ok, unauth]].concat(),
        ),
        (
            Some("nobody"),
            [vec![unauth; 5], vec![ok, ok, unauth, ok, ok, unauth]].concat(),
        ),
        (
            Some("expired"),
            [vec![unauth; 5], vec![ok, ok, unauth, ok, ok, unauth]].concat(),
        ),
        (
            Some("reader"),
            vec![ok, ok, ok, denied, denied, ok, ok, denied, ok, ok, missing],
        ),
        (
            Some("writer"),
            vec![
                denied, denied, denied, ok, ok, ok, ok, denied, ok, ok, missing,
            ],
        ),
        (
            Some("admin"),
            [vec![denied; 5], open.to_vec(), vec![ok, ok, missing]].concat(),
        ),
        (
            Some("all"),
            vec![ok, ok, ok, ok, ok, ok, ok, denied, ok, ok, missing],
        ),
        (
            Some("limited"),
            vec![ok, ok, ok, ok, ok, ok, ok, denied, ok, ok, missing],
        ),
    ];
    for (who, want) in &http_table {
        let got = http_codes(&server, *who).await;
        for ((route, status), want) in got.iter().zip(want) {
            assert_eq!(status, want, "{route} with key {who:?}");
        }
    }
    assert_eq!(sink.0.lock().unwrap().len(), 6);

    // Refusals are counted like any other answer.
    let metrics = reqwest::Client::new()
        .get(server.url("/metrics"))
        .bearer_auth(secret("admin"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "quiver_requests_total{code=\"UNAUTHENTICATED\",method=\"GetOnlineFeatures\",protocol=\"grpc\"} 3",
        "quiver_requests_total{code=\"PERMISSION_DENIED\",method=\"WriteFeatures\",protocol=\"grpc\"} 2",
        "quiver_requests_total{code=\"401\",method=\"/api/v1/features/write\",protocol=\"http\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line}");
    }
    assert!(!metrics.contains("qv_test_secret"), "a key in /metrics");
    server.shutdown().await;
}

#[tokio::test]
async fn keys_limited_to_views_services_and_event_types() {
    let (server, sink) = server(AuthSettings {
        api_keys: keys(),
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let who = Some("limited");
    let denied = |r: Result<tonic::Response<pb::GetOnlineFeaturesResponse>, tonic::Status>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        e.message().to_owned()
    };
    // A view outside the key's list, alone or next to an allowed one.
    let m = denied(
        c.get_online_features(with_key(
            online(&["user_profile:age", "user_stream:page_views_24h"], None),
            who,
        ))
        .await,
    );
    assert!(
        m.contains("\"limited\" may not read feature view \"user_stream\""),
        "{m}"
    );
    // A service the key names is allowed whatever its views; one it does
    // not name only when all its views are the key's.
    c.get_online_features(with_key(online(&[], Some("product_service")), who))
        .await
        .unwrap();
    denied(
        c.get_online_features(with_key(online(&[], Some("user_service")), who))
            .await,
    );
    // Writes to other views, pushes of other event types: refused whole.
    let e = c
        .write_features(with_key(write("user_activity", "sessions_7d", int(3)), who))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("may not write feature view \"user_activity\""),
        "{e:?}"
    );
    let mut page_view = login("pv");
    page_view.event_type = "page_view".into();
    let e = c
        .push_events(with_key(
            pb::PushEventsRequest {
                events: vec![login("ok"), page_view],
            },
            who,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("type \"page_view\" (event 1)"),
        "{e:?}"
    );
    assert!(
        sink.0.lock().unwrap().is_empty(),
        "nothing of a refused call is pushed"
    );

    // REST: all features of an entity are those the key may read.
    let body: serde_json::Value = reqwest::Client::new()
        .get(server.url("/api/v1/features/user/u1"))
        .bearer_auth(secret("limited"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&String> = body["features"].as_object().unwrap().keys().collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("user_profile__")),
        "{names:?}"
    );
    let r = reqwest::Client::new()
        .get(server.url("/api/v1/features/product/p1"))
        .bearer_auth(secret("limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    server.shutdown().await;
}

#[tokio::test]
async fn protected_health_needs_a_key() {
    let (server, _) = server(AuthSettings {
        api_keys: keys(),
        protect_health: true,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    for path in ["/health", "/ready"] {
        assert_eq!(
            http.get(server.url(path)).send().await.unwrap().status(),
            401
        );
        let r = http
            .get(server.url(path))
            .bearer_auth(secret("admin"))
            .send()
            .await;
        assert_eq!(r.unwrap().status(), 200, "{path}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let req = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let e = health.check(with_key(req(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    health.check(with_key(req(), Some("writer"))).await.unwrap();
    // Metrics stay open unless protected themselves.
    assert_eq!(
        http.get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.shutdown().await;
}

#[tokio::test]
async fn keys_file_rotation_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let file = |names: &[&str]| {
        let mut text = String::new();
        for n in names {
            text.push_str(&format!(
                "[[keys]]\nname = \"{n}\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n\n",
                key_digest(&secret(n))
            ));
        }
        // Replaced in one rename, as `quiver auth create-key` does.
        let tmp = dir.path().join("keys.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    file(&["old"]);
    let (server, _) = server(AuthSettings {
        keys_file: Some(path.clone()),
        reload_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let status = |who: &'static str| {
        let url = server.url("/api/v1/registry");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(secret(who))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("old").await, 200);
    assert_eq!(status("new").await, 401);

    // Rotate: both keys for a while, then only the new one.
    file(&["old", "new"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status("new").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "new key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status("old").await, 200);
    file(&["new"]);
    while status("old").await != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "old key never revoked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status("new").await, 200);

    // A broken file leaves the keys in force.
    std::fs::write(
        &path,
        "[[keys]]\nname = \"x\"\nsha256 = \"not hex\"\nscopes = [\"read\"]\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status("new").await, 200);
    server.shutdown().await;
}

/// Pauses every Redis client for `ms` (`CLIENT PAUSE`): online-store calls
/// hang until then.
fn pause_redis(server: &mut TestServer, ms: u64) {
    let port = server.redis_server().port().to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "CLIENT", "PAUSE", &ms.to_string(), "ALL"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

async fn server_with_limits(auth: Option<AuthSettings>) -> TestServer {
    let redis = RedisServer::start();
    // Longer than the request timeout: the layer's timeout answers first.
    let store = redis_store(&redis, Duration::from_secs(20));
    let registry = Arc::new(Registry::from_toml("r", REGISTRY).unwrap());
    let limits = Limits {
        max_in_flight_per_key: 2,
        request_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    TestServer::start_with_auth(
        registry,
        store,
        Backend::Redis(redis),
        limits,
        None,
        None,
        auth,
    )
    .await
}

/// The REST and gRPC answers of one GetOnlineFeatures as `who`.
async fn read_once(server: &TestServer, who: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .get(server.url("/api/v1/features/user/u1?features=user_profile:age"));
    if let Some(n) = who {
        req = req.bearer_auth(secret(n));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").cloned();
    let body = resp.text().await.unwrap();
    if status == 429 {
        assert_eq!(retry_after.unwrap(), "1");
    }
    (status, body)
}

#[tokio::test]
async fn one_key_cannot_hold_more_than_its_share_and_slow_requests_time_out() {
    let mut big = key("big", &[Scope::Read]);
    big.max_in_flight = Some(3);
    let settings = AuthSettings {
        api_keys: vec![key("reader", &[Scope::Read]), big],
        ..Default::default()
    };
    let mut server = server_with_limits(Some(settings)).await;
    assert_eq!(read_once(&server, Some("reader")).await.0, 200);
    pause_redis(&mut server, 2500);
    let server = Arc::new(server);
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let s = server.clone();
            tokio::spawn(async move { read_once(&s, Some("reader")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third request of the same key, on either API, is refused at once.
    let (status, body) = read_once(&server, Some("reader")).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("API key \\\"reader\\\" already has 2 requests in flight")
            && body.contains("max_in_flight_per_key"),
        "{body}"
    );
    let mut client = server.client().await;
    let e = client
        .get_online_features(with_key(
            online(&["user_profile:age"], None),
            Some("reader"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Other keys are not affected; a key's own limit replaces the default.
    let big: Vec<_> = (0..3)
        .map(|_| {
            let s = server.clone();
            tokio::spawn(async move { read_once(&s, Some("big")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_once(&server, Some("big")).await.0, 429);
    // Health is open and not counted.
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    // The hanging requests end at limits.request_timeout, not the store's.
    for h in hanging.into_iter().chain(big) {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("limits.request_timeout (1s 500ms)"), "{body}");
    }
    // Their slots are free again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(read_once(&server, Some("reader")).await.0, 200);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("code=\"429\"") && metrics.contains("code=\"504\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_keys_each_client_address_is_limited() {
    let mut server = server_with_limits(None).await;
    pause_redis(&mut server, 2500);
    let server = Arc::new(server);
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let s = server.clone();
            tokio::spawn(async move {
                let mut client = s.client().await;
                client
                    .get_online_features(online(&["user_profile:age"], None))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // REST and gRPC calls of one address share the count.
    let (status, body) = read_once(&server, None).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("client 127.0.0.1 already has 2"), "{body}");
    // Probes and scrapers of that address are not counted.
    for open in ["/health", "/metrics", "/openapi.json"] {
        let resp = reqwest::get(server.url(open)).await.unwrap();
        assert_eq!(resp.status(), 200, "{open}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    for h in hanging {
        let e = h.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("limits.request_timeout"), "{e:?}");
    }
}
