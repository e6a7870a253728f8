//! The REST gateway (axum): JSON over the same [`FeatureServer`] as gRPC.
//!
//! Paths are documented in `openapi.json` (served at `/openapi.json`, with a
//! viewer at `/docs`) and in `docs/api.md`. Errors are
//! `{"error": {"code": "...", "message": "..."}}` with the HTTP status of
//! `crate::error::http_status`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use quiver_core::error::{cut, quote};
use quiver_core::event::Event;
use quiver_core::json::{json_kind, parse_strict, value_from_json, value_to_json};
use quiver_core::time::{format_rfc3339, parse_rfc3339};
use quiver_core::value::parse_int64;
use quiver_core::{Error, ErrorKind, Registry, Value, ValueType};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::auth::{principal_of, AuthLayer, Principal, Transport};
use crate::error::http_status;
use crate::service::{FeatureRowIn, FeatureSelector, FeatureServer, OnlineRequest, OnlineResponse};

const OPENAPI: &str = include_str!("openapi.json");
const DOCS_HTML: &str = include_str!("docs.html");

/// An error response.
#[derive(Debug)]
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.kind() == ErrorKind::Internal {
            tracing::error!(error = %self.0, "internal error");
        }
        let message = crate::error::bounded(self.0.message());
        let body = json!({"error": {"code": self.0.kind().as_str(), "message": message}});
        (http_status(self.0.kind()), Json(body)).into_response()
    }
}

/// A JSON request body: `application/json`, within the body limit, parsed
/// with duplicate keys refused ([`quiver_core::json::parse_strict`]), then
/// read as `T` (whose unknown fields are refused by `T` itself).
pub struct StrictJson<T>(pub T);

#[axum::async_trait]
impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim();
                m.eq_ignore_ascii_case("application/json")
                    || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !json {
            return Err(ApiError(Error::invalid(
                "invalid JSON body: send it with content-type: application/json",
            )));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let kind = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorKind::ResourceExhausted
            } else {
                ErrorKind::InvalidArgument
            };
            ApiError(Error::new(
                kind,
                format!("invalid JSON body: {}", r.body_text()),
            ))
        })?;
        let invalid = |e: String| ApiError(Error::invalid(format!("invalid JSON body: {e}")));
        let value = parse_strict(&bytes).map_err(invalid)?;
        // The error names where in the body the problem is (rows[0].features).
        serde_path_to_error::deserialize(value)
            .map(StrictJson)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// The caller the [`AuthLayer`] admitted the request as.
pub struct Caller(pub Arc<Principal>);

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        principal_of(&parts.extensions)
            .map(Caller)
            .map_err(ApiError)
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError(Error::invalid(format!(
        "invalid query string: {}",
        r.body_text()
    )))
}

type ApiResult = Result<Response, ApiError>;

