"""Server reflection as Python tools use it: grpcio-reflection's ProtoReflectionDescriptorDatabase
(which speaks grpc.reflection.v1alpha) discovers every service of a live quiver, and each method is
called with messages built from the reflected descriptors alone, without the .proto."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def _caller(channel, pool, full_method: str, streaming: bool):
    service, method = full_method.rsplit("/", 1)
    m = pool.FindServiceByName(service).FindMethodByName(method)
    request_cls = message_factory.GetMessageClass(m.input_type)
    response_cls = message_factory.GetMessageClass(m.output_type)
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString)
    return request_cls, call


def test_every_service_is_discoverable_and_callable_without_the_proto(server):
    with grpc.insecure_channel(server["grpc"]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"quiver.v1.FeatureService", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        fs = pool.FindServiceByName("quiver.v1.FeatureService")
        assert {m.name for m in fs.methods} == {
            "GetOnlineFeatures", "WriteFeatures", "GetRegistry", "PushEvents", "GetHistoricalFeatures"
        }

        req_cls, call = _caller(channel, pool, "grpc.health.v1.Health/Check", False)
        assert call(req_cls(service="quiver.v1.FeatureService"), timeout=5).status == 1  # SERVING

        req_cls, call = _caller(channel, pool, "quiver.v1.FeatureService/GetRegistry", False)
        reg = call(req_cls(), timeout=5)
        assert "user_service" in [s.name for s in reg.feature_services]

        req_cls, call = _caller(channel, pool, "quiver.v1.FeatureService/GetOnlineFeatures", False)
        req = req_cls(feature_service="user_service")
        req.entities["user_id"].val.add().string_val = "user_123"
        resp = call(req, timeout=5)
        assert list(resp.metadata.feature_names.val)[0] == "user_id"
        assert resp.results[0].values[0].string_val == "user_123"

        req_cls, call = _caller(channel, pool, "quiver.v1.FeatureService/WriteFeatures", False)
        req = req_cls(feature_view="user_profile")
        row = req.rows.add()
        row.entity_key["user_id"].string_val = "reflected_user"
        row.event_timestamp.GetCurrentTime()
        row.features["age"].int64_val = 33
        assert call(req, timeout=5).written == 1

        req_cls, call = _caller(channel, pool, "quiver.v1.FeatureService/PushEvents", False)
        req = req_cls()
        ev = req.events.add(event_id="reflected-1", event_type="login")
        ev.event_time.GetCurrentTime()
        ev.entities["user_id"].string_val = "reflected_user"
        ev.attributes["device"].string_val = "web"
        ev.attributes["country"].string_val = "DE"
        assert call(req, timeout=5).accepted == 1

        # The streamed method is reachable too: an empty entity table is refused with a reason.
        req_cls, call = _caller(channel, pool, "quiver.v1.FeatureService/GetHistoricalFeatures", True)
        try:
            list(call(req_cls(feature_service="user_service"), timeout=30))
            raise AssertionError("an empty request was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e


def test_reflection_v1_and_v1alpha_answer_alike(server):
    from grpc_reflection.v1alpha import reflection_pb2 as v1alpha
    from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = v1alpha_grpc.ServerReflectionStub(channel)
        [resp] = list(stub.ServerReflectionInfo(iter([v1alpha.ServerReflectionRequest(list_services="")]), timeout=5))
        alpha = sorted(s.name for s in resp.list_services_response.service)
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=v1alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1alpha.ServerReflectionResponse.FromString,
        )
        # v1 and v1alpha share their message layout, so one set of classes reads both.
        [resp] = list(v1(iter([v1alpha.ServerReflectionRequest(list_services="")]), timeout=5))
        assert sorted(s.name for s in resp.list_services_response.service) == alpha
        assert "quiver.v1.FeatureService" in alpha
