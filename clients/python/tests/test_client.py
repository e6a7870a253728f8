"""The Python client against a live quiver server, through real grpcio stubs."""

from __future__ import annotations

import datetime as dt
import json
import math
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest

from conftest import start_quiver
from quiver_client import QuiverClient, QuiverError, float32_list


@pytest.fixture()
def client(server):
    with QuiverClient(server["grpc"]) as c:
        yield c


def test_registry_is_discoverable(client):
    reg = client.registry()
    assert {e.join_key for e in reg.entities} == {"user_id", "product_id"}
    assert "user_service" in [s.name for s in reg.feature_services]


def test_feature_service_for_demo_users(client):
    resp = client.get_online_features({"user_id": ["user_1", "user_123", "ghost"]}, feature_service="user_service")
    assert list(resp)[0] == "user_id"
    assert resp.statuses["age"] == ["PRESENT", "PRESENT", "NOT_FOUND"]
    assert resp.event_timestamps["user_id"] == [None, None, None]
    cols = resp.to_dict(with_status=True)
    age = cols["age"]
    assert [s for _, s, _ in age] == ["PRESENT", "PRESENT", "NOT_FOUND"]
    assert 18 <= age[0][0] < 78
    assert isinstance(age[0][2], dt.datetime)
    assert age[2] == (None, "NOT_FOUND", None)
    assert isinstance(cols["last_login"][1][0], dt.datetime)


def test_write_then_read_typed_values(client):
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    out = client.write_features(
        "user_activity",
        [
            {
                "entity_key": {"user_id": "py_user"},
                "event_timestamp": now,
                "features": {
                    "sessions_7d": 5,
                    "total_spend_30d": 99.5,
                    "last_login": now,
                    "favorite_categories": ["books", "toys"],
                    "avg_order_value_30d": None,
                },
            }
        ],
    )
    assert out == {"written": 1, "stale": 0, "expired": 0}
    emb = [i / 16 for i in range(16)]
    client.write_features(
        "user_embedding",
        [{"entity_key": {"user_id": "py_user"}, "event_timestamp": now, "features": {"embedding": float32_list(emb)}}],
    )
    rows = client.get_online_features_rows(
        {"user_id": ["py_user"]},
        features=[
            "user_activity:sessions_7d",
            "user_activity:total_spend_30d",
            "user_activity:last_login",
            "user_activity:favorite_categories",
            "user_activity:avg_order_value_30d",
            "user_embedding:embedding",
        ],
        full_feature_names=True,
    )
    r = rows[0]
    assert r["user_id"] == "py_user"
    assert r["user_activity__sessions_7d"] == 5
    assert r["user_activity__total_spend_30d"] == 99.5
    assert r["user_activity__last_login"] == now
    assert r["user_activity__favorite_categories"] == ["books", "toys"]
    assert r["user_activity__avg_order_value_30d"] is None
    assert r["user_embedding__embedding"] == pytest.approx(emb)
    # Arrow columns take the values' wire types: embeddings stay float32, nulls keep an int column int.
    import pyarrow as pa

    cols = client.get_online_features(
        {"user_id": ["py_user", "nobody"]},
        features=["user_activity:sessions_7d", "user_activity:last_login", "user_activity:favorite_categories",
                  "user_embedding:embedding", "user_activity:avg_order_value_30d"],
    )
    schema = cols.to_arrow().schema
    assert [schema.field(n).type for n in schema.names] == [
        pa.string(), pa.int64(), pa.timestamp("us", tz="UTC"), pa.list_(pa.string()), pa.list_(pa.float32()), pa.null(),
    ]
    assert cols.to_arrow()["embedding"].to_pylist()[0] == emb
    # An older write does not replace the newer row.
    stale = client.write_features(
        "user_activity",
        [{"entity_key": {"user_id": "py_user"}, "event_timestamp": now - dt.timedelta(hours=1), "features": {"sessions_7d": 1}}],
    )
    assert stale == {"written": 0, "stale": 1, "expired": 0}


