"""Plain Python values <-> quiver.v1 messages, shared by the sync and asyncio clients."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import grpc

from quiver_client.v1 import feature_service_pb2 as pb

if TYPE_CHECKING:
    import pandas
    import polars
    import pyarrow

STATUS_NAMES: Dict[int, str] = {v.number: v.name for v in pb.FieldStatus.DESCRIPTOR.values}
"""quiver.v1.FieldStatus numbers to their names (PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE)."""


class QuiverError(Exception):
    """A failed call: `code` is the grpc.StatusCode (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED,
    PERMISSION_DENIED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, ...), `message` the
    server's explanation (docs/api.md lists what each code means for each RPC)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> Tuple[Any, Tuple[grpc.StatusCode, str]]:
        # Pickled by its fields, so the error crosses process pools (multiprocessing, joblib).
        return (QuiverError, (self.code, self.message))


def error_from(e: grpc.RpcError) -> QuiverError:
    """The QuiverError of a failed grpc call (sync or asyncio)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return QuiverError(code, details or "")


def _set_timestamp(ts: Any, v: _dt.datetime) -> None:
    """Sets a google.protobuf.Timestamp to the instant `v` names: aware datetimes are converted to
    UTC, naive ones are taken as UTC (as protobuf, Arrow and pandas do; never as local time)."""
    ts.FromDatetime(v.astimezone(_dt.timezone.utc) if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc))


def to_value(v: Any) -> pb.Value:
    """A Python value as a quiver.v1.Value.

    None, bool, int (int64), float (double), str, bytes, datetime (naive means UTC) and lists of
    them; a list of numbers with any float is a double list (ints and floats alike), of ints only
    an int64 list; a numpy float32 array is a float list (embeddings). Raises TypeError for
    anything else and for lists holding None.
    """
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
        # numpy arrays and scalars: float32 arrays -> embedding (float_list), others by element type.
        if str(v.dtype) == "float32" and getattr(v, "ndim", 0) == 1:
            out.float_list_val.val.extend(v.tolist())
        else:
            return to_value(v.tolist())
    else:
        raise TypeError(f"unsupported value type {type(v).__name__}")
    return out


def float32_list(values: Iterable[float]) -> pb.Value:
    """An embedding value (float32 list) from any iterable of numbers."""
    out = pb.Value()
    out.float_list_val.val.extend(float(x) for x in values)
    return out


def from_value(v: pb.Value) -> Any:
    """A quiver.v1.Value as a plain Python value (timestamps as aware UTC datetimes, lists as lists)."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_val":
        return None
    if kind == "timestamp_val":
        return v.timestamp_val.ToDatetime(tzinfo=_dt.timezone.utc)
    x = getattr(v, kind)
    if kind.endswith("_list_val"):
        return list(x.val)
    return x


_WIDENED = {
    frozenset({"int64_val", "double_val"}): "double_val",
    frozenset({"int64_list_val", "double_list_val"}): "double_list_val",
}


def _column_kind(kinds: Iterable[Optional[str]]) -> Optional[str]:
    """The one Value oneof kind of a column's non-null values: None when all are null, int64 and
    double widened to double (echoed entity and request columns hold what the caller sent, e.g.
    [100, 32.75]), "" when the kinds do not agree otherwise."""
    seen = frozenset(k for k in kinds if k not in (None, "null_val"))
    if len(seen) <= 1:
        return next(iter(seen), None)
    return _WIDENED.get(seen, "")


def _widened(values: List[Any], kind: Optional[str]) -> List[Any]:
    """A column's values with ints as floats where its kind is double (pyarrow refuses ints that a
    double cannot hold exactly; the column is double all the same)."""
    if kind == "double_val":
        return [None if x is None else float(x) for x in values]
    if kind == "double_list_val":
        return [None if x is None else [float(y) for y in x] for x in values]
    return values


def _arrow_type(kind: Optional[str]) -> "Optional[pyarrow.DataType]":
    """The Arrow type of a column whose values are of Value oneof `kind` (None: all null; "": mixed,
    for pyarrow to infer)."""
    import pyarrow as pa

    if kind == "":
        return None

    scalars = {
        "int64": pa.int64(), "double": pa.float64(), "float": pa.float32(), "string": pa.string(),
        "bool": pa.bool_(), "bytes": pa.binary(), "timestamp": pa.timestamp("us", tz="UTC"),
    }
    if kind is None:
        return pa.null()
    base = kind[: -len("_list_val")] if kind.endswith("_list_val") else kind[: -len("_val")]
    return pa.list_(scalars[base]) if kind.endswith("_list_val") else scalars[base]


