"""Every execution of the skip rule (ffnskip.engine.skip_rule) decides as the rule itself does.

The reference is the rule's own functions run on plain lists (`ListOps`: every operation an
obvious per-row comprehension). Held to it, layer by layer over several steps of randomised
batches (every policy mixed, rows in their warm-up, aligned quorums whose products are exact
integers, similarities on the thresholds themselves):

- the engine's host controller, as ModelRunner.decode asks it: SkipPlanner's PlannedStep or
  AdaptiveStep over bit masks and sparse numbers, with its shortcuts (settled rows, quiet
  layers, cosines computed only for the rows that may fire, cached planned decisions);
- the tensor driver of the GPU benchmark's captured step (ffnskip.bench.gpu.device_skips);
- the host vector type's operations themselves, against the lists.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ffnskip.bench.gpu.device_skips import DeviceSkips, RowTensors
from ffnskip.config import Policy, SkipParams
from ffnskip.engine import skip_rule
from ffnskip.engine.policies import FfnRows, RowPlan, SkipPlanner
from ffnskip.engine.segments import residual_similarity
from ffnskip.engine.skip_rule import HOST, HostNumbers, SkipState, rows_of

LAYERS = 12
SIMILARITIES = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]  # the thresholds below among them


class ListVector:
    """A row vector as a list; every operator elementwise (a scalar stands for every row)."""

    def __init__(self, values: Any) -> None:
        self.values = list(values)

    def _zip(self, other: Any, op: Callable[[Any, Any], Any]) -> ListVector:
        others = other.values if isinstance(other, ListVector) else [other] * len(self.values)
        return ListVector(op(a, b) for a, b in zip(self.values, others))

    def __and__(self, other: Any) -> ListVector:
        return self._zip(other, lambda a, b: a and b)

    def __or__(self, other: Any) -> ListVector:
        return self._zip(other, lambda a, b: a or b)

    def __invert__(self) -> ListVector:
        return ListVector(not a for a in self.values)

    def __gt__(self, other: Any) -> ListVector:  # type: ignore[override]
        return self._zip(other, lambda a, b: a > b)

    def __ge__(self, other: Any) -> ListVector:  # type: ignore[override]
        return self._zip(other, lambda a, b: a >= b)

    def __sub__(self, other: Any) -> ListVector:
        return self._zip(other, lambda a, b: a - b)


class ListOps:
    @staticmethod
    def where(cond: ListVector, yes: Any, no: ListVector) -> ListVector:
        yeses = yes.values if isinstance(yes, ListVector) else [yes] * len(cond.values)
        return ListVector(y if c else n for c, y, n in zip(cond.values, yeses, no.values))

    @staticmethod
    def count(mask: ListVector) -> int:
        return sum(1 for a in mask.values if a)


LIST = ListOps()


class ListRows:
    """A step's plans as lists, read straight from the RowPlans (no builder of the drivers)."""

    def __init__(self, plans: list[RowPlan], active: list[bool], draws: list[Any]) -> None:
        policies = [p.params.policy if on else Policy.DENSE for p, on in zip(plans, active)]
        layers = range(len(plans[0].hot))
        self.hot = [ListVector(p.hot[layer] for p in plans) for layer in layers]
        self.planned = [ListVector(d is not None and bool(d[layer]) for d in draws) for layer in layers]
        self.adaptive = ListVector(policy in (Policy.ADAPTIVE, Policy.ALIGNED) for policy in policies)
        self.aligned = ListVector(policy is Policy.ALIGNED for policy in policies)
        self.threshold = ListVector(p.params.threshold for p in plans)
        self.run_length = ListVector(p.run_length for p in plans)
        self.quorum = min((p.params.quorum for p, policy in zip(plans, policies) if policy is Policy.ALIGNED), default=1.0)


def random_params(rng: random.Random) -> SkipParams:
    policy = rng.choice([Policy.DENSE, Policy.ADAPTIVE, Policy.ALIGNED, Policy.ALIGNED, Policy.STATIC, Policy.RANDOM,
                         Policy.NON_ADAPTIVE])
    start = rng.randint(0, 4)
    return SkipParams(policy=policy, cold_start=start, cold_end=rng.randint(start + 1, LAYERS),
                      threshold=rng.choice([0.5, 0.7, 0.9]), max_skip=rng.choice([None, 0, 1, 2, 4]),
                      warm_up=0, probability=0.4, quorum=rng.choice([0.2, 0.25, 0.3, 0.5, 0.6, 1.0]),
                      static_layers=tuple(sorted(rng.sample(range(LAYERS), 3))), seed=rng.randint(0, 99)
                      ).resolved(LAYERS)


