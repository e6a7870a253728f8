//! The REST gateway (axum): JSON over the same [`FeatureServer`] as gRPC.
//!
//! The OpenAPI description is generated from these handlers and the types
//! they read and write ([`crate::openapi`]; served at `/openapi.json`, with
//! a viewer whose assets are in the binary at `/docs`); see also
//! `docs/api.md`. Errors are
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
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use indexmap::IndexMap;
use quiver_core::error::{cut, quote};
use quiver_core::event::Event;
use quiver_core::json::{json_kind, parse_strict, value_from_json, value_to_json};
use quiver_core::time::{format_rfc3339, parse_rfc3339};
use quiver_core::value::parse_int64;
use quiver_core::{Error, ErrorKind, Registry, Value, ValueType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json_};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{principal_of, AuthLayer, Principal, Transport};
use crate::error::http_status;
use crate::openapi::ErrorBody;
use crate::service::{
    FeatureRowIn, FeatureSelector, FeatureServer, FieldStatus, OnlineRequest, OnlineResponse,
};

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
    // The crate's assets; its own index page is replaced (viewer_index).
    let viewer = swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: crate::openapi::DOCS_PATH,
        api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
        title: Some("quiver API"),
    })
    .layer(middleware::from_fn(viewer_index));
    let api = Router::new()
        .route("/api/v1/features/:entity/:id", get(get_entity_features))
        .route("/api/v1/features/online", post(post_online_features))
        .route("/api/v1/features/write", post(post_write_features))
        .route("/api/v1/events", post(post_events))
        .route("/api/v1/registry", get(get_registry))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    crate::openapi::document(),
                )
            }),
        )
        .with_state(service.clone());
    api.merge(viewer)
        .fallback(|| async {
            ApiError(Error::not_found(
                "no such path; see /docs or /openapi.json for the API",
            ))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(AuthLayer::new(&service, Transport::Http))
        .layer(middleware::from_fn_with_state(service, track))
}

/// The `/docs` page: Swagger UI from the assets in the binary, reading
/// `/openapi.json`. swagger-ui-dist's own page echoes the request URI into
/// the HTML unescaped (and breaks at `/docs/`), so quiver serves this fixed
/// page instead.
const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>quiver API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
  </script>
</body>
</html>
"##;

async fn viewer_index(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == crate::openapi::DOCS_PATH
        || path.strip_prefix(crate::openapi::DOCS_PATH) == Some("/")
    {
        return (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            DOCS_HTML,
        )
            .into_response();
    }
    next.run(req).await
}

/// Longest request target (path and query) the gateway reads, as the
/// usual proxies' default (nginx: 8 KiB header buffers). Longer ones get a
/// 414 in the JSON error format. hyper itself answers 414 with an empty
/// body, before any handler, to targets over 64 KiB.
pub const MAX_URI_BYTES: usize = 8 * 1024;

async fn track(State(svc): State<Arc<FeatureServer>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let resp = if target > MAX_URI_BYTES {
        let message = format!(
            "the request target is {target} bytes, more than {MAX_URI_BYTES}; send long feature lists in the body of POST /api/v1/features/online"
        );
        let body =
            json!({"error": {"code": ErrorKind::InvalidArgument.as_str(), "message": message}});
        (StatusCode::URI_TOO_LONG, Json(body)).into_response()
    } else {
        next.run(req).await
    };
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

/// Query parameters of `GET /api/v1/features/{entity}/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EntityQuery {
    /// Comma-separated `view:feature` references.
    #[param(example = "user_profile:age,user_activity:sessions_7d")]
    features: Option<String>,
    /// A feature service of the registry (instead of `features`).
    #[param(example = "user_service")]
    feature_service: Option<String>,
    /// Name features `view__feature` (default true).
    full_feature_names: Option<bool>,
}

/// One feature of one entity.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureValue {
    /// The value as JSON: numbers, strings, booleans, arrays; bytes as
    /// base64, timestamps as RFC 3339 strings in UTC, NaN and infinities as
    /// "NaN", "Infinity", "-Infinity"; null when absent. Writes accept every
    /// form reads return.
    value: Json_,
    status: FieldStatus,
    /// Event time of the value (RFC 3339, UTC); null when nothing is stored.
    #[schema(format = DateTime)]
    event_timestamp: Option<String>,
}

/// The features of one entity.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntityFeatures {
    /// The entity, as in the path.
    entity: String,
    /// The entity's join key.
    join_key: String,
    /// The entity id, as in the path.
    id: String,
    /// Output name (`view__feature` or `feature`) to value, in selection order.
    #[schema(value_type = HashMap<String, FeatureValue>)]
    features: IndexMap<String, FeatureValue>,
}

