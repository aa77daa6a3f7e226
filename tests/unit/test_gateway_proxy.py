"""Failover and error passing through the gateway, with scripted fake decoders
(tests/helpers/scripted_gateway.py); mid-stream resume is tests/unit/test_gateway_resume.py."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from ffnskip.v1 import generation_pb2 as pb
from services.gateway.fleet import quantile
from services.gateway.proxy import Timeouts
from tests.helpers.scripted_gateway import MODEL, FakeDecoder, counters, drain, gateway, request


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


def test_attempts_are_bounded():
    async def scenario() -> None:
        fakes = [FakeDecoder(n, "unavailable") for n in "abc"]
        async with gateway(*fakes, max_attempts=2) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "no decoder could serve the request: unavailable (2 attempts); retry"
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
        stalling, spare = FakeDecoder("a", "stalls_after_token"), FakeDecoder("b", "ok")
        async with gateway(stalling, spare, timeouts=Timeouts(attempt_s=30, first_token_s=5, stall_s=0.5),
                           resume=False) as (stub, telemetry, router):
            router.in_flight["b"] = 1  # make "a" the first choice
            messages, code, details = await drain(stub.GenerateStream(request(), timeout=20))
            assert [m.WhichOneof("kind") for m in messages] == ["token"]
            assert code == grpc.StatusCode.UNAVAILABLE and "stalled" in details and "incomplete" in details
            await asyncio.wait_for(stalling.cancelled.wait(), timeout=5)
            assert router.in_flight == {"b": 1} and spare.calls == 0

    asyncio.run(scenario())


def test_the_client_deadline_reaches_the_decoder():
    async def scenario() -> None:
        slow = FakeDecoder("a", "hang")
        async with gateway(slow) as (stub, telemetry, router):
            released = asyncio.Event()
            release = router.release

            def release_and_tell(decoder: str) -> None:
                release(decoder)
                released.set()

            router.release = release_and_tell
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(slow.cancelled.wait(), timeout=5)  # the decoder stopped working on it
            # the decoder's own copy of the deadline may cancel it before the gateway's handler
            # has unwound: the slot is given back when that handler ends, so wait for it
            await asyncio.wait_for(released.wait(), timeout=5)
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
        async with gateway(FakeDecoder("a", "ok", tokens=4, warm_up=2)) as (stub, telemetry, router):
            for _ in range(2):
                reply = await stub.Generate(request())
                assert reply.resumes == 0 and reply.latency.ttft_ms == 1.0  # a pod's own summary, as it is
            group = counters(telemetry)[(MODEL, "a")]
            assert group.requests == 2 and dict(group.finished_by_reason) == {"length": 2}
            assert group.generated_tokens == 8 and group.ffn_blocks_total == 32 and group.ffn_blocks_skipped == 4
            assert group.skip_ratio == pytest.approx(0.125)
            assert list(group.layer_skip_frequency) == [0.0, 0.5, 0.0, 0.0]
            assert group.request_decode_skip_ratio.mean == pytest.approx(0.25)
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


def test_a_conversation_returns_to_the_pod_its_first_message_hashes_to():
    """With conversation affinity each prompt keeps to one pod of three, turn after turn, and
    different ones spread over them (the rotation alone would walk every prompt round the three)."""
    def turn(first: str, turns: int) -> pb.GenerateRequest:
        messages = [pb.ChatMessage(role="user", content=first)]
        messages += [pb.ChatMessage(role="user", content=f"and then {i}") for i in range(turns)]
        return pb.GenerateRequest(model=MODEL, messages=messages, sampling=pb.SamplingOptions(max_new_tokens=3))

    async def scenario() -> None:
        async with gateway(*(FakeDecoder(name, "ok") for name in "abc"), affinity=True) as (stub, _, _):
            homes = {}
            for first in (f"conversation {i}" for i in range(12)):
                pods = {(await stub.Generate(turn(first, turns))).served_by for turns in range(3)}
                assert len(pods) == 1, (first, pods)
                homes[first] = pods.pop()
            assert set(homes.values()) == {"a", "b", "c"}

    asyncio.run(scenario())
