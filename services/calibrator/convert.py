"""The calibrator's conversions: a SubmitCalibrationRequest into a validated job request
(the dict queued in Redis), and job records and profiles back into protobuf."""

from __future__ import annotations

import re
from typing import Any

from ffnskip import datasets
from ffnskip.calibration.calibrate import CalibrationRequest
from ffnskip.config import Policy, QualityBudget
from ffnskip.errors import InvalidArgument, NotFound
from ffnskip.profile import Profile
from ffnskip.rpc.convert import policy_fields, policy_of, skip_params_to_proto
from ffnskip.v1 import calibrator_pb2 as pb
from services.calibrator.settings import CalibratorSettings

MAX_PROMPT_CHARS = 8000
MAX_IDEMPOTENCY_KEY = 200
DEFAULT_DATASET = "calibration"
DEFAULT_TARGET = 0.25
DEFAULT_TOKENS = 128
DEFAULT_POLICY = Policy.ADAPTIVE.value
# The data sets a job may name, and the field of each row that is the prompt.
DATASET_FIELDS = {"calibration": "text", "prompts": "prompt", "factoid_qa": "question"}
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATES = {
    "queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING, "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED, "cancelled": pb.JOB_STATE_CANCELLED,
}


def job_request(message: pb.SubmitCalibrationRequest, settings: CalibratorSettings) -> dict[str, Any]:
    """Validate a submission completely (so a queued job cannot be refused later for its
    input) and return the JSON-able request the worker will run."""
    if not message.model:
        raise InvalidArgument("model", "must not be empty")
    if message.model not in settings.models:
        raise NotFound(f"model: {message.model!r} is not served by this calibrator (models: {', '.join(settings.models)})")
    request: dict[str, Any] = {"model": message.model, "activate": message.activate_on_success}
    request["target_skip_ratio"] = message.target_skip_ratio if message.HasField("target_skip_ratio") else DEFAULT_TARGET
    request["tokens_per_prompt"] = message.tokens_per_prompt if message.HasField("tokens_per_prompt") else DEFAULT_TOKENS
    budget = {name: getattr(message, name) for name in ("max_kl", "max_relative_nll") if message.HasField(name)}
    named = policy_of(message)  # policy_value, else (a client older than it) the deprecated string
    if not (budget or message.HasField("target_skip_ratio") or named is Policy.ADAPTIVE):
        budget = QualityBudget().to_dict()  # no objective asked for: the default quality budget
    if budget:
        request["quality_budget"] = budget
    request["policy"] = named.value if named else (Policy.STATIC.value if budget else DEFAULT_POLICY)
    if message.WhichOneof("source") == "prompts":
        prompts = list(message.prompts.prompts)
        for index, prompt in enumerate(prompts):
            if len(prompt) > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"prompts[{index}]", f"at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
        request["prompts"] = prompts
    else:
        request["dataset"] = message.dataset if message.WhichOneof("source") == "dataset" else DEFAULT_DATASET
    calibration_request(request)  # the calibration's own checks: prompt count, ratio, tokens
    return request


def idempotency_key(message: pb.SubmitCalibrationRequest) -> str | None:
    key = message.idempotency_key
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable() or any(c.isspace() for c in key):
        raise InvalidArgument("idempotency_key", f"must be 1-{MAX_IDEMPOTENCY_KEY} printable characters without spaces")
    return key


def dataset_prompts(name: str) -> list[str]:
    if name not in DATASET_FIELDS:  # never a path: a client must not read the server's files
        raise NotFound(f"dataset: unknown data set {name!r} (known: {', '.join(DATASET_FIELDS)})")
    return datasets.texts(name, DATASET_FIELDS[name])


def calibration_request(request: dict[str, Any], job_id: str = "", batch_size: int | None = None) -> CalibrationRequest:
    """The engine-side request for a queued job request."""
    prompts = request["prompts"] if "prompts" in request else dataset_prompts(request["dataset"])
    batching: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    return CalibrationRequest(
        prompts=tuple(prompts), target_skip_ratio=float(request["target_skip_ratio"]),
        tokens_per_prompt=int(request["tokens_per_prompt"]), job_id=job_id, model_id=request["model"],
        policy=request.get("policy", DEFAULT_POLICY), **batching,  # jobs queued before policies existed are adaptive
        quality_budget=QualityBudget(**request["quality_budget"]) if "quality_budget" in request else None,
    )


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id or ""):
        raise InvalidArgument("job_id", f"must be a job id as SubmitCalibration returned it, got {job_id!r}")
    return job_id


def job_to_proto(record: dict[str, Any]) -> pb.Job:
    request = record.get("request") or {}
    source = f"dataset:{request['dataset']}" if "dataset" in request else f"{len(request.get('prompts', []))} prompts"
    job = pb.Job(
        job_id=record.get("id", ""), model=request.get("model", ""),
        state=_STATES.get(record.get("state", ""), pb.JOB_STATE_UNSPECIFIED), phase=record.get("phase", ""),
        done=int(record.get("done") or 0), total=int(record.get("total") or 0), error=record.get("error", ""),
        attempts=int(record.get("attempts") or 0), cancel_requested=bool(record.get("cancel_requested")),
        created_at=record.get("created_at", ""), started_at=record.get("started_at", ""),
        updated_at=record.get("updated_at", ""), finished_at=record.get("finished_at", ""),
        target_skip_ratio=float(request.get("target_skip_ratio") or 0.0),
        tokens_per_prompt=int(request.get("tokens_per_prompt") or 0),
        activate_on_success=bool(request.get("activate")), prompt_source=source,
        **policy_fields(request.get("policy", DEFAULT_POLICY)),
    )
    if record.get("eta_s") is not None:
        job.eta_s = record["eta_s"]
    if record.get("profile_version"):
        job.profile_version = int(record["profile_version"])
    return job


def summary_to_proto(profile: Profile, active: bool) -> pb.ProfileSummary:
    return pb.ProfileSummary(
        model=profile.model_id, version=profile.version, active=active, created_at=profile.created_at,
        job_id=profile.job_id, fingerprint=profile.fingerprint, skip_params=skip_params_to_proto(profile.skip_params()),
        target_skip_ratio=profile.target_skip_ratio, measured_skip_ratio=profile.measured_skip_ratio,
        measured_decode_skip_ratio=profile.measured_decode_skip_ratio, measured_agreement=profile.measured_agreement,
        calibration_size=int(profile.calibration["size"]), num_layers=profile.num_layers,
        measured_kl=profile.quality.get("kl", 0.0), measured_top_match=profile.quality.get("top_match", 0.0),
        measured_relative_nll=profile.quality.get("relative_nll", 0.0), max_kl=profile.quality.get("max_kl", 0.0),
        max_relative_nll=profile.quality.get("max_relative_nll", 0.0), within_budget=profile.within_budget,
    )
