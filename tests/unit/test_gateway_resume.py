"""Mid-stream resume through the gateway, with scripted fake decoders
(tests/helpers/scripted_gateway.py): a stream whose pod fails after tokens continues on another
pod of its profile version, as one stream with one summary of the whole answer."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ffnskip.v1 import generation_pb2 as pb
from services.gateway.proxy import Timeouts
from services.gateway.resume import Relayed, whole_answer
from services.gateway.telemetry import field
from tests.helpers.scripted_gateway import MODEL, FakeDecoder, counters, drain, gateway, request


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
