"""Typed helper over the generated quiver.v1 stubs: plain Python values in, plain values out."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import grpc

try:
    from quiver.v1 import feature_service_pb2 as pb
    from quiver.v1 import feature_service_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - message for users
    raise ImportError("quiver stubs are missing: run `python -m quiver_client.generate`") from e

STATUS_NAMES = {v.number: v.name for v in pb.FieldStatus.DESCRIPTOR.values}


class QuiverError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _set_timestamp(ts: Any, v: _dt.datetime) -> None:
    """Sets a google.protobuf.Timestamp to the instant `v` names: aware datetimes are converted to
    UTC, naive ones are taken as UTC (as protobuf, Arrow and pandas do; never as local time)."""
    ts.FromDatetime(v.astimezone(_dt.timezone.utc) if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc))


def to_value(v: Any) -> "pb.Value":
    """A Python value as a quiver.v1.Value. Naive datetimes are UTC; a list of numbers with any
    float is a double list (ints and floats alike), of ints only an int64 list."""
    out = pb.Value()
    if v is None:
        out.null_val = pb.NULL
    elif isinstance(v, bool):
        out.bool_val = v
    elif isinstance(v, int):
        out.int64_val = v
    elif isinstance(v, float):
        out.double_val = v
    elif isinstance(v, str):
        out.string_val = v
    elif isinstance(v, (bytes, bytearray)):
        out.bytes_val = bytes(v)
    elif isinstance(v, _dt.datetime):
        _set_timestamp(out.timestamp_val, v)
    elif isinstance(v, (list, tuple)) and not v:
        # An empty list of any type (the server takes it for the declared list type); a field
        # left empty would not be set at all and arrive as null.
        out.double_list_val.SetInParent()
    elif isinstance(v, (list, tuple)):
        first = v[0]
        if any(x is None for x in v):
            raise TypeError(f"null element at index {[x is None for x in v].index(True)}: lists cannot hold None")
        if isinstance(first, bool):
            out.bool_list_val.val.extend(v)
        elif isinstance(first, (int, float)) and any(isinstance(x, float) for x in v):
            out.double_list_val.val.extend(float(x) for x in v)
        elif isinstance(first, int):
            out.int64_list_val.val.extend(v)
        elif isinstance(first, str):
            out.string_list_val.val.extend(v)
        elif isinstance(first, (bytes, bytearray)):
            out.bytes_list_val.val.extend(bytes(x) for x in v)
        else:
            raise TypeError(f"unsupported list element type {type(first).__name__}")
    elif hasattr(v, "dtype") and hasattr(v, "tolist"):
        # numpy arrays: float32 -> embedding (float_list), others by element type.
        if str(v.dtype) == "float32":
            out.float_list_val.val.extend(v.tolist())
        else:
            return to_value(v.tolist())
    else:
        raise TypeError(f"unsupported value type {type(v).__name__}")
    return out


def float32_list(values: Iterable[float]) -> "pb.Value":
    """An embedding value (float32 list) from any iterable of numbers."""
    out = pb.Value()
    out.float_list_val.val.extend(float(x) for x in values)
    return out


def from_value(v: "pb.Value") -> Any:
    """A quiver.v1.Value as a plain Python value."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_val":
        return None
    if kind == "timestamp_val":
        return v.timestamp_val.ToDatetime(tzinfo=_dt.timezone.utc)
    x = getattr(v, kind)
    if kind.endswith("_list_val"):
        return list(x.val)
    return x


def _check_selection(features: Optional[Sequence[str]], feature_service: Optional[str]) -> None:
    if (features is None) == (feature_service is None):
        raise ValueError("pass exactly one of features= or feature_service=")


def _select(req: Any, features: Optional[Sequence[str]], feature_service: Optional[str]) -> None:
    """Sets the feature selection (the request's `kind` oneof) of an online or historical request."""
    if feature_service is not None:
        req.feature_service = feature_service
    else:
        req.features.val.extend(features)


