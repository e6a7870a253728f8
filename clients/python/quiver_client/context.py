"""Features as LLM context: an entity's feature values turned into compact prompt text, with units
(from the registry) and freshness (from each value's event time), so that a language model can use
them and tell fresh facts from stale ones. Pure formatting: no model is called."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Dict, List, Optional, Sequence

from quiver_client._convert import OnlineResponse
from quiver_client.v1 import feature_service_pb2 as pb

__all__ = ["feature_metadata", "prompt_context"]


def feature_metadata(registry: pb.GetRegistryResponse) -> Dict[str, Dict[str, str]]:
    """{name: {"unit", "description", "source"}} for every feature of the registry, under both its
    `view__feature` name and its bare name (the bare name only when one view has it). `source` is
    the view's (FeatureViewSpec.source): "on_demand" for features computed at request time."""
    out: Dict[str, Dict[str, str]] = {}
    bare: Dict[str, List[Dict[str, str]]] = {}
    for v in registry.feature_views:
        for f in v.features:
            meta = {"unit": f.unit, "description": f.description, "source": v.source}
            out[f"{v.name}__{f.name}"] = meta
            bare.setdefault(f.name, []).append(meta)
    for name, metas in bare.items():
        if len(metas) == 1 and name not in out:
            out[name] = metas[0]
    return out


def _age(seconds: float) -> str:
    """A duration as the largest whole unit: 45 s, 12 min, 3 h, 2 d."""
    s = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{int(s // size)} {unit}"
    return f"{int(s)} s"


def _number(x: float) -> str:
    """Compact but faithful: integers as written, other numbers to 4 significant digits."""
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _value(v: Any, max_items: int) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return _number(float(v))
    if isinstance(v, _dt.datetime):
        return v.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, list):
        shown = ", ".join(_value(x, max_items) for x in v[:max_items])
        more = f", ... ({len(v)} in all)" if len(v) > max_items else ""
        return f"[{shown}{more}]"
    return str(v)


def prompt_context(
    features: OnlineResponse,
    registry: Optional[pb.GetRegistryResponse] = None,
    *,
    row: int = 0,
    now: Optional[_dt.datetime] = None,
    skip: Sequence[str] = (),
    max_items: int = 5,
    max_list_length: int = 32,
) -> str:
    """The features of entity row `row` of `features` as prompt text, one line per feature:

        user_id=user_123, as of 2026-12-01T10:00:00Z:
        - total_spend_30d: 129.5 EUR (2 h old)
        - last_login: 2026-11-30T22:00:00Z (12 h old)
        - avg_order_value_30d: unknown (no value stored)
        - sessions_7d: 4 (stale: 3 d old, past its TTL)
        - hours_since_login: 14.5 hours (computed at request time)

    Units and descriptions come from `registry` (GetRegistry; FeatureSpec.unit) when given.
    Freshness is each value's age at `now` (default: the current time). Values not found or
    written as null read "unknown" with the reason; values past their view's TTL are marked stale.
    Features of on-demand views (known from `registry`) are marked as computed at request time
    rather than given an age (the server stamps them with the request's time), and a null one
    reads "unknown (not computable: an input is missing)".
    Lists show their first `max_items` items; numeric lists longer than `max_list_length`
    (embeddings) are left out, as text would waste the context on them. Columns in `skip` are not
    listed; the entity columns (join keys, request data) head the text. Raises IndexError for a
    row the response lacks.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    meta = feature_metadata(registry) if registry is not None else {}
    names = list(features)
    n_rows = len(features[names[0]]) if names else 0
    if not 0 <= row < n_rows:
        raise IndexError(f"row {row} of a response with {n_rows} rows")
    lead = features.entity_columns
    head = ", ".join(f"{k}={_value(features[k][row], max_items)}" for k in lead)
    stamp = _value(now, max_items)
    lines = [f"{head}, as of {stamp}:" if head else f"as of {stamp}:"]
    for name in names:
        if name in lead or name in skip:
            continue
        value = features[name][row]
        status = features.statuses[name][row]
        ts = features.event_timestamps[name][row]
        if isinstance(value, list) and len(value) > max_list_length and all(
            isinstance(x, (int, float)) for x in value
        ):
            continue
        if status == "NOT_FOUND":
            lines.append(f"- {name}: unknown (no value stored)")
            continue
        computed = meta.get(name, {}).get("source") == "on_demand"
        if value is None:
            reason = "not computable: an input is missing" if computed else "stored as null"
            lines.append(f"- {name}: unknown ({reason})")
            continue
        unit = meta.get(name, {}).get("unit", "")
        text = _value(value, max_items) + (f" {unit}" if unit else "")
        notes = []
        if computed:
            notes.append("computed at request time")
        elif ts is not None:
            age = _age((now - ts).total_seconds())
            notes.append(f"stale: {age} old, past its TTL" if status == "OUTSIDE_MAX_AGE" else f"{age} old")
        lines.append(f"- {name}: {text}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)
