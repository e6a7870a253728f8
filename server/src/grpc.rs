//! The tonic adapter: decodes requests, calls [`FeatureServer`], encodes
//! responses, and records per-RPC metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use quiver_batch::retrieve::to_ipc;
use quiver_core::{Error, ErrorKind};
use quiver_proto::prost::Message;

use quiver_core::wire::event_from_pb;
use quiver_core::Result;
use quiver_proto::v1 as pb;
use tonic::{Request, Response, Status};

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
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.inner.metrics().observe_request(
            "grpc",
            method,
            grpc_code_name(code),
            started.elapsed(),
        );
        result.map(Response::new)
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        _ => "OTHER",
    }
}

/// The stream of a `GetHistoricalFeatures` answer.
pub type ArrowStream = Pin<Box<dyn Stream<Item = Result<pb::ArrowBatch, Status>> + Send + 'static>>;

impl GrpcService {
    /// Refuses unary requests over `max_request_bytes`: the transport
    /// accepts up to `max_historical_bytes` for training-set entity tables.
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
                let (selector, table, full) =
                    convert::historical_request_from_pb(request.into_inner())?;
                let batches = self.inner.get_historical(&selector, table, full).await?;
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
            let req = convert::online_request_from_pb(request.into_inner())?;
            Ok(convert::online_response_to_pb(
                self.inner.get_online(req).await?,
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
            let req = request.into_inner();
            let rows = convert::write_rows_from_pb(req.rows)?;
            let out = self.inner.write_features(&req.feature_view, rows).await?;
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
            let events = request
                .into_inner()
                .events
                .into_iter()
                .map(|e| (e.event_id.clone(), event_from_pb(e)))
                .collect();
            let out = self.inner.push_events(events).await?;
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
