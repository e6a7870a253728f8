//! The tonic adapter: decodes requests, calls [`FeatureServer`], encodes
//! responses, and records per-RPC metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{FutureExt, Stream};
use quiver_batch::retrieve::to_ipc;
use quiver_core::{Error, ErrorKind};
use quiver_proto::prost::Message;

use quiver_core::wire::event_from_pb;
use quiver_core::Result;
use quiver_proto::v1 as pb;
use tonic::{Request, Response, Status};

use quiver_proto::FeatureServiceServer;

use crate::auth::principal_of;
use crate::convert;
use crate::error::to_status;
use crate::service::FeatureServer;

/// `quiver.v1.FeatureService` over [`FeatureServer`].
#[derive(Debug, Clone)]
pub struct GrpcService {
    inner: Arc<FeatureServer>,
}

impl GrpcService {
    /// Wraps the domain service.
    pub fn new(inner: Arc<FeatureServer>) -> Self {
        GrpcService { inner }
    }

    async fn observe<T>(
        &self,
        method: &str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = fut.await.map_err(to_status);
        let metrics = self.inner.metrics();
        metrics.observe_latency("grpc", method, started.elapsed());
        // Failed calls are counted by [`ErrorCountLayer`], with those that
        // fail before reaching here (a request that does not decode).
        if result.is_ok() {
            metrics.count_request("grpc", method, grpc_code_name(tonic::Code::Ok));
        }
        result.map(Response::new)
    }
}

/// The RPCs of `quiver.v1.FeatureService` (metric label values).
const METHODS: [&str; 5] = [
    "GetOnlineFeatures",
    "GetHistoricalFeatures",
    "WriteFeatures",
    "PushEvents",
    "GetRegistry",
];

/// Counts every failed `quiver.v1.FeatureService` call in
/// `quiver_requests_total` from the response's `grpc-status` header (a
/// call that fails before any message is sent answers with a
/// trailers-only response): failures of the handlers and calls that never
/// reach them (a request that does not decode, an unknown method) alike.
#[derive(Debug, Clone)]
pub struct ErrorCountLayer {
    server: Arc<FeatureServer>,
}

impl ErrorCountLayer {
    /// Counts into `server`'s metrics.
    pub fn new(server: Arc<FeatureServer>) -> Self {
        ErrorCountLayer { server }
    }
}

impl<S> tower::Layer<S> for ErrorCountLayer {
    type Service = ErrorCount<S>;

    fn layer(&self, inner: S) -> ErrorCount<S> {
        ErrorCount {
            inner,
            server: self.server.clone(),
        }
    }
}

/// The service of [`ErrorCountLayer`].
#[derive(Debug, Clone)]
pub struct ErrorCount<S> {
    inner: S,
    server: Arc<FeatureServer>,
}

type HttpRequest<B> = tonic::codegen::http::Request<B>;
type HttpResponse<B> = tonic::codegen::http::Response<B>;

impl<S, B, R> tower::Service<HttpRequest<B>> for ErrorCount<S>
where
    S: tower::Service<HttpRequest<B>, Response = HttpResponse<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = HttpResponse<R>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<HttpResponse<R>, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequest<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .strip_prefix("/quiver.v1.FeatureService/")
            .map(|m| {
                METHODS
                    .iter()
                    .copied()
                    .find(|k| *k == m)
                    .unwrap_or("unknown")
            });
        let server = self.server.clone();
        // A client's deadline or cancel drops this future (tonic's timeout
        // wraps outside the layers): the guard counts the call then.
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.to_str().ok()?))
            .map(|d| Instant::now() + d);
        let mut guard = method.map(|m| Unfinished {
            server: server.clone(),
            method: m,
            deadline,
            armed: true,
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
            if let Some(g) = guard.as_mut() {
                g.armed = false;
            }
            let mut resp = match result {
                Ok(r) => r?,
                Err(panic) => {
                    // A bug, not the caller's cancel: counted and logged as
                    // one, then left to unwind as before (the call is reset).
                    if let Some(m) = method {
                        server.metrics().count_request("grpc", m, "INTERNAL");
                    }
                    tracing::error!(method = method.unwrap_or("?"), "request handler panicked");
                    std::panic::resume_unwind(panic)
                }
            };
            if let Some(m) = method {
                caller_faults(&mut resp, m);
            }
            let status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<i32>().ok());
            if let (Some(method), Some(code)) = (method, status.filter(|&c| c != 0)) {
                let code = grpc_code_name(tonic::Code::from_i32(code));
                server.metrics().count_request("grpc", method, code);
            }
            Ok(resp)
        })
    }
}