def test_times_are_instants_and_values_come_back_exactly(client):
    """An aware datetime is the instant it names; a naive one is UTC (never local time); NaN and
    infinities come back as themselves."""
    base = dt.datetime.now(dt.timezone.utc).replace(microsecond=123456)
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    # The same instant three ways, then one microsecond later: the later row wins.
    for when in (base.astimezone(ist), base.replace(tzinfo=None), base):
        client.write_features(
            "user_activity",
            [{"entity_key": {"user_id": "py_tz"}, "event_timestamp": when, "features": {"last_login": when}}],
        )
    later = base + dt.timedelta(microseconds=1)
    assert client.write_features(
        "user_activity",
        [{"entity_key": {"user_id": "py_tz"}, "event_timestamp": later.astimezone(ist),
          "features": {"last_login": base.astimezone(ist), "total_spend_30d": float("nan"),
                       "avg_order_value_30d": float("-inf")}}],
    ) == {"written": 1, "stale": 0, "expired": 0}
    cols = client.get_online_features(
        {"user_id": ["py_tz"]},
        features=["user_activity:last_login", "user_activity:total_spend_30d", "user_activity:avg_order_value_30d"],
    ).to_dict(with_status=True)
    value, status, event_time = cols["last_login"][0]
    assert (value, status, event_time) == (base, "PRESENT", later)
    assert math.isnan(cols["total_spend_30d"][0][0])
    assert cols["avg_order_value_30d"][0][0] == float("-inf")
    # Join-key columns have no event time; found values have theirs (decided by the status, so
    # that an event at 1970-01-01T00:00:00Z would still be a time).
    assert cols["last_login"][0][2] is not None
    keyed = client.get_online_features({"user_id": ["py_tz"]}, features=["user_activity:last_login"]).to_dict(
        with_status=True
    )
    assert keyed["user_id"][0] == ("py_tz", "PRESENT", None)
    # An empty list is an empty list (of the declared type), not null.
    client.write_features(
        "user_activity",
        [{"entity_key": {"user_id": "py_empty"}, "event_timestamp": base, "features": {"favorite_categories": []}}],
    )
    cols = client.get_online_features({"user_id": ["py_empty"]}, features=["user_activity:favorite_categories"])
    assert cols["favorite_categories"] == [[]]
    # A list of ints and floats is a double list; a None element is refused before sending.
    from quiver_client import to_value
    assert list(to_value([1, 2.5]).double_list_val.val) == [1.0, 2.5]
    with pytest.raises(TypeError, match="null element at index 1"):
        to_value(["a", None])


