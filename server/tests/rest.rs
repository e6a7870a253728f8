//! REST gateway integration tests over real HTTP.

mod common;

use common::{now, TestServer};
use quiver_server::Limits;
use serde_json::{json, Value};

async fn post(server: &TestServer, path: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let resp = reqwest::get(server.url(path)).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn ts(offset_hours: i64) -> String {
    quiver_core::time::format_rfc3339(now() + offset_hours * 3_600_000_000)
}

async fn write_sample(server: &TestServer) {
    let body = json!({
        "feature_view": "user_profile",
        "rows": [{
            "entity_key": {"user_id": "user_123"},
            "event_timestamp": ts(-1),
            "features": {"age": 34, "country": "NL", "is_premium": true, "signup_ts": "2024-05-01T10:00:00Z"}
        }]
    });
    let (status, out) = post(server, "/api/v1/features/write", &body.to_string()).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out, json!({"written": 1, "stale": 0, "expired": 0}));
    let body = json!({
        "feature_view": "user_embedding",
        "rows": [{"entity_key": {"user_id": "user_123"}, "event_timestamp": ts(-2),
                  "features": {"embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]}}]
    });
    assert_eq!(
        post(server, "/api/v1/features/write", &body.to_string())
            .await
            .0,
        200
    );
}

async fn entity_path_serves_the_seed_curl(server: &TestServer) {
    write_sample(server).await;
    let (status, body) = get(server, "/api/v1/features/user/user_123").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entity"], "user");
    assert_eq!(body["join_key"], "user_id");
    assert_eq!(body["id"], "user_123");
    let f = &body["features"];
    assert_eq!(f["user_profile__age"]["value"], 34);
    assert_eq!(f["user_profile__age"]["status"], "PRESENT");
    assert_eq!(
        f["user_profile__signup_ts"]["value"],
        "2024-05-01T10:00:00.000000Z"
    );
    assert_eq!(f["user_embedding__embedding"]["value"][0], 0.1);
    assert_eq!(f["user_activity__sessions_7d"]["status"], "NOT_FOUND");
    assert_eq!(f["user_activity__sessions_7d"]["value"], Value::Null);
    let (_, one) = get(
        server,
        "/api/v1/features/user/user_123?features=user_profile:age&full_feature_names=false",
    )
    .await;
    assert_eq!(
        one["features"],
        json!({"age": one["features"]["age"].clone()})
    );
    let (_, svc) = get(
        server,
        "/api/v1/features/user/user_123?feature_service=recommendation_service",
    )
    .await;
    assert_eq!(svc["features"].as_object().unwrap().len(), 3);
}

async fn post_online_is_columnar(server: &TestServer) {
    let body = json!({"features": ["user_profile:age", "user_profile:country"], "entities": {"user_id": ["user_123", "ghost"]}});
    let (status, out) = post(server, "/api/v1/features/online", &body.to_string()).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["metadata"]["feature_names"],
        json!(["user_id", "age", "country"])
    );
    assert_eq!(out["results"][0]["values"], json!(["user_123", "ghost"]));
    assert_eq!(out["results"][1]["values"], json!([34, null]));
    assert_eq!(
        out["results"][1]["statuses"],
        json!(["PRESENT", "NOT_FOUND"])
    );
    assert!(out["results"][1]["event_timestamps"][0].is_string());
    assert_eq!(out["results"][2]["values"], json!(["NL", null]));
}

async fn bad_input_gets_json_errors(server: &TestServer) {
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            "/api/v1/features/online",
            "{not json",
            400,
            "invalid JSON body",
        ),
        (
            "/api/v1/features/online",
            r#"{"entities": {"user_id": ["a"]}}"#,
            400,
            "feature_service",
        ),
        (
            "/api/v1/features/online",
            r#"{"feature_service": "x", "features": ["a:b"], "entities": {}}"#,
            400,
            "not both",
        ),
        (
            "/api/v1/features/online",
            r#"{"feature_service": "ghost", "entities": {"user_id": ["a"]}}"#,
            404,
            "unknown feature service",
        ),
        (
            "/api/v1/features/online",
            r#"{"features": ["user_profile:age"], "entities": {"user_id": [1.5]}}"#,
            400,
            "entities.user_id[0]",
        ),
        (
            "/api/v1/features/online",
            r#"{"features": ["user_profile:age"], "entities": {"user_id": "a"}}"#,
            400,
            "must be an array",
        ),
        (
            "/api/v1/features/online",
            r#"{"features": ["user_profile:age"], "entities": {"user_id": ["a"]}, "extra": 1}"#,
            400,
            "unknown field `extra`",
        ),
        (
            "/api/v1/features/online",
            r#"{"features": ["user_profile:age"], "entities": {"user_id": [7]}}"#,
            400,
            "entities.user_id[0]: expected string, got a number",
        ),
        (
            "/api/v1/features/write",
            r#"{"feature_view": "user_profile", "rows": [{"entity_key": {"user_id": "u"}, "event_timestamp": "yesterday"}]}"#,
            400,
            "event_timestamp: \"yesterday\" is not an RFC 3339 timestamp",
        ),
        (
            "/api/v1/features/write",
            r#"{"feature_view": "user_profile", "rows": [{"entity_key": {"user_id": "u"}, "event_timestamp": "2026-01-01T00:00:00Z", "features": {"age": "old"}}]}"#,
            400,
            "features.age: expected int64 (an integer, or one as a decimal string), got the string \"old\"",
        ),
        (
            "/api/v1/features/write",
            r#"{"feature_view": "user_profile", "rows": [{"entity_key": {"user_id": "u"}, "event_timestamp": "2026-01-01T00:00:00Z", "features": {"height": 1}}]}"#,
            400,
            "unknown feature \"height\"",
        ),
        (
            "/api/v1/features/write",
            r#"{"feature_view": "ghost", "rows": []}"#,
            404,
            "unknown feature view",
        ),
    ];
    for (path, body, want, needle) in cases {
        let (status, out) = post(server, path, body).await;
        assert_eq!(status, *want, "{path} {body}: {out}");
        let msg = out["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
        assert!(out["error"]["code"].is_string());
    }
    let gets: &[(&str, u16, &str)] = &[
        (
            "/api/v1/features/robot/r1",
            404,
            "unknown entity \"robot\"; known entities: user, product",
        ),
        ("/api/v1/features/user/u?features=nope", 400, "view:feature"),
        (
            "/api/v1/features/user/u?feature_service=ghost",
            404,
            "unknown feature service",
        ),
        (
            "/api/v1/features/user/u?full_feature_names=maybe",
            400,
            "invalid query string",
        ),
        (
            "/api/v1/features/user/u?color=red",
            400,
            "invalid query string",
        ),
        ("/no/such/path", 404, "/docs"),
    ];
    for (path, want, needle) in gets {
        let (status, out) = get(server, path).await;
        assert_eq!(status, *want, "{path}: {out}");
        let msg = out["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {msg:?} lacks {needle:?}");
    }
}

async fn operational_endpoints(server: &TestServer) {
    assert_eq!(get(server, "/health").await, (200, json!({"status": "ok"})));
    let (status, ready) = get(server, "/ready").await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"quiver_requests_total{code="200",method="/api/v1/features/:entity/:id",protocol="http"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("quiver_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quiver_online_store_duration_seconds_bucket"),
        "{metrics}"
    );
    // The ages of served rows, per feature view.
    assert!(
        metrics.contains("quiver_served_feature_age_seconds_count{feature_view="),
        "{metrics}"
    );
    let (status, spec) = get(server, "/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/features/{entity}/{id}",
        "/api/v1/features/online",
        "/api/v1/registry",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    // Every path of the description is served (none falls to the 404 fallback).
    let paths = spec["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 8, "{paths:?}");
    let http = reqwest::Client::new();
    for (path, item) in paths {
        let url = server.url(&path.replace("{entity}", "user").replace("{id}", "user_123"));
        let req = if item.get("get").is_some() {
            http.get(url)
        } else {
            http.post(url).json(&json!({}))
        };
        let resp = req.send().await.unwrap();
        assert_ne!(resp.status(), 404, "{path}");
        assert_ne!(resp.status(), 405, "{path}");
    }
    // The viewer works offline: its page loads only assets of this server.
    for page in ["/docs", "/docs/", "/docs?x=%22%3E%3Cscript%3E"] {
        let docs = reqwest::get(server.url(page)).await.unwrap();
        assert_eq!(docs.status(), 200);
        let html = docs.text().await.unwrap();
        assert!(html.contains("/openapi.json"), "{html}");
        assert!(
            !html.contains("https://") && !html.contains("x=%22"),
            "{html}"
        );
        for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
            assert!(html.contains(asset), "{html}");
        }
    }
    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
        let resp = reqwest::get(server.url(asset)).await.unwrap();
        assert_eq!(resp.status(), 200, "{asset}");
        assert!(resp.bytes().await.unwrap().len() > 10_000, "{asset}");
    }
    let (status, reg) = get(server, "/api/v1/registry").await;
    assert_eq!(status, 200);
    assert_eq!(reg["feature_services"][0]["name"], "user_service");
}