/// The duration of a `grpc-timeout` header (gRPC over HTTP/2: up to 8
/// digits and a unit, H M S m u n).
fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call whose response was never produced: dropped at the client's
/// deadline (`DEADLINE_EXCEEDED`) or cancel (`CANCELLED`).
struct Unfinished {
    server: Arc<FeatureServer>,
    method: &'static str,
    /// When the client's `grpc-timeout` runs out.
    deadline: Option<Instant>,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A little slack: the timer that dropped the call fires at the
        // deadline, give or take the scheduler.
        let late = self
            .deadline
            .is_some_and(|d| Instant::now() + std::time::Duration::from_millis(20) >= d);
        let code = if late {
            tonic::Code::DeadlineExceeded
        } else {
            tonic::Code::Cancelled
        };
        self.server
            .metrics()
            .count_request("grpc", self.method, grpc_code_name(code));
    }
}

/// `quiver.v1.FeatureService` with a decode limit per RPC. tonic takes
/// one limit per service and checks it against each message's length
/// prefix, before reading the message: `GetHistoricalFeatures` (entity
/// tables, up to `limits.max_historical_bytes`) goes to one instance, every
/// other RPC to one limited to `limits.max_request_bytes`, so that an
/// oversized request is refused before its bytes are buffered or decoded.
#[derive(Debug, Clone)]
pub struct SizeRouted {
    small: FeatureServiceServer<GrpcService>,
    large: FeatureServiceServer<GrpcService>,
}

pub(crate) const HISTORICAL_PATH: &str = "/quiver.v1.FeatureService/GetHistoricalFeatures";

impl SizeRouted {
    /// Both instances over `server`, with its limits.
    pub fn new(server: Arc<FeatureServer>) -> Self {
        let limits = server.limits();
        let svc = || {
            FeatureServiceServer::new(GrpcService::new(server.clone()))
                // Training sets are large; one response message carries one batch.
                .max_encoding_message_size(usize::MAX)
        };
        SizeRouted {
            small: svc().max_decoding_message_size(limits.max_request_bytes),
            large: svc().max_decoding_message_size(limits.max_historical_bytes),
        }
    }
}

impl tonic::server::NamedService for SizeRouted {
    const NAME: &'static str =
        <FeatureServiceServer<GrpcService> as tonic::server::NamedService>::NAME;
}

