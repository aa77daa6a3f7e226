"""The skip rule run on tensors (for a step captured whole on a device) decides as the
host-side controller the CPU engine uses: the same rows run each layer's FFN, step after step,
for batches mixing every policy, with similarities drawn to land around the thresholds."""

from __future__ import annotations

import random

import pytest
import torch

from ffnskip.bench.gpu.device_skips import DeviceSkips, RowTensors
from ffnskip.config import Policy, SkipParams
from ffnskip.engine.policies import FfnRows, RowPlan, SkipPlanner

LAYERS = 12


def random_params(rng: random.Random) -> SkipParams:
    policy = rng.choice([Policy.DENSE, Policy.ADAPTIVE, Policy.ALIGNED, Policy.STATIC, Policy.RANDOM,
                         Policy.NON_ADAPTIVE])
    start = rng.randint(0, 4)
    return SkipParams(policy=policy, cold_start=start, cold_end=rng.randint(start + 1, LAYERS),
                      threshold=rng.choice([0.5, 0.7, 0.9]), max_skip=rng.choice([None, 0, 1, 2, 4]),
                      warm_up=0, probability=0.4, quorum=rng.choice([0.25, 0.5, 1.0]),
                      static_layers=tuple(sorted(rng.sample(range(LAYERS), 3))), seed=rng.randint(0, 99)
                      ).resolved(LAYERS)


def host_runs(decision, batch: int) -> list[bool]:
    if decision.kind is FfnRows.ALL:
        return [True] * batch
    if decision.kind is FfnRows.NONE:
        return [False] * batch
    return [b in decision.rows for b in range(batch)]


@pytest.mark.parametrize("seed", range(40))
def test_tensor_decisions_equal_the_host_controller(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 6)
    plans = [RowPlan.build(random_params(rng), LAYERS) for _ in range(batch)]
    planner = SkipPlanner(LAYERS)
    for step in range(6):
        active = [rng.random() < 0.85 for _ in range(batch)]
        generators = [torch.Generator().manual_seed(seed * 100 + step * 10 + b) for b in range(batch)]
        host = planner.begin_step(plans, active, generators)
        # the same draws for the tensors (the planned policies' draws come from the generators)
        generators = [torch.Generator().manual_seed(seed * 100 + step * 10 + b) for b in range(batch)]
        policies = [p.params.policy if on else Policy.DENSE for p, on in zip(plans, active)]
        planned = [p.draw(g) if policy.planned else None for p, policy, g in zip(plans, policies, generators)]
        device = DeviceSkips(RowTensors.build(plans, active, planned, torch.device("cpu")))
        h = torch.zeros(batch, 1, 4)
        for layer in range(LAYERS):
            expected = host_runs(host.decide(layer), batch)
            assert device.decide(layer).tolist() == expected, (step, layer)
            similarity = torch.tensor([rng.choice([0.4, 0.6, 0.8, 0.95]) for _ in range(batch)])
            out = h.clone()
            host.observe(layer, h, out, similarity)
            device.observe(layer, similarity)
