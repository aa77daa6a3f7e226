"""API-key auth: hashing, bearer parsing, roles, and the interceptor on a real in-process
grpc.aio server (unary and streaming methods, health left open)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ffnskip.errors import InvalidArgument, PermissionDenied, Unauthenticated
from ffnskip.rpc.server import Server
from ffnskip.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from services.gateway.auth import API, OPS, AuthInterceptor, KeyRing, authorize, bearer_token, hash_key
from services.gateway.main import tls_credentials
from services.gateway.servicer import method_roles
from services.gateway.settings import ENV_VARS, GatewaySettings

API_KEY, OPS_KEY = "api-secret-1", "ops-secret-1"


def test_keys_are_held_as_sha256_digests_only():
    ring = KeyRing.from_strings(f" {API_KEY} , other ", OPS_KEY)
    assert ring.api == {hashlib.sha256(API_KEY.encode()).hexdigest(), hash_key("other")}
    assert API_KEY not in repr(ring) and API_KEY not in str(ring.api)


def test_prehashed_entries_are_accepted_and_checked():
    digest = hash_key(API_KEY)
    ring = KeyRing.from_strings(f"sha256:{digest.upper()}", "")
    assert ring.role_of(API_KEY) == API
    with pytest.raises(InvalidArgument, match="FFNSKIP_API_KEYS"):
        KeyRing.from_strings("sha256:abc", "")


@pytest.mark.parametrize("metadata, token", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("Authorization", "bearer   abc  "),), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("authorization", "Bearer "),), None),
    ((("x-other", "Bearer abc"),), None),
    ((), None),
])
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_roles():
    ring = KeyRing.from_strings(API_KEY, OPS_KEY)
    bearer = lambda key: (("authorization", f"Bearer {key}"),)  # noqa: E731
    assert authorize(ring, bearer(API_KEY), API) == API
    assert authorize(ring, bearer(OPS_KEY), API) == OPS  # an ops key may call the public API
    assert authorize(ring, bearer(OPS_KEY), OPS) == OPS
    with pytest.raises(PermissionDenied):
        authorize(ring, bearer(API_KEY), OPS)
    with pytest.raises(Unauthenticated, match="unknown"):
        authorize(ring, bearer("guess"), API)
    with pytest.raises(Unauthenticated, match="missing"):
        authorize(ring, (), API)


def test_settings_refuse_to_start_without_keys_unless_told():
    with pytest.raises(InvalidArgument, match="FFNSKIP_API_KEYS"):
        GatewaySettings.from_env({})
    assert GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "true"}).auth_disabled
    settings = GatewaySettings.from_env({"FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_OPS_KEYS": OPS_KEY})
    assert API_KEY not in repr(settings) and OPS_KEY not in repr(settings)  # safe to log


def test_settings_read_exactly_the_listed_variables():
    import re
    from pathlib import Path

    import services.gateway.settings as module
    from ffnskip.store.connection import REDIS_ENV_VARS

    read = set(re.findall(r'"(FFNSKIP_[A-Z_]+)"', Path(module.__file__).read_text()))
    assert read | set(REDIS_ENV_VARS) == set(ENV_VARS)  # RedisSettings.from_env reads the Redis ones
    assert {"FFNSKIP_REDIS_URL", "FFNSKIP_REDIS_PASSWORD", "FFNSKIP_REDIS_TLS", "FFNSKIP_REDIS_DB"} <= set(ENV_VARS)
    with pytest.raises(InvalidArgument, match="FFNSKIP_MAX_ATTEMPTS"):
        GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1", "FFNSKIP_MAX_ATTEMPTS": "zero"})
    with pytest.raises(InvalidArgument, match="FFNSKIP_TLS_CERT"):
        GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1", "FFNSKIP_TLS_CERT": "/x.pem"})


class Echo(gateway_pb2_grpc.GatewayServicer):
    async def Generate(self, request, context):
        return generation_pb2.GenerateResponse(text="ok")

    async def GenerateStream(self, request, context):
        yield generation_pb2.GenerateStreamResponse(token=generation_pb2.TokenChunk(index=1, text="ok"))

    async def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse()

    async def GetTelemetry(self, request, context):
        return gateway_pb2.GetTelemetryResponse(gateways=1)


def test_interceptor_on_a_real_server():
    refused: list[str] = []

    async def scenario() -> None:
        ring = KeyRing.from_strings(API_KEY, OPS_KEY)
        interceptor = AuthInterceptor(ring, method_roles(API, OPS), lambda method, exc: refused.append(method))
        server = Server(["ffnskip.v1.Gateway"], interceptors=[interceptor])
        gateway_pb2_grpc.add_GatewayServicer_to_server(Echo(), server.grpc)
        port = await server.start("127.0.0.1:0")
        await server.set_ready(True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await check(gateway_pb2_grpc.GatewayStub(channel), health_pb2_grpc.HealthStub(channel))
        finally:
            await server.grpc.stop(None)

    async def code_of(call) -> grpc.StatusCode:
        try:
            result = call()
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            assert API_KEY not in (err.details() or "") and OPS_KEY not in (err.details() or "")
            return err.code()

    async def check(stub, health) -> None:
        def md(key):
            return (("authorization", f"Bearer {key}"),)

        request = generation_pb2.GenerateRequest()
        assert await code_of(lambda: stub.Generate(request)) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(lambda: stub.GenerateStream(request, metadata=md("wrong"))) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(lambda: stub.Generate(request, metadata=md(API_KEY))) == grpc.StatusCode.OK
        assert await code_of(lambda: stub.GenerateStream(request, metadata=md(API_KEY))) == grpc.StatusCode.OK
        telemetry = gateway_pb2.GetTelemetryRequest()
        assert await code_of(lambda: stub.GetTelemetry(telemetry, metadata=md(API_KEY))) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(lambda: stub.GetTelemetry(telemetry, metadata=md(OPS_KEY))) == grpc.StatusCode.OK
        assert await code_of(lambda: stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=md(OPS_KEY))) == grpc.StatusCode.OK
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))  # probes need no key
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())
    assert len(refused) == 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_on_the_gateway_port(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    settings = GatewaySettings.from_env({"FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_TLS_CERT": str(cert),
                                         "FFNSKIP_TLS_KEY": str(key)})

    async def scenario() -> None:
        server = Server(["ffnskip.v1.Gateway"])
        gateway_pb2_grpc.add_GatewayServicer_to_server(Echo(), server.grpc)
        port = await server.start("127.0.0.1:0", tls_credentials(settings))
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                reply = await gateway_pb2_grpc.GatewayStub(channel).Generate(generation_pb2.GenerateRequest(), timeout=10)
                assert reply.text == "ok"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await gateway_pb2_grpc.GatewayStub(plain).Generate(generation_pb2.GenerateRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.grpc.stop(None)

    asyncio.run(scenario())
    with pytest.raises(InvalidArgument, match="cannot read"):
        tls_credentials(GatewaySettings.from_env({"FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_TLS_CERT": "/nope.pem",
                                                  "FFNSKIP_TLS_KEY": "/nope.key"}))