class QuiverClient:
    """A connection to quiver's gRPC FeatureService."""

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
    ):
        """Connects to `target` (host:port).

        `api_key`: sent as `authorization: Bearer <key>` on every call, for servers with `[auth]`
        configured; defaults to the `QUIVER_API_KEY` environment variable. Calls without a valid key
        raise QuiverError with UNAUTHENTICATED, calls outside the key's scopes PERMISSION_DENIED.

        TLS (`quiver serve --tls-cert ...`): `tls=True` verifies the server against the system's CAs,
        or against `root_certificates` (PEM bytes) when given; `certificate_chain` and `private_key`
        (PEM bytes) are the client certificate a server with `--tls-client-ca` (mutual TLS) requires.
        Any of them turns TLS on.
        """
        if channel is None:
            if tls or root_certificates or certificate_chain or private_key:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=root_certificates,
                    private_key=private_key,
                    certificate_chain=certificate_chain,
                )
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("QUIVER_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None

    def __enter__(self) -> "QuiverClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def stub(self) -> "pb_grpc.FeatureServiceStub":
        """The raw generated stub, for everything the helper does not cover."""
        return self._stub

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverError(e.code(), e.details()) from None

    def get_online_features(
        self,
        entities: Mapping[str, Sequence[Any]],
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        with_status: bool = False,
    ) -> Dict[str, List[Any]]:
        """Latest values as columns: {name: [value per entity row]}.

        With with_status=True each value is a (value, status name, event datetime or None) tuple; the
        event time is None for join-key columns and for values that were not found (any instant,
        1970-01-01T00:00:00Z included, is a real event time).
        """
        _check_selection(features, feature_service)
        req = pb.GetOnlineFeaturesRequest(full_feature_names=full_feature_names)
        _select(req, features, feature_service)
        for key, ids in entities.items():
            req.entities[key].val.extend(to_value(i) for i in ids)
        resp = self._call(self._stub.GetOnlineFeatures, req)
        names = list(resp.metadata.feature_names.val)
        keys = len(req.entities)  # join-key columns come first
        not_found = pb.FieldStatus.Value("NOT_FOUND")
        out: Dict[str, List[Any]] = {}
        for col, (name, vec) in enumerate(zip(names, resp.results)):
            values = [from_value(v) for v in vec.values]
            if with_status:
                stamps = [
                    None if col < keys or status == not_found else ts.ToDatetime(tzinfo=_dt.timezone.utc)
                    for ts, status in zip(vec.event_timestamps, vec.statuses)
                ]
                out[name] = list(zip(values, [STATUS_NAMES[s] for s in vec.statuses], stamps))
            else:
                out[name] = values
        return out

    def get_online_features_rows(self, entities: Mapping[str, Sequence[Any]], **kw: Any) -> List[Dict[str, Any]]:
        """Latest values as one dict per entity row."""
        cols = self.get_online_features(entities, **kw)
        n = len(next(iter(cols.values()), []))
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]

    def write_features(self, feature_view: str, rows: Sequence[Mapping[str, Any]]) -> Dict[str, int]:
        """Writes rows {"entity_key": {...}, "event_timestamp": datetime, "features": {...}}.

        Datetimes with a time zone are the instants they name; naive datetimes are UTC.

        Feature values may be pb.Value (e.g. float32_list(...) for embeddings) or plain Python values.
        """
        req = pb.WriteFeaturesRequest(feature_view=feature_view)
        for r in rows:
            row = req.rows.add()
            for k, v in r["entity_key"].items():
                row.entity_key[k].CopyFrom(to_value(v))
            _set_timestamp(row.event_timestamp, r["event_timestamp"])
            for k, v in r.get("features", {}).items():
                row.features[k].CopyFrom(v if isinstance(v, pb.Value) else to_value(v))
        resp = self._call(self._stub.WriteFeatures, req)
        return {"written": resp.written, "stale": resp.stale, "expired": resp.expired}

    def push_events(self, events: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        """Pushes events {"event_id", "event_type", "event_time": datetime, "entities": {...}, "attributes": {...}}.

        Returns {"accepted": n, "rejected": [{"index", "event_id", "reason"}, ...]}; invalid events are
        rejected one by one, the others are appended to the server's event log.
        """
        req = pb.PushEventsRequest()
        for e in events:
            ev = req.events.add()
            ev.event_id = e["event_id"]
            ev.event_type = e["event_type"]
            if e.get("event_time") is not None:
                _set_timestamp(ev.event_time, e["event_time"])
            for k, v in e.get("entities", {}).items():
                ev.entities[k].CopyFrom(to_value(v))
            for k, v in e.get("attributes", {}).items():
                ev.attributes[k].CopyFrom(v if isinstance(v, pb.Value) else to_value(v))
        resp = self._call(self._stub.PushEvents, req)
        return {
            "accepted": resp.accepted,
            "rejected": [{"index": r.index, "event_id": r.event_id, "reason": r.reason} for r in resp.rejected],
        }

    def registry(self) -> "pb.GetRegistryResponse":
        """Entities, feature views and feature services of the server."""
        return self._call(self._stub.GetRegistry, pb.GetRegistryRequest())

    def get_historical_features(
        self,
        entity_df: Any,
        features: Optional[Sequence[str]] = None,
        feature_service: Optional[str] = None,
        full_feature_names: bool = False,
        timeout: Optional[float] = 600.0,
    ) -> Any:
        """A point-in-time correct training set as a pandas DataFrame.

        `entity_df` (pandas DataFrame or pyarrow Table) holds the join keys of the selected views, an
        `event_timestamp` column (naive times are UTC) and any other columns (labels), which come back
        unchanged. Each feature is its newest value at or before the row's event_timestamp and within
        the view's TTL; aggregations are computed as of that time. Needs pyarrow and pandas.
        """
        import pyarrow as pa

        _check_selection(features, feature_service)
        table = entity_df if isinstance(entity_df, pa.Table) else pa.Table.from_pandas(entity_df, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        req = pb.GetHistoricalFeaturesRequest(
            entities_arrow=sink.getvalue().to_pybytes(), full_feature_names=full_feature_names
        )
        _select(req, features, feature_service)
        try:
            parts = [pa.ipc.open_stream(m.arrow_ipc).read_all() for m in self._stub.GetHistoricalFeatures(req, timeout=timeout, metadata=self._metadata)]
        except grpc.RpcError as e:
            raise QuiverError(e.code(), e.details()) from None
        return pa.concat_tables(parts).to_pandas()
