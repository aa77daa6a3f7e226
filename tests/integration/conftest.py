"""Integration fixtures: the embedded SmolLM2 model, loaded once per test session (prepared
on first use), and a Redis client on the test's own redis-server."""

from __future__ import annotations

import os

import pytest
import redis

from ffnskip.engine import load_model
from ffnskip.settings import cache_root
from ffnskip.store.connection import RedisSettings, connect
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def smollm():
    return load_model("smollm2-135m", device="cpu", dtype="float32", cache_dir=cache_root(os.environ))


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    """A client that gives up quickly: a test about an outage must not wait on retries."""
    return connect(RedisSettings(url=redis_server.url, retries=2, socket_timeout_s=2.0))
