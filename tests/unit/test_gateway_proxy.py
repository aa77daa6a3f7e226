"""Failover and error passing through the gateway, with scripted fake decoders: real
grpc.aio servers in-process on loopback, no model, deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from ffnskip.rpc.server import Server
from ffnskip.v1 import decoder_pb2_grpc, gateway_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from services.gateway.channels import ChannelPool
from services.gateway.discovery import StaticDiscovery
from services.gateway.fleet import quantile, summarise
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy, Timeouts
from services.gateway.resume import Relayed, whole_answer
from services.gateway.routing import Endpoint, Router
from services.gateway.servicer import GatewayServicer
from services.gateway.telemetry import Telemetry, field

MODEL = "m"


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Token i (0-based) is id i with text "t{i} ", skipping `skip_layer` once past `warm_up`;
    a resumed call continues after the delivered tokens, and its summary covers them with the
    layers the request says they skipped, as the engine's does."""

    def __init__(self, name: str, mode: str = "ok", tokens: int = 3, version: int | None = None,
                 warm_up: int = 0, skip_layer: int = 1, die_after: int = 0) -> None:
        self.name, self.mode, self.tokens, self.version = name, mode, tokens, version
        self.warm_up, self.skip_layer = warm_up, skip_layer
        self.die_after = die_after or (1 if mode in ("dies_after_token", "stalls_after_token") else 0)
        self.calls = 0
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = asyncio.Event()

    async def GenerateStream(self, request, context):
        self.calls += 1
        self.requests.append(request)
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.mode == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "skip.threshold: must be in [0.5, 1], got 0.1")
        if self.mode == "exhausted":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", trailing_metadata=(("retry-after", "2"),))
        if self.mode == "transport":  # what grpc itself says of a pod it cannot reach: an address
            await context.abort(grpc.StatusCode.INTERNAL, "ipv4:10.1.2.3:50052: connection reset")
        if self.mode == "refuses_resume" and request.HasField("resume"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "resume.profile_version: this decoder serves 9")
        if self.mode == "hang":
            await self._hang()
        resumed = len(request.resume.token_ids)
        for sent, i in enumerate(range(resumed, self.tokens), start=1):
            yield pb.GenerateStreamResponse(token=pb.TokenChunk(index=i + 1, token_id=i, text=f"t{i} ",
                                                                skipped_layers=self._skips(i), elapsed_ms=1.0))
            if sent == self.die_after:
                if self.mode == "stalls_after_token":  # a frozen pod: the connection stays up, nothing comes
                    await self._hang()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "socket closed")
        records = [list(request.resume.skipped_layers[i].layers) if i < resumed else self._skips(i)
                   for i in range(self.tokens)]
        skipped = sum(len(r) for r in records)
        decode_tokens = max(0, self.tokens - self.warm_up)
        stats = pb.SkipStats(skip_ratio=skipped / (4 * self.tokens),
                             decode_skip_ratio=skipped / (4 * decode_tokens) if decode_tokens else 0.0,
                             ffn_blocks_total=4 * self.tokens, ffn_blocks_skipped=skipped,
                             per_layer_skips=[sum(layer in r for r in records) for layer in range(4)],
                             generated_tokens=self.tokens)
        yield pb.GenerateStreamResponse(summary=pb.GenerateResponse(
            text="".join(f"t{i} " for i in range(self.tokens)), finish_reason="length", served_by=self.name,
            skip_stats=stats, request_id=request.request_id, token_ids=list(range(self.tokens)),
            profile_version=self.version or 0, seed=request.sampling.seed,
            latency=pb.Latency(ttft_ms=1.0, total_ms=2.0, queue_ms=0.5)))

    def _skips(self, i: int) -> list[int]:
        return [self.skip_layer] if i + 1 > self.warm_up else []

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@contextlib.asynccontextmanager
async def gateway(*fakes: FakeDecoder, max_attempts: int = 3, timeouts: Timeouts = Timeouts(attempt_s=30),
                  resume: bool = True) -> AsyncIterator[tuple]:
    servers, endpoints = [], []
    for fake in fakes:
        server = grpc.aio.server()
        decoder_pb2_grpc.add_DecoderServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        endpoints.append(Endpoint(fake.name, f"127.0.0.1:{port}", MODEL, capacity=4, profile_version=fake.version))
    telemetry = Telemetry()
    router = Router(StaticDiscovery(endpoints), quarantine_s=60)
    pool = ChannelPool(4 << 20, keepalive_s=20)
    proxy = Proxy(router, pool, telemetry, max_attempts=max_attempts, timeouts=timeouts, resume=resume)
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


