"""`ffnskip up` for real on a tiny random Llama: the first run calibrates the model through
the calibrator and serves a request through the gateway; the second run finds the
profile in its data directory and skips calibration. Both exit on their own (--once)
after stopping every process they started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny import save_tiny_model
from tests.redis_server import free_port


def up_command(data_dir, model_dir, *extra: str) -> list[str]:
    """`ffnskip up` on `model_dir` on the CPU, with a short first request and calibration."""
    return [sys.executable, "-m", "ffnskip.cli", "up", "--model", str(model_dir), "--device", "cpu",
            "--data-dir", str(data_dir), "--max-new-tokens", "8", "--calibration-tokens", "8", "--http-port", "0", *extra]


def up_env(data_dir, **extra: str) -> dict[str, str]:
    """This environment without the key variables (so `up` makes and prints its own), with the
    cache root next to `data_dir` (the decoders' profile copies stay out of the user's cache),
    plus `extra`."""
    drop = ("FFNSKIP_API_KEYS", "FFNSKIP_OPS_KEYS")
    cache = str(Path(data_dir).parent / "ffnskip-cache")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "FFNSKIP_CACHE": cache, **extra}


def up(data_dir, model_dir, *extra: str) -> subprocess.CompletedProcess:
    command = up_command(data_dir, model_dir, "--once", "--gateway-port", str(free_port()), *extra)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=up_env(data_dir))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("stack-model"))


def test_up_calibrates_serves_and_stops(tmp_path, model_dir):
    first = up(tmp_path / "stack", model_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "no active skip profile: calibrating" in first.stdout and "quality budget" in first.stdout
    # the first answer does not wait for the calibration (the decoders serve dense until the profile is active)
    assert first.stdout.index("served by decoder-0") < first.stdout.index("succeeded")
    assert "served by decoder-0" in first.stdout and "profile v1" in first.stdout
    assert "API key     dev-" in first.stdout and "stack stopped" in first.stdout
    assert "skip:" in first.stdout and "latency: first token" in first.stdout
    # the decoders keep their copy of the active profile under the cache root they were given
    assert list((tmp_path / "ffnskip-cache" / "profiles").glob("*.profile.json"))

    second = up(tmp_path / "stack", model_dir, "--decoders", "2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "calibrating" not in second.stdout  # the profile survived in the stack's Redis data
    assert "profile v1" in second.stdout
    logs = tmp_path / "stack" / "logs"
    assert (logs / "decoder-1.log").exists() and (logs / "gateway.log").exists()


def test_a_first_request_the_gateway_refuses_is_one_line_and_the_stack_stops(tmp_path, model_dir):
    refused = up(tmp_path / "stack", model_dir, "--prompt", "")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "error: the first request failed: INVALID_ARGUMENT" in refused.stderr
    assert "Traceback" not in refused.stderr and "stack stopped" in refused.stdout
