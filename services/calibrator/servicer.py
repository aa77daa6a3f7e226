"""The Calibrator gRPC servicer: validate, convert, call the stores, convert back.

Store calls block (redis-py), so each runs in a worker thread (asyncio.to_thread, which
carries the request id along). Errors are the taxonomy; StatusInterceptor maps them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ffnskip.errors import FailedPrecondition, InvalidArgument, NotFound
from ffnskip.logs import get_logger
from ffnskip.profile import Profile
from ffnskip.rpc.convert import layer_to_proto
from ffnskip.store import JobQueue, ProfileStore
from ffnskip.store.jobs import TERMINAL_STATES
from ffnskip.store.profiles import check_model_id
from ffnskip.v1 import calibrator_pb2 as pb
from ffnskip.v1 import calibrator_pb2_grpc
from services.calibrator import convert
from services.calibrator.settings import CalibratorSettings

log = get_logger(__name__)
T = TypeVar("T")


class CalibratorServicer(calibrator_pb2_grpc.CalibratorServicer):
    def __init__(self, settings: CalibratorSettings, jobs: JobQueue, profiles: ProfileStore, watch_poll_s: float = 0.25) -> None:
        self._settings = settings
        self._jobs = jobs
        self._profiles = profiles
        self._watch_poll_s = watch_poll_s

    @staticmethod
    async def _call(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # --- jobs --------------------------------------------------------------------------

    async def SubmitCalibration(self, request: pb.SubmitCalibrationRequest, context) -> pb.SubmitCalibrationResponse:
        job_request = await self._call(convert.job_request, request, self._settings)
        key = convert.idempotency_key(request)
        job_id = await self._call(self._jobs.submit, job_request, key)
        log.info("job submitted", job_id=job_id, model=request.model, idempotency_key=key)
        return pb.SubmitCalibrationResponse(job_id=job_id)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return convert.job_to_proto(await self._call(self._jobs.get, convert.check_job_id(request.job_id)))

    async def WatchJob(self, request: pb.WatchJobRequest, context) -> AsyncIterator[pb.Job]:
        job_id = convert.check_job_id(request.job_id)
        last: pb.Job | None = None
        while True:
            record = await self._call(self._jobs.get, job_id)
            job = convert.job_to_proto(record)
            if job != last:
                yield job
                last = job
            if record["state"] in TERMINAL_STATES:
                return
            await asyncio.sleep(self._watch_poll_s)  # the job hash has no change feed: poll it

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        job_id = convert.check_job_id(request.job_id)
        state = await self._call(self._jobs.cancel, job_id)
        log.info("job cancel requested", job_id=job_id, state=state)
        return convert.job_to_proto(await self._call(self._jobs.get, job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        limit = request.limit or 50
        if not (1 <= limit <= 1000):
            raise InvalidArgument("limit", f"must be in [1, 1000], got {limit}")
        records = await self._call(self._jobs.list, limit)
        return pb.ListJobsResponse(jobs=[convert.job_to_proto(r) for r in records])

    # --- profiles ----------------------------------------------------------------------

    async def ListProfiles(self, request: pb.ListProfilesRequest, context) -> pb.ListProfilesResponse:
        models = [_model(request.model)] if request.model else await self._call(self._profiles.list_models)
        summaries: list[pb.ProfileSummary] = []
        for model in models:
            summaries += await self._call(self._summaries, model)
        return pb.ListProfilesResponse(profiles=summaries)

    async def GetProfile(self, request: pb.GetProfileRequest, context) -> pb.GetProfileResponse:
        model = _model(request.model)
        active = await self._call(self._active_version, model)
        version = request.version if request.HasField("version") else active
        if version is None:
            raise NotFound(f"model {model!r} has no active profile")
        profile = await self._call(self._read, model, version)
        plot = await self._call(self._profiles.get_plot, model, version)
        return pb.GetProfileResponse(summary=convert.summary_to_proto(profile, version == active),
                                     profile_json=profile.to_json(), plot_png=plot or b"",
                                     layers=[layer_to_proto(s) for s in profile.layers])

    async def ActivateProfile(self, request: pb.ActivateProfileRequest, context) -> pb.ProfileChange:
        model = _model(request.model)
        profile = await self._call(self._read, model, request.version)  # refuse a malformed profile; the active one stays
        if not (profile.within_budget or request.force):
            raise FailedPrecondition(f"force: profile v{request.version} misses its quality budget ({profile.budget_verdict()}); "
                                     "activate it with force to serve it anyway")
        previous = await self._call(self._active_version, model)
        await self._call(self._profiles.activate, model, request.version)
        log.info("profile activated", model=model, version=request.version, previous=previous, forced=not profile.within_budget)
        return _change(model, request.version, previous)

    async def RollbackProfile(self, request: pb.RollbackProfileRequest, context) -> pb.ProfileChange:
        model = _model(request.model)
        stack = await self._call(self._profiles.activations, model)
        if len(stack) >= 2:
            await self._call(self._read, model, stack[-2])  # refuse to roll back onto a malformed profile
        active = await self._call(self._profiles.rollback, model)
        previous = stack[-1] if stack else None  # read before the script: informational only
        log.info("profile rolled back", model=model, version=active, previous=previous)
        return _change(model, active, previous)

    # --- blocking helpers (run in a thread) ----------------------------------------------

    def _read(self, model: str, version: int) -> Profile:
        """The stored profile; a malformed document is FAILED_PRECONDITION naming its key."""
        try:
            return self._profiles.get(model, version)
        except InvalidArgument as err:
            log.error("malformed profile in redis", model=model, version=version, error=err.message)
            raise FailedPrecondition(f"stored profile v{version} of model {model!r} is malformed: {err.message}") from None

    def _active_version(self, model: str) -> int | None:
        try:
            return self._profiles.active_version(model)
        except InvalidArgument as err:
            log.error("malformed active pointer in redis", model=model, error=err.message)
            raise FailedPrecondition(f"the active profile pointer of model {model!r} is malformed: {err.message}") from None

    def _summaries(self, model: str) -> list[pb.ProfileSummary]:
        active = self._active_version(model)
        summaries = []
        for version in self._profiles.list_versions(model):
            try:
                summaries.append(convert.summary_to_proto(self._read(model, version), version == active))
            except (FailedPrecondition, NotFound) as err:  # list the rest; mark the unusable one
                summaries.append(pb.ProfileSummary(model=model, version=version, active=version == active, error=err.message))
        return summaries


def _model(model: str) -> str:
    try:
        return check_model_id(model)
    except InvalidArgument as err:
        raise InvalidArgument("model", err.problem) from None


def _change(model: str, active: int, previous: int | None) -> pb.ProfileChange:
    change = pb.ProfileChange(model=model, active_version=active)
    if previous is not None:
        change.previous_version = previous
    return change
