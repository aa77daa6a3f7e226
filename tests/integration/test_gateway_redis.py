"""The gateway's Redis parts against a real redis-server: fleet telemetry summed over
replicas, registry discovery (expiry and a Redis outage), prompt sampling."""

from __future__ import annotations

import asyncio

import pytest

from ffnskip.store.connection import RedisSettings, connect
from ffnskip.store.registry import DecoderRegistry
from ffnskip.v1 import generation_pb2 as pb
from services.gateway.discovery import RegistryDiscovery
from services.gateway.fleet import FleetTelemetry, summarise
from services.gateway.prompt_samples import PromptSampler
from services.gateway.telemetry import Telemetry


def client_for(server):
    return connect(RedisSettings(url=server.url, retries=0, socket_timeout_s=1.0))


def record(telemetry: Telemetry, decoder: str, tokens: int) -> None:
    telemetry.first_token("m", decoder, 0.05)
    telemetry.success("m", decoder, "length", 0.4, tokens, 4 * tokens, tokens, [0, tokens, 0, 0], 0.25, 0.3)


def test_replicas_sum_and_a_gone_replica_drops_out(redis_server):
    client = client_for(redis_server)
    a, b = Telemetry(), Telemetry()
    record(a, "d1", 5)
    record(b, "d1", 7)
    record(b, "d2", 3)
    FleetTelemetry(client, "gw-a", ttl_s=60).write(a.snapshot())
    FleetTelemetry(client, "gw-b", ttl_s=60).write(b.snapshot())
    FleetTelemetry(client, "gw-b", ttl_s=60).write(b.snapshot())  # a repeated write never double-counts
    gateways, counters = FleetTelemetry(client, "gw-a", ttl_s=60).read_all()
    groups = {(g.model, g.decoder): g for g in summarise(gateways, counters).groups}
    assert gateways == 2
    assert groups[("m", "d1")].generated_tokens == 12 and groups[("m", "d1")].requests == 2
    assert groups[("m", "d2")].requests == 1 and groups[("m", "")].requests == 3
    assert groups[("m", "")].time_to_first_token_seconds.count == 3

    client.delete("ffnskip:telemetry:gateway:gw-b")  # what its TTL does when the replica is gone
    gateways, counters = FleetTelemetry(client, "gw-a", ttl_s=60).read_all()
    assert gateways == 1 and summarise(gateways, counters).groups[0].requests == 1
    restored = Telemetry()
    restored.seed(FleetTelemetry(client, "gw-a", ttl_s=60).read_own())  # a restart continues the counts
    assert restored.snapshot() == a.snapshot()


def test_discovery_follows_the_registry_and_survives_an_outage(redis_server):
    client = client_for(redis_server)
    registry = DecoderRegistry(client)
    info = {"id": "d1", "address": "127.0.0.1:1", "model_id": "m", "capacity": 2, "load": 0,
            "profile_version": None, "draining": False}
    now = [100.0]
    discovery = RegistryDiscovery(registry, interval_s=0.1, stale_s=5.0, clock=lambda: now[0])

    async def scenario() -> None:
        registry.register(info, ttl_s=30)
        await discovery.refresh()
        assert [e.decoder_id for e in discovery.endpoints()] == ["d1"]
        registry.register({**info, "draining": True}, ttl_s=30)
        await discovery.refresh()
        assert discovery.endpoints()[0].draining
        redis_server.stop()
        await discovery.refresh()  # Redis down: the last snapshot stays, until it is stale
        assert discovery.endpoints()[0].live(now[0]) and not discovery.endpoints()[0].live(now[0] + 5.0)
        redis_server.start()
        registry.withdraw("d1")
        await discovery.refresh()
        assert discovery.endpoints() == []

    asyncio.run(scenario())


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 2)])
def test_prompt_sampling_is_off_by_default_and_stores_only_the_input(redis_server, rate, expected):
    client = client_for(redis_server)
    sampler = PromptSampler(client, rate, "ffnskip:prompt-samples", maxlen=100)

    async def scenario() -> None:
        sampler.offer(pb.GenerateRequest(model="m", prompt="what is copper?", request_id="r-1"))
        sampler.offer(pb.GenerateRequest(model="m", messages=[pb.ChatMessage(role="user", content="hi")]))
        await asyncio.gather(*list(sampler._tasks))

    asyncio.run(scenario())
    entries = client.xrange("ffnskip:prompt-samples")
    assert len(entries) == expected
    if expected:
        # the two offers are written by concurrent tasks: their order in the stream is not fixed
        by_kind = {fields[b"kind"]: fields for _, fields in entries}
        assert set(by_kind) == {b"prompt", b"messages"}
        assert set(by_kind[b"prompt"]) == {b"model", b"kind", b"input", b"at"}
        assert by_kind[b"prompt"][b"input"] == b"what is copper?"
