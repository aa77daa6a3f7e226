"""The shared server builder on loopback: health names, readiness through a drain,
reflection, message-size limits, and in-flight RPCs finishing during a drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ffnskip.rpc.server import Server
from ffnskip.v1 import generation_pb2

pytestmark = pytest.mark.timeout(60)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _echo(request: bytes, context) -> bytes:
    return request


async def _statuses(channel) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", "liveness", "readiness")}


def test_health_reflection_and_drain() -> None:
    async def scenario() -> None:
        server = Server(["test.Echo"], max_message_bytes=1024)
        release = asyncio.Event()
        arrived = asyncio.Event()

        async def slow(request: bytes, context) -> bytes:
            arrived.set()
            await release.wait()
            return b"finished"

        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(_echo), "Slow": grpc.unary_unary_rpc_method_handler(slow)}
        server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        port = await server.start("127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _statuses(channel) == {"": NOT_SERVING, "liveness": SERVING, "readiness": NOT_SERVING}
            await server.set_ready(True)
            assert await _statuses(channel) == {"": SERVING, "liveness": SERVING, "readiness": SERVING}

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name async for reply in replies for s in reply.list_services_response.service}
            assert {"test.Echo", "grpc.health.v1.Health"} <= names

            echo = channel.unary_unary("/test.Echo/Echo")
            assert await echo(b"x" * 512, timeout=5) == b"x" * 512
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await echo(b"x" * 4096, timeout=5)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            health = health_pb2_grpc.HealthStub(channel)
            readiness = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
            liveness = health.Watch(health_pb2.HealthCheckRequest(service="liveness"))
            assert (await readiness.read()).status == SERVING and (await liveness.read()).status == SERVING
            in_flight = asyncio.ensure_future(channel.unary_unary("/test.Echo/Slow")(b"", timeout=20))
            await asyncio.wait_for(arrived.wait(), 10)  # the call is running on the server before the drain

            async def on_drain() -> None:
                # Draining: readiness goes down while the in-flight call is still running.
                assert (await asyncio.wait_for(readiness.read(), 5)).status == NOT_SERVING
                assert not in_flight.done()
                release.set()

            await server.drain(grace_s=2, on_drain=on_drain)
            assert await in_flight == b"finished"
            with pytest.raises(grpc.aio.AioRpcError):  # liveness never reported NOT_SERVING; the watch just ends
                assert (await liveness.read()).status == SERVING

    asyncio.run(scenario())


@pytest.mark.parametrize("streaming", [False, True])
def test_a_request_that_cannot_be_parsed_is_invalid_argument(streaming: bool) -> None:
    """Bad UTF-8 in a string field (what a lone surrogate becomes on the wire), or a garbled
    message: INVALID_ARGUMENT naming the request, where gRPC alone answers UNKNOWN."""
    async def answer(request, context):
        return generation_pb2.GenerateResponse(text=request.model)

    async def stream(request, context):
        yield generation_pb2.GenerateResponse(text=request.model)

    async def scenario() -> None:
        server = Server(["test.Parse"])
        parse = generation_pb2.GenerateRequest.FromString
        out = generation_pb2.GenerateResponse.SerializeToString
        handler = (grpc.unary_stream_rpc_method_handler(stream, parse, out) if streaming
                   else grpc.unary_unary_rpc_method_handler(answer, parse, out))
        server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Parse", {"Call": handler}),))
        port = await server.start("127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = (channel.unary_stream if streaming else channel.unary_unary)("/test.Parse/Call")

            async def send(raw: bytes):
                if streaming:
                    return [generation_pb2.GenerateResponse.FromString(m) async for m in call(raw, timeout=5)][0]
                return generation_pb2.GenerateResponse.FromString(await call(raw, timeout=5))

            assert (await send(generation_pb2.GenerateRequest(model="fine").SerializeToString())).text == "fine"
            for raw in (b"\x0a\x03t\xffy", b"\x0a\x7fshort"):  # model = bad UTF-8; a length past the end
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await send(raw)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details().startswith("request: could not be parsed")
        await server.grpc.stop(None)

    asyncio.run(scenario())
