"""The synchronous client of quiver's gRPC FeatureService."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import grpc

from quiver_client import _convert as cv
from quiver_client._convert import OnlineResponse, QuiverError, float32_list, from_value, to_value
from quiver_client.v1 import feature_service_pb2 as pb
from quiver_client.v1 import feature_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import pandas
    import pyarrow

__all__ = ["QuiverClient", "QuiverError", "OnlineResponse", "float32_list", "from_value", "to_value"]


class QuiverClient:
    """A connection to quiver's gRPC FeatureService (one HTTP/2 channel, safe to share between
    threads).

    Every call has a deadline (`timeout` seconds, overridable per call) and is retried by grpc on
    UNAVAILABLE (server unreachable or restarting) up to `max_attempts` times in all, with
    exponential backoff from `initial_backoff` to `max_backoff` seconds. Failed calls raise
    QuiverError with the gRPC status code and the server's message.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        timeout: float = 5.0,
        channel: Optional[grpc.Channel] = None,
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
        """Connects to `target` (host:port).

        `api_key`: sent as `authorization: Bearer <key>` on every call, for servers with `[auth]`
        configured; defaults to the `QUIVER_API_KEY` environment variable. Calls without a valid key
        raise QuiverError with UNAUTHENTICATED, calls outside the key's scopes PERMISSION_DENIED.

        TLS (`quiver serve --tls-cert ...`): `tls=True` verifies the server against the system's CAs,
        or against `root_certificates` (PEM bytes) when given; `certificate_chain` and `private_key`
        (PEM bytes) are the client certificate a server with `--tls-client-ca` (mutual TLS) requires.
        Any of them turns TLS on.

        `options`: further grpc channel arguments, after quiver's (retry policy, 256 MiB receive
        limit). `channel`: a ready channel to use instead (the other connection settings are then
        ignored).
        """
        if channel is None:
            channel = cv.open_channel(
                grpc, target, tls, root_certificates, certificate_chain, private_key,
                max_attempts, initial_backoff, max_backoff, options,
            )
        self._channel = channel
        self._stub = pb_grpc.FeatureServiceStub(channel)
        self.timeout = timeout
        self._metadata = cv.auth_metadata(api_key)

    def __enter__(self) -> "QuiverClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def stub(self) -> pb_grpc.FeatureServiceStub:
        """The raw generated stub, for everything the helper does not cover."""
        return self._stub

    def _deadline(self, timeout: Optional[float]) -> float:
        return self.timeout if timeout is None else timeout

    def get_online_features(
        self,
        entities: Mapping[str, Sequence[Any]],
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = None,
    ) -> OnlineResponse:
        """Latest values for the entity rows `entities` ({join key: [value per row]}) of the
        features `features` ("view:feature" names) or of the feature service `feature_service`
        (exactly one of the two).

        Returns an OnlineResponse: a mapping {column: [value per row]} with statuses, event times
        and `to_rows()`, `to_df()`, `to_arrow()`, `to_polars()`. Feature columns are named
        `feature`, or `view__feature` with full_feature_names=True.
        """
        req = cv.online_request(entities, features, feature_service, full_feature_names)
        try:
            resp = self._stub.GetOnlineFeatures(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return OnlineResponse(resp, join_keys=len(req.entities))

    def get_online_features_rows(self, entities: Mapping[str, Sequence[Any]], **kw: Any) -> List[Dict[str, Any]]:
        """Latest values as one dict per entity row (get_online_features(...).to_rows())."""
        return self.get_online_features(entities, **kw).to_rows()

    def write_features(
        self, feature_view: str, rows: Sequence[Mapping[str, Any]], timeout: Optional[float] = None
    ) -> Dict[str, int]:
        """Writes rows {"entity_key": {...}, "event_timestamp": datetime, "features": {...}} into
        the online store; returns {"written", "stale", "expired"} counts (an older row never
        replaces a newer one; rows past the view's TTL are not written).

        Datetimes with a time zone are the instants they name; naive datetimes are UTC. Feature
        values may be quiver.v1.Value (e.g. float32_list(...) for embeddings) or plain values.
        """
        req = cv.write_request(feature_view, rows)
        try:
            resp = self._stub.WriteFeatures(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.write_result(resp)

    def push_events(self, events: Sequence[Mapping[str, Any]], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Pushes events {"event_id", "event_type", "event_time": datetime, "entities": {...},
        "attributes": {...}} onto the event log.

        Returns {"accepted": n, "rejected": [{"index", "event_id", "reason"}, ...]}; invalid events
        are rejected one by one, the others are appended to the server's event log.
        """
        req = cv.push_request(events)
        try:
            resp = self._stub.PushEvents(req, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.push_result(resp)

    def registry(self, timeout: Optional[float] = None) -> pb.GetRegistryResponse:
        """Entities, event types, feature views and feature services of the server."""
        try:
            return self._stub.GetRegistry(
                pb.GetRegistryRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise cv.error_from(e) from None

    def get_historical_features_arrow(
        self,
        entity_df: Any,
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = 600.0,
    ) -> "pyarrow.Table":
        """A point-in-time correct training set as a pyarrow Table (see get_historical_features)."""
        req = cv.historical_request(entity_df, features, feature_service, full_feature_names)
        try:
            batches = list(self._stub.GetHistoricalFeatures(req, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise cv.error_from(e) from None
        return cv.arrow_table(batches)

    def get_historical_features(
        self,
        entity_df: Any,
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = 600.0,
    ) -> "pandas.DataFrame":
        """A point-in-time correct training set as a pandas DataFrame.

        `entity_df` (pandas DataFrame, pyarrow Table or RecordBatch, or polars DataFrame) holds the
        join keys of the selected views, an `event_timestamp` column (naive times are UTC), request
        data of selected on-demand views, and any other columns
        (labels), which come back unchanged, in row order. Each feature is its newest value at or
        before the row's event_timestamp and within the view's TTL; aggregations are computed as of
        that time. `timeout` is the whole retrieval's deadline in seconds (None: no deadline).
        Needs pyarrow and pandas.
        """
        df: pandas.DataFrame = self.get_historical_features_arrow(
            entity_df, features, feature_service, full_feature_names, timeout
        ).to_pandas()
        return df
