"""ProfileStore against a real redis-server: history, active pointer, rollback, events, outages."""

from __future__ import annotations

import json
import queue
import random
import threading
import time

import pytest
import redis

from ffnskip.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ffnskip.store import ProfileStore, RedisSettings, connect
from tests.helpers.profiles import build_profile
from tests.redis_server import RedisServer

MODEL = "tiny-llama"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(client: redis.Redis) -> ProfileStore:
    return ProfileStore(client)


def test_publish_get_and_history(store: ProfileStore) -> None:
    first, second = build_profile(threshold=0.9), build_profile(threshold=0.95)
    assert store.publish(first, plot_png=b"\x89PNG-1") == 1
    assert store.publish(second) == 2
    assert store.get(MODEL, 1) == first.with_version(1)
    assert store.get(MODEL, 2).threshold == 0.95
    assert store.list_versions(MODEL) == [1, 2]
    assert store.list_models() == [MODEL]
    assert store.get_plot(MODEL, 1) == b"\x89PNG-1"
    assert store.get_plot(MODEL, 2) is None
    assert store.active_version(MODEL) is None and store.get_active(MODEL) is None
    with pytest.raises(NotFound):
        store.get(MODEL, 3)


def test_versions_are_immutable(store: ProfileStore, client: redis.Redis) -> None:
    client.set("ffnskip:profile:tiny-llama:next", 0)  # force the next allocation onto an existing version
    store.publish(build_profile())
    client.set("ffnskip:profile:tiny-llama:next", 0)
    with pytest.raises(Exception) as err:
        store.publish(build_profile(threshold=0.5))
    assert type(err.value).__name__ == "AlreadyExists"
    assert store.get(MODEL, 1).threshold == 0.95


def test_active_pointer_and_activate(store: ProfileStore) -> None:
    assert store.publish(build_profile(), activate=True) == 1
    assert store.publish(build_profile(threshold=0.9)) == 2
    assert store.active_version(MODEL) == 1  # publishing without activate leaves the pointer
    store.activate(MODEL, 2)
    assert store.get_active(MODEL).threshold == 0.9
    with pytest.raises(NotFound):
        store.activate(MODEL, 99)
    assert store.active_version(MODEL) == 2
    assert store.activations(MODEL) == [1, 2]


def test_concurrent_activations_leave_one_consistent_pointer(store: ProfileStore, client: redis.Redis) -> None:
    versions = [store.publish(build_profile()) for _ in range(5)]
    errors: list[BaseException] = []

    def flip(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                store.activate(MODEL, rng.choice(versions))
                if rng.random() < 0.2:
                    try:
                        store.rollback(MODEL)
                    except FailedPrecondition:
                        pass
        except BaseException as err:  # surfaced below; a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=flip, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    stack = store.activations(MODEL)
    assert store.active_version(MODEL) == stack[-1]
    assert stack[-1] in versions
    assert all(a != b for a, b in zip(stack, stack[1:]))  # re-activating the active one is a no-op


def test_rollback_walks_back_the_activation_stack(store: ProfileStore) -> None:
    for threshold in (0.9, 0.95, 0.99):
        store.publish(build_profile(threshold=threshold), activate=True)
    assert store.rollback(MODEL) == 2
    assert store.active_version(MODEL) == 2
    assert store.rollback(MODEL) == 1
    with pytest.raises(FailedPrecondition):
        store.rollback(MODEL)
    assert store.active_version(MODEL) == 1
    with pytest.raises(FailedPrecondition):
        store.rollback("never-published")


def test_events_reach_a_subscriber_and_reconnects_resync(store: ProfileStore, redis_server: RedisServer) -> None:
    received: queue.Queue[dict] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=store.subscribe, args=(received.put, stop), kwargs={"poll_s": 0.1})
    thread.start()
    try:
        assert received.get(timeout=10) == {"action": "resync"}
        store.publish(build_profile(), activate=True)
        assert received.get(timeout=10) == {"model": MODEL, "version": 1, "action": "activate"}
        store.publish(build_profile(), activate=True)
        assert received.get(timeout=10)["version"] == 2
        store.rollback(MODEL)
        assert received.get(timeout=10) == {"model": MODEL, "version": 1, "action": "rollback"}

        redis_server.stop()  # an outage: whatever was published now is lost to the subscriber
        redis_server.start()
        assert received.get(timeout=20) == {"action": "resync"}
        store.publish(build_profile(), activate=True)
        assert received.get(timeout=10)["action"] == "activate"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_events_iterator_closes(store: ProfileStore) -> None:
    with store.events(poll_s=0.1) as events:
        assert next(events) == {"action": "resync"}
        assert events.get(timeout=0.2) is None
    assert list(events) == []


def test_malformed_stored_profile_is_invalid_argument(store: ProfileStore, client: redis.Redis) -> None:
    client.set("ffnskip:profile:bad:v1", b"{not json")
    client.zadd("ffnskip:profile:bad:versions", {"1": 1})
    store.activate("bad", 1)
    with pytest.raises(InvalidArgument) as err:
        store.get_active("bad")
    assert "ffnskip:profile:bad:v1" in err.value.message

    wrong = json.loads(build_profile(model_id="bad", version=2).to_json())
    wrong["threshold"] = 2.0
    client.set("ffnskip:profile:bad:v2", json.dumps(wrong))
    with pytest.raises(InvalidArgument) as err:
        store.get("bad", 2)
    assert err.value.field == "profile.threshold"

    client.set("ffnskip:profile:bad:v3", build_profile(model_id="bad", version=4).to_json())
    with pytest.raises(InvalidArgument):
        store.get("bad", 3)  # a profile stored under the wrong version key

    client.set("ffnskip:profile:bad:active", "latest")
    with pytest.raises(InvalidArgument):
        store.active_version("bad")


def test_model_ids_cannot_forge_keys(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument):
        store.get("tiny:plot", 1)


def test_redis_down_is_unavailable_quickly(store: ProfileStore, redis_server: RedisServer) -> None:
    store.publish(build_profile(), activate=True)
    redis_server.stop()
    for call in (lambda: store.get_active(MODEL), lambda: store.publish(build_profile()), lambda: store.rollback(MODEL)):
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            call()
        assert time.monotonic() - started < 5.0  # retries are bounded
        assert f"127.0.0.1:{redis_server.port}" in err.value.message


def test_settings_from_env_connect_to_the_server(redis_server: RedisServer) -> None:
    settings = RedisSettings.from_env({"FFNSKIP_REDIS_URL": redis_server.url, "FFNSKIP_REDIS_DB": "2", "FFNSKIP_REDIS_TLS": "false"})
    assert (settings.db, settings.tls, settings.password) == (2, False, None)
    assert RedisSettings.from_env({}) == RedisSettings()
    client = connect(settings)
    ProfileStore(client).publish(build_profile())
    assert client.connection_pool.connection_kwargs["db"] == 2 and client.dbsize() > 0
    with pytest.raises(InvalidArgument):
        RedisSettings.from_env({"FFNSKIP_REDIS_TLS": "maybe"})
    with pytest.raises(InvalidArgument):
        RedisSettings.from_env({"FFNSKIP_REDIS_DB": "two"})
