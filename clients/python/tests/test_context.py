"""Features as LLM prompt context: exact text for a response built by hand (units, freshness,
unknown and stale values, lists, embeddings left out), and the live server's registry units."""

from __future__ import annotations

import datetime as dt

import pytest

from quiver_client import OnlineResponse, QuiverClient
from quiver_client.context import feature_metadata, prompt_context
from quiver_client.v1 import feature_service_pb2 as pb

NOW = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.timezone.utc)


def _response() -> OnlineResponse:
    resp = pb.GetOnlineFeaturesResponse()
    names = ["user_id", "total_spend_30d", "last_login", "sessions_7d", "favorite_categories",
             "avg_order_value_30d", "embedding", "country", "is_premium", "hours_since_login",
             "amount_vs_avg_order_7d"]
    resp.metadata.feature_names.val.extend(names)

    def col(values, statuses, times):
        vec = resp.results.add()
        for v, s, t in zip(values, statuses, times):
            vec.values.append(v)
            vec.statuses.append(s)
            ts = vec.event_timestamps.add()
            if t is not None:
                ts.FromDatetime(t)

    def val(**kw):
        v = pb.Value(**{k: x for k, x in kw.items() if k not in ("string_list", "float_list")})
        if "string_list" in kw:
            v.string_list_val.val.extend(kw["string_list"])
        if "float_list" in kw:
            v.float_list_val.val.extend(kw["float_list"])
        return v

    h = dt.timedelta(hours=1)
    col([val(string_val="user_123")], [pb.PRESENT], [None])
    col([val(double_val=129.5)], [pb.PRESENT], [NOW - 2 * h])
    col([val(timestamp_val=None)], [pb.PRESENT], [NOW - 12 * h])
    resp.results[-1].values[0].timestamp_val.FromDatetime(NOW - 12 * h)
    col([val(int64_val=4)], [pb.OUTSIDE_MAX_AGE], [NOW - 72 * h])
    col([val(string_list=["books", "toys", "garden", "music", "tools", "games", "food"])], [pb.PRESENT],
        [NOW - dt.timedelta(minutes=5)])
    col([val(null_val=pb.NULL)], [pb.NOT_FOUND], [None])
    col([val(float_list=[0.25] * 64)], [pb.PRESENT], [NOW - h])
    col([val(null_val=pb.NULL)], [pb.NULL_VALUE], [NOW - h])
    col([val(bool_val=True)], [pb.PRESENT], [NOW - dt.timedelta(seconds=40)])
    # Request-time features carry the request's time.
    col([val(double_val=14.5)], [pb.PRESENT], [NOW])
    col([val(null_val=pb.NULL)], [pb.NULL_VALUE], [NOW])
    return OnlineResponse(resp, join_keys=1)


def _registry() -> pb.GetRegistryResponse:
    reg = pb.GetRegistryResponse()
    v = reg.feature_views.add(name="user_activity")
    v.features.add(name="total_spend_30d", unit="USD", description="Spend over 30 days")
    v.features.add(name="sessions_7d", unit="sessions")
    od = reg.feature_views.add(name="user_context", source="on_demand")
    od.features.add(name="hours_since_login", unit="hours")
    od.features.add(name="amount_vs_avg_order_7d")
    return reg


def test_text_has_values_units_and_freshness():
    text = prompt_context(_response(), _registry(), now=NOW)
    assert text == "\n".join([
        "user_id=user_123, as of 2026-12-01T10:00:00Z:",
        "- total_spend_30d: 129.5 USD (2 h old)",
        "- last_login: 2026-11-30T22:00:00Z (12 h old)",
        "- sessions_7d: 4 sessions (stale: 3 d old, past its TTL)",
        "- favorite_categories: [books, toys, garden, music, tools, ... (7 in all)] (5 min old)",
        "- avg_order_value_30d: unknown (no value stored)",
        "- country: unknown (stored as null)",
        "- is_premium: yes (40 s old)",
        "- hours_since_login: 14.5 hours (computed at request time)",
        "- amount_vs_avg_order_7d: unknown (not computable: an input is missing)",
    ])
    # Without a registry there are no units; skipped columns are left out.
    text = prompt_context(_response(), now=NOW, skip=["favorite_categories"])
    assert "- total_spend_30d: 129.5 (2 h old)" in text and "favorite" not in text
    assert "- hours_since_login: 14.5 (0 s old)" in text
    with pytest.raises(IndexError):
        prompt_context(_response(), row=1, now=NOW)


def test_metadata_names_features_both_ways():
    meta = feature_metadata(_registry())
    assert meta["user_activity__total_spend_30d"]["unit"] == "USD"
    assert meta["total_spend_30d"]["description"] == "Spend over 30 days"
    assert meta["user_context__hours_since_login"]["source"] == "on_demand"
    assert meta["hours_since_login"]["source"] == "on_demand"


def test_live_context_uses_the_registry_units(server):
    with QuiverClient(server["grpc"]) as q:
        feats = q.get_online_features({"user_id": ["user_123"]}, feature_service="user_service")
        text = prompt_context(feats, q.registry())
    lines = text.splitlines()
    assert lines[0].startswith("user_id=user_123, as of ")
    age = next(line for line in lines if line.startswith("- age: "))
    assert age.endswith(" old)") and " years (" in age, age
    assert any(line.startswith("- total_spend_30d: ") and " USD (" in line for line in lines), text
