"""Python client of the quiver feature store.

Usage::

    from quiver_client import QuiverClient
    with QuiverClient("localhost:50051") as q:
        cols = q.get_online_features({"user_id": ["user_1"]}, feature_service="user_service")
        rows = q.get_online_features_rows({"user_id": ["user_1"]}, features=["user_profile:age"])

Stubs are generated from proto/ by `python -m quiver_client.generate`.
"""

from __future__ import annotations

import pathlib
import sys

_GEN = pathlib.Path(__file__).resolve().parent / "_gen"
if str(_GEN) not in sys.path:
    # The generated modules import each other as `quiver.v1...`.
    sys.path.insert(0, str(_GEN))

__all__ = ["QuiverClient", "QuiverError", "float32_list", "from_value", "to_value"]


def __getattr__(name: str):
    # Imported lazily so `python -m quiver_client.generate` works before the stubs exist.
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
