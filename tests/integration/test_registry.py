"""DecoderRegistry against a real redis-server: register, filter by model, TTL expiry, withdraw."""

from __future__ import annotations

import time

import pytest
import redis

from ffnskip.errors import InvalidArgument, Unavailable
from ffnskip.store import DecoderRegistry
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


def decoder(decoder_id: str, model: str = "tiny-llama", **extra: object) -> dict:
    info = dict(id=decoder_id, address=f"10.0.0.{len(decoder_id)}:50051", model_id=model, capacity=16, load=0,
                profile_version=3, draining=False)
    info.update(extra)
    return info


@pytest.fixture
def registry(client: redis.Redis) -> DecoderRegistry:
    return DecoderRegistry(client)


def test_register_and_list_by_model(registry: DecoderRegistry) -> None:
    registry.register(decoder("pod-a"), ttl_s=30)
    registry.register(decoder("pod-b", model="smollm2-135m"), ttl_s=30)
    registry.heartbeat("pod-a", decoder("pod-a", load=5, draining=True), ttl_s=30)
    assert [d["id"] for d in registry.list()] == ["pod-a", "pod-b"]
    listed = registry.list(model="tiny-llama")
    assert len(listed) == 1 and listed[0]["load"] == 5 and listed[0]["draining"] is True
    assert registry.list(model="nobody") == []


def test_ttl_expiry_drops_a_silent_decoder(registry: DecoderRegistry, client: redis.Redis) -> None:
    registry.register(decoder("pod-live"), ttl_s=30)
    registry.register(decoder("pod-dying"), ttl_s=1)
    assert {d["id"] for d in registry.list()} == {"pod-live", "pod-dying"}
    deadline = time.monotonic() + 10
    while {d["id"] for d in registry.list()} != {"pod-live"}:
        assert time.monotonic() < deadline, "expired decoder still listed"
        time.sleep(0.05)  # polling for Redis's own expiry, bounded by the deadline
    assert client.smembers("ffnskip:decoders") == {b"pod-live"}  # the index is pruned too


def test_withdraw(registry: DecoderRegistry) -> None:
    registry.register(decoder("pod-a"), ttl_s=30)
    registry.withdraw("pod-a")
    assert registry.list() == [] and registry.get("pod-a") is None
    registry.withdraw("pod-a")  # idempotent


def test_bad_info_names_the_field(registry: DecoderRegistry) -> None:
    for info, field in [
        (decoder("pod-a", capacity="16"), "decoder.capacity"),
        (decoder("pod-a", draining=1), "decoder.draining"),
        (decoder("pod-a", capacity=True), "decoder.capacity"),
        ({k: v for k, v in decoder("pod-a").items() if k != "address"}, "decoder.address"),
        (decoder("pod:a"), "decoder.id"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            registry.register(info, ttl_s=5)
        assert err.value.field == field
    with pytest.raises(InvalidArgument):
        registry.register(decoder("pod-a"), ttl_s=0)


def test_corrupt_entry_is_skipped(registry: DecoderRegistry, client: redis.Redis) -> None:
    registry.register(decoder("pod-a"), ttl_s=30)
    client.set("ffnskip:decoder:pod-x", b"{oops", ex=30)
    client.sadd("ffnskip:decoders", "pod-x")
    assert [d["id"] for d in registry.list()] == ["pod-a"]


def test_redis_down_is_unavailable(registry: DecoderRegistry, redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(Unavailable):
        registry.list()
    with pytest.raises(Unavailable):
        registry.register(decoder("pod-a"), ttl_s=5)
