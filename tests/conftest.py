"""Shared pytest fixtures."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers.profiles import build_profile
from tests.redis_server import RedisServer, running_redis


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free loopback port (no persistence), per test."""
    with running_redis() as server:
        yield server


@pytest.fixture
def make_profile():  # type: ignore[no-untyped-def]
    """Factory for valid test profiles: make_profile(model_id="m", threshold=0.9)."""
    return build_profile
