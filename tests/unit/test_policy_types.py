"""Skip policies are one type end to end: the enum, its wire encoding (every policy, aligned
included, by name), and the decision kinds of a step."""

from __future__ import annotations

import json

import pytest
import torch

from ffnskip.config import POLICIES, Policy, QualityBudget, SkipParams
from ffnskip.engine.policies import AdaptiveStep, FfnRows, PlannedStep, RowPlan, SkipPlanner
from ffnskip.errors import InvalidArgument
from ffnskip.rpc.convert import policy_fields, policy_from_proto, policy_of, policy_to_proto, skip_params_from_proto, skip_params_to_proto
from ffnskip.rpc.generation import skip_of
from ffnskip.v1 import calibrator_pb2, common_pb2, generation_pb2


def test_a_policy_is_its_name_everywhere():
    params = SkipParams(policy="aligned")
    assert params.policy is Policy.ALIGNED and params.policy == "aligned"
    assert f"{params.policy}" == "aligned" and json.dumps({"policy": params.policy}) == '{"policy": "aligned"}'
    assert POLICIES == tuple(p.value for p in Policy)
    with pytest.raises(InvalidArgument) as caught:
        SkipParams(policy="greedy")
    assert caught.value.field == "policy" and "aligned" in caught.value.problem


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_round_trips_through_the_proto_enum(policy):
    assert policy_from_proto(policy_to_proto(policy)) is policy
    assert common_pb2.SkipPolicy.Name(policy_to_proto(policy)) == f"SKIP_POLICY_{policy.value.upper()}"


def test_skip_params_keep_aligned_and_its_quorum_on_the_wire():
    params = SkipParams(policy=Policy.ALIGNED, quorum=0.75, threshold=0.9, max_skip=None)
    assert skip_params_from_proto(skip_params_to_proto(params)) == params
    assert skip_params_from_proto(common_pb2.SkipParams(threshold=0.9)).policy is Policy.ADAPTIVE  # unset
    with pytest.raises(InvalidArgument) as caught:
        skip_params_from_proto(common_pb2.SkipParams(policy=99, threshold=0.9), "summary.skip_params")
    assert caught.value.field == "summary.skip_params.policy"


# ------------------------------------------------ one encoding on the wire: the enum, the names deprecated

POLICY_MESSAGES = [generation_pb2.SkipOverrides, generation_pb2.GenerateResponse,
                   calibrator_pb2.SubmitCalibrationRequest, calibrator_pb2.Job]


@pytest.mark.parametrize("message_type", POLICY_MESSAGES, ids=lambda t: t.__name__)
def test_a_message_names_its_policy_by_the_enum_and_an_older_ones_name_still_reads(message_type):
    sent = message_type(**policy_fields(Policy.STATIC))
    assert (sent.policy_value, sent.policy) == (common_pb2.SKIP_POLICY_STATIC, "static")  # both, for old readers
    assert policy_of(sent) is Policy.STATIC
    assert policy_of(message_type(policy_value=common_pb2.SKIP_POLICY_STATIC)) is Policy.STATIC  # new only
    assert policy_of(message_type(policy="static")) is Policy.STATIC  # old only
    assert policy_of(message_type(policy="dense", policy_value=common_pb2.SKIP_POLICY_ALIGNED)) is Policy.ALIGNED
    assert policy_of(message_type()) is None
    for bad, field in ((message_type(policy_value=99), "x.policy_value"), (message_type(policy="greedy"), "x.policy")):
        with pytest.raises(InvalidArgument) as caught:
            policy_of(bad, "x.policy")
        assert caught.value.field == field


def test_a_name_no_policy_has_travels_as_the_name_for_the_receiver_to_refuse():
    assert policy_fields("aligned") == {"policy": "aligned", "policy_value": common_pb2.SKIP_POLICY_ALIGNED}
    assert policy_fields("greedy") == {"policy": "greedy"} and policy_fields("") == {"policy": ""}


