"""The embedded SmolLM2 model, loaded once per test session (prepared on first use)."""

from __future__ import annotations

import pytest

from ffnskip.engine import load_model


@pytest.fixture(scope="session")
def smollm():
    return load_model("smollm2-135m", device="cpu", dtype="float32")