/// The gateway's routes, with metrics and a body-size limit.
pub fn router(service: Arc<FeatureServer>) -> Router {
    let limit = service.limits().max_request_bytes;
    Router::new()
        .route("/api/v1/features/:entity/:id", get(get_entity_features))
        .route("/api/v1/features/online", post(post_online_features))
        .route("/api/v1/features/write", post(post_write_features))
        .route("/api/v1/events", post(post_events))
        .route("/api/v1/registry", get(get_registry))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/docs", get(|| async { Html(DOCS_HTML) }))
        .fallback(|| async {
            ApiError(Error::not_found(
                "no such path; see /docs or /openapi.json for the API",
            ))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(AuthLayer::new(
            service.authenticator().cloned(),
            Transport::Http,
        ))
        .layer(middleware::from_fn_with_state(service.clone(), track))
        .with_state(service)
}

async fn track(State(svc): State<Arc<FeatureServer>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    svc.metrics()
        .observe_request("http", &route, resp.status().as_str(), started.elapsed());
    resp
}

/// The features chosen by `features` or `feature_service` (never both);
/// `neither` when the request names none.
fn selector(
    features: Option<Vec<String>>,
    feature_service: Option<String>,
    neither: Result<FeatureSelector, Error>,
) -> Result<FeatureSelector, Error> {
    match (features, feature_service) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "pass either features or feature_service, not both",
        )),
        (Some(f), None) => Ok(FeatureSelector::Refs(f)),
        (None, Some(s)) => Ok(FeatureSelector::Service(s)),
        (None, None) => neither,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityQuery {
    /// Comma-separated `view:feature` references.
    features: Option<String>,
    feature_service: Option<String>,
    full_feature_names: Option<bool>,
}

async fn get_entity_features(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    Path((entity, id)): Path<(String, String)>,
    query: Result<Query<EntityQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(query_rejection)?;
    let reg = svc.registry();
    let ent = reg.require_entity(&entity)?;
    let key = match ent.value_type {
        ValueType::Int64 => Value::Int64(parse_int64(&id).map_err(|m| {
            Error::invalid(format!("entity {} has int64 ids: {m}", quote(&entity)))
        })?),
        _ => Value::String(id.clone()),
    };
    let refs = q.features.map(|f| {
        f.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let selector = selector(
        refs,
        q.feature_service,
        Ok(FeatureSelector::Entity(entity.clone())),
    )?;
    let resp = svc
        .get_online(
            &caller,
            OnlineRequest {
                selector,
                entities: vec![(ent.join_key.clone(), vec![key])],
                full_feature_names: q.full_feature_names.unwrap_or(true),
            },
        )
        .await?;
    let mut features = Map::new();
    for (name, col) in resp.names.iter().zip(resp.columns).skip(1) {
        let (value, status, ts) = (&col.values[0], col.statuses[0], col.event_ts[0]);
        features.insert(
            name.clone(),
            json!({
                "value": value_to_json(value),
                "status": status.as_str(),
                "event_timestamp": ts.map(format_rfc3339),
            }),
        );
    }
    Ok(Json(json!({
        "entity": entity,
        "join_key": ent.join_key,
        "id": id,
        "features": features,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlineBody {
    feature_service: Option<String>,
    features: Option<Vec<String>>,
    entities: Map<String, Json_>,
    #[serde(default)]
    full_feature_names: bool,
}

async fn post_online_features(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    StrictJson(body): StrictJson<OnlineBody>,
) -> ApiResult {
    let neither = Err(Error::invalid(
        "set either \"feature_service\" or \"features\" (a list of \"view:feature\" references)",
    ));
    let selector = selector(body.features, body.feature_service, neither)?;
    let mut entities = Vec::with_capacity(body.entities.len());
    for (key, col) in body.entities {
        let Json_::Array(items) = col else {
            return Err(
                Error::invalid(format!("entities.{} must be an array of ids", cut(&key))).into(),
            );
        };
        let values = items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                entity_value_from_json(svc.registry(), &key, v)
                    .map_err(|m| Error::invalid(format!("entities.{}[{i}]: {m}", cut(&key))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        entities.push((key, values));
    }
    let resp = svc
        .get_online(
            &caller,
            OnlineRequest {
                selector,
                entities,
                full_feature_names: body.full_feature_names,
            },
        )
        .await?;
    Ok(Json(online_response_json(resp)).into_response())
}

fn online_response_json(resp: OnlineResponse) -> Json_ {
    let results: Vec<Json_> = resp
        .columns
        .iter()
        .map(|c| {
            json!({
                "values": c.values.iter().map(value_to_json).collect::<Vec<_>>(),
                "statuses": c.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "event_timestamps": c.event_ts.iter().map(|t| t.map(format_rfc3339)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"metadata": {"feature_names": resp.names}, "results": results})
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    feature_view: String,
    rows: Vec<WriteRowBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteRowBody {
    entity_key: Map<String, Json_>,
    event_timestamp: String,
    #[serde(default)]
    features: Map<String, Json_>,
}

async fn post_write_features(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    StrictJson(body): StrictJson<WriteBody>,
) -> ApiResult {
    let reg = svc.registry();
    let view = reg.view(reg.require_view(&body.feature_view)?);
    let mut rows = Vec::with_capacity(body.rows.len());
    for (i, r) in body.rows.into_iter().enumerate() {
        let at = |m: String| Error::invalid(format!("rows[{i}]: {m}"));
        let entity_key = r
            .entity_key
            .iter()
            .map(|(k, v)| {
                entity_value_from_json(reg, k, v)
                    .map(|v| (k.clone(), v))
                    .map_err(|m| at(format!("entity_key.{}: {m}", cut(k))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let event_ts =
            parse_rfc3339(&r.event_timestamp).map_err(|m| at(format!("event_timestamp: {m}")))?;
        let mut features = Vec::with_capacity(r.features.len());
        for (name, v) in r.features {
            // Unknown names are reported by the service with the full list.
            let Some(fi) = view.feature_index(&name) else {
                features.push((name, Value::Null));
                continue;
            };
            let ty = view.features[fi].value_type;
            let value = value_from_json(&v, ty).map_err(|m| at(format!("features.{name}: {m}")))?;
            features.push((name, value));
        }
        rows.push(FeatureRowIn {
            entity_key,
            event_ts: Some(event_ts),
            features,
        });
    }
    let out = svc
        .write_features(&caller, &body.feature_view, rows)
        .await?;
    Ok(
        Json(json!({"written": out.written, "stale": out.stale, "expired": out.expired}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    events: Vec<Json_>,
}

/// `POST /api/v1/events`: `{"events": [<event JSON>, ...]}`, each event in
/// the JSON form of `quiver_core::event::Event::to_json`. Answers 200 with
/// accepted/rejected counts even when some events are rejected.
async fn post_events(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    StrictJson(body): StrictJson<EventsBody>,
) -> ApiResult {
    let reg = svc.registry();
    let events = body
        .events
        .iter()
        .map(|j| {
            let id = j
                .get("event_id")
                .and_then(Json_::as_str)
                .unwrap_or_default()
                .to_owned();
            // Checked once, by push_events, like gRPC events.
            (id, Event::parse_json(reg, j))
        })
        .collect();
    let out = svc.push_events(&caller, events).await?;
    let rejected: Vec<Json_> = out
        .rejected
        .into_iter()
        .map(|(index, event_id, reason)| json!({"index": index, "event_id": event_id, "reason": reason}))
        .collect();
    Ok(Json(json!({"accepted": out.accepted, "rejected": rejected})).into_response())
}

async fn get_registry(State(svc): State<Arc<FeatureServer>>) -> Json<Json_> {
    // The same content as gRPC GetRegistry, in its JSON mapping.
    let pb = crate::convert::registry_to_pb(svc.registry());
    let reg = svc.registry();
    let views: Vec<Json_> = pb
        .feature_views
        .iter()
        .zip(reg.views())
        .map(|(p, v)| json!({
            "name": v.name,
            "entities": v.entities,
            "ttl_seconds": p.ttl_seconds,
            "description": v.description,
            "tags": v.tags,
            "source": p.source,
            "event_types": p.event_types,
            "tile_seconds": p.tile_seconds,
            "sql": p.sql,
            "aggregations": p.aggregations.iter().map(|a| json!({
                "name": a.name, "function": a.function, "attribute": a.attribute,
                "event_types": a.event_types, "window_seconds": a.window_seconds, "n": a.n,
            })).collect::<Vec<_>>(),
            "features": v.features.iter().map(|f| json!({
                "name": f.name, "value_type": f.value_type.as_str(), "dimension": f.dimension, "description": f.description,
            })).collect::<Vec<_>>(),
        }))
        .collect();
    Json(json!({
        "entities": reg.entities().iter().map(|e| json!({
            "name": e.name, "join_key": e.join_key, "value_type": e.value_type.as_str(), "description": e.description,
        })).collect::<Vec<_>>(),
        "feature_views": views,
        "feature_services": reg.services().iter().map(|s| json!({
            "name": s.name, "features": s.refs, "description": s.description,
        })).collect::<Vec<_>>(),
        "event_types": reg.event_types().iter().map(|e| json!({
            "name": e.name,
            "entities": e.entities,
            "attributes": e.attributes.iter().map(|(n, t)| json!({
                "name": n, "value_type": t.as_str(), "optional": e.optional.contains(n),
            })).collect::<Vec<_>>(),
            "description": e.description,
        })).collect::<Vec<_>>(),
    }))
}

async fn ready(State(svc): State<Arc<FeatureServer>>) -> Response {
    match svc.ping().await {
        Ok(()) => Json(json!({"status": "ready", "online_store": svc.backend()})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "not_ready", "online_store": svc.backend(), "error": e.message()}),
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(svc): State<Arc<FeatureServer>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        svc.metrics().render(),
    )
        .into_response()
}

/// An entity id from JSON, typed by the registry: the declared type of the
/// entity with join key `join_key` (so `"007"` stays the string "007" for a
/// string entity, and an int64 id may come as a number or a decimal
/// string). Ids of unknown join keys are taken as sent (a string or an
/// integer); the service then names the join keys that exist.
fn entity_value_from_json(reg: &Registry, join_key: &str, v: &Json_) -> Result<Value, String> {
    if let Some(e) = reg.entity_by_join_key(join_key) {
        if v.is_null() {
            return Err(format!("expected a {} id, got null", e.value_type));
        }
        return value_from_json(v, e.value_type);
    }
    match v {
        Json_::String(s) => Ok(Value::String(s.clone())),
        Json_::Number(n) => n.as_i64().map(Value::Int64).ok_or_else(|| {
            format!(
                "entity ids are strings or integers, got {}",
                cut(n.as_str())
            )
        }),
        other => Err(format!(
            "entity ids are strings or integers, got {}",
            json_kind(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_ids_take_the_registrys_type() {
        let reg = Registry::from_toml(
            "r.toml",
            r#"
[[entities]]
name = "account"
join_key = "account_id"

[[entities]]
name = "shop"
join_key = "shop_id"
value_type = "int64"
"#,
        )
        .unwrap();
        let id = |k: &str, v: Json_| entity_value_from_json(&reg, k, &v);
        assert_eq!(
            id("account_id", json!("007")).unwrap(),
            Value::String("007".into())
        );
        assert!(id("account_id", json!(7))
            .unwrap_err()
            .contains("expected string"));
        assert_eq!(id("shop_id", json!(7)).unwrap(), Value::Int64(7));
        assert_eq!(id("shop_id", json!("7")).unwrap(), Value::Int64(7));
        assert!(id("shop_id", json!("9223372036854775808"))
            .unwrap_err()
            .contains("out of range for int64"));
        assert!(id("shop_id", json!(null)).is_err());
        assert_eq!(id("other", json!(7)).unwrap(), Value::Int64(7));
        assert!(id("other", json!(7.5)).is_err());
        assert!(id("other", json!([1])).is_err());
    }
}
