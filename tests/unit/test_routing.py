"""The gateway's routing policy with stub endpoints: no network, no clock."""

from __future__ import annotations

import pytest

from ffnskip.errors import InvalidArgument, NotFound, Unavailable
from ffnskip.v1 import generation_pb2 as pb
from services.gateway.discovery import StaticDiscovery
from services.gateway.endpoints import Endpoint
from services.gateway.proxy import conversation_affinity
from services.gateway.routing import AFFINITY_SLACK, Router, pick, routable
from services.gateway.settings import GatewaySettings

NOW = 100.0


def ep(decoder_id: str, model: str = "m", load: float = 0.0, draining: bool = False,
       expires_at: float = NOW + 10) -> Endpoint:
    return Endpoint(decoder_id=decoder_id, address=f"{decoder_id}:1", model_id=model, capacity=4, load=load,
                    draining=draining, expires_at=expires_at)


def test_least_in_flight_wins_over_reported_load():
    endpoints = [ep("a", load=0), ep("b", load=9)]
    assert pick(endpoints, {"a": 3, "b": 1}, "m", NOW).decoder_id == "b"


def test_reported_load_breaks_ties_of_in_flight():
    endpoints = [ep("a", load=5), ep("b", load=2), ep("c", load=7)]
    assert pick(endpoints, {"a": 1, "b": 1, "c": 1}, "m", NOW).decoder_id == "b"