def test_errors_carry_status_and_message(client):
    with pytest.raises(QuiverError) as e:
        client.get_online_features({"user_id": ["u"]}, features=["user_activity:nope"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "its features:" in e.value.message
    with pytest.raises(QuiverError) as e:
        client.get_online_features({"user_id": [42]}, features=["user_profile:age"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes string values" in e.value.message


def test_rest_gateway_serves_the_seed_curl(server):
    with urllib.request.urlopen(f"{server['http']}/api/v1/features/user/user_123") as r:
        body = json.load(r)
    assert body["id"] == "user_123"
    assert body["features"]["user_profile__age"]["status"] == "PRESENT"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server['http']}/api/v1/features/robot/r1")
    assert e.value.code == 404
    assert "known entities" in json.load(e.value)["error"]["message"]

def test_pushed_events_update_streaming_features(client):
    now = dt.datetime.now(dt.timezone.utc)
    views = [
        {
            "event_id": f"py-pv-{i}",
            "event_type": "page_view",
            "event_time": now,
            "entities": {"user_id": "py_stream_user", "product_id": f"product_{i}"},
            "attributes": {"session_id": "py", "category": "books", "dwell_seconds": 2.5},
        }
        for i in range(3)
    ]
    bad = {"event_id": "py-bad", "event_type": "page_view", "event_time": now,
           "entities": {"user_id": "py_stream_user"}, "attributes": {}}
    out = client.push_events(views + [bad])
    assert out["accepted"] == 3
    assert out["rejected"][0]["index"] == 3
    assert "missing join key" in out["rejected"][0]["reason"]
    deadline = time.time() + 20
    while True:
        cols = client.get_online_features(
            {"user_id": ["py_stream_user"]},
            features=["user_stream:page_views_1h", "user_stream:recent_products"],
        )
        if cols["page_views_1h"][0] == 3 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert cols["page_views_1h"] == [3]
    assert sorted(cols["recent_products"][0]) == ["product_0", "product_1", "product_2"]


def test_historical_features_as_pandas(client):
    import pandas as pd

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    user = "py_hist_user"
    events = [
        {"event_id": f"py-h-pv-{h}", "event_type": "page_view", "event_time": now - dt.timedelta(hours=h),
         "entities": {"user_id": user, "product_id": "product_7"},
         "attributes": {"session_id": "h", "category": "books"}}
        for h in (2, 1)
    ] + [
        {"event_id": "py-h-login", "event_type": "login", "event_time": now - dt.timedelta(minutes=100),
         "entities": {"user_id": user}, "attributes": {"device": "ios", "country": "NL"}},
    ]
    assert client.push_events(events)["accepted"] == 3
    entity_df = pd.DataFrame({
        "user_id": [user, user, user],
        "event_timestamp": pd.to_datetime([now - dt.timedelta(hours=3), now - dt.timedelta(minutes=90), now]),
        "label": [0, 1, 1],
    })
    features = ["user_stream:page_views_24h", "user_last_login:device"]
    deadline = time.time() + 30
    while True:  # the events reach the archive within a few seconds
        df = client.get_historical_features(entity_df, features=features, full_feature_names=True)
        if df["user_stream__page_views_24h"].iloc[2] == 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert list(df.columns) == ["user_id", "event_timestamp", "label",
                                "user_stream__page_views_24h", "user_last_login__device"]
    assert df["label"].tolist() == [0, 1, 1]
    # Nothing from after each row's time leaks in.
    assert pd.isna(df["user_stream__page_views_24h"].iloc[0])
    assert df["user_stream__page_views_24h"].iloc[1:].tolist() == [1, 2]
    assert pd.isna(df["user_last_login__device"].iloc[0])
    assert df["user_last_login__device"].iloc[1:].tolist() == ["ios", "ios"]
    assert str(df["event_timestamp"].dt.tz) == "UTC"

    with pytest.raises(QuiverError) as e:
        client.get_historical_features(entity_df[["user_id"]], features=features)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "event_timestamp" in e.value.message


def test_sigterm_shuts_down_gracefully(tmp_path):
    proc, grpc_addr, _ = start_quiver(
        ["demo", "--users", "20", "--products", "5", "--rate", "0",
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
         "--store-path", str(tmp_path / "online.redb"), "--archive", str(tmp_path / "offline")]
    )
    with QuiverClient(grpc_addr) as c:
        assert c.registry().feature_views
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_request_time_features_online_equal_offline(client):
    """checkout_context computed from request data and stored features: GetOnlineFeatures (request
    columns beside the entities) and historical retrieval (the same columns in the entity table,
    pandas and polars) give the same values; hours_since_login is as of each row's time."""
    import pandas as pd
    import polars as pl

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    user = "py_checkout_user"
    login_at = now - dt.timedelta(hours=5)
    events = [
        {"event_id": f"py-co-buy-{i}", "event_type": "purchase", "event_time": now - dt.timedelta(hours=h),
         "entities": {"user_id": user, "product_id": "product_3"},
         "attributes": {"session_id": "co", "quantity": 1, "price": amount, "amount": amount, "category": "books"}}
        for i, (h, amount) in enumerate([(3, 40.0), (2, 25.5)])
    ] + [
        {"event_id": "py-co-login", "event_type": "login", "event_time": login_at,
         "entities": {"user_id": user}, "attributes": {"device": "web", "country": "NL"}},
    ]
    assert client.push_events(events)["accepted"] == 3
    request = {
        "amount": [120.0, 0.0, 32.75],
        "ship_country": ["NL", "FR", "NL"],
        "lat": [52.37, 52.37, -33.87],
        "lon": [4.90, 4.90, 151.21],
        "ship_lat": [48.86, 52.37, 40.71],
        "ship_lon": [2.35, 4.90, -74.01],
    }
    features = ["checkout_context:*", "user_context:hours_since_login"]
    computed = ["amount_vs_avg_order_7d", "ships_abroad", "ship_distance_km"]
    deadline = time.time() + 30
    while True:  # ingest applies the events within a second or so
        online = client.get_online_features({"user_id": [user] * 3, **request}, features=features)
        if online["amount_vs_avg_order_7d"][0] is not None or time.time() > deadline:
            break
        time.sleep(0.2)
    assert online["amount_vs_avg_order_7d"] == [120.0 / 32.75, 0.0, 1.0]
    assert online["ships_abroad"] == [False, True, False]
    # Request columns come back as sent; ints and floats in one column make a double column.
    mixed = client.get_online_features({"user_id": [user] * 2, **{k: v[:2] for k, v in request.items()},
                                        "amount": [100, 32.75]}, features=features)
    assert mixed.to_arrow()["amount"].to_pylist() == [100.0, 32.75]

    assert mixed.to_df()["amount_vs_avg_order_7d"].tolist() == [100 / 32.75, 1.0]
    assert online["ship_distance_km"][1] == 0.0 and 400 < online["ship_distance_km"][0] < 450
    assert all(s == "PRESENT" for s in online.statuses["ship_distance_km"])

    at = now + dt.timedelta(seconds=1)
    entity = pd.DataFrame({"user_id": [user] * 3, "event_timestamp": [at] * 3, **request})
    deadline = time.time() + 30
    while True:  # the events reach the archive within a few seconds
        offline = client.get_historical_features(entity, features=features)
        if offline["amount_vs_avg_order_7d"].iloc[0] == online["amount_vs_avg_order_7d"][0] \
                or time.time() > deadline:
            break
        time.sleep(0.5)
    for name in computed:
        assert offline[name].tolist() == online[name], name
    assert offline["hours_since_login"].tolist() == [(at - login_at).total_seconds() / 3600] * 3
    # A polars entity table (eager or lazy) gives the same training set.
    for frame in (pl.from_pandas(entity), pl.from_pandas(entity).lazy()):
        from_polars = client.get_historical_features(frame, features=features)
        assert from_polars[computed + ["hours_since_login"]].equals(offline[computed + ["hours_since_login"]])
    # So does a pyarrow RecordBatch.
    import pyarrow as pa

    from_batch = client.get_historical_features(pa.RecordBatch.from_pandas(entity), features=features)
    assert from_batch[computed].equals(offline[computed])

    with pytest.raises(QuiverError) as e:
        client.get_online_features({"user_id": [user]}, features=features)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs request data" in e.value.message


def test_errors_pickle_and_retry_settings_are_checked():
    import pickle

    err = pickle.loads(pickle.dumps(QuiverError(grpc.StatusCode.NOT_FOUND, "no such view")))
    assert (err.code, err.message, str(err)) == (grpc.StatusCode.NOT_FOUND, "no such view", "NOT_FOUND: no such view")
    for bad in (0, 6):
        with pytest.raises(ValueError, match="max_attempts must be 1 to 5"):
            QuiverClient("127.0.0.1:1", max_attempts=bad)