/// Latest features of one entity. Without `features` or
/// `feature_service`: every feature of every view keyed by this entity
/// alone, named `view__feature`.
#[utoipa::path(
    get,
    path = "/api/v1/features/{entity}/{id}",
    tag = "features",
    params(
        ("entity" = String, Path, description = "An entity of the registry", example = "user"),
        ("id" = String, Path, description = "The entity id (int64 entities: a decimal integer)", example = "user_123"),
        EntityQuery,
    ),
    responses(
        (status = 200, description = "The entity's features", body = EntityFeatures),
        (status = 400, description = "Malformed reference or id", body = ErrorBody),
        (status = 404, description = "Unknown entity, feature view, feature or feature service", body = ErrorBody),
        (status = 413, description = "More features than limits.max_features", body = ErrorBody),
    ),
    security(("bearerAuth" = [])),
)]
pub async fn get_entity_features(
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
    let mut features = IndexMap::new();
    for (name, col) in resp.names.iter().zip(resp.columns).skip(1) {
        let (value, status, ts) = (&col.values[0], col.statuses[0], col.event_ts[0]);
        features.insert(
            name.clone(),
            FeatureValue {
                value: value_to_json(value),
                status,
                event_timestamp: ts.map(format_rfc3339),
            },
        );
    }
    Ok(Json(EntityFeatures {
        join_key: ent.join_key.clone(),
        entity,
        id,
        features,
    })
    .into_response())
}

/// A `POST /api/v1/features/online` request: one of `feature_service`
/// and `features`, and the entity rows column-wise.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnlineBody {
    /// A feature service of the registry.
    #[schema(example = "user_service")]
    feature_service: Option<String>,
    /// `view:feature` references.
    #[schema(example = json!(["user_profile:age"]))]
    features: Option<Vec<String>>,
    /// Join key to one id per entity row (all columns the same length),
    /// and the request data of selected on-demand features by name.
    #[schema(value_type = HashMap<String, Vec<Json_>>, example = json!({"user_id": ["user_1", "user_2"]}))]
    entities: Map<String, Json_>,
    /// Name features `view__feature` instead of `feature`.
    #[serde(default)]
    full_feature_names: bool,
}

/// Latest features of many entities, column-wise like gRPC
/// GetOnlineFeatures.
#[utoipa::path(
    post,
    path = "/api/v1/features/online",
    tag = "features",
    request_body = OnlineBody,
    responses(
        (status = 200, description = "One column per output name: the join keys, then the features", body = OnlineFeatures),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "Unknown feature view, feature or feature service", body = ErrorBody),
        (status = 413, description = "More rows, features or bytes than [limits] allows", body = ErrorBody),
    ),
    security(("bearerAuth" = [])),
)]
pub async fn post_online_features(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    StrictJson(body): StrictJson<OnlineBody>,
) -> ApiResult {
    let neither = Err(Error::invalid(
        "set either \"feature_service\" or \"features\" (a list of \"view:feature\" references)",
    ));
    let selector = selector(body.features, body.feature_service, neither)?;
    let request_types = svc.request_data_types(&selector);
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
                entity_value_from_json(svc.registry(), &request_types, &key, v)
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
    Ok(Json(OnlineFeatures::from(resp)).into_response())
}

/// The answer of `POST /api/v1/features/online`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OnlineFeatures {
    metadata: OnlineMetadata,
    /// One column per name of `metadata.feature_names`, in that order.
    results: Vec<FeatureColumn>,
}

/// The output names.
#[derive(Debug, Serialize, ToSchema)]
pub struct OnlineMetadata {
    /// The join keys, then the features (`feature` or `view__feature`).
    feature_names: Vec<String>,
}

/// One output column, one entry per entity row.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureColumn {
    /// Values in the JSON forms of [`FeatureValue`].
    values: Vec<Json_>,
    statuses: Vec<FieldStatus>,
    /// Event times (RFC 3339, UTC); null where nothing is stored.
    #[schema(value_type = Vec<Option<String>>)]
    event_timestamps: Vec<Option<String>>,
}

impl From<OnlineResponse> for OnlineFeatures {
    fn from(resp: OnlineResponse) -> Self {
        let results = resp
            .columns
            .iter()
            .map(|c| FeatureColumn {
                values: c.values.iter().map(value_to_json).collect(),
                statuses: c.statuses.clone(),
                event_timestamps: c.event_ts.iter().map(|t| t.map(format_rfc3339)).collect(),
            })
            .collect();
        OnlineFeatures {
            metadata: OnlineMetadata {
                feature_names: resp.names,
            },
            results,
        }
    }
}

