"""Python client of the quiver feature store.

Usage::

    from quiver_client import QuiverClient
    with QuiverClient("localhost:50051") as q:
        feats = q.get_online_features({"user_id": ["user_1"]}, feature_service="user_service")
        feats["age"], feats.statuses["age"], feats.to_df()

    from quiver_client import AsyncQuiverClient      # the same API for asyncio

The protobuf messages and gRPC stubs of quiver.v1 are `quiver_client.v1.feature_service_pb2` and
`quiver_client.v1.feature_service_pb2_grpc`, generated when the package is built.
"""

from quiver_client._convert import STATUS_NAMES, OnlineResponse, QuiverError, float32_list, from_value, to_value
from quiver_client.aio import AsyncQuiverClient
from quiver_client.client import QuiverClient

__all__ = [
    "AsyncQuiverClient",
    "OnlineResponse",
    "QuiverClient",
    "QuiverError",
    "STATUS_NAMES",
    "float32_list",
    "from_value",
    "to_value",
]
__version__ = "0.2.0"
