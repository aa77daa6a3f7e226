"""Failover and error passing through the gateway, with scripted fake decoders: real
grpc.aio servers in-process on loopback, no model, deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import AsyncIterator

import grpc
import pytest

from ffnskip.rpc.server import Server
from ffnskip.v1 import decoder_pb2_grpc, gateway_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from services.gateway.discovery import StaticDiscovery
from services.gateway.fleet import quantile, summarise
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import ChannelPool, Proxy, Router, Timeouts
from services.gateway.routing import Endpoint
from services.gateway.servicer import GatewayServicer
from services.gateway.telemetry import Telemetry

MODEL = "m"


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, name: str, mode: str, tokens: int = 3) -> None:
        self.name, self.mode, self.tokens = name, mode, tokens
        self.calls = 0
        self.cancelled = asyncio.Event()

    async def GenerateStream(self, request, context):
        self.calls += 1
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.mode == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "skip.threshold: must be in [0.5, 1], got 0.1")
        if self.mode == "exhausted":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", trailing_metadata=(("retry-after", "2"),))
        if self.mode == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        for i in range(self.tokens):
            yield pb.GenerateStreamResponse(token=pb.TokenChunk(index=i + 1, token_id=i, text="x", skipped_layers=[1]))
            if self.mode == "dies_after_token":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "socket closed")
            if self.mode == "stalls_after_token":  # a frozen pod: the connection stays up, nothing comes
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
        stats = pb.SkipStats(skip_ratio=0.25, decode_skip_ratio=0.5, ffn_blocks_total=4 * self.tokens,
                             ffn_blocks_skipped=self.tokens, per_layer_skips=[0, self.tokens, 0, 0],
                             generated_tokens=self.tokens)
        yield pb.GenerateStreamResponse(summary=pb.GenerateResponse(
            text="x" * self.tokens, finish_reason="length", served_by=self.name, skip_stats=stats,
            request_id=request.request_id))


@contextlib.asynccontextmanager
async def gateway(*fakes: FakeDecoder, max_attempts: int = 3,
                  timeouts: Timeouts = Timeouts(attempt_s=30)) -> AsyncIterator[tuple]:
    servers, endpoints = [], []
    for fake in fakes:
        server = grpc.aio.server()
        decoder_pb2_grpc.add_DecoderServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        endpoints.append(Endpoint(fake.name, f"127.0.0.1:{port}", MODEL, capacity=4))
    telemetry = Telemetry()
    router = Router(StaticDiscovery(endpoints), quarantine_s=60)
    pool = ChannelPool(4 << 20, keepalive_s=20)
    proxy = Proxy(router, pool, telemetry, max_attempts=max_attempts, timeouts=timeouts)
    front = Server(["ffnskip.v1.Gateway"])
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(proxy, PromptSampler(None, 0, "s", 1), 256), front.grpc)
    port = await front.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield gateway_pb2_grpc.GatewayStub(channel), telemetry, router
    finally:
        await front.grpc.stop(None)
        await pool.close()
        for server in servers:
            await server.stop(None)


def request() -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt="hi", sampling=pb.SamplingOptions(max_new_tokens=3))


async def drain(call) -> tuple[list, grpc.StatusCode, str]:
    messages = []
    try:
        async for message in call:
            messages.append(message)
        return messages, grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        return messages, err.code(), err.details() or ""


def counters(telemetry: Telemetry) -> dict:
    response = summarise(1, telemetry.snapshot())
    return {(g.model, g.decoder): g for g in response.groups}


def test_unavailable_before_the_first_token_fails_over():
    async def scenario() -> None:
        down, up = FakeDecoder("a", "unavailable"), FakeDecoder("b", "ok")
        async with gateway(down, up) as (stub, telemetry, router):
            call = stub.GenerateStream(request())
            messages, code, _ = await drain(call)
            assert code == grpc.StatusCode.OK
            assert [m.WhichOneof("kind") for m in messages] == ["token"] * 3 + ["summary"]  # no duplicates
            assert messages[-1].summary.served_by == "b"
            assert dict(await call.initial_metadata())["x-served-by"] == "b"
            reply = await stub.Generate(request())  # the failed pod is quarantined: not tried again
            assert reply.served_by == "b" and down.calls == 1
            groups = counters(telemetry)
            assert groups[(MODEL, "a")].failovers == 1 and groups[(MODEL, "b")].requests == 2
            assert router.in_flight == {}

    asyncio.run(scenario())


def test_failure_after_the_first_token_ends_the_stream_with_an_error():
    async def scenario() -> None:
        dying, spare = FakeDecoder("a", "dies_after_token"), FakeDecoder("b", "ok")
        async with gateway(dying, spare) as (stub, telemetry, router):
            router.quarantine("b")  # make "a" the first choice
            messages, code, details = await drain(stub.GenerateStream(request()))
            assert [m.WhichOneof("kind") for m in messages] == ["token"]
            assert code == grpc.StatusCode.UNAVAILABLE and "incomplete" in details and "after 1 tokens" in details
            assert spare.calls == 0  # never a retry once tokens went out
            assert counters(telemetry)[(MODEL, "a")].errors_by_code["UNAVAILABLE"] == 1

    asyncio.run(scenario())


def test_attempts_are_bounded():
    async def scenario() -> None:
        fakes = [FakeDecoder(n, "unavailable") for n in "abc"]
        async with gateway(*fakes, max_attempts=2) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert sum(f.calls for f in fakes) == 2

    asyncio.run(scenario())


def test_decoder_errors_pass_through_with_their_code_and_trailers():
    async def scenario() -> None:
        async with gateway(FakeDecoder("a", "invalid")) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("skip.threshold")
        async with gateway(FakeDecoder("a", "exhausted")) as (stub, telemetry, router):
            call = stub.Generate(request())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "2") in tuple(err.value.trailing_metadata())

    asyncio.run(scenario())


def test_a_full_decoder_is_skipped_for_one_with_room():
    async def scenario() -> None:
        full, spare = FakeDecoder("a", "exhausted"), FakeDecoder("b", "ok")
        async with gateway(full, spare) as (stub, telemetry, router):
            router.in_flight["b"] = 1  # make "a" the first choice
            reply = await stub.Generate(request())
            assert reply.served_by == "b" and full.calls == 1
            router.in_flight.pop("b")
            reply = await stub.Generate(request())  # a full pod is not quarantined: it is tried again
            assert full.calls == 2 and reply.served_by == "b"

    asyncio.run(scenario())


def test_every_decoder_full_is_resource_exhausted_with_the_shortest_retry_after():
    async def scenario() -> None:
        async with gateway(FakeDecoder("a", "exhausted"), FakeDecoder("b", "exhausted")) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.value.details()
            assert ("retry-after", "2") in tuple(err.value.trailing_metadata())

    asyncio.run(scenario())


def test_a_silent_decoder_is_left_for_another_within_the_first_token_timeout():
    async def scenario() -> None:
        frozen, spare = FakeDecoder("a", "hang"), FakeDecoder("b", "ok")
        async with gateway(frozen, spare, timeouts=Timeouts(attempt_s=30, first_token_s=0.5, stall_s=0.5)) as (
                stub, telemetry, router):
            router.in_flight["b"] = 1  # make "a" the first choice
            reply = await stub.Generate(request(), timeout=10)
            assert reply.served_by == "b" and frozen.calls == 1
            await asyncio.wait_for(frozen.cancelled.wait(), timeout=5)  # its attempt was cancelled
            router.in_flight.pop("b")
            assert (await stub.Generate(request(), timeout=10)).served_by == "b"  # "a" is quarantined
            assert frozen.calls == 1

    asyncio.run(scenario())


def test_a_decoder_stalled_mid_stream_ends_the_call_as_incomplete():
    async def scenario() -> None:
        stalling = FakeDecoder("a", "stalls_after_token")
        async with gateway(stalling, timeouts=Timeouts(attempt_s=30, first_token_s=5, stall_s=0.5)) as (
                stub, telemetry, router):
            messages, code, details = await drain(stub.GenerateStream(request(), timeout=20))
            assert [m.WhichOneof("kind") for m in messages] == ["token"]
            assert code == grpc.StatusCode.UNAVAILABLE and "stalled" in details and "incomplete" in details
            await asyncio.wait_for(stalling.cancelled.wait(), timeout=5)
            assert router.in_flight == {}

    asyncio.run(scenario())


def test_the_client_deadline_reaches_the_decoder():
    async def scenario() -> None:
        slow = FakeDecoder("a", "hang")
        async with gateway(slow) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(slow.cancelled.wait(), timeout=5)  # the decoder stopped working on it
            assert router.in_flight == {}

    asyncio.run(scenario())


def test_bad_input_is_refused_before_any_decoder():
    async def scenario() -> None:
        fake = FakeDecoder("a", "ok")
        async with gateway(fake) as (stub, telemetry, router):
            bad = request()
            bad.sampling.temperature = -1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.temperature" in err.value.details()
            unknown = request()
            unknown.model = "nope"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(unknown)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "served now: m" in err.value.details()
            assert fake.calls == 0
            assert counters(telemetry)[("-", "-")].errors_by_code == {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1}

    asyncio.run(scenario())


def test_success_telemetry_and_the_summary():
    async def scenario() -> None:
        async with gateway(FakeDecoder("a", "ok", tokens=4)) as (stub, telemetry, router):
            for _ in range(2):
                await stub.Generate(request())
            group = counters(telemetry)[(MODEL, "a")]
            assert group.requests == 2 and dict(group.finished_by_reason) == {"length": 2}
            assert group.generated_tokens == 8 and group.ffn_blocks_total == 32 and group.ffn_blocks_skipped == 8
            assert group.skip_ratio == pytest.approx(0.25)
            assert list(group.layer_skip_frequency) == [0.0, 1.0, 0.0, 0.0]
            assert group.request_decode_skip_ratio.mean == pytest.approx(0.5)
            assert group.time_to_first_token_seconds.count == 2 and group.inter_token_latency_seconds.count == 6
            assert group.e2e_request_latency_seconds.count == 2
            total = counters(telemetry)[(MODEL, "")]
            assert total.requests == 2

    asyncio.run(scenario())


def test_quantiles_from_buckets():
    bounds = [1.0, 2.0, 4.0, math.inf]
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(1.5)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 4.0  # +Inf bucket: the last finite bound
    assert quantile(0.5, bounds, [0, 0, 0, 0]) == 0.0