class OnlineResponse(Mapping[str, List[Any]]):
    """The answer of GetOnlineFeatures: a read-only mapping of column name to one value per entity
    row (join-key columns first, then the features in request order), with each value's status and
    event time beside it, and conversions to rows, pandas, pyarrow and polars.

    - `statuses[name]`: PRESENT, NULL_VALUE, NOT_FOUND or OUTSIDE_MAX_AGE per row;
    - `event_timestamps[name]`: the event time (aware UTC datetime) of each value, None for
      join-key columns and for values not found (any instant, 1970-01-01T00:00:00Z included, is a
      real event time).
    """

    def __init__(self, resp: pb.GetOnlineFeaturesResponse, join_keys: int):
        names = list(resp.metadata.feature_names.val)
        self.entity_columns: List[str] = names[:join_keys]
        """The request's entity columns (join keys and request data), echoed first."""
        not_found = pb.NOT_FOUND
        self._values: Dict[str, List[Any]] = {}
        self.statuses: Dict[str, List[str]] = {}
        self.event_timestamps: Dict[str, List[Optional[_dt.datetime]]] = {}
        self._kinds: Dict[str, Optional[str]] = {}
        for col, (name, vec) in enumerate(zip(names, resp.results)):
            self._values[name] = [from_value(v) for v in vec.values]
            self._kinds[name] = _column_kind(v.WhichOneof("kind") for v in vec.values)
            self.statuses[name] = [STATUS_NAMES.get(s, str(s)) for s in vec.statuses]
            self.event_timestamps[name] = [
                None if col < join_keys or status == not_found else ts.ToDatetime(tzinfo=_dt.timezone.utc)
                for ts, status in zip(vec.event_timestamps, vec.statuses)
            ]

    def __getitem__(self, name: str) -> List[Any]:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"OnlineResponse({self._values!r})"

    def to_dict(self, with_status: bool = False) -> Dict[str, List[Any]]:
        """Columns as a dict; with_status=True gives (value, status, event time) per value."""
        if not with_status:
            return {k: list(v) for k, v in self._values.items()}
        return {
            k: list(zip(v, self.statuses[k], self.event_timestamps[k])) for k, v in self._values.items()
        }

    def to_rows(self) -> List[Dict[str, Any]]:
        """One dict per entity row, in request order."""
        n = len(next(iter(self._values.values()), []))
        return [{k: v[i] for k, v in self._values.items()} for i in range(n)]

    def to_arrow(self) -> "pyarrow.Table":
        """A pyarrow Table, one column per name, typed by the values' wire types: int64, double,
        string, bool, binary, timestamp[us, tz=UTC], and lists of them, embeddings (float lists)
        as list<float32>; an echoed entity or request column of ints and floats as double. A column
        with no value but nulls has Arrow's null type. Needs pyarrow."""
        import pyarrow as pa

        return pa.table({k: pa.array(_widened(v, self._kinds[k]), type=_arrow_type(self._kinds[k]))
                         for k, v in self._values.items()})

    def to_df(self) -> "pandas.DataFrame":
        """A pandas DataFrame, one row per entity row. Needs pandas and pyarrow."""
        import pandas as pd

        df: pd.DataFrame = self.to_arrow().to_pandas()
        return df

    def to_polars(self) -> "polars.DataFrame":
        """A polars DataFrame, one row per entity row. Needs polars and pyarrow."""
        import polars as pl

        df = pl.from_arrow(self.to_arrow())
        assert isinstance(df, pl.DataFrame)  # a Table gives a DataFrame (a single Array a Series)
        return df


def check_selection(features: Optional[Sequence[str]], feature_service: Optional[str]) -> None:
    if (features is None) == (feature_service is None):
        raise ValueError("pass exactly one of features= or feature_service=")
    if isinstance(features, str):
        raise TypeError("features= takes a list of 'view:feature' names, not one string")


def online_request(
    entities: Mapping[str, Sequence[Any]],
    features: Optional[Sequence[str]],
    feature_service: Optional[str],
    full_feature_names: bool,
) -> pb.GetOnlineFeaturesRequest:
    check_selection(features, feature_service)
    req = pb.GetOnlineFeaturesRequest(full_feature_names=full_feature_names)
    if feature_service is not None:
        req.feature_service = feature_service
    else:
        assert features is not None
        req.features.val.extend(features)
    for key, ids in entities.items():
        req.entities[key].val.extend(to_value(i) for i in ids)
    return req


def write_request(feature_view: str, rows: Sequence[Mapping[str, Any]]) -> pb.WriteFeaturesRequest:
    req = pb.WriteFeaturesRequest(feature_view=feature_view)
    for r in rows:
        row = req.rows.add()
        for k, v in r["entity_key"].items():
            row.entity_key[k].CopyFrom(to_value(v))
        _set_timestamp(row.event_timestamp, r["event_timestamp"])
        for k, v in r.get("features", {}).items():
            row.features[k].CopyFrom(v if isinstance(v, pb.Value) else to_value(v))
    return req


def write_result(resp: pb.WriteFeaturesResponse) -> Dict[str, int]:
    return {"written": resp.written, "stale": resp.stale, "expired": resp.expired}


