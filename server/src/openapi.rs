//! The OpenAPI description of the REST gateway, generated (utoipa) from the
//! handlers of [`crate::rest`] and the types they read and write, so that
//! it cannot drift from them. Served at `/openapi.json`; `/docs` shows it
//! in Swagger UI, whose assets are embedded in the binary (no CDN: the
//! viewer works offline and behind strict egress rules).

use std::borrow::Cow;
use std::sync::LazyLock;

use quiver_core::ErrorKind;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::rest;

/// Where the viewer is served (`/docs`, its assets under `/docs/`).
pub const DOCS_PATH: &str = "/docs";

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    code: ErrorCode,
    /// What is wrong and what to do about it; quoted input is cut (with its
    /// length), secrets are never included.
    message: String,
}

/// The error's kind: one of quiver's error kinds (`quiver_core::ErrorKind`),
/// the same on gRPC (as a status code) and REST.
#[derive(Debug)]
pub struct ErrorCode;

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "The error's kind, the same on gRPC (as a status code) and REST",
            ))
            .enum_values(Some(ErrorKind::ALL.iter().map(|k| k.as_str())))
            .into()
    }
}

impl ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

/// Adds the bearer scheme that `security(("bearerAuth" = []))` names.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key, or a JWT of the identity provider ([auth.jwt]): `authorization: Bearer <key or token>`, when the server requires them ([auth]). Health, readiness and metrics are open unless protected.",
                    ))
                    .build(),
            ),
        );
        // Every operation may answer these; listing them once per path
        // would only repeat them.
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                let refusals = [
                    ("401", "No API key or token, or an unknown, revoked, expired or invalid one (only when the server requires them)"),
                    ("403", "The API key lacks the scope, feature view, feature service or event type"),
                    ("414", "The request target is longer than 8 KiB"),
                    ("429", "The API key (or client) has limits.max_in_flight_per_key requests in flight; Retry-After: 1"),
                    ("500", "A fault of the server (logged)"),
                    ("503", "The online store or event log does not answer"),
                    ("504", "The request took longer than limits.request_timeout"),
                ];
                for (status, description) in refusals {
                    if op.responses.responses.contains_key(status) {
                        continue;
                    }
                    let response = utoipa::openapi::ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new()
                                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                                    "ErrorBody",
                                ))))
                                .build(),
                        )
                        .build();
                    op.responses
                        .responses
                        .insert(status.to_owned(), RefOr::T(response));
                }
            }
        }
    }
}

/// The REST gateway's description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "quiver feature store REST gateway",
        description = "JSON gateway over the same service as the gRPC quiver.v1.FeatureService (port 50051). Errors are {\"error\": {\"code\", \"message\"}}. Generated from the handlers.",
    ),
    paths(
        rest::get_entity_features,
        rest::post_online_features,
        rest::post_write_features,
        rest::post_events,
        rest::get_registry,
        rest::health,
        rest::ready,
        rest::metrics,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    modifiers(&BearerAuth),
    tags(
        (name = "features", description = "Online feature reads and writes"),
        (name = "events", description = "Events into the event log (Kafka)"),
        (name = "registry", description = "The feature registry"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
)]
pub struct ApiDoc;

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI description serializes")
});

/// The OpenAPI document (JSON), built once.
pub fn document() -> &'static str {
    &DOCUMENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_document_lists_every_error_code_and_status() {
        let doc: Value = serde_json::from_str(document()).unwrap();
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        let listed: Vec<&str> = codes
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let all: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(listed, all);
        let statuses = &doc["components"]["schemas"]["FieldStatus"]["enum"];
        let want: Vec<Value> = [
            crate::service::FieldStatus::Present,
            crate::service::FieldStatus::NullValue,
            crate::service::FieldStatus::NotFound,
            crate::service::FieldStatus::OutsideMaxAge,
        ]
        .iter()
        .map(|s| Value::from(s.as_str()))
        .collect();
        assert_eq!(statuses.as_array().unwrap(), &want);
        assert!(
            doc["components"]["securitySchemes"]["bearerAuth"].is_object(),
            "{doc}"
        );
    }
}