def test_with_resume_off_a_failure_after_the_first_token_ends_the_stream_with_an_error():
    async def scenario() -> None:
        dying, spare = FakeDecoder("pod-a", "dies_after_token"), FakeDecoder("pod-b", "ok")
        async with gateway(dying, spare, resume=False) as (stub, telemetry, router):
            router.quarantine("pod-b")  # make "pod-a" the first choice
            messages, code, details = await drain(stub.GenerateStream(request()))
            assert [m.WhichOneof("kind") for m in messages] == ["token"]
            assert code == grpc.StatusCode.UNAVAILABLE and "incomplete" in details and "after 1 tokens" in details
            assert "pod-a" not in details and "127.0.0.1" not in details  # no transport details for clients
            assert spare.calls == 0  # never a retry once tokens went out
            assert counters(telemetry)[(MODEL, "pod-a")].errors_by_code["UNAVAILABLE"] == 1

    asyncio.run(scenario())


def resumable_request(tokens: int = 6) -> pb.GenerateRequest:
    req = request()
    req.sampling.max_new_tokens = tokens
    return req


def test_a_failure_mid_stream_is_resumed_on_another_pod_of_the_same_profile_version():
    async def scenario() -> None:
        # "a" dies after 3 tokens; "b" serves another profile version; "c" continues the stream
        dying = FakeDecoder("a", tokens=6, version=7, warm_up=2, skip_layer=1, die_after=3)
        other = FakeDecoder("b", tokens=6, version=8)
        spare = FakeDecoder("c", tokens=6, version=7, warm_up=2, skip_layer=2)
        async with gateway(dying, other, spare) as (stub, telemetry, router):
            router.in_flight.update({"b": 1, "c": 1})  # make "a" the first choice
            call = stub.GenerateStream(resumable_request())
            messages, code, details = await drain(call)
            assert code == grpc.StatusCode.OK, details
            tokens = [m.token for m in messages if m.HasField("token")]
            assert [t.index for t in tokens] == [1, 2, 3, 4, 5, 6] and [t.token_id for t in tokens] == list(range(6))
            assert [m.WhichOneof("kind") for m in messages][-1] == "summary" and len(messages) == 7
            assert dict(await call.initial_metadata())["x-served-by"] == "a"  # the pod that started it
            assert other.calls == 0  # another profile version never continues a stream
            resume = spare.requests[0].resume
            assert list(resume.token_ids) == [0, 1, 2] and resume.profile_version == 7
            assert [list(s.layers) for s in resume.skipped_layers] == [[], [], [1]]  # as "a" streamed them
            first, second = dying.requests[0], spare.requests[0]
            assert first.sampling.HasField("seed") and second.sampling.seed == first.sampling.seed  # pinned once
            assert not first.HasField("resume")

            summary = messages[-1].summary
            assert summary.resumes == 1 and summary.served_by == "c" and summary.profile_version == 7
            assert list(summary.token_ids) == list(range(6)) and summary.text == "".join(t.text for t in tokens)
            stats = summary.skip_stats
            # token 3 skipped layer 1 on "a"; tokens 4-6 layer 2 on "c"; tokens 1-2 were warm-up
            assert list(stats.per_layer_skips) == [0, 1, 3, 0] and stats.ffn_blocks_skipped == 4
            assert stats.generated_tokens == 6 and stats.ffn_blocks_total == 24
            assert stats.skip_ratio == pytest.approx(4 / 24) and stats.decode_skip_ratio == pytest.approx(4 / 16)
            assert summary.latency.total_ms >= summary.latency.ttft_ms > 0 and summary.latency.ttft_ms != 1.0

            groups = counters(telemetry)
            assert groups[(MODEL, "a")].errors == 0 and groups[(MODEL, "c")].generated_tokens == 6
            assert telemetry.counters[field(MODEL, "a", "resumes")] == 1
            assert groups[(MODEL, "a")].resumes == 1  # GetTelemetry sums them
            assert telemetry.registry.get_sample_value(
                "ffnskip:request_resumes_total", {"model_name": MODEL, "decoder": "a"}) == 1
            assert router.in_flight == {"b": 1, "c": 1}

    asyncio.run(scenario())


def test_a_stalled_stream_is_resumed_and_the_frozen_pod_left():
    async def scenario() -> None:
        frozen, spare = FakeDecoder("a", "stalls_after_token", tokens=4), FakeDecoder("b", tokens=4)
        async with gateway(frozen, spare, timeouts=Timeouts(attempt_s=30, first_token_s=5, stall_s=0.3)) as (
                stub, telemetry, router):
            router.in_flight["b"] = 1  # make "a" the first choice
            reply = await stub.Generate(resumable_request(4), timeout=10)  # non-streaming calls resume too
            assert reply.resumes == 1 and reply.served_by == "b" and list(reply.token_ids) == [0, 1, 2, 3]
            assert reply.text == "t0 t1 t2 t3 "
            await asyncio.wait_for(frozen.cancelled.wait(), timeout=5)  # its attempt was cancelled
            router.in_flight.pop("b")
            assert (await stub.Generate(request(), timeout=10)).served_by == "b"  # "a" is quarantined

    asyncio.run(scenario())


