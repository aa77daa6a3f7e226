"""Calibration workers: threads that claim jobs from the Redis stream and run them.

One job, one attempt: load the model (once per process, cached), run calibrate() with
progress and cancellation wired to the job record, heartbeat in a side thread, then
publish the profile and complete the job in one Lua script (ProfileStore.publish) and ack.

A worker that dies mid-job stops heartbeating; after reclaim_idle_ms another worker
takes the entry over and runs the job again. Two attempts can never both complete it:
publish sets "succeeded" in the same script that checks it. A worker that notices it
lost the job (heartbeat refused) or is told to abandon it (shutdown past the grace
period) stops without recording anything, leaving the job to the next owner.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ffnskip.calibration.calibrate import CalibrationOutcome, calibrate
from ffnskip.errors import Cancelled, FailedPrecondition, FfnSkipError, NotFound, Unavailable
from ffnskip.logs import get_logger
from ffnskip.store import ClaimedJob, JobQueue, ProfileStore
from services.calibrator import convert
from services.calibrator.settings import CalibratorSettings

log = get_logger(__name__)
PUBLISH_ATTEMPTS = 8  # a computed profile is expensive: ride out a Redis restart before giving up


class _LeftForReclaim(Exception):
    """This worker stops without recording an outcome; the job's entry stays pending."""


class ModelCache:
    """Models by spec, each loaded once per process and shared by the workers (read-only weights)."""

    def __init__(self, device: str, dtype: str, cache_dir: Path, loader: Callable | None = None) -> None:
        self._device, self._dtype, self._cache_dir = device, dtype, cache_dir
        self._loader = loader
        self._models: dict = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, spec: str):
        with self._guard:
            lock = self._locks.setdefault(spec, threading.Lock())
        with lock:  # two workers asking for the same model wait for one load
            if spec not in self._models:
                loader = self._loader
                if loader is None:
                    from ffnskip.engine import load_model  # torch and transformers: only a worker that runs loads them

                    loader = functools.partial(load_model, cache_dir=self._cache_dir)
                started = time.perf_counter()
                self._models[spec] = loader(spec, device=self._device, dtype=self._dtype)
                log.info("model loaded", model=spec, seconds=round(time.perf_counter() - started, 2))
            return self._models[spec]


class Heartbeat:
    """Keeps a claimed job's stream entry fresh; sets `lost` when another worker owns it."""

    def __init__(self, jobs: JobQueue, claimed: ClaimedJob, interval_s: float) -> None:
        self.lost = threading.Event()
        self._jobs, self._claimed, self._interval_s = jobs, claimed, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claimed.job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._jobs.heartbeat(self._claimed)
            except FailedPrecondition:
                log.warning("job taken over by another worker", job_id=self._claimed.job_id)
                self.lost.set()
                return
            except Unavailable as err:  # keep trying; the job is reclaimed only if this lasts
                log.warning("heartbeat failed", job_id=self._claimed.job_id, error=err.message)


class ProgressReporter:
    """calibrate()'s progress callback: writes phase, done/total and an ETA to the job record."""

    def __init__(self, jobs: JobQueue, job_id: str, min_interval_s: float = 0.2) -> None:
        self._jobs, self._job_id, self._min_interval_s = jobs, job_id, min_interval_s
        self._started = time.monotonic()
        self._last_write = 0.0
        self._last_phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase == self._last_phase and done < total and now - self._last_write < self._min_interval_s:
            return  # throttled: Redis needs no more than a few updates a second
        eta = (now - self._started) / done * (total - done) if done > 0 else None
        try:
            self._jobs.progress(self._job_id, phase, done, total, None if eta is None else round(eta, 1))
            self._last_write, self._last_phase = now, phase
        except Unavailable as err:  # progress is advisory: never fail a calibration over it
            log.warning("progress update failed", job_id=self._job_id, error=err.message)


