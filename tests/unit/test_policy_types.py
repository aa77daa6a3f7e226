"""Skip policies are one type end to end: the enum, its wire encoding (every policy, aligned
included, by name), and the decision kinds of a step."""

from __future__ import annotations

import json

import pytest
import torch

from ffnskip.config import POLICIES, Policy, SkipParams
from ffnskip.engine.policies import AdaptiveStep, FfnRows, PlannedStep, RowPlan, SkipPlanner
from ffnskip.errors import InvalidArgument
from ffnskip.rpc.convert import policy_from_proto, policy_to_proto, skip_params_from_proto, skip_params_to_proto
from ffnskip.v1 import common_pb2


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