/// A `POST /api/v1/features/write` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteBody {
    /// The feature view written.
    #[schema(example = "user_activity")]
    feature_view: String,
    rows: Vec<WriteRowBody>,
}

/// One row of a write.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteRowBody {
    /// Join key to id, for every join key of the view.
    #[schema(value_type = HashMap<String, Json_>, example = json!({"user_id": "user_123"}))]
    entity_key: Map<String, Json_>,
    /// Event time of the row: RFC 3339 (offsets converted to UTC; a space
    /// for `T` and lower-case `t`/`z` are accepted too, so no schema
    /// `format`), within years 0001-9999.
    #[schema(example = "2026-11-30T12:00:00Z")]
    event_timestamp: String,
    /// Feature name to JSON value, read as the registry's type: the forms
    /// reads return, int64 also as decimal strings, base64 also URL-safe or
    /// unpadded, timestamps in any RFC 3339 form.
    #[serde(default)]
    #[schema(value_type = HashMap<String, Json_>, example = json!({"sessions_7d": 12}))]
    features: Map<String, Json_>,
}

/// What became of written rows.
#[derive(Debug, Serialize, ToSchema)]
pub struct WriteResult {
    /// Rows stored.
    written: u64,
    /// Rows older than the stored ones (event-time last-write-wins): skipped.
    stale: u64,
    /// Rows older than the view's TTL plus the expiry grace: not stored (a
    /// read would not find them).
    expired: u64,
}

/// Write feature rows (event-time last-write-wins, idempotent).
#[utoipa::path(
    post,
    path = "/api/v1/features/write",
    tag = "features",
    request_body = WriteBody,
    responses(
        (status = 200, description = "Rows written, stale and expired", body = WriteResult),
        (status = 400, description = "Malformed row, unknown feature or wrong type", body = ErrorBody),
        (status = 404, description = "Unknown feature view", body = ErrorBody),
        (status = 413, description = "More rows or bytes than [limits] allows", body = ErrorBody),
    ),
    security(("bearerAuth" = [])),
)]
pub async fn post_write_features(
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
                entity_value_from_json(reg, &[], k, v)
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
    Ok(Json(WriteResult {
        written: out.written,
        stale: out.stale,
        expired: out.expired,
    })
    .into_response())
}

/// A `POST /api/v1/events` request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsBody {
    /// The events. A body whose events do not have this shape is refused
    /// whole (400); events of this shape are then checked one by one
    /// against the registry (unknown type or key, wrong value type, time
    /// out of bounds), and those that fail are listed in `rejected`.
    events: Vec<EventJson>,
}

/// One event, the shape `quiver_core::event::Event::parse_json` reads (and
/// Kafka JSON payloads carry).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventJson {
    /// Unique id of the event (replays and duplicates count once).
    #[schema(example = "evt-0001")]
    event_id: String,
    /// An event type of the registry.
    #[schema(example = "login")]
    event_type: String,
    /// When it happened: any RFC 3339 form (offsets converted to UTC). Not
    /// a schema `format`: an event with another text is refused on its own
    /// (listed in `rejected`), like an unknown type or key.
    #[schema(example = "2026-11-30T12:00:00Z")]
    event_time: String,
    /// Join key to id, for every entity of the event type.
    #[schema(value_type = Option<HashMap<String, Json_>>, example = json!({"user_id": "user_123"}))]
    entities: Option<Map<String, Json_>>,
    /// Attribute name to value, typed by the registry.
    #[schema(value_type = Option<HashMap<String, Json_>>)]
    attributes: Option<Map<String, Json_>>,
}

impl EventJson {
    /// The event as the JSON object `Event::parse_json` reads.
    fn into_json(self) -> Json_ {
        let mut obj = Map::new();
        obj.insert("event_id".into(), Json_::String(self.event_id));
        obj.insert("event_type".into(), Json_::String(self.event_type));
        obj.insert("event_time".into(), Json_::String(self.event_time));
        if let Some(e) = self.entities {
            obj.insert("entities".into(), Json_::Object(e));
        }
        if let Some(a) = self.attributes {
            obj.insert("attributes".into(), Json_::Object(a));
        }
        Json_::Object(obj)
    }
}