class Worker:
    def __init__(self, name: str, settings: CalibratorSettings, jobs: JobQueue, profiles: ProfileStore,
                 models: ModelCache, stop: threading.Event, abandon: threading.Event) -> None:
        self.name = name
        self._settings, self._jobs, self._profiles, self._models = settings, jobs, profiles, models
        self._stop = stop  # no new jobs
        self._abandon = abandon  # give up the running job (left for another worker to reclaim)

    def run(self) -> None:
        """The thread's loop: claim, run, repeat until stopped."""
        import ffnskip.engine  # noqa: F401 - torch and transformers take seconds to import: before, not inside, a job

        failures = 0
        while not self._stop.is_set():
            try:
                claimed = self._jobs.claim(self.name, block_ms=1000, min_idle_ms=self._settings.reclaim_idle_ms)
                failures = 0
            except Unavailable as err:
                failures += 1
                log.warning("cannot claim jobs", worker=self.name, error=err.message)
                self._stop.wait(min(5.0, 0.2 * 2**failures))
                continue
            if claimed is not None:
                self.process(claimed)

    def process(self, claimed: ClaimedJob) -> None:
        job_id = claimed.job_id
        log.info("job started", job_id=job_id, worker=self.name, attempt=claimed.deliveries, model=claimed.request.get("model"))
        with Heartbeat(self._jobs, claimed, self._settings.heartbeat_s) as heartbeat:
            gone = lambda: heartbeat.lost.is_set() or self._abandon.is_set()  # noqa: E731
            try:
                request = convert.calibration_request(claimed.request, job_id, self._settings.batch_size)
                loaded = self._models.get(request.model_id)
                should_cancel = self._cancel_check(job_id, gone)
                if should_cancel():  # the model load may have taken a while
                    raise Cancelled("calibration cancelled")
                outcome = calibrate(loaded, request, ProgressReporter(self._jobs, job_id), should_cancel)
                activate = bool(claimed.request.get("activate"))
                if activate and not outcome.profile.within_budget:  # stored for inspection; serving it needs force
                    log.warning("profile misses its quality budget: not activated", job_id=job_id,
                                verdict=outcome.profile.budget_verdict())
                    activate = False
                version = self._publish(claimed, outcome, activate, gone)
                substitute_bytes = len(outcome.substitutes or b"")
            except _LeftForReclaim as err:
                log.warning("job left for another worker", job_id=job_id, worker=self.name, reason=str(err))
                return
            except Cancelled:
                if gone():
                    log.warning("job left for another worker", job_id=job_id, worker=self.name)
                else:
                    self._record(claimed, lambda: self._jobs.mark_cancelled(claimed), "cancelled")
                return
            except FfnSkipError as err:
                error = err.message
                log.warning("job failed", job_id=job_id, error=error)
                self._record(claimed, lambda: self._jobs.fail(claimed, error), "failed")
                return
            except Exception as err:  # a bug: keep the worker alive, the job keeps the error
                log.exception("job crashed", job_id=job_id)
                message = f"internal error: {type(err).__name__}: {err}"
                self._record(claimed, lambda: self._jobs.fail(claimed, message), "failed")
                return
        if version is not None:
            log.info("job succeeded", job_id=job_id, profile_version=version, substitute_bytes=substitute_bytes)

    def _cancel_check(self, job_id: str, gone: Callable[[], bool]) -> Callable[[], bool]:
        def should_cancel() -> bool:
            if gone():
                return True
            try:
                return self._jobs.is_cancel_requested(job_id)
            except Unavailable:
                return False  # Redis blip: carry on; the heartbeat decides whether we still own the job

        return should_cancel

    def _publish(self, claimed: ClaimedJob, outcome: CalibrationOutcome, activate: bool,
                 gone: Callable[[], bool]) -> int | None:
        """Publish the profile with its plot and substitutes (an InvalidArgument, substitutes that
        disagree with the profile, fails the job: a bug in the calibration, not a Redis blip)."""
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                version = self._profiles.publish(outcome.profile, outcome.plot_png, activate=activate,
                                                 job_id=claimed.job_id, substitutes=outcome.substitutes)
                self._jobs.ack(claimed)
                return version
            except (FailedPrecondition, NotFound) as err:  # cancelled meanwhile, or the record is gone
                log.warning("profile not published", job_id=claimed.job_id, error=err.message)
                self._jobs.ack(claimed)
                return None
            except Unavailable as err:
                log.warning("publish failed; retrying", job_id=claimed.job_id, attempt=attempt + 1, error=err.message)
                if gone() or self._abandon.wait(min(10.0, 0.5 * 2**attempt)):
                    break
        raise _LeftForReclaim("could not publish the profile")

    def _record(self, claimed: ClaimedJob, record: Callable[[], bool], state: str) -> None:
        try:
            if not record():
                log.info("outcome not recorded: job already over or owned elsewhere", job_id=claimed.job_id, state=state)
        except Unavailable as err:  # the entry stays pending and is retried after reclaim
            log.warning("could not record the outcome", job_id=claimed.job_id, state=state, error=err.message)
