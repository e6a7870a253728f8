//! Request spans of both APIs, for `tower_http`'s `TraceLayer`.
//!
//! With traces exported ([`quiver_core::telemetry::enabled`]) every traced
//! gRPC call and REST request (a caller's sampled `traceparent`, or picked
//! at the sampling ratio: [`quiver_core::telemetry::trace_request`]) gets
//! a server span named as the OpenTelemetry
//! semantic conventions name them (`quiver.v1.FeatureService/GetOnlineFeatures`;
//! `GET /api/v1/features/:entity/:id`), continuing the caller's trace
//! when its gRPC metadata or HTTP headers carry a W3C `traceparent`, and
//! ending with the gRPC status or HTTP status code. Health checks and
//! `/metrics` are not traced. Without traces the layer keeps
//! `tower_http`'s defaults (a `DEBUG` "request" span).

use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{HeaderMap, Request, Response};
use opentelemetry_http::HeaderExtractor;
use quiver_core::telemetry::{self, RequestTrace};
use tower_http::classify::GrpcFailureClass;
use tower_http::trace::{
    DefaultMakeSpan, DefaultOnEos, DefaultOnFailure, DefaultOnResponse, MakeSpan, OnEos, OnFailure,
    OnResponse,
};
use tracing::field::Empty;
use tracing::Span;

/// gRPC server spans (`rpc.system = grpc`).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcSpans;

/// Services whose calls are traced by name; health checks are not traced
/// (a root trace every probe interval), other paths are named `_OTHER`
/// (a span name per path a scanner invents would be unbounded).
const TRACED_GRPC: [&str; 3] = [
    "quiver.v1.FeatureService",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

impl<B> MakeSpan<B> for GrpcSpans {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service == "grpc.health.v1.Health" {
            return DefaultMakeSpan::new().make_span(req);
        }
        let decision = telemetry::trace_request(&HeaderExtractor(req.headers()));
        if decision == RequestTrace::Untraced {
            return DefaultMakeSpan::new().make_span(req);
        }
        let name = if TRACED_GRPC.contains(&service) {
            path
        } else {
            "_OTHER"
        };
        let span = tracing::info_span!(
            "grpc request",
            otel.name = name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            quiver.head_sampled = Empty,
        );
        started(&span, &decision);
        span
    }
}

/// Ties a new request span to its trace: the caller's, or a new one that
/// the root sampler keeps.
fn started(span: &Span, decision: &RequestTrace) {
    decision.apply(span);
    if *decision == RequestTrace::Root {
        span.record(telemetry::HEAD_SAMPLED, true);
    }
}

/// The `grpc-status` of a header or trailer block.
fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Records a call's gRPC status; the codes the OpenTelemetry conventions
/// count as a server's error (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
/// INTERNAL, UNAVAILABLE, DATA_LOSS) mark the span failed.
fn record_status(span: &Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        telemetry::set_error(span, format!("gRPC status {code}"));
    }
}

impl<B> OnResponse<B> for GrpcSpans {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &Span) {
        // An error answered at once comes as "trailers-only": the status
        // is in the headers.
        if let Some(code) = grpc_status(response.headers()) {
            record_status(span, code);
        }
        DefaultOnResponse::default().on_response(response, latency, span);
    }
}

impl OnEos for GrpcSpans {
    fn on_eos(self, trailers: Option<&HeaderMap>, stream_duration: Duration, span: &Span) {
        if let Some(code) = trailers.and_then(grpc_status) {
            record_status(span, code);
        }
        DefaultOnEos::default().on_eos(trailers, stream_duration, span);
    }
}

impl OnFailure<GrpcFailureClass> for GrpcSpans {
    fn on_failure(&mut self, class: GrpcFailureClass, latency: Duration, span: &Span) {
        match &class {
            GrpcFailureClass::Code(code) => record_status(span, i64::from(code.get())),
            GrpcFailureClass::Error(e) => telemetry::set_error(span, e.clone()),
        }
        DefaultOnFailure::default().on_failure(class, latency, span);
    }
}

/// HTTP server spans of the REST gateway, named by route.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpSpans;

/// Routes that probes and scrapers call: not traced.
const UNTRACED_ROUTES: [&str; 3] = ["/health", "/ready", "/metrics"];

impl<B> MakeSpan<B> for HttpSpans {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        if route.is_some_and(|r| UNTRACED_ROUTES.contains(&r)) {
            return DefaultMakeSpan::new().make_span(req);
        }
        let decision = telemetry::trace_request(&HeaderExtractor(req.headers()));
        if decision == RequestTrace::Untraced {
            return DefaultMakeSpan::new().make_span(req);
        }
        // A method outside HTTP's own is `_OTHER` (the conventions' rule).
        let method = match req.method().as_str() {
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH") => m,
            _ => "_OTHER",
        };
        // Without a matched route the name is the method alone (the
        // conventions' rule): paths are unbounded, routes are not.
        let name = match route {
            Some(r) => format!("{method} {r}"),
            None => method.to_owned(),
        };
        let span = tracing::info_span!(
            "http request",
            otel.name = name,
            otel.kind = "server",
            http.request.method = method,
            http.route = route,
            // Paths are percent-encoded ASCII; a long one is cut.
            url.path = req.uri().path().get(..256).unwrap_or(req.uri().path()),
            http.response.status_code = Empty,
            quiver.head_sampled = Empty,
        );
        started(&span, &decision);
        span
    }
}

impl<B> OnResponse<B> for HttpSpans {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &Span) {
        let status = response.status();
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            telemetry::set_error(span, status.to_string());
        }
        DefaultOnResponse::default().on_response(response, latency, span);
    }
}
