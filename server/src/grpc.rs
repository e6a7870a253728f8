//! The tonic adapter: decodes requests, calls [`FeatureServer`], encodes
//! responses, and records per-RPC metrics.

use std::sync::Arc;
use std::time::Instant;

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
        _ => "OTHER",
    }
}

#[tonic::async_trait]
impl quiver_proto::FeatureService for GrpcService {
    async fn get_online_features(
        &self,
        request: Request<pb::GetOnlineFeaturesRequest>,
    ) -> Result<Response<pb::GetOnlineFeaturesResponse>, Status> {
        self.observe("GetOnlineFeatures", async {
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
            let req = request.into_inner();
            let rows = convert::write_rows_from_pb(req.rows)?;
            let out = self.inner.write_features(&req.feature_view, rows).await?;
            Ok(pb::WriteFeaturesResponse {
                written: out.written,
                stale: out.stale,
            })
        })
        .await
    }

    async fn push_events(
        &self,
        request: Request<pb::PushEventsRequest>,
    ) -> Result<Response<pb::PushEventsResponse>, Status> {
        self.observe("PushEvents", async {
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