/// Caller input in error messages is quoted cut, with its length: a
/// 100 KB name gets a short JSON error, on every path that names it.
async fn huge_input_is_quoted_within_bounds(server: &TestServer) {
    let long = "x".repeat(100_000);
    let cases = [
        (
            json!({"features": [format!("{long}:f")], "entities": {"user_id": ["u1"]}}),
            404,
            "unknown feature view",
        ),
        (
            json!({"features": [format!("user_profile:{long}")], "entities": {"user_id": ["u1"]}}),
            404,
            "unknown feature",
        ),
        (
            json!({"feature_service": long, "entities": {"user_id": ["u1"]}}),
            404,
            "unknown feature service",
        ),
        (
            json!({"features": ["user_profile:age"], "entities": {long.clone(): ["u1"]}}),
            400,
            "unknown join key",
        ),
    ];
    for (body, code, needle) in cases {
        let (status, err) = post(server, "/api/v1/features/online", &body.to_string()).await;
        assert_eq!(status, code, "{needle}: {err}");
        let m = err["error"]["message"].as_str().unwrap();
        assert!(m.len() < 2_300, "{needle}: message of {} bytes", m.len());
        assert!(m.contains(needle) && m.contains("(100000 bytes)"), "{m}");
    }
}

async fn suite(server: TestServer) {
    huge_input_is_quoted_within_bounds(&server).await;
    entity_path_serves_the_seed_curl(&server).await;
    post_online_is_columnar(&server).await;
    bad_input_gets_json_errors(&server).await;
    operational_endpoints(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn rest_over_redis() {
    suite(TestServer::redis().await).await;
}

#[tokio::test]
async fn rest_over_redis_cluster() {
    suite(TestServer::redis_cluster().await).await;
}

#[tokio::test]
async fn rest_over_embedded() {
    suite(TestServer::embedded().await).await;
}

#[tokio::test]
async fn oversize_bodies_are_413() {
    let server = TestServer::redis_with(Limits {
        max_request_bytes: 2048,
        ..Limits::default()
    })
    .await;
    let ids: Vec<String> = (0..500).map(|n| format!("user_{n}")).collect();
    let body = json!({"feature_service": "user_service", "entities": {"user_id": ids}});
    let (status, out) = post(&server, "/api/v1/features/online", &body.to_string()).await;
    assert_eq!(status, 413, "{out}");
    assert_eq!(out["error"]["code"], "resource_exhausted");
    server.shutdown().await;
}

#[tokio::test]
async fn redis_down_is_503_then_recovers() {
    let mut server = TestServer::redis().await;
    server.redis_server().stop();
    let (status, out) = get(&server, "/api/v1/features/user/user_1").await;
    assert_eq!(status, 503, "{out}");
    assert_eq!(out["error"]["code"], "unavailable");
    assert_eq!(get(&server, "/ready").await.0, 503);
    server.redis_server().restart();
    assert_eq!(get(&server, "/ready").await.0, 200);
    assert_eq!(get(&server, "/api/v1/features/user/user_1").await.0, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn over_long_urls_are_414_in_json() {
    let server = TestServer::redis().await;
    let refs = |n: usize| vec!["user_profile:age"; n].join(",");
    // Just under the limit: an ordinary answer (a duplicated feature is refused).
    let path = format!("/api/v1/features/user/u1?features={}", refs(470));
    assert!(path.len() < quiver_server::rest::MAX_URI_BYTES);
    let (status, _) = get(&server, &path).await;
    assert_ne!(status, 414);
    for n in [520, 3_000] {
        let path = format!("/api/v1/features/user/u1?features={}", refs(n));
        let (status, out) = get(&server, &path).await;
        assert_eq!(status, 414, "{out}");
        assert_eq!(out["error"]["code"], "invalid_argument", "{out}");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("more than 8192") && message.contains("POST /api/v1/features/online"),
            "{message}"
        );
        // Unknown paths too: the check comes before routing.
        let (status, _) = get(&server, &path.replace("/features/user/u1", "/nope")).await;
        assert_eq!(status, 414);
    }
    let metrics = server.metrics().await;
    assert!(metrics.contains("code=\"414\""), "{metrics}");
}