def test_exact_ties_rotate_so_sequential_traffic_spreads():
    endpoints = [ep("b"), ep("a"), ep("c")]
    chosen = [pick(endpoints, {}, "m", NOW, rotation=r).decoder_id for r in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_rotation_only_among_the_least_loaded():
    endpoints = [ep("a"), ep("b"), ep("c")]
    chosen = {pick(endpoints, {"b": 2}, "m", NOW, rotation=r).decoder_id for r in range(10)}
    assert chosen == {"a", "c"}


def test_never_a_draining_decoder_even_when_idle():
    endpoints = [ep("a", draining=True), ep("b")]
    assert pick(endpoints, {"b": 50}, "m", NOW).decoder_id == "b"
    assert pick([ep("a", draining=True)], {}, "m", NOW) is None


def test_never_an_expired_decoder():
    endpoints = [ep("a", expires_at=NOW), ep("b", expires_at=NOW + 0.001)]
    assert pick(endpoints, {"b": 9}, "m", NOW).decoder_id == "b"
    assert pick(endpoints, {}, "m", NOW + 1) is None


def test_only_decoders_of_the_requested_model():
    endpoints = [ep("a", model="other"), ep("b", model="m", load=100)]
    assert pick(endpoints, {}, "m", NOW).decoder_id == "b"
    assert pick(endpoints, {}, "missing", NOW) is None


def test_excluded_decoders_are_skipped():
    endpoints = [ep("a"), ep("b")]
    assert pick(endpoints, {"b": 5}, "m", NOW, exclude={"a"}).decoder_id == "b"
    assert pick(endpoints, {}, "m", NOW, exclude={"a", "b"}) is None


def test_routable_filters_all_at_once():
    endpoints = [ep("a"), ep("b", draining=True), ep("c", expires_at=NOW - 1), ep("d", model="x"), ep("e")]
    assert [e.decoder_id for e in routable(endpoints, "m", NOW, exclude={"e"})] == ["a"]


def test_endpoint_from_registry_entry():
    info = {"id": "d1", "address": "10.0.0.7:50052", "model_id": "m", "capacity": 16, "load": 3,
            "profile_version": 4, "draining": False}
    endpoint = Endpoint.from_registry(info, expires_at=NOW)
    assert (endpoint.decoder_id, endpoint.address, endpoint.capacity, endpoint.load, endpoint.profile_version) == \
        ("d1", "10.0.0.7:50052", 16, 3.0, 4)
    assert endpoint.live(NOW - 0.1) and not endpoint.live(NOW)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_router_unknown_model_is_not_found_and_names_the_served_ones():
    router = Router(StaticDiscovery([ep("a", model="m1")]), quarantine_s=5, clock=Clock())
    with pytest.raises(NotFound, match="m1"):
        router.choose("nope", set())


def test_router_all_draining_is_unavailable_not_not_found():
    router = Router(StaticDiscovery([ep("a", draining=True)]), quarantine_s=5, clock=Clock())
    with pytest.raises(Unavailable):
        router.choose("m", set())


def test_router_counts_in_flight_per_decoder():
    router = Router(StaticDiscovery([ep("a"), ep("b")]), quarantine_s=5, clock=Clock())
    first = router.choose("m", set()).decoder_id
    router.acquire(first)
    second = router.choose("m", set()).decoder_id
    assert second != first  # the busy one is avoided
    router.release(first)
    assert router.in_flight == {}


def test_router_quarantines_a_failed_decoder_for_a_while():
    clock = Clock()
    router = Router(StaticDiscovery([ep("a"), ep("b")]), quarantine_s=5, clock=clock)
    router.quarantine("a")
    assert {router.choose("m", set()).decoder_id for _ in range(4)} == {"b"}
    clock.now += 5.0
    assert {router.choose("m", set()).decoder_id for _ in range(4)} == {"a", "b"}


def test_router_prefers_a_quarantined_decoder_to_none():
    router = Router(StaticDiscovery([ep("a"), ep("b")]), quarantine_s=5, clock=Clock())
    router.quarantine("a")
    assert router.choose("m", {"b"}).decoder_id == "a"
    with pytest.raises(Unavailable):
        router.choose("m", {"a", "b"})  # tried in this request: never twice


def test_a_conversation_returns_to_its_pod_while_that_pod_is_nearly_least_loaded():
    endpoints = [ep("a"), ep("b"), ep("c")]
    home = pick(endpoints, {}, "m", NOW, affinity="system: be brief").decoder_id
    # the same key, whatever the rotation, and still when its pod has AFFINITY_SLACK more in flight
    assert {pick(endpoints, {}, "m", NOW, rotation=r, affinity="system: be brief").decoder_id for r in range(6)} == {home}
    busy = {home: AFFINITY_SLACK}
    assert pick(endpoints, busy, "m", NOW, affinity="system: be brief").decoder_id == home
    busier = {home: AFFINITY_SLACK + 1}
    assert pick(endpoints, busier, "m", NOW, affinity="system: be brief").decoder_id != home
    # a pod leaving moves only its own conversations
    keys = [f"conversation {i}" for i in range(40)]
    before = {k: pick(endpoints, {}, "m", NOW, affinity=k).decoder_id for k in keys}
    assert set(before.values()) == {"a", "b", "c"}  # different conversations spread
    after = {k: pick(endpoints, {}, "m", NOW, exclude={"c"}, affinity=k).decoder_id for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "c")


def test_a_conversation_is_named_by_its_first_message():
    def chat(*contents: str) -> pb.GenerateRequest:
        return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=c) for c in contents])

    assert conversation_affinity(chat("hi", "there")) == conversation_affinity(chat("hi", "again", "more"))
    assert conversation_affinity(chat("hi")) != conversation_affinity(chat("hello"))
    assert conversation_affinity(pb.GenerateRequest(prompt="x" * 300 + "a")) == conversation_affinity(
        pb.GenerateRequest(prompt="x" * 300 + "b"))
    assert conversation_affinity(pb.GenerateRequest(prompt_token_ids=[1, 2, 3])) == "1,2,3"


def test_conversation_affinity_is_a_flag_and_on_by_default():
    keys = {"FFNSKIP_API_KEYS": "k"}
    assert GatewaySettings.from_env(keys).conversation_affinity
    assert not GatewaySettings.from_env({**keys, "FFNSKIP_CONVERSATION_AFFINITY": "false"}).conversation_affinity
    with pytest.raises(InvalidArgument, match="FFNSKIP_CONVERSATION_AFFINITY"):
        GatewaySettings.from_env({**keys, "FFNSKIP_CONVERSATION_AFFINITY": "sometimes"})
