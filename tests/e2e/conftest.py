"""Fixtures of the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ffnskip.stack.procs import free_port
from tests.helpers.fleet import Fleet
from tests.helpers.http_fleet import HttpFleet
from tests.helpers.tiny import save_tiny_model
from tests.redis_server import running_redis


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> Iterator[HttpFleet]:
    tmp: Path = tmp_path_factory.mktemp("openai")
    model_dir = save_tiny_model(tmp / "tiny")
    with running_redis() as redis_server:
        fleet = Fleet(tmp, redis_server.url, model_dir)
        http_port, metrics_port = free_port(), free_port()
        try:
            decoder = fleet.decoder("d1", FFNSKIP_MAX_BATCH="2", FFNSKIP_MAX_QUEUE="0", FFNSKIP_METRICS_HOST="127.0.0.1",
                                    FFNSKIP_METRICS_PORT=str(metrics_port))
            gateway = fleet.gateway("gw-a", FFNSKIP_HTTP_HOST="127.0.0.1", FFNSKIP_HTTP_PORT=str(http_port))
            fleet.ready(decoder, gateway)
            yield HttpFleet(fleet, http_port, metrics_port, redis_server.url)
        finally:
            fleet.stop()