@pytest.mark.parametrize("overrides", [
    generation_pb2.SkipOverrides(policy_value=common_pb2.SKIP_POLICY_STATIC),  # a client sending the enum alone
    generation_pb2.SkipOverrides(policy="static"),  # a client older than it
    generation_pb2.SkipOverrides(**policy_fields("static")),  # today's clients: both
])
def test_skip_overrides_take_the_policy_from_either_field(overrides):
    assert skip_of(overrides, SkipParams(policy=Policy.ADAPTIVE)).policy is Policy.STATIC
    assert skip_of(generation_pb2.SkipOverrides(), SkipParams(policy=Policy.RANDOM)).policy is Policy.RANDOM  # neither


def test_calibration_jobs_take_the_policy_from_either_field():
    from services.calibrator.convert import job_request, job_to_proto
    from services.calibrator.settings import CalibratorSettings

    settings = CalibratorSettings(models=("m",))
    prompts = calibrator_pb2.PromptList(prompts=["one", "two", "three"])
    for fields in ({"policy_value": common_pb2.SKIP_POLICY_STATIC}, {"policy": "static"}, policy_fields("static")):
        request = job_request(calibrator_pb2.SubmitCalibrationRequest(model="m", prompts=prompts, **fields), settings)
        assert request["policy"] == "static"
        job = job_to_proto({"id": "j", "request": request})
        assert (job.policy_value, job.policy) == (common_pb2.SKIP_POLICY_STATIC, "static")
    request = job_request(calibrator_pb2.SubmitCalibrationRequest(model="m", prompts=prompts), settings)
    assert request["policy"] == "static"  # no objective asked for: the default quality budget's static set
    assert request["quality_budget"] == QualityBudget().to_dict()
    request = job_request(calibrator_pb2.SubmitCalibrationRequest(model="m", prompts=prompts, target_skip_ratio=0.2),
                          settings)
    assert request["policy"] == "adaptive" and "quality_budget" not in request  # a target: the paper's rule by default
    assert policy_of(job_to_proto({"id": "j", "request": {"model": "m"}})) is Policy.ADAPTIVE  # queued before policies


def plan(policy: Policy, **kwargs) -> RowPlan:
    return RowPlan.build(SkipParams(policy=policy, cold_start=1, cold_end=5, **kwargs).resolved(6), 6)


def test_steps_are_planned_unless_a_row_decides_per_layer():
    planner = SkipPlanner(6)
    generators = [torch.Generator(), torch.Generator()]
    planned = planner.begin_step([plan(Policy.STATIC, static_layers=(2,)), plan(Policy.DENSE)], [True, True], generators)
    assert isinstance(planned, PlannedStep)
    assert [planned.decide(layer).kind for layer in range(6)] == [FfnRows.ALL, FfnRows.ALL, FfnRows.SOME] + [FfnRows.ALL] * 3
    assert planned.decide(2).rows == (1,)
    adaptive = planner.begin_step([plan(Policy.ADAPTIVE), plan(Policy.STATIC)], [True, True], generators)
    assert isinstance(adaptive, AdaptiveStep)
    warming = planner.begin_step([plan(Policy.ADAPTIVE)], [False], generators[:1])  # in its warm-up: dense
    assert isinstance(warming, PlannedStep) and warming.outcome().ffn_reads == 6


def test_a_row_that_moves_keeps_its_own_hot_layers():
    """The planner reuses the per-layer hot rows while the adaptive rows are the same: the same
    rows, not merely the same hot layers (a row that moved to another index once raised IndexError
    in a later step, or asked the wrong row)."""
    planner = SkipPlanner(6)
    generators = [torch.Generator(), torch.Generator()]
    rows = [plan(Policy.ADAPTIVE), plan(Policy.ADAPTIVE)]
    planner.begin_step(rows, [False, True], generators)  # row 0 in its warm-up, row 1 adaptive
    alone = planner.begin_step(rows[:1], [True], generators[:1])  # the other row left; this one is row 0 now
    for layer in range(6):
        alone.decide(layer)
        h = torch.ones(1, 1, 4)
        alone.observe(layer, h, h, None)  # cos 1: the row fires at its first hot layer
    assert alone.outcome().skipped == [[2, 3, 4]]