def push_request(events: Sequence[Mapping[str, Any]]) -> pb.PushEventsRequest:
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
    return req


def push_result(resp: pb.PushEventsResponse) -> Dict[str, Any]:
    return {
        "accepted": resp.accepted,
        "rejected": [{"index": r.index, "event_id": r.event_id, "reason": r.reason} for r in resp.rejected],
    }


def historical_request(
    entity_df: Any,
    features: Optional[Sequence[str]],
    feature_service: Optional[str],
    full_feature_names: bool,
) -> pb.GetHistoricalFeaturesRequest:
    """The request carrying `entity_df` (pandas DataFrame, pyarrow Table or RecordBatch, or polars
    DataFrame or LazyFrame) as one Arrow IPC stream."""
    import pyarrow as pa

    check_selection(features, feature_service)
    if isinstance(entity_df, pa.Table):
        table = entity_df
    elif isinstance(entity_df, pa.RecordBatch):
        table = pa.Table.from_batches([entity_df])
    elif type(entity_df).__module__.split(".")[0] == "polars":
        import polars as pl

        frame = entity_df.collect() if isinstance(entity_df, pl.LazyFrame) else entity_df
        table = frame.to_arrow()
    else:
        table = pa.Table.from_pandas(entity_df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    req = pb.GetHistoricalFeaturesRequest(
        entities_arrow=sink.getvalue().to_pybytes(), full_feature_names=full_feature_names
    )
    if feature_service is not None:
        req.feature_service = feature_service
    else:
        assert features is not None
        req.features.val.extend(features)
    return req


def arrow_table(batches: Sequence[pb.ArrowBatch]) -> "pyarrow.Table":
    """The training set of a GetHistoricalFeatures stream."""
    import pyarrow as pa

    return pa.concat_tables([pa.ipc.open_stream(m.arrow_ipc).read_all() for m in batches])


def _duration(seconds: float) -> str:
    """Seconds as a protobuf JSON Duration ("0.3s"): at most 9 fractional digits, no exponent, as
    gRPC's service-config parser requires; below a nanosecond is refused."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    if float(text) <= 0:
        raise ValueError(f"backoff {seconds!r} s is below a nanosecond")
    return text + "s"


def retry_service_config(max_attempts: int, initial_backoff: float, max_backoff: float) -> str:
    """gRPC service config (https://github.com/grpc/grpc/blob/master/doc/service_config.md) that
    retries every FeatureService call that fails with UNAVAILABLE (the server could not be reached,
    is shutting down, or its online store or Kafka is unreachable), with exponential backoff and
    jitter done by grpc itself (https://github.com/grpc/proposal/blob/master/A6-client-retries.md).

    A retried call may have been processed once already (a connection lost after the server got
    it). Every FeatureService call is safe to repeat: reads change nothing, WriteFeatures is
    last-write-wins by event time (a repeat writes the same row), and a repeated PushEvents counts
    each `event_id` once in windowed aggregations, online and offline; only the raw event archive
    keeps both copies (docs/streaming.md). `max_attempts` is 1 to 5: gRPC allows at most 5."""
    import json

    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be 1 to 5 (gRPC allows at most 5 attempts), not {max_attempts}")
    if max_attempts > 1 and not 0 < initial_backoff <= max_backoff:
        raise ValueError("backoffs must satisfy 0 < initial_backoff <= max_backoff (seconds)")
    config: Dict[str, Any] = {"methodConfig": [{"name": [{"service": "quiver.v1.FeatureService"}]}]}
    if max_attempts > 1:
        config["methodConfig"][0]["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": _duration(initial_backoff),
            "maxBackoff": _duration(max_backoff),
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps(config)


def channel_options(max_attempts: int, initial_backoff: float, max_backoff: float) -> List[Tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.service_config", retry_service_config(max_attempts, initial_backoff, max_backoff)),
        # Training sets stream as Arrow batches; let one batch be large.
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ]


def auth_metadata(api_key: Optional[str]) -> Optional[Tuple[Tuple[str, str], ...]]:
    import os

    key = api_key if api_key is not None else os.environ.get("QUIVER_API_KEY")
    return (("authorization", f"Bearer {key}"),) if key else None


def open_channel(
    api: Any,
    target: str,
    tls: bool,
    root_certificates: Optional[bytes],
    certificate_chain: Optional[bytes],
    private_key: Optional[bytes],
    max_attempts: int,
    initial_backoff: float,
    max_backoff: float,
    options: Sequence[Tuple[str, Any]],
) -> Any:
    """A channel of `api` (the grpc module, or grpc.aio) to `target` with quiver's options (see
    QuiverClient): TLS when any TLS setting is given, else plain text."""
    opts = channel_options(max_attempts, initial_backoff, max_backoff) + list(options)
    if tls or root_certificates or certificate_chain or private_key:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
        return api.secure_channel(target, creds, options=opts)
    return api.insecure_channel(target, options=opts)
