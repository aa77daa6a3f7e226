"""Fixtures for engine unit tests: tiny random Llama models on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from ffnskip.engine import Engine, load_model
from tests.helpers.tiny import plant_ffn, save_tiny_model

NEUTRAL = [2, 5]  # planted FFNs that output zero: cos(h, out) == 1 exactly
LOUD = [0, 1, 3, 4, 6, 7]  # planted FFNs that dominate the residual: cos far below any threshold


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """The cache root the tiny models are loaded with (weight digests), never the user's."""
    return tmp_path_factory.mktemp("ffnskip-cache")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    directory = save_tiny_model(tmp_path_factory.mktemp("planted"), seed=1, num_layers=8)
    plant_ffn(directory, NEUTRAL, LOUD)
    return directory


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir, engine_cache):
    return load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=engine_cache)


@pytest.fixture
def tiny_engine(tiny_loaded) -> Engine:
    return Engine(tiny_loaded, max_batch=4, max_seq_len=128)


@pytest.fixture(scope="session")
def planted_loaded(planted_dir, engine_cache):
    return load_model(str(planted_dir), device="cpu", dtype="float32", cache_dir=engine_cache)
