"""A profile's substitutes in the store, against a real redis-server: published in the same
script as the profile under a key of their own, read back by version, and refused when they
are not the bytes the profile records; the calibration worker publishes an outcome's."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import redis
import torch

from ffnskip.engine.substitutes import Substitute, SubstituteSet
from ffnskip.errors import InvalidArgument
from ffnskip.store import JobQueue, ProfileStore
from services.calibrator import worker as worker_module
from services.calibrator.settings import CalibratorSettings
from services.calibrator.worker import ModelCache, Worker
from tests.helpers.profiles import build_profile, substitutes_record

MODEL = "tiny-llama"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(client: redis.Redis) -> ProfileStore:
    return ProfileStore(client)


@pytest.fixture(scope="module")
def blob() -> bytes:
    generator = torch.Generator().manual_seed(0)
    return SubstituteSet({2: Substitute(torch.randn(8, generator=generator)),
                          3: Substitute(torch.randn(8, generator=generator))}).to_bytes()


def compensated(blob: bytes, **overrides):  # type: ignore[no-untyped-def]
    return build_profile(policy="static", static_layers=[2, 3], substitutes=substitutes_record(blob, [2, 3]), **overrides)


def test_publish_with_substitutes_and_read_them_back(store: ProfileStore, client: redis.Redis, blob: bytes) -> None:
    profile = compensated(blob)
    plain = store.publish(build_profile(), activate=True)
    version = store.publish(profile, plot_png=b"png", activate=True, substitutes=blob)
    assert store.get_active(MODEL) == profile.with_version(version)
    assert store.get_substitutes(MODEL, version) == blob and store.get_plot(MODEL, version) == b"png"
    assert store.get_substitutes(MODEL, plain) is None  # plain skips: no key at all
    assert client.exists(f"ffnskip:profile:{MODEL}:substitutes:v{version}") == 1
    again = SubstituteSet.from_bytes(store.get_substitutes(MODEL, version) or b"")
    assert list(again.layers) == [2, 3]


@pytest.mark.parametrize("given, problem", [
    (None, "missing"),
    ("other", "sha256"),
    ("longer", "bytes"),
])
def test_substitutes_that_are_not_the_recorded_bytes_are_refused(store: ProfileStore, blob: bytes, given: str | None,
                                                                 problem: str) -> None:
    wrong = {None: None, "other": bytes(reversed(blob)), "longer": blob + b"\0"}[given]
    with pytest.raises(InvalidArgument) as err:
        store.publish(compensated(blob), activate=True, substitutes=wrong)
    assert err.value.field == "substitutes" and problem in err.value.problem
    assert store.list_versions(MODEL) == [] and store.active_version(MODEL) is None  # nothing stored


def test_substitutes_for_a_profile_that_records_none_are_refused(store: ProfileStore, blob: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        store.publish(build_profile(), substitutes=blob)
    assert err.value.field == "substitutes"
    assert store.list_versions(MODEL) == []


def test_the_worker_publishes_the_outcomes_substitutes(client: redis.Redis, store: ProfileStore, blob: bytes,
                                                       tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = JobQueue(client)
    models = ModelCache("cpu", "float32", tmp_path, loader=lambda spec, device, dtype: SimpleNamespace(model_id=spec))
    worker = Worker("w-1", CalibratorSettings(models=(MODEL,), device="cpu"), jobs, store, models,
                    threading.Event(), threading.Event())
    job_id = jobs.submit({"model": MODEL, "prompts": ["a", "b", "c"], "target_skip_ratio": 0.25,
                          "tokens_per_prompt": 8, "activate": True})
    claimed = jobs.claim("w-1", block_ms=1000, min_idle_ms=60_000)
    assert claimed is not None

    def calibrate(loaded, request, progress, should_cancel):  # type: ignore[no-untyped-def]
        return SimpleNamespace(profile=compensated(blob, model_id=MODEL), plot_png=b"png", substitutes=blob)

    monkeypatch.setattr(worker_module, "calibrate", calibrate)
    worker.process(claimed)
    record = jobs.get(job_id)
    assert record["state"] == "succeeded"
    assert store.get_substitutes(MODEL, int(record["profile_version"])) == blob
