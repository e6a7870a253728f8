//! quiver's serving layer.
//!
//! [`run`] serves the gRPC `quiver.v1.FeatureService` (with `grpc.health.v1`
//! health and server reflection) and the REST gateway on listeners the caller
//! bound, until the shutdown future resolves; then both drain in-flight
//! requests and return. Tests bind port 0; the binary binds the configured
//! addresses and passes SIGTERM/ctrl-c.
//!
//! # Layout
//! - [`service`]: the domain service both transports call.
//! - [`grpc`]: the tonic adapter. [`rest`]: the axum adapter.
//! - [`convert`]: protobuf <-> domain types. [`error`]: error -> status codes.
//! - [`metrics`]: Prometheus metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

pub mod convert;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod rest;
pub mod service;

pub use metrics::Metrics;
pub use service::{FeatureServer, Limits};

/// Fully-qualified gRPC service name, as health checks ask for it.
pub const SERVICE_NAME: &str = "quiver.v1.FeatureService";

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// Reflection could not be set up (a build problem).
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves gRPC on `grpc` and REST on `http` until `shutdown` resolves, then
/// drains in-flight requests. `health_interval` is how often the online
/// store is pinged to update gRPC health and the `quiver_ready` gauge.
pub async fn run(
    service: Arc<FeatureServer>,
    grpc: TcpListener,
    http: TcpListener,
    health_interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (mut reporter, health_service) = tonic_health::server::health_reporter();
    let health_task = {
        let service = service.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let ok = service.ping().await.is_ok();
                if last != Some(ok) {
                    let status = if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(SERVICE_NAME, status).await;
                    service.metrics().set_ready(ok);
                    if !ok {
                        tracing::warn!(
                            backend = service.backend(),
                            "online store is not answering; not ready"
                        );
                    } else if last.is_some() {
                        tracing::info!(backend = service.backend(), "online store is back; ready");
                    }
                    last = Some(ok);
                }
                tokio::select! {
                    _ = tokio::time::sleep(health_interval) => {}
                    _ = rx.wait_for(|s| *s) => break,
                }
            }
        })
    };

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(quiver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let feature_service = grpc::SizeRouted::new(service.clone());
    // Small request/response RPCs: Nagle's algorithm would add tens of ms.
    let incoming = TcpListenerStream::new(grpc).map_ok(|s| {
        let _ = s.set_nodelay(true);
        s
    });
    let grpc_server = tonic::transport::Server::builder()
        .layer(TraceLayer::new(SharedClassifier::new(
            client_errors_are_not_failures(),
        )))
        .layer(grpc::ErrorCountLayer::new(service.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(feature_service)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));

    let app = rest::router(service.clone()).layer(TraceLayer::new_for_http());
    let http_server = axum::serve(http, app)
        .tcp_nodelay(true)
        .with_graceful_shutdown(stopped(stop_rx.clone()));

    let (g, h) = tokio::join!(grpc_server, http_server);
    health_task.abort();
    g?;
    h?;
    Ok(())
}

/// gRPC codes that a caller's request causes: traced as finished calls,
/// not logged as failures at ERROR level (they are counted in
/// `quiver_requests_total` by code), so that a flood of bad requests does
/// not flood the error log or an alert on it. The others (INTERNAL,
/// UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN, ...) are the server's or its
/// backends' faults and stay failures.
fn client_errors_are_not_failures() -> GrpcErrorsAsFailures {
    [
        GrpcCode::Cancelled,
        GrpcCode::InvalidArgument,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Unauthenticated,
    ]
    .into_iter()
    .fold(
        GrpcErrorsAsFailures::new(),
        GrpcErrorsAsFailures::with_success,
    )
}
