"""One process life for every service: settings -> logging -> serve -> exit code."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import structlog

from ffnskip.errors import InvalidArgument, Unavailable
from ffnskip.logs import configure_logging
from ffnskip.rpc import process
from ffnskip.rpc.process import EXIT_BAD_SETTINGS, EXIT_FAILED, EXIT_OK, run_service


@dataclass(frozen=True)
class Settings:
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        if "FFNSKIP_BROKEN" in env:
            raise InvalidArgument("FFNSKIP_BROKEN", "must not be set")
        return cls(env.get("FFNSKIP_LOG_LEVEL", "info"))


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """run_service configures logging for a process; here, without cached loggers, and undone
    afterwards, so later tests can capture logs with structlog's own testing tools."""
    monkeypatch.setattr(process, "configure_logging", functools.partial(configure_logging, cache_loggers=False))
    yield
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def test_bad_settings_exit_2_with_one_line_and_nothing_served(capsys) -> None:
    served = []

    async def serve(settings: Settings) -> None:
        served.append(settings)

    assert run_service("svc", Settings.from_env, serve, {"FFNSKIP_BROKEN": "1"}) == EXIT_BAD_SETTINGS
    assert served == []
    assert capsys.readouterr().err.strip() == "error: FFNSKIP_BROKEN: must not be set"


def test_a_failure_while_serving_exits_1_and_a_clean_stop_0(capsys) -> None:
    async def failing(settings: Settings) -> None:
        raise Unavailable("redis unreachable")

    async def clean(settings: Settings) -> None:
        assert settings.log_level == "debug"

    assert run_service("svc", Settings.from_env, failing, {}) == EXIT_FAILED
    assert "error: redis unreachable" in capsys.readouterr().err
    assert run_service("svc", Settings.from_env, clean, {"FFNSKIP_LOG_LEVEL": "debug"}) == EXIT_OK
