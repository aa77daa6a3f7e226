"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.profiles import build_profile
from tests.redis_server import RedisServer, running_redis

# The services and `ffnskip up` that tests start decode eagerly unless a test says otherwise:
# compiling every batch bucket in the background would compete with the tests for the CPU
# (tests/unit/test_compiled_segments.py covers compiled decoding).
os.environ.setdefault("FFNSKIP_COMPILE", "0")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free loopback port (no persistence), per test."""
    with running_redis() as server:
        yield server


@pytest.fixture
def make_profile():  # type: ignore[no-untyped-def]
    """Factory for valid test profiles: make_profile(model_id="m", threshold=0.9)."""
    return build_profile