def runs_of(decision: Any, batch: int) -> list[bool]:
    if decision.kind is FfnRows.ALL:
        return [True] * batch
    if decision.kind is FfnRows.NONE:
        return [False] * batch
    return [b in decision.rows for b in range(batch)]


def generators(seed: int, step: int, batch: int) -> list[torch.Generator]:
    """The same seeds for every path that draws this step's planned skips."""
    return [torch.Generator().manual_seed(seed * 1000 + step * 10 + b) for b in range(batch)]


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]  # h, out, cos(h, out), whether the segment computed it


def layer_inputs(rng: random.Random, batch: int) -> Inputs:
    """The similarities either drawn from SIMILARITIES and handed over as a segment's own
    (computed), or left for the host to take from h and out."""
    h = torch.randn(batch, 1, 8, generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
    if rng.random() < 0.5:
        return h, h.clone(), torch.tensor([rng.choice(SIMILARITIES) for _ in range(batch)]), True
    scale = torch.tensor([rng.choice([0.0, 0.2, 0.5, 1.0, 3.0]) for _ in range(batch)])[:, None, None]
    out = h + scale * torch.randn(batch, 1, 8, generator=torch.Generator().manual_seed(rng.randint(0, 10**6)))
    return h, out, residual_similarity(h, out), False


def hold_step(planner: SkipPlanner, plans: list[RowPlan], active: list[bool], draw: Callable[[], list[torch.Generator]],
              inputs: list[Inputs], record: bool = False) -> list[list[int]]:
    """One decode step through the host controller (as ModelRunner.decode asks it), the tensor
    driver and the rule on lists, asserting that every layer's decision agrees; -> the layers
    each row skipped. `draw()` gives each path the same generators for its planned draws."""
    batch, layers = len(plans), len(plans[0].hot)
    host = planner.begin_step(plans, active, draw(), record_similarity=record)
    policies = [p.params.policy if on else Policy.DENSE for p, on in zip(plans, active)]
    draws = [p.draw(g) if policy.planned else None for p, policy, g in zip(plans, policies, draw())]
    rows = ListRows(plans, active, draws)
    device = DeviceSkips(RowTensors.build(plans, active, draws, torch.device("cpu")))
    state = SkipState(remaining=ListVector([0] * batch), fired=ListVector([False] * batch))
    skipped: list[list[int]] = [[] for _ in range(batch)]
    reads = 0
    for layer, (h, out, similarity, computed) in enumerate(inputs):
        skip, wish = skip_rule.decide(rows, state, layer, LIST)
        expected = [not s for s in skip.values]
        assert runs_of(host.decide(layer), batch) == expected, ("host", layer)
        assert device.decide(layer).tolist() == expected, ("device", layer)
        state = skip_rule.observe(rows, state, layer, skip, wish, ListVector(similarity.tolist()), LIST)
        host.observe(layer, h, out, similarity if computed else None)
        device.observe(layer, similarity)
        for b in range(batch):
            if skip.values[b]:
                skipped[b].append(layer)
        reads += any(expected)
    outcome = host.outcome()
    assert outcome.skipped == skipped and outcome.ffn_reads == reads
    if record:
        assert outcome.similarity is not None
        assert [[outcome.similarity[b][layer] for b in range(batch)] for layer in range(layers)] == \
            [inputs[layer][2].tolist() for layer in range(layers)]
    return skipped


@pytest.mark.parametrize("seed", range(60))
def test_every_driver_decides_as_the_rule(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 7)
    plans = [RowPlan.build(random_params(rng), LAYERS) for _ in range(batch)]
    planner = SkipPlanner(LAYERS)  # one planner for every step: its caches are part of what is held
    for step in range(6):
        active = [rng.random() < 0.85 for _ in range(batch)]
        inputs = [layer_inputs(rng, batch) for _ in range(LAYERS)]
        hold_step(planner, plans, active, lambda step=step: generators(seed, step, batch), inputs,
                  record=rng.random() < 0.2)


def adaptive_row(max_skip: int) -> RowPlan:
    params = SkipParams(policy=Policy.ADAPTIVE, cold_start=1, cold_end=9, threshold=0.9, max_skip=max_skip, warm_up=0)
    return RowPlan.build(params.resolved(10), 10)


def test_the_settled_shortcut_waits_for_every_adaptive_row():
    """Row 0 fires at layer 1 and its run ends at layer 2; row 1 fires only at layer 5: a step that
    stopped asking once no row is in a run would miss its skips."""
    plans = [adaptive_row(1), adaptive_row(2), RowPlan.build(SkipParams(policy=Policy.DENSE).resolved(10), 10)]
    fires_at = {0: 1, 1: 5}
    inputs = []
    for layer in range(10):
        similarity = torch.tensor([1.0 if fires_at.get(b) == layer else 0.0 for b in range(3)])
        inputs.append((torch.zeros(3, 1, 4), torch.zeros(3, 1, 4), similarity, True))
    skipped = hold_step(SkipPlanner(10), plans, [True] * 3, lambda: [torch.Generator()] * 3, inputs)
    assert skipped == [[2], [6, 7], []]


def aligned_rows(batch: int, quorum: float) -> list[RowPlan]:
    params = SkipParams(policy=Policy.ALIGNED, cold_start=1, cold_end=6, threshold=0.9, max_skip=2, warm_up=0,
                        quorum=quorum).resolved(8)
    return [RowPlan.build(params, 8)] * batch


@pytest.mark.parametrize("batch, quorum, met", [(25, 0.6, True), (5, 0.2, True), (8, 0.3, False)])
def test_a_quorum_met_exactly_is_met_on_every_execution(batch, quorum, met):
    """Fifteen votes of 25 at quorum 0.6: 15 >= 0.6 * 25 = 15.0 on the host, in float64, where
    float32 makes the product 15.000001 and the vote would miss: every execution computes the
    quorum in float64. The first round(quorum * batch) rows fire at the first hot layer and vote
    at the next two (two of eight at 0.3 miss it)."""
    plans = aligned_rows(batch, quorum)
    voters = round(quorum * batch)
    host = SkipPlanner(8).begin_step(plans, [True] * batch, [torch.Generator()] * batch)
    device = DeviceSkips(RowTensors.build(plans, [True] * batch, [None] * batch, torch.device("cpu")))
    h = torch.zeros(batch, 1, 4)
    kinds = []
    for layer in range(8):
        decision = host.decide(layer)
        assert device.decide(layer).tolist() == runs_of(decision, batch), layer
        kinds.append(decision.kind)
        similarity = torch.tensor([1.0 if b < voters else 0.0 for b in range(batch)])
        host.observe(layer, h, h, similarity)
        device.observe(layer, similarity)
    together = voters >= quorum * batch
    assert kinds[2:4] == [FfnRows.NONE if together else FfnRows.ALL] * 2
    assert together == met


# ---- the host vector type against the lists


def host_of(values: list[float], default: float, rng: random.Random) -> HostNumbers:
    """`values` as HostNumbers that store a random part of the rows holding `default`."""
    stored = {b: v for b, v in enumerate(values) if v != default or rng.random() < 0.3}
    return HostNumbers(stored, default, len(values))


def as_list(vector: Any, size: int) -> list:
    if isinstance(vector, HostNumbers):
        return [vector.at(b) for b in range(size)]
    return [bool(vector >> b & 1) for b in range(size)]


@pytest.mark.parametrize("seed", range(30))
def test_host_vectors_compute_as_lists(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 70)  # past 64 rows too
    mask = lambda: rng.getrandbits(size)  # noqa: E731
    a, b, c = mask(), mask(), mask()
    la, lb, lc = (ListVector(as_list(m, size)) for m in (a, b, c))
    assert rows_of(a) == tuple(i for i in range(size) if la.values[i])
    assert HOST.count(a) == LIST.count(la)
    assert as_list(a & ~b | c, size) == (la & ~lb | lc).values
    for together in (True, False):
        assert as_list(HOST.where(a, together, b), size) == LIST.where(la, together, lb).values
    for default in (0, -math.inf, 5.0):  # 5.0 > 0: the rows at the default must be looked at too
        values = [rng.choice([default, 0, 1, 2, 0.5, 0.9]) for _ in range(size)]
        other = [rng.choice([0.5, 0.9, 1, 7.0]) for _ in range(size)]
        x, lx = host_of(values, default, rng), ListVector(values)
        y, ly = host_of(other, rng.choice([0.9, math.inf]), rng), ListVector(other)
        assert as_list(x > 0, size) == (lx > 0).values
        assert as_list(x >= y, size) == (lx >= ly).values
        assert as_list(x > y, size) == (lx > ly).values
        assert as_list(x - 1, size) == (lx - 1).values
        assert as_list(HOST.where(a, x - 1, x), size) == LIST.where(la, lx - 1, lx).values
        assert as_list(HOST.where(a, y, x), size) == LIST.where(la, ly, lx).values
        assert as_list(HOST.where(a, 3, x), size) == LIST.where(la, 3, lx).values
    with pytest.raises(ValueError):
        rows_of(~a)