def test_a_pod_refusing_the_resume_for_its_profile_version_is_passed_over():
    async def scenario() -> None:
        # "b" registered version 7 but has swapped profiles since: it refuses; "c" continues
        dying = FakeDecoder("a", tokens=5, version=7, die_after=2)
        swapped = FakeDecoder("b", "refuses_resume", tokens=5, version=7)
        spare = FakeDecoder("c", tokens=5, version=7)
        async with gateway(dying, swapped, spare, max_attempts=3) as (stub, telemetry, router):
            router.in_flight.update({"b": 1, "c": 2})  # "a" first, then "b"
            reply = await stub.Generate(resumable_request(5))
            assert reply.served_by == "c" and reply.resumes == 2 and list(reply.token_ids) == list(range(5))
            assert swapped.calls == 1 and len(spare.requests[0].resume.token_ids) == 2
            router.in_flight.update({"b": 0, "c": 5})
            assert (await stub.Generate(request())).served_by == "b"  # a refusal is no fault: not quarantined

    asyncio.run(scenario())


def test_resumes_are_bounded_by_max_attempts_and_end_as_incomplete():
    async def scenario() -> None:
        fakes = [FakeDecoder(name, tokens=6, die_after=1) for name in ("pod-a", "pod-b", "pod-c")]
        async with gateway(*fakes, max_attempts=2) as (stub, telemetry, router):
            messages, code, details = await drain(stub.GenerateStream(resumable_request()))
            assert [m.token.token_id for m in messages] == [0, 1]  # one token from each attempt, none twice
            assert code == grpc.StatusCode.UNAVAILABLE and "incomplete" in details and "after 2 tokens" in details
            assert "pod-" not in details and "127.0.0.1" not in details
            assert sum(f.calls for f in fakes) == 2

    asyncio.run(scenario())


def test_no_pod_of_the_stream_profile_version_ends_it_as_incomplete():
    async def scenario() -> None:
        dying, other = FakeDecoder("a", tokens=4, version=3, die_after=1), FakeDecoder("b", tokens=4, version=4)
        async with gateway(dying, other) as (stub, telemetry, router):
            router.in_flight["b"] = 1  # make "a" the first choice
            messages, code, details = await drain(stub.GenerateStream(resumable_request(4)))
            assert len(messages) == 1 and code == grpc.StatusCode.UNAVAILABLE and "incomplete" in details
            assert other.calls == 0
            assert counters(telemetry)[(MODEL, "a")].errors_by_code["UNAVAILABLE"] == 1

    asyncio.run(scenario())


def test_a_client_seed_is_kept_and_a_missing_one_drawn_per_request():
    async def scenario() -> None:
        fake = FakeDecoder("a")
        async with gateway(fake) as (stub, telemetry, router):
            seeded = request()
            seeded.sampling.seed = 5
            assert (await stub.Generate(seeded)).seed == 5
            drawn = [(await stub.Generate(request())).seed for _ in range(2)]
            assert all(fake.requests[i].sampling.HasField("seed") for i in range(3))
            assert drawn[0] != drawn[1]  # fresh per request (63 random bits)

    asyncio.run(scenario())


def test_transport_details_never_reach_the_client():
    async def scenario() -> None:
        async with gateway(FakeDecoder("pod-a", "transport")) as (stub, telemetry, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(request())
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "10.1.2.3" not in err.value.details() and "pod-a" not in err.value.details()

    asyncio.run(scenario())


def test_the_whole_answer_puts_the_earlier_logprobs_first_and_the_clients_latency():
    chunks = [pb.TokenChunk(index=i + 1, token_id=i, text=f"t{i} ", logprob=pb.TokenLogprob(token_id=i, logprob=-i))
              for i in range(4)]
    last = pb.GenerateResponse(text="t0 t1 t2 t3 ", token_ids=[0, 1, 2, 3], latency=pb.Latency(queue_ms=3.0),
                               logprobs=[pb.TokenLogprob(token_id=3, logprob=-3)])
    relayed = Relayed(started=0.0, chunks=chunks, first_at=1.0, resumes=1)
    whole = whole_answer(last, relayed, resumed=3, now=4.0)
    assert [e.token_id for e in whole.logprobs] == [0, 1, 2, 3]
    assert whole.latency.ttft_ms == 1000.0 and whole.latency.total_ms == 4000.0 and whole.latency.tokens_per_s == 1.0
    assert whole.latency.queue_ms == 3.0 and whole.text == "t0 t1 t2 t3 " and whole.resumes == 1


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
