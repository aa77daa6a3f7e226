"""The calibration worker in-process against a real redis-server, with calibrate() replaced
by stubs: every outcome path records the right job state (or deliberately none)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from ffnskip.errors import Cancelled, InvalidArgument
from ffnskip.store import JobQueue, ProfileStore, RedisSettings, connect
from services.calibrator import worker as worker_module
from services.calibrator.settings import CalibratorSettings
from services.calibrator.worker import ModelCache, ProgressReporter, Worker
from tests.helpers.profiles import build_profile

pytestmark = pytest.mark.timeout(60)
MODEL = "tiny-llama"
REQUEST = {"model": MODEL, "prompts": ["a", "b", "c"], "target_skip_ratio": 0.25, "tokens_per_prompt": 8, "activate": True}


@pytest.fixture
def env(redis_server, tmp_path):
    client = connect(RedisSettings(url=redis_server.url, retries=1))
    settings = CalibratorSettings(models=(MODEL,), reclaim_idle_ms=300, device="cpu")
    loads: list[str] = []
    models = ModelCache("cpu", "float32", tmp_path, loader=lambda spec, device, dtype: loads.append(spec) or SimpleNamespace(model_id=spec))
    stop, abandon = threading.Event(), threading.Event()
    jobs, profiles = JobQueue(client), ProfileStore(client)
    yield SimpleNamespace(jobs=jobs, profiles=profiles, client=client, loads=loads,
                          worker=Worker("w-1", settings, jobs, profiles, models, stop, abandon), abandon=abandon)
    client.close()


def run_one(env, calibrate) -> str:
    """Submit a job, claim it as the worker and process it with `calibrate` as the calibration."""
    job_id = env.jobs.submit(REQUEST)
    claimed = env.jobs.claim("w-1", block_ms=1000, min_idle_ms=60_000)
    assert claimed is not None and claimed.job_id == job_id
    original = worker_module.calibrate
    worker_module.calibrate = calibrate
    try:
        env.worker.process(claimed)
    finally:
        worker_module.calibrate = original
    return job_id


def pending(env) -> int:
    return env.client.xpending("ffnskip:jobs", "calibrators")["pending"]


def test_success_publishes_activates_and_acks(env) -> None:
    def calibrate(loaded, request, progress, should_cancel):
        assert request.model_id == MODEL and request.prompts == ("a", "b", "c") and request.job_id
        progress("measuring", 1, 2)
        return SimpleNamespace(profile=build_profile(model_id=MODEL), plot_png=b"png", substitutes=None)

    job_id = run_one(env, calibrate)
    record = env.jobs.get(job_id)
    assert record["state"] == "succeeded" and record["phase"] == "measuring" and record["eta_s"] is not None
    assert env.profiles.get_active(MODEL).job_id == job_id and env.profiles.get_plot(MODEL, record["profile_version"]) == b"png"
    assert pending(env) == 0
    run_one(env, calibrate)
    assert env.loads == [MODEL]  # the model was loaded once and reused


@pytest.mark.parametrize("error, message", [
    (InvalidArgument("prompts", "no decoded tokens"), "prompts: no decoded tokens"),
    (RuntimeError("boom"), "internal error: RuntimeError: boom"),
])
def test_failure_keeps_its_error(env, error: Exception, message: str) -> None:
    def calibrate(loaded, request, progress, should_cancel):
        raise error

    job_id = run_one(env, calibrate)
    record = env.jobs.get(job_id)
    assert (record["state"], record["error"]) == ("failed", message)
    assert pending(env) == 0 and env.profiles.list_versions(MODEL) == []


def test_cancel_request_stops_the_calibration(env) -> None:
    def calibrate(loaded, request, progress, should_cancel):
        env.jobs.cancel(request.job_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if should_cancel():
                raise Cancelled("calibration cancelled")
            time.sleep(0.01)  # polling cadence
        raise AssertionError("should_cancel never became true")

    job_id = run_one(env, calibrate)
    assert env.jobs.get(job_id)["state"] == "cancelled" and pending(env) == 0


def test_a_worker_that_lost_its_job_records_nothing(env) -> None:
    taken = {}

    def calibrate(loaded, request, progress, should_cancel):
        taken["job"] = env.jobs.claim("w-2", block_ms=0, min_idle_ms=0)  # another worker takes the entry over
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # w-1's heartbeat (every 100 ms) notices
            if should_cancel():
                raise Cancelled("calibration cancelled")
            time.sleep(0.01)  # polling cadence
        raise AssertionError("the worker never noticed it lost the job")

    job_id = run_one(env, calibrate)
    assert taken["job"] is not None and taken["job"].job_id == job_id
    record = env.jobs.get(job_id)
    assert record["state"] == "running" and record["consumer"] == "w-2" and not record.get("error")
    assert pending(env) == 1  # still pending, now for w-2


def test_progress_reporter_writes_an_eta(env) -> None:
    job_id = env.jobs.submit(REQUEST)
    env.jobs.claim("w-1", block_ms=1000)
    report = ProgressReporter(env.jobs, job_id, min_interval_s=0)
    report("measuring", 0, 10)
    assert env.jobs.get(job_id)["eta_s"] is None
    report("measuring", 5, 10)
    record = env.jobs.get(job_id)
    assert (record["phase"], record["done"], record["total"]) == ("measuring", 5, 10) and record["eta_s"] >= 0
