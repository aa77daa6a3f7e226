"""The decoder service for real: a redis-server, decoder processes serving the embedded
SmolLM2 model on loopback, gRPC over sockets."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from ffnskip.config import Policy, SkipParams
from ffnskip.rpc.convert import policy_of, skip_params_from_proto
from ffnskip.store.connection import RedisSettings, connect
from ffnskip.store.profiles import ProfileStore
from ffnskip.store.registry import DecoderRegistry
from ffnskip.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from tests.helpers.polling import wait_for
from tests.helpers.profiles import build_profile
from tests.helpers.services import ServiceProcess, free_port
from tests.redis_server import running_redis

MODEL = "smollm2-135m"
CHAT = [pb.ChatMessage(role="user", content="Write a short paragraph about the ocean.")]


def decoder_env(redis_url: str, cache_dir, **extra) -> dict[str, str]:
    env = {"FFNSKIP_MODEL": MODEL, "FFNSKIP_REDIS_URL": redis_url, "FFNSKIP_PROFILE_CACHE_DIR": str(cache_dir),
           "FFNSKIP_MAX_BATCH": "2", "FFNSKIP_MAX_QUEUE": "1", "FFNSKIP_MAX_SEQ_LEN": "1024",
           "FFNSKIP_MAX_NEW_TOKENS_CAP": "256", "FFNSKIP_REGISTRY_TTL_S": "3", "FFNSKIP_DRAIN_TIMEOUT_S": "60",
           "FFNSKIP_DEVICE": "cpu"}
    env.update(extra)
    return env


def start_decoder(tmp_path, redis_url: str, name: str, **extra) -> ServiceProcess:
    port = free_port()
    env = decoder_env(redis_url, tmp_path / "profile-cache", FFNSKIP_DECODER_PORT=str(port), FFNSKIP_DECODER_ID=name, **extra)
    return ServiceProcess("services.decoder.main", env, port, tmp_path / f"{name}.log").start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decoder")
    with running_redis() as redis_server:
        metrics_port = free_port()
        decoder = start_decoder(tmp, redis_server.url, "decoder-a", FFNSKIP_METRICS_PORT=str(metrics_port))
        channel = grpc.insecure_channel(decoder.address)
        try:
            yield {"redis": redis_server, "decoder": decoder, "stub": decoder_pb2_grpc.DecoderStub(channel), "tmp": tmp,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
        finally:
            channel.close()
            decoder.stop()


def request(max_new_tokens: int = 24, **kwargs) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_new_tokens=max_new_tokens, **kwargs.pop("sampling", {}))
    return pb.GenerateRequest(model=MODEL, messages=CHAT, sampling=sampling, **kwargs)


def info(stub) -> decoder_pb2.InfoResponse:
    return stub.Info(decoder_pb2.InfoRequest(), timeout=10)


def publish(redis_url: str, fingerprint: str, **fields) -> int:
    store = ProfileStore(connect(RedisSettings(url=redis_url)))
    params = {"threshold": 0.97, "max_skip": 4, "warm_up": 4, **fields}
    profile = build_profile(model_id=MODEL, fingerprint=fingerprint, num_layers=30, cold_start=1, cold_end=29, **params)
    return store.publish(profile, activate=True)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is not installed: nothing to keep out")
def test_the_decoder_process_holds_no_scipy(stack):
    """transformers imports scipy wherever it is installed (the test extra's lm-eval brings it); a
    decoder keeps it out of its memory."""
    maps = Path(f"/proc/{stack['decoder'].process.pid}/maps").read_text()
    assert "/scipy/" not in maps


def test_stream_tokens_in_order_with_final_stats(stack):
    stub = stack["stub"]
    skip = pb.SkipOverrides(policy="adaptive", warm_up=4, max_skip=4, threshold=0.97)
    messages = list(stub.GenerateStream(request(20, skip=skip), timeout=120))
    tokens, summary = messages[:-1], messages[-1]
    assert all(m.HasField("token") for m in tokens) and summary.HasField("summary")
    assert [m.token.index for m in tokens] == list(range(1, len(tokens) + 1))
    final = summary.summary
    assert [m.token.token_id for m in tokens] == list(final.token_ids)
    assert "".join(m.token.text for m in tokens) == final.text
    stats = final.skip_stats
    assert stats.generated_tokens == len(tokens) and stats.ffn_blocks_total == 30 * len(tokens)
    assert stats.ffn_blocks_skipped == sum(len(m.token.skipped_layers) for m in tokens) == sum(stats.per_layer_skips)
    assert all(not m.token.skipped_layers for m in tokens[:4])  # warm-up
    assert final.policy == "adaptive" and final.served_by == "decoder-a"
    assert final.policy_value == common_pb2.SKIP_POLICY_ADAPTIVE and policy_of(final) is Policy.ADAPTIVE
    assert final.prompt_tokens > len(CHAT[0].content.split())  # the chat template's rendering, as tokenized
    assert final.latency.ttft_ms > 0 and final.latency.total_ms >= final.latency.ttft_ms


def test_metrics_endpoint_counts_tokens_and_queue(stack):
    before = scrape(stack["metrics"])
    result = stack["stub"].Generate(request(6), timeout=120)
    after = scrape(stack["metrics"])
    assert after['ffnskip:generation_tokens_total{model_name="smollm2-135m"}'] - \
        before.get('ffnskip:generation_tokens_total{model_name="smollm2-135m"}', 0.0) == len(result.token_ids)
    assert after['ffnskip:num_requests_waiting{model_name="smollm2-135m"}'] == 0.0


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and not line.startswith("#")}


def test_info_gives_the_default_skip_in_the_enum_and_the_deprecated_json(stack):
    reply = info(stack["stub"])
    assert reply.HasField("default_skip") and reply.default_skip_json
    document = json.loads(reply.default_skip_json)  # what an older reader reads
    params = skip_params_from_proto(reply.default_skip, "default_skip")
    assert params == SkipParams(**{**document, "static_layers": tuple(document["static_layers"])})


def test_registered_in_redis_for_the_gateway(stack):
    entries = DecoderRegistry(connect(RedisSettings(url=stack["redis"].url))).list(model=MODEL)
    assert [e["address"] for e in entries] == [stack["decoder"].address]
    assert entries[0]["capacity"] == 2 and entries[0]["draining"] is False


@pytest.mark.parametrize(
    "req, code, needle",
    [
        (pb.GenerateRequest(model=MODEL, prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(model="no-such-model", prompt="hi"), grpc.StatusCode.NOT_FOUND, "model"),
        (request(0, sampling={"temperature": -1.0}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (request(257), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
        (request(-3), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
        (request(8, sampling={"top_p": 1.5}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        (request(8, sampling={"top_k": -1}), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
        (request(8, skip=pb.SkipOverrides(threshold=0.1)), grpc.StatusCode.INVALID_ARGUMENT, "skip.threshold"),
        (request(8, skip=pb.SkipOverrides(max_skip=500)), grpc.StatusCode.INVALID_ARGUMENT, "skip.max_skip"),
        (request(8, skip=pb.SkipOverrides(policy="observe")), grpc.StatusCode.INVALID_ARGUMENT, "skip.policy"),
        (request(8, skip=pb.SkipOverrides(policy="aligned", quorum=0.1)), grpc.StatusCode.INVALID_ARGUMENT, "skip.quorum"),
        (pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="robot", content="x")]),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
        (pb.GenerateRequest(model=MODEL, prompt="word " * 1500), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ],
)
def test_bad_input_gets_a_clear_status(stack, req, code, needle):
    with pytest.raises(grpc.RpcError) as caught:
        stack["stub"].Generate(req, timeout=60)
    assert caught.value.code() == code
    assert needle in caught.value.details()


def test_oversize_message_is_refused_by_grpc_limits(stack):
    with pytest.raises(grpc.RpcError) as caught:
        stack["stub"].Generate(pb.GenerateRequest(model=MODEL, prompt="x" * (40 * 1024 * 1024)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_is_honoured(stack):
    # 256 tokens take over a second at the fastest this model decodes on a CPU (about 250 tokens/s
    # at one row): with 1.0 s the whole answer once came back in time
    with pytest.raises(grpc.RpcError) as caught:
        stack["stub"].Generate(request(256, sampling={"stop": [], "ignore_eos": True}), timeout=0.4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: info(stack["stub"]).running == 0, what="the expired sequence to leave the batch")


def test_cancel_stops_the_sequence(stack):
    stub = stack["stub"]
    call = stub.GenerateStream(request(256), timeout=120)
    first = next(call)
    assert first.token.index == 1
    call.cancel()
    wait_for(lambda: info(stub).running == 0 and info(stub).waiting == 0, what="the cancelled sequence to leave")


def test_backpressure_when_rows_and_queue_are_full(stack):
    stub = stack["stub"]
    calls = [stub.GenerateStream(request(256), timeout=120) for _ in range(2)]  # the two rows
    try:
        for call in calls:
            next(call)
        queued = stub.GenerateStream(request(256), timeout=120)  # the one queue slot
        calls.append(queued)
        wait_for(lambda: info(stub).waiting == 1, what="the third request to queue")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request(8), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in caught.value.details()
    finally:
        for call in calls:
            call.cancel()
    wait_for(lambda: info(stub).running == 0 and info(stub).waiting == 0, what="the batch to empty")


def test_profile_hot_swap_under_traffic(stack):
    stub, redis_url = stack["stub"], stack["redis"].url
    fingerprint = info(stub).fingerprint
    v1 = publish(redis_url, fingerprint)
    wait_for(lambda: info(stub).profile_version == v1, what="profile v1")
    before = stub.GenerateStream(request(48), timeout=120)
    next(before)  # running on v1
    v2 = publish(redis_url, fingerprint, threshold=0.99)
    wait_for(lambda: info(stub).profile_version == v2, what="profile v2")
    assert list(before)[-1].summary.profile_version == v1
    after = stub.Generate(request(8), timeout=120)
    assert after.profile_version == v2 and after.policy == "aligned"  # the default serving policy


def test_serving_policy_is_configuration_and_requests_may_override_it(stack):
    stub, redis_url = stack["stub"], stack["redis"].url
    version = publish(redis_url, info(stub).fingerprint)
    wait_for(lambda: info(stub).profile_version == version, what="the adaptive profile")
    assert stub.Generate(request(8), timeout=120).policy == "aligned"  # the default: decided per batch
    as_calibrated = start_decoder(stack["tmp"], redis_url, "decoder-profile", FFNSKIP_SKIP_POLICY="profile")
    try:
        with grpc.insecure_channel(as_calibrated.address) as channel:
            other = decoder_pb2_grpc.DecoderStub(channel)
            wait_for(lambda: info(other).profile_version == version, what="the adaptive profile")
            served = other.Generate(request(8), timeout=120)
            assert served.profile_version == version and served.policy == "adaptive"
            # a request may still ask for another policy and quorum within the limits
            overridden = other.Generate(request(8, skip=pb.SkipOverrides(policy="aligned", quorum=1.0)), timeout=120)
            assert overridden.policy == "aligned"
    finally:
        as_calibrated.stop()
    assert '"policy": "adaptive"' in as_calibrated.log()  # the profile line says how it is served


def test_profile_for_other_weights_is_refused(stack):
    stub = stack["stub"]
    current = info(stub).profile_version
    publish(stack["redis"].url, "00" * 16)
    # the decoder reads the new pointer (its resync event) and must keep the previous profile
    after = stub.Generate(request(4), timeout=120)
    assert after.profile_version == current
    assert "profile for other weights refused" in stack["decoder"].log()


def test_redis_outage_then_restart_serves_from_the_disk_copy(stack):
    stub, redis_server = stack["stub"], stack["redis"]
    fingerprint = info(stub).fingerprint
    version = publish(redis_server.url, fingerprint)
    wait_for(lambda: info(stub).profile_version == version, what="the new profile")
    redis_server.stop()
    try:
        during = stub.Generate(request(8), timeout=120)
        assert during.profile_version == version and during.finish_reason in ("length", "eos")
        # a decoder started while Redis is down serves the disk copy
        second = start_decoder(stack["tmp"], redis_server.url, "decoder-b")
        try:
            with grpc.insecure_channel(second.address) as channel:
                other = decoder_pb2_grpc.DecoderStub(channel)
                assert info(other).profile_version == version
                assert other.Generate(request(8), timeout=120).profile_version == version
        finally:
            second.stop()
    finally:
        redis_server.start()


def test_sigterm_drains_in_flight_work(tmp_path):
    with running_redis() as redis_server:
        decoder = start_decoder(tmp_path, redis_server.url, "decoder-drain")
        registry = DecoderRegistry(connect(RedisSettings(url=redis_server.url)))
        try:
            with grpc.insecure_channel(decoder.address) as channel:
                stub = decoder_pb2_grpc.DecoderStub(channel)
                call = stub.GenerateStream(request(40, sampling={"stop": []}), timeout=120)
                received = [next(call)]
                result: dict = {}
                drainer = threading.Thread(target=lambda: result.update(code=decoder.terminate(timeout_s=120)))
                drainer.start()
                wait_for(lambda: (registry.get("decoder-drain") or {}).get("draining"), what="draining in the registry")
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Generate(request(4), timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                received += list(call)
                drainer.join(timeout=120)
            summary = received[-1].summary
            assert summary.finish_reason in ("length", "eos")
            assert len(received) == summary.skip_stats.generated_tokens + 1  # every token, then the summary
            assert result["code"] == 0
            assert registry.get("decoder-drain") is None
        finally:
            decoder.stop()


def test_ignore_eos_generates_exactly_max_new_tokens(stack):
    """Benchmarks compare policies at equal work: the request runs past EOS to its limit."""
    stub = stack["stub"]
    short = [pb.ChatMessage(role="user", content="Answer with one word: is water wet?")]
    natural = stub.Generate(pb.GenerateRequest(model=MODEL, messages=short, sampling=pb.SamplingOptions(max_new_tokens=48)),
                            timeout=120)
    assert natural.finish_reason == "eos" and natural.skip_stats.generated_tokens < 48
    forced = stub.Generate(pb.GenerateRequest(model=MODEL, messages=short,
                                              sampling=pb.SamplingOptions(max_new_tokens=48, ignore_eos=True)), timeout=120)
    assert forced.finish_reason == "length" and forced.skip_stats.generated_tokens == 48