/// What became of pushed events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsResult {
    /// Events appended to the event log.
    accepted: u64,
    /// Events refused, each with its reason (the others were accepted).
    rejected: Vec<RejectedEvent>,
}

/// An event that was not pushed.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectedEvent {
    /// Its position in `events`.
    index: usize,
    /// Its `event_id`.
    event_id: String,
    /// Why it was refused.
    reason: String,
}

/// Push events: each is checked against the registry's event types and
/// appended to the event log; the answer is 200 with the accepted count
/// and the refused events with their reasons, even when some are refused.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "events",
    request_body = EventsBody,
    responses(
        (status = 200, description = "Accepted count and the refused events with their reasons", body = EventsResult),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 403, description = "The key may not push an event type of the call (nothing is pushed)", body = ErrorBody),
        (status = 413, description = "More events or bytes than [limits] allows", body = ErrorBody),
        (status = 503, description = "No event log, or it does not answer", body = ErrorBody),
    ),
    security(("bearerAuth" = [])),
)]
pub async fn post_events(
    State(svc): State<Arc<FeatureServer>>,
    Caller(caller): Caller,
    StrictJson(body): StrictJson<EventsBody>,
) -> ApiResult {
    let reg = svc.registry();
    let events = body
        .events
        .into_iter()
        .map(|e| {
            let id = e.event_id.clone();
            // Checked once, by push_events, like gRPC events.
            (id, Event::parse_json(reg, &e.into_json()))
        })
        .collect();
    let out = svc.push_events(&caller, events).await?;
    let rejected = out
        .rejected
        .into_iter()
        .map(|(index, event_id, reason)| RejectedEvent {
            index,
            event_id,
            reason,
        })
        .collect();
    Ok(Json(EventsResult {
        accepted: out.accepted,
        rejected,
    })
    .into_response())
}

/// The registry: the same content as gRPC GetRegistry, in its JSON mapping.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegistryJson {
    entities: Vec<EntityJson>,
    feature_views: Vec<FeatureViewJson>,
    feature_services: Vec<FeatureServiceJson>,
    event_types: Vec<EventTypeJson>,
}

/// An entity.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntityJson {
    name: String,
    join_key: String,
    /// One of the registry's value types (`string`, `int64`, ...).
    value_type: String,
    description: String,
}

/// A feature view.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureViewJson {
    name: String,
    entities: Vec<String>,
    /// 0: no TTL.
    ttl_seconds: u64,
    description: String,
    tags: std::collections::BTreeMap<String, String>,
    /// `batch`, `sql`, `events`, `aggregations` or `on_demand`.
    source: String,
    event_types: Vec<String>,
    tile_seconds: u64,
    /// The query of a SQL view; empty otherwise.
    sql: String,
    aggregations: Vec<AggregationJson>,
    features: Vec<FeatureJson>,
    /// The features an on-demand view reads (`view:feature`).
    inputs: Vec<String>,
    /// The request data an on-demand view reads.
    request: Vec<AttributeJson>,
}

/// A windowed aggregation of a stream view.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregationJson {
    name: String,
    function: String,
    attribute: String,
    event_types: Vec<String>,
    window_seconds: u64,
    n: u32,
}

/// A feature.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureJson {
    name: String,
    value_type: String,
    /// Length of embedding features.
    dimension: Option<u32>,
    description: String,
    /// Unit of the values (`USD`, `km`); empty when none is declared.
    unit: String,
    /// The SQL expression of an on-demand view's feature; empty otherwise.
    expression: String,
}

/// A feature service.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureServiceJson {
    name: String,
    /// `view:feature` references.
    features: Vec<String>,
    description: String,
}

/// An event type.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeJson {
    name: String,
    entities: Vec<String>,
    attributes: Vec<AttributeJson>,
    description: String,
}

/// An attribute of an event type.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttributeJson {
    name: String,
    value_type: String,
    optional: bool,
}

