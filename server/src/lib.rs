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
//! - [`metrics`]: Prometheus metrics. [`trace`]: request spans (OpenTelemetry).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

pub mod auth;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod jwt;
pub mod limit;
pub mod metrics;
pub mod openapi;
pub mod rest;
pub mod service;
pub mod tls;
pub mod trace;
mod watch;

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
    let options = RunOptions {
        health_interval,
        tls: None,
    };
    run_with(service, grpc, http, options, shutdown).await
}

/// How [`run_with`] serves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How often the online store is pinged for health.
    pub health_interval: Duration,
    /// TLS on both listeners (reloaded while serving), or plain TCP.
    pub tls: Option<Arc<tls::Tls>>,
}

/// [`run`] with [`RunOptions`].
pub async fn run_with(
    service: Arc<FeatureServer>,
    grpc: TcpListener,
    http: TcpListener,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let health_interval = options.health_interval;
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

    if let Some(auth) = service.authenticator() {
        auth.clone().watch(stopped(stop_rx.clone()));
        auth.watch_jwks(stopped(stop_rx.clone()));
    }
    if let Some(tls) = &options.tls {
        tls.clone().watch(stopped(stop_rx.clone()));
    }

    // Reflection in both versions: `grpc.reflection.v1` and the older
    // `v1alpha` that grpcio-reflection's descriptor database, grpcurl
    // before 1.9 and several GUI clients still ask for. Each lists every
    // service, both reflection services included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(quiver_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let feature_service = grpc::SizeRouted::new(service.clone());
    let incoming = tls::incoming(grpc, options.tls.clone(), auth::Transport::Grpc);
    let grpc_server = tonic::transport::Server::builder()
        .layer(
            TraceLayer::new(SharedClassifier::new(client_errors_are_not_failures()))
                .make_span_with(trace::GrpcSpans)
                .on_response(trace::GrpcSpans)
                .on_eos(trace::GrpcSpans)
                .on_failure(trace::GrpcSpans),
        )
        .layer(grpc::ErrorCountLayer::new(service.clone()))
        .layer(auth::AuthLayer::new(&service, auth::Transport::Grpc))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(feature_service)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));

    let app = rest::router(service.clone()).layer(
        TraceLayer::new_for_http()
            .make_span_with(trace::HttpSpans)
            .on_response(trace::HttpSpans),
    );
    let http_server = serve_http(
        app,
        tls::incoming(http, options.tls.clone(), auth::Transport::Http),
        stopped(stop_rx.clone()),
    );

    let (g, h) = tokio::join!(grpc_server, http_server);
    health_task.abort();
    g?;
    h?;
    Ok(())
}

/// Serves `app` on `incoming` (HTTP/1.1 and HTTP/2, hyper) until `stop`,
/// then stops accepting and waits for open connections to finish their
/// requests.
async fn serve_http(
    app: axum::Router,
    mut incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<tls::Conn>>,
    stop: impl Future<Output = ()>,
) -> Result<(), std::io::Error> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_stream::StreamExt;
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = &mut stop => break,
        };
        let Some(Ok(conn)) = conn else { break };
        // The peer, as tonic gives it to gRPC requests: per-client limits
        // (crate::limit) count both APIs alike.
        let peer = tonic::transport::server::Connected::connect_info(&conn);
        let app =
            tower::ServiceExt::map_request(app.clone(), move |mut req: axum::http::Request<_>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
        let service = hyper_util::service::TowerToHyperService::new(app);
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(incoming);
    graceful.shutdown().await;
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