impl<B> tower::Service<HttpRequest<B>> for SizeRouted
where
    FeatureServiceServer<GrpcService>: tower::Service<HttpRequest<B>>,
{
    type Response = <FeatureServiceServer<GrpcService> as tower::Service<HttpRequest<B>>>::Response;
    type Error = <FeatureServiceServer<GrpcService> as tower::Service<HttpRequest<B>>>::Error;
    type Future = <FeatureServiceServer<GrpcService> as tower::Service<HttpRequest<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Both are always ready (tonic's generated servers are).
        match self.small.poll_ready(cx) {
            std::task::Poll::Ready(Ok(())) => self.large.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: HttpRequest<B>) -> Self::Future {
        if req.uri().path() == HISTORICAL_PATH {
            self.large.call(req)
        } else {
            self.small.call(req)
        }
    }
}

/// What the gRPC spec percent-encodes in `grpc-message` (of ASCII text).
pub(crate) const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Statuses that tonic gives a caller's faults before any handler runs,
/// restated: a message over the decode limit (tonic: OUT_OF_RANGE) is
/// RESOURCE_EXHAUSTED naming the setting, as gRPC's own implementations
/// and quiver's REST gateway (413) have it; a request that does not
/// decode, or is cut short, or has no message (tonic: INTERNAL) is
/// INVALID_ARGUMENT. Done here, inside the trace layer, so that neither
/// the log nor the metrics count a client's garbage as a server fault.
fn caller_faults<R>(resp: &mut HttpResponse<R>, method: &str) {
    let h = resp.headers();
    let code = h.get("grpc-status").and_then(|v| v.to_str().ok());
    if !matches!(code, Some("11" | "13")) {
        return;
    }
    let code = code.unwrap_or_default().to_owned();
    let Some(msg) = h.get("grpc-message").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let msg = percent_encoding::percent_decode_str(msg)
        .decode_utf8_lossy()
        .into_owned();
    let restated = if code == "11" {
        let Some(rest) = msg.strip_prefix("Error, decoded message length too large: found ") else {
            return;
        };
        let found = rest.split(' ').next().unwrap_or("?");
        let limit = rest
            .rsplit("is: ")
            .next()
            .and_then(|l| l.split(' ').next())
            .unwrap_or("?");
        let setting = if method == "GetHistoricalFeatures" {
            "limits.max_historical_bytes"
        } else {
            "limits.max_request_bytes"
        };
        (
            "8",
            format!("the request is {found} bytes; the limit is {limit} ({setting})"),
        )
    } else if let Some(why) = msg.strip_prefix("failed to decode Protobuf message: ") {
        ("3", format!("malformed protobuf message: {why}"))
    } else if msg == "Unexpected EOF decoding stream." {
        (
            "3",
            "malformed request: the message is shorter than its length prefix".to_owned(),
        )
    } else if msg == "Missing request message." {
        ("3", "malformed request: no request message".to_owned())
    } else if msg.starts_with("protocol error: received message with") {
        ("3", format!("malformed request: {msg}"))
    } else {
        return;
    };
    let h = resp.headers_mut();
    h.insert(
        "grpc-status",
        tonic::codegen::http::HeaderValue::from_static(restated.0),
    );
    // The restated text is ASCII; the gRPC spec's percent-encoding
    // leaves all but '%' and controls as they are.
    let text: String = percent_encoding::utf8_percent_encode(&restated.1, GRPC_MESSAGE).collect();
    if let Ok(v) = tonic::codegen::http::HeaderValue::from_str(&text) {
        h.insert("grpc-message", v);
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The stream of a `GetHistoricalFeatures` answer.
pub type ArrowStream = Pin<Box<dyn Stream<Item = Result<pb::ArrowBatch, Status>> + Send + 'static>>;

impl GrpcService {
    /// Refuses unary requests over `max_request_bytes`. [`SizeRouted`]
    /// already refuses them from their length prefix; this stays as the
    /// rule's statement where the handlers are.
    fn check_size(&self, req: &impl Message) -> Result<()> {
        let (len, max) = (req.encoded_len(), self.inner.limits().max_request_bytes);
        if len > max {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "the request is {len} bytes; the limit is {max} (limits.max_request_bytes)"
                ),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl quiver_proto::FeatureService for GrpcService {
    type GetHistoricalFeaturesStream = ArrowStream;

    async fn get_historical_features(
        &self,
        request: Request<pb::GetHistoricalFeaturesRequest>,
    ) -> Result<Response<ArrowStream>, Status> {
        let answer = self
            .observe("GetHistoricalFeatures", async {
                let caller = principal_of(request.extensions())?;
                let (selector, table, full) =
                    convert::historical_request_from_pb(request.into_inner())?;
                let batches = self
                    .inner
                    .get_historical(&caller, &selector, table, full)
                    .await?;
                batches
                    .iter()
                    .map(|b| to_ipc(b).map(|arrow_ipc| pb::ArrowBatch { arrow_ipc }))
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
        let stream: ArrowStream = Box::pin(futures::stream::iter(
            answer.into_inner().into_iter().map(Ok),
        ));
        Ok(Response::new(stream))
    }

    async fn get_online_features(
        &self,
        request: Request<pb::GetOnlineFeaturesRequest>,
    ) -> Result<Response<pb::GetOnlineFeaturesResponse>, Status> {
        self.observe("GetOnlineFeatures", async {
            self.check_size(request.get_ref())?;
            let caller = principal_of(request.extensions())?;
            let req = convert::online_request_from_pb(request.into_inner())?;
            Ok(convert::online_response_to_pb(
                self.inner.get_online(&caller, req).await?,
            ))
        })
        .await
    }

    async fn write_features(
        &self,
        request: Request<pb::WriteFeaturesRequest>,
    ) -> Result<Response<pb::WriteFeaturesResponse>, Status> {
        self.observe("WriteFeatures", async {
            self.check_size(request.get_ref())?;
            let caller = principal_of(request.extensions())?;
            let req = request.into_inner();
            let rows = convert::write_rows_from_pb(req.rows)?;
            let out = self
                .inner
                .write_features(&caller, &req.feature_view, rows)
                .await?;
            Ok(pb::WriteFeaturesResponse {
                written: out.written,
                stale: out.stale,
                expired: out.expired,
            })
        })
        .await
    }

    async fn push_events(
        &self,
        request: Request<pb::PushEventsRequest>,
    ) -> Result<Response<pb::PushEventsResponse>, Status> {
        self.observe("PushEvents", async {
            self.check_size(request.get_ref())?;
            let caller = principal_of(request.extensions())?;
            let events = request
                .into_inner()
                .events
                .into_iter()
                .map(|e| (e.event_id.clone(), event_from_pb(e)))
                .collect();
            let out = self.inner.push_events(&caller, events).await?;
            Ok(pb::PushEventsResponse {
                accepted: out.accepted,
                rejected: out
                    .rejected
                    .into_iter()
                    .map(|(index, event_id, reason)| pb::RejectedEvent {
                        index: index as u32,
                        event_id,
                        reason,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn get_registry(
        &self,
        _request: Request<pb::GetRegistryRequest>,
    ) -> Result<Response<pb::GetRegistryResponse>, Status> {
        self.observe("GetRegistry", async {
            Ok(convert::registry_to_pb(self.inner.registry()))
        })
        .await
    }
}
