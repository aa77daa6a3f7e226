"""Conversions between the shared protobuf messages (ffnskip/v1/common.proto) and the
engine's types. Conversions into engine types validate through the frozen dataclasses,
so a bad field surfaces as InvalidArgument naming it."""

from __future__ import annotations

from ffnskip.config import SkipParams
from ffnskip.errors import InvalidArgument
from ffnskip.profile import LayerStats
from ffnskip.v1 import common_pb2

_POLICY_TO_PROTO = {
    "adaptive": common_pb2.SKIP_POLICY_ADAPTIVE,
    "dense": common_pb2.SKIP_POLICY_DENSE,
    "random": common_pb2.SKIP_POLICY_RANDOM,
    "non_adaptive": common_pb2.SKIP_POLICY_NON_ADAPTIVE,
    "static": common_pb2.SKIP_POLICY_STATIC,
    "observe": common_pb2.SKIP_POLICY_OBSERVE,
}
_POLICY_FROM_PROTO = {value: name for name, value in _POLICY_TO_PROTO.items()}


def skip_params_to_proto(params: SkipParams) -> common_pb2.SkipParams:
    message = common_pb2.SkipParams(
        policy=_POLICY_TO_PROTO[params.policy], cold_start=params.cold_start, threshold=float(params.threshold),
        warm_up=params.warm_up, probability=float(params.probability), static_layers=list(params.static_layers),
        seed=params.seed,
    )
    if params.cold_end is not None:
        message.cold_end = params.cold_end
    if params.max_skip is not None:
        message.max_skip = params.max_skip
    return message


def skip_params_from_proto(message: common_pb2.SkipParams, field: str = "skip_params") -> SkipParams:
    if message.policy not in _POLICY_FROM_PROTO and message.policy != common_pb2.SKIP_POLICY_UNSPECIFIED:
        raise InvalidArgument(f"{field}.policy", f"unknown policy value {message.policy}")
    try:
        return SkipParams(
            policy=_POLICY_FROM_PROTO.get(message.policy, "adaptive"),
            cold_start=message.cold_start,
            cold_end=message.cold_end if message.HasField("cold_end") else None,
            threshold=message.threshold,
            max_skip=message.max_skip if message.HasField("max_skip") else None,
            warm_up=message.warm_up,
            probability=message.probability,
            static_layers=tuple(message.static_layers),
            seed=message.seed,
        )
    except InvalidArgument as err:
        raise InvalidArgument(f"{field}.{err.field}", err.problem) from None


def layer_to_proto(stats: LayerStats) -> common_pb2.LayerSimilarity:
    return common_pb2.LayerSimilarity(
        layer=stats.layer, mean=stats.mean, std=stats.std, min=stats.min, p05=stats.p05, p25=stats.p25,
        p50=stats.p50, p75=stats.p75, p95=stats.p95, max=stats.max, count=stats.count,
    )