/// Entities, feature views, feature services and event types (names and
/// types, no values).
#[utoipa::path(
    get,
    path = "/api/v1/registry",
    tag = "registry",
    responses((status = 200, description = "The registry", body = RegistryJson)),
    security(("bearerAuth" = [])),
)]
pub async fn get_registry(State(svc): State<Arc<FeatureServer>>) -> Json<RegistryJson> {
    let pb = crate::convert::registry_to_pb(svc.registry());
    let reg = svc.registry();
    let feature_views = pb
        .feature_views
        .into_iter()
        .zip(reg.views())
        .map(|(p, v)| FeatureViewJson {
            name: v.name.clone(),
            entities: v.entities.clone(),
            ttl_seconds: p.ttl_seconds,
            description: v.description.clone(),
            tags: v.tags.clone(),
            source: p.source,
            event_types: p.event_types,
            tile_seconds: p.tile_seconds,
            sql: p.sql,
            aggregations: p
                .aggregations
                .into_iter()
                .map(|a| AggregationJson {
                    name: a.name,
                    function: a.function,
                    attribute: a.attribute,
                    event_types: a.event_types,
                    window_seconds: a.window_seconds,
                    n: a.n,
                })
                .collect(),
            features: v
                .features
                .iter()
                .zip(&p.features)
                .map(|(f, pf)| FeatureJson {
                    name: f.name.clone(),
                    value_type: f.value_type.as_str().to_owned(),
                    dimension: f.dimension,
                    description: f.description.clone(),
                    unit: f.unit.clone(),
                    expression: pf.expression.clone(),
                })
                .collect(),
            inputs: p.inputs,
            request: match &v.source {
                quiver_core::registry::ViewSource::OnDemand { request, .. } => request
                    .iter()
                    .map(|r| AttributeJson {
                        name: r.name.clone(),
                        value_type: r.value_type.as_str().to_owned(),
                        optional: false,
                    })
                    .collect(),
                _ => Vec::new(),
            },
        })
        .collect();
    Json(RegistryJson {
        entities: reg
            .entities()
            .iter()
            .map(|e| EntityJson {
                name: e.name.clone(),
                join_key: e.join_key.clone(),
                value_type: e.value_type.as_str().to_owned(),
                description: e.description.clone(),
            })
            .collect(),
        feature_views,
        feature_services: reg
            .services()
            .iter()
            .map(|s| FeatureServiceJson {
                name: s.name.clone(),
                features: s.refs.clone(),
                description: s.description.clone(),
            })
            .collect(),
        event_types: reg
            .event_types()
            .iter()
            .map(|e| EventTypeJson {
                name: e.name.clone(),
                entities: e.entities.clone(),
                attributes: e
                    .attributes
                    .iter()
                    .map(|(n, t)| AttributeJson {
                        name: n.clone(),
                        value_type: t.as_str().to_owned(),
                        optional: e.optional.contains(n),
                    })
                    .collect(),
                description: e.description.clone(),
            })
            .collect(),
    })
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: String,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "The process is up", body = Health)),
    security((), ("bearerAuth" = [])),
)]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    #[schema(example = "ready")]
    status: String,
    /// The online store's backend (`redis`, `redis_cluster`, `embedded`).
    online_store: String,
    /// Why the online store is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Readiness: the online store answers.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "The online store does not answer", body = Readiness),
    ),
    security((), ("bearerAuth" = [])),
)]
pub async fn ready(State(svc): State<Arc<FeatureServer>>) -> Response {
    let (status, error) = match svc.ping().await {
        Ok(()) => (StatusCode::OK, None),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(e.message().to_owned()),
        ),
    };
    let body = Readiness {
        status: if error.is_none() {
            "ready"
        } else {
            "not_ready"
        }
        .to_owned(),
        online_store: svc.backend().to_owned(),
        error,
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Text exposition format 0.0.4", body = String, content_type = "text/plain")),
    security((), ("bearerAuth" = [])),
)]
pub async fn metrics(State(svc): State<Arc<FeatureServer>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            quiver_core::metrics::TEXT_CONTENT_TYPE,
        )],
        svc.metrics().render(),
    )
        .into_response()
}

/// An entity id from JSON, typed by the registry: the declared type of the
/// entity with join key `join_key` (so `"007"` stays the string "007" for a
/// string entity, and an int64 id may come as a number or a decimal
/// string). Request data of the selected on-demand views
/// (`request_types`) is typed as they declare it. Ids of unknown join keys are taken as sent (a string or an
/// integer); the service then names the join keys that exist.
fn entity_value_from_json(
    reg: &Registry,
    request_types: &[(String, ValueType)],
    join_key: &str,
    v: &Json_,
) -> Result<Value, String> {
    if let Some(e) = reg.entity_by_join_key(join_key) {
        if v.is_null() {
            return Err(format!("expected a {} id, got null", e.value_type));
        }
        return value_from_json(v, e.value_type);
    }
    // Request data of the selected on-demand views, typed as they declare.
    if let Some((_, ty)) = request_types.iter().find(|(n, _)| n == join_key) {
        return value_from_json(v, *ty);
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
        let id = |k: &str, v: Json_| entity_value_from_json(&reg, &[], k, &v);
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
