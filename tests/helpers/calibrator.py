"""Start a real calibrator process for tests (see tests/helpers/services.py)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.services import ServiceProcess, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start_calibrator(tmp: Path, redis_url: str, model: str, name: str, **extra: str) -> ServiceProcess:
    """`python -m services.calibrator.main` on a free loopback port, serving `model`;
    returns once its health service says SERVING."""
    port = free_port()
    env = {"FFNSKIP_REDIS_URL": redis_url, "FFNSKIP_MODELS": model, "FFNSKIP_DEVICE": "cpu",
           "FFNSKIP_CALIBRATOR_HOST": "127.0.0.1", "FFNSKIP_CALIBRATOR_PORT": str(port), "FFNSKIP_DRAIN_TIMEOUT_S": "5",
           **extra}
    return ServiceProcess("services.calibrator.main", env, port, tmp / f"{name}.log").start()
