"""Conversions between the shared protobuf messages (ffnskip/v1/common.proto) and the
engine's types. Conversions into engine types validate through the frozen dataclasses,
so a bad field surfaces as InvalidArgument naming it.

A message names a skip policy one way, the SkipPolicy enum; the strings that named one before
(`policy` beside a `policy_value`, InfoResponse.default_skip_json) are deprecated. Every sender
sets both through `policy_fields` (or both of InfoResponse's), every reader takes the enum
through `policy_of`, falling back to the string from an older sender (no component reads
InfoResponse's skip parameters; `default_skip` is there for those that will)."""

from __future__ import annotations

from typing import Any

from ffnskip.config import POLICIES, Policy, SkipParams
from ffnskip.errors import InvalidArgument
from ffnskip.profile import LayerStats
from ffnskip.v1 import common_pb2


def policy_to_proto(policy: Policy) -> common_pb2.SkipPolicy:
    """The SkipPolicy value of a policy: SKIP_POLICY_ and its name in upper case."""
    return getattr(common_pb2, f"SKIP_POLICY_{policy.name}")


def policy_from_proto(value: int, field: str = "policy") -> Policy:
    """The policy of a SkipPolicy value; UNSPECIFIED is the server's default, ADAPTIVE."""
    if value == common_pb2.SKIP_POLICY_UNSPECIFIED:
        return Policy.ADAPTIVE
    if value not in common_pb2.SkipPolicy.values():
        raise InvalidArgument(field, f"unknown policy value {value}")
    return Policy[common_pb2.SkipPolicy.Name(value).removeprefix("SKIP_POLICY_")]


def policy_fields(policy: str) -> dict[str, Any]:
    """The fields a message names `policy` with (a Policy, or a name as a flag or JSON gives it),
    as keyword arguments of SkipOverrides, GenerateResponse, SubmitCalibrationRequest and Job:
    `policy_value`, and the deprecated string `policy` for readers older than it. A name that is
    no policy ("" included) travels as the string alone, for the receiver to default or refuse."""
    if policy not in POLICIES:
        return {"policy": policy}
    named = Policy(policy)
    return {"policy": named.value, "policy_value": policy_to_proto(named)}


def policy_of(message: Any, field: str = "policy") -> Policy | None:
    """The policy a message with the pair names: its `policy_value`, else (a sender older than
    it) its deprecated string `policy`; None when neither is set. An unknown value or name is
    InvalidArgument naming `field`."""
    if message.policy_value != common_pb2.SKIP_POLICY_UNSPECIFIED:
        return policy_from_proto(message.policy_value, f"{field}_value")
    return Policy.parse(message.policy, field) if message.policy else None


def skip_params_to_proto(params: SkipParams) -> common_pb2.SkipParams:
    message = common_pb2.SkipParams(
        policy=policy_to_proto(params.policy), cold_start=params.cold_start, threshold=float(params.threshold),
        warm_up=params.warm_up, probability=float(params.probability), static_layers=list(params.static_layers),
        seed=params.seed, quorum=float(params.quorum),
    )
    if params.cold_end is not None:
        message.cold_end = params.cold_end
    if params.max_skip is not None:
        message.max_skip = params.max_skip
    return message


def skip_params_from_proto(message: common_pb2.SkipParams, field: str = "skip_params") -> SkipParams:
    policy = policy_from_proto(message.policy, f"{field}.policy")
    try:
        return SkipParams(
            policy=policy,
            cold_start=message.cold_start,
            cold_end=message.cold_end if message.HasField("cold_end") else None,
            threshold=message.threshold,
            max_skip=message.max_skip if message.HasField("max_skip") else None,
            warm_up=message.warm_up,
            probability=message.probability,
            static_layers=tuple(message.static_layers),
            seed=message.seed,
            quorum=message.quorum or SkipParams.quorum,
        )
    except InvalidArgument as err:
        raise InvalidArgument(f"{field}.{err.field}", err.problem) from None


def layer_to_proto(stats: LayerStats) -> common_pb2.LayerSimilarity:
    return common_pb2.LayerSimilarity(
        layer=stats.layer, mean=stats.mean, std=stats.std, min=stats.min, p05=stats.p05, p25=stats.p25,
        p50=stats.p50, p75=stats.p75, p95=stats.p95, max=stats.max, count=stats.count,
    )
