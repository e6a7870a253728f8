"""The asyncio client against the live server, and the result conversions (dict, rows, pandas,
pyarrow, polars) agreeing with each other."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest

from quiver_client import AsyncQuiverClient, OnlineResponse, QuiverClient, QuiverError


def test_async_client_does_what_the_sync_one_does(server):
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    async def main() -> None:
        async with AsyncQuiverClient(server["grpc"]) as q:
            reg = await q.registry()
            assert "user_service" in [s.name for s in reg.feature_services]
            out = await q.write_features(
                "user_activity",
                [{"entity_key": {"user_id": "aio_user"}, "event_timestamp": now,
                  "features": {"sessions_7d": 9, "favorite_categories": ["garden"]}}],
            )
            assert out == {"written": 1, "stale": 0, "expired": 0}
            # Many calls in flight on one channel.
            answers = await asyncio.gather(
                *[q.get_online_features({"user_id": ["aio_user", f"user_{i}"]},
                                        features=["user_activity:sessions_7d", "user_profile:age"])
                  for i in range(20)]
            )
            for resp in answers:
                assert isinstance(resp, OnlineResponse)
                assert resp["sessions_7d"][0] == 9
                assert resp.statuses["sessions_7d"][0] == "PRESENT"
                assert resp.event_timestamps["sessions_7d"][0] == now
            rows = await q.get_online_features_rows({"user_id": ["aio_user"]}, features=["user_activity:favorite_categories"])
            assert rows == [{"user_id": "aio_user", "favorite_categories": ["garden"]}]
            pushed = await q.push_events([
                {"event_id": "aio-1", "event_type": "page_view", "event_time": now,
                 "entities": {"user_id": "aio_user", "product_id": "product_1"},
                 "attributes": {"session_id": "s", "category": "books"}},
                {"event_id": "aio-2", "event_type": "no_such_type", "event_time": now, "entities": {}},
            ])
            assert pushed["accepted"] == 1
            assert [r["index"] for r in pushed["rejected"]] == [1]
            with pytest.raises(QuiverError) as e:
                await q.get_online_features({"user_id": [7]}, features=["user_profile:age"])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(QuiverError) as e:
                await q.get_online_features({"user_id": ["u"]}, feature_service="no_such_service")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            import pyarrow as pa

            entity = pa.table({"user_id": ["aio_user"], "event_timestamp": pa.array([now], pa.timestamp("us", "UTC"))})
            table = await q.get_historical_features_arrow(entity, features=["user_last_login:device"])
            assert table.column_names == ["user_id", "event_timestamp", "device"]
            df = await q.get_historical_features(entity, features=["user_last_login:device"])
            assert df["user_id"].tolist() == ["aio_user"]

    asyncio.run(main())


def test_results_convert_to_rows_pandas_arrow_and_polars(server):
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    with QuiverClient(server["grpc"]) as q:
        resp = q.get_online_features({"user_id": ["user_1", "user_2", "nobody"]}, feature_service="user_service")
    cols = resp.to_dict()
    assert dict(resp) == cols and len(resp) == len(cols)
    n = 3
    rows = resp.to_rows()
    assert len(rows) == n and rows[2]["user_id"] == "nobody"
    assert all(rows[i][k] == cols[k][i] for i in range(n) for k in cols)

    table = resp.to_arrow()
    assert isinstance(table, pa.Table) and table.column_names == list(cols)
    assert table.to_pydict() == cols

    df = resp.to_df()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == list(cols) and len(df) == n
    assert df["user_id"].tolist() == cols["user_id"]
    assert pd.isna(df["age"].iloc[2]) and df["age"].iloc[0] == cols["age"][0]

    pdf = resp.to_polars()
    assert isinstance(pdf, pl.DataFrame) and pdf.columns == list(cols)
    assert pdf["age"].to_list() == cols["age"]

    # Timestamps stay instants in UTC through every form.
    last_login = cols["last_login"][0]
    assert last_login.tzinfo is not None
    assert df["last_login"].iloc[0].to_pydatetime() == last_login
    assert str(df["last_login"].dt.tz) == "UTC"


def test_selection_mistakes_are_caught_before_sending(server):
    with QuiverClient(server["grpc"]) as q:
        with pytest.raises(ValueError, match="exactly one"):
            q.get_online_features({"user_id": ["u"]})
        with pytest.raises(ValueError, match="exactly one"):
            q.get_online_features({"user_id": ["u"]}, features=["user_profile:age"], feature_service="user_service")
        with pytest.raises(TypeError, match="not one string"):
            q.get_online_features({"user_id": ["u"]}, features="user_profile:age")


def test_arrow_columns_take_the_wire_types():
    """Typed by the values' kinds, not guessed from Python values: ints and floats in one echoed
    column make a double column (an int no double holds exactly included), float lists float32."""
    import pyarrow as pa

    from quiver_client import OnlineResponse
    from quiver_client.v1 import feature_service_pb2 as pb

    resp = pb.GetOnlineFeaturesResponse()
    resp.metadata.feature_names.val.extend(["amount", "embedding", "nothing"])
    columns = [
        [pb.Value(int64_val=2**53 + 1), pb.Value(double_val=0.5)],
        [pb.Value(float_list_val=pb.FloatList(val=[0.25, 0.5])), pb.Value(null_val=pb.NULL)],
        [pb.Value(null_val=pb.NULL), pb.Value(null_val=pb.NULL)],
    ]
    for values in columns:
        vec = resp.results.add()
        vec.values.extend(values)
        vec.statuses.extend([pb.PRESENT, pb.PRESENT])
        vec.event_timestamps.add()
        vec.event_timestamps.add()
    table = OnlineResponse(resp, join_keys=1).to_arrow()
    assert table.schema.types == [pa.float64(), pa.list_(pa.float32()), pa.null()]
    assert table["amount"].to_pylist() == [float(2**53 + 1), 0.5]
    assert table["embedding"].to_pylist() == [[0.25, 0.5], None]
