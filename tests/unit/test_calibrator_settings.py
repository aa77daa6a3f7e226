"""CalibratorSettings.from_env: defaults, parsing, errors that name the variable, and
ENV_VARS listing exactly what is read (the Kubernetes manifests are checked against it)."""

from __future__ import annotations

import inspect
import re

import pytest

from ffnskip.errors import InvalidArgument
from ffnskip.settings import cache_root
from ffnskip.store import connection
from services.calibrator import settings as settings_module
from services.calibrator.settings import ENV_VARS, CalibratorSettings


def test_defaults() -> None:
    settings = CalibratorSettings.from_env({})
    assert (settings.host, settings.port, settings.models, settings.workers) == ("0.0.0.0", 50053, ("smollm2-135m",), 1)
    assert settings.reclaim_idle_ms == 60_000 and settings.heartbeat_s == pytest.approx(20.0)
    assert settings.redis.url == "redis://127.0.0.1:6379/0"


def test_parsing() -> None:
    settings = CalibratorSettings.from_env({
        "FFNSKIP_CALIBRATOR_PORT": "6000", "FFNSKIP_MODELS": " smollm2-135m , /models/llama ,", "FFNSKIP_DEVICE": "cpu",
        "FFNSKIP_CALIBRATOR_WORKERS": "0", "FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS": "1500", "FFNSKIP_LOG_LEVEL": "DEBUG",
        "FFNSKIP_REDIS_URL": "redis://redis:6380/2", "FFNSKIP_DRAIN_TIMEOUT_S": "2.5",
    })
    assert settings.port == 6000 and settings.models == ("smollm2-135m", "/models/llama") and settings.workers == 0
    assert settings.heartbeat_s == pytest.approx(0.5) and settings.log_level == "debug" and settings.drain_timeout_s == 2.5
    assert settings.redis.address == "redis:6380"


@pytest.mark.parametrize("name, value", [
    ("FFNSKIP_CALIBRATOR_PORT", "http"), ("FFNSKIP_CALIBRATOR_PORT", "70000"), ("FFNSKIP_CALIBRATOR_WORKERS", "-1"),
    ("FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS", "10"), ("FFNSKIP_MODELS", "a:b"), ("FFNSKIP_DEVICE", "tpu"),
    ("FFNSKIP_DTYPE", "int8"), ("FFNSKIP_DRAIN_TIMEOUT_S", "soon"), ("FFNSKIP_CALIBRATOR_BATCH_SIZE", "0"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CalibratorSettings.from_env({name: value})
    assert caught.value.field == name


def test_env_vars_lists_every_variable_read() -> None:
    pattern = re.compile(r'"(FFNSKIP_[A-Z0-9_]+)"')
    read_here = set(pattern.findall(inspect.getsource(CalibratorSettings.from_env)))
    read_by_redis = set(pattern.findall(inspect.getsource(connection.RedisSettings.from_env)))
    read_by_cache_root = set(pattern.findall(inspect.getsource(cache_root)))
    assert set(ENV_VARS) == read_here | read_by_redis | read_by_cache_root
    assert len(ENV_VARS) == len(set(ENV_VARS))
    documented = inspect.getdoc(settings_module) or ""
    assert all(name.removeprefix("FFNSKIP_REDIS_") in documented for name in ENV_VARS)
