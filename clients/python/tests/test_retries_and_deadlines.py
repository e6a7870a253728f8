"""Deadlines and retries on UNAVAILABLE, sync and asyncio, against an in-process gRPC server of the
generated FeatureService servicer whose answers the test scripts (quiver itself cannot be made to
fail on cue); and a port nobody listens on."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent import futures
from typing import List

import grpc
import pytest

from quiver_client import AsyncQuiverClient, QuiverClient, QuiverError
from quiver_client.v1 import feature_service_pb2 as pb
from quiver_client.v1 import feature_service_pb2_grpc as pb_grpc


class Scripted(pb_grpc.FeatureServiceServicer):
    """GetRegistry fails with `failures` codes in turn, then answers; GetOnlineFeatures sleeps."""

    def __init__(self) -> None:
        self.failures: List[grpc.StatusCode] = []
        self.calls = 0
        self.lock = threading.Lock()

    def GetRegistry(self, request, context):
        with self.lock:
            self.calls += 1
            code = self.failures.pop(0) if self.failures else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        return pb.GetRegistryResponse(entities=[pb.EntitySpec(name="user", join_key="user_id")])

    def GetOnlineFeatures(self, request, context):
        time.sleep(2)
        return pb.GetOnlineFeaturesResponse()


@pytest.fixture()
def scripted():
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_unavailable_is_retried_then_answered(scripted):
    servicer, target = scripted
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 2
    with QuiverClient(target, max_attempts=4, initial_backoff=0.01) as q:
        assert q.registry().entities[0].join_key == "user_id"
    assert servicer.calls == 3


def test_retries_stop_at_max_attempts(scripted):
    servicer, target = scripted
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 5
    with QuiverClient(target, max_attempts=2, initial_backoff=0.01) as q:
        with pytest.raises(QuiverError) as e:
            q.registry()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert e.value.message == "scripted UNAVAILABLE"
    assert servicer.calls == 2
    servicer.calls, servicer.failures = 0, [grpc.StatusCode.UNAVAILABLE]
    with QuiverClient(target, max_attempts=1) as q:
        with pytest.raises(QuiverError):
            q.registry()
    assert servicer.calls == 1


def test_other_errors_are_not_retried(scripted):
    servicer, target = scripted
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL):
        servicer.calls, servicer.failures = 0, [code]
        with QuiverClient(target, initial_backoff=0.01) as q:
            with pytest.raises(QuiverError) as e:
                q.registry()
        assert e.value.code == code
        assert servicer.calls == 1


def test_async_client_retries_too(scripted):
    servicer, target = scripted
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 3

    async def main() -> None:
        async with AsyncQuiverClient(target, max_attempts=4, initial_backoff=0.01) as q:
            assert (await q.registry()).entities[0].name == "user"

    asyncio.run(main())
    assert servicer.calls == 4


def test_deadlines_sync_and_async(scripted):
    _, target = scripted
    with QuiverClient(target, timeout=0.2) as q:
        started = time.monotonic()
        with pytest.raises(QuiverError) as e:
            q.get_online_features({"user_id": ["u"]}, features=["v:f"])
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        # A per-call deadline overrides the client's.
        with pytest.raises(QuiverError) as e:
            q.get_online_features({"user_id": ["u"]}, features=["v:f"], timeout=0.05)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    async def main() -> None:
        async with AsyncQuiverClient(target, timeout=0.2) as q:
            with pytest.raises(QuiverError) as e:
                await q.get_online_features({"user_id": ["u"]}, features=["v:f"])
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(main())


def test_nobody_listening_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with QuiverClient(f"127.0.0.1:{port}", max_attempts=3, initial_backoff=0.01, timeout=5) as q:
        with pytest.raises(QuiverError) as e:
            q.registry()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
