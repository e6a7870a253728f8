"""The asyncio client of quiver's gRPC FeatureService (grpc.aio)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import grpc
import grpc.aio

from quiver_client import _convert as cv
from quiver_client._convert import OnlineResponse
from quiver_client.v1 import feature_service_pb2 as pb
from quiver_client.v1 import feature_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import pandas
    import pyarrow

__all__ = ["AsyncQuiverClient"]


class AsyncQuiverClient:
    """QuiverClient for asyncio: the same methods as coroutines, over one grpc.aio channel.

    Create and use it inside a running event loop::

        async with AsyncQuiverClient("localhost:50051") as q:
            feats = await q.get_online_features({"user_id": ["user_1"]}, feature_service="user_service")

    Deadlines, retries on UNAVAILABLE, TLS and API keys work as in QuiverClient.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        timeout: float = 5.0,
        channel: Optional[grpc.aio.Channel] = None,
        api_key: Optional[str] = None,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        max_attempts: int = 4,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        options: Sequence[Tuple[str, Any]] = (),
    ):
        """Connects to `target` (host:port); the arguments are QuiverClient's."""
        if channel is None:
            channel = cv.open_channel(
                grpc.aio, target, tls, root_certificates, certificate_chain, private_key,
                max_attempts, initial_backoff, max_backoff, options,
            )
        self._channel = channel
        self._stub = pb_grpc.FeatureServiceStub(channel)
        self.timeout = timeout
        self._metadata = cv.auth_metadata(api_key)

    async def __aenter__(self) -> "AsyncQuiverClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @property
    def stub(self) -> pb_grpc.FeatureServiceAsyncStub:
        """The raw generated asyncio stub, for everything the helper does not cover."""
        return self._stub

    def _deadline(self, timeout: Optional[float]) -> float:
        return self.timeout if timeout is None else timeout

    async def get_online_features(
        self,
        entities: Mapping[str, Sequence[Any]],
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = None,
    ) -> OnlineResponse:
        """See QuiverClient.get_online_features."""
        req = cv.online_request(entities, features, feature_service, full_feature_names)
        try:
            resp = await self._stub.GetOnlineFeatures(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return OnlineResponse(resp, join_keys=len(req.entities))

    async def get_online_features_rows(self, entities: Mapping[str, Sequence[Any]], **kw: Any) -> List[Dict[str, Any]]:
        """See QuiverClient.get_online_features_rows."""
        return (await self.get_online_features(entities, **kw)).to_rows()

    async def write_features(
        self, feature_view: str, rows: Sequence[Mapping[str, Any]], timeout: Optional[float] = None
    ) -> Dict[str, int]:
        """See QuiverClient.write_features."""
        req = cv.write_request(feature_view, rows)
        try:
            resp = await self._stub.WriteFeatures(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.write_result(resp)

    async def push_events(self, events: Sequence[Mapping[str, Any]], timeout: Optional[float] = None) -> Dict[str, Any]:
        """See QuiverClient.push_events."""
        req = cv.push_request(events)
        try:
            resp = await self._stub.PushEvents(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.push_result(resp)

    async def registry(self, timeout: Optional[float] = None) -> pb.GetRegistryResponse:
        """See QuiverClient.registry."""
        try:
            return await self._stub.GetRegistry(
                pb.GetRegistryRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise cv.error_from(e) from None

    async def get_historical_features_arrow(
        self,
        entity_df: Any,
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = 600.0,
    ) -> "pyarrow.Table":
        """See QuiverClient.get_historical_features_arrow."""
        req = cv.historical_request(entity_df, features, feature_service, full_feature_names)
        try:
            batches = [m async for m in self._stub.GetHistoricalFeatures(req, timeout=timeout, metadata=self._metadata)]
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.arrow_table(batches)

    async def get_historical_features(
        self,
        entity_df: Any,
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = 600.0,
    ) -> "pandas.DataFrame":
        """See QuiverClient.get_historical_features."""
        table = await self.get_historical_features_arrow(entity_df, features, feature_service, full_feature_names, timeout)
        df: pandas.DataFrame = table.to_pandas()
        return df
