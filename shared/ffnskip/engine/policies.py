"""Skip policies per row of a decode batch: which rows run each layer's FFN.

Every sequence carries its own SkipParams, so one batch can mix policies. At the
start of a step the planner turns the rows' plans into one `StepSkips`; between the
attention and the FFN of each layer the runner asks it `decide(layer)`, and after
the FFN it reports back through `observe(layer, h, out)`. There are two kinds of
step:

- `PlannedStep`: every row's skips are known before the first layer (dense, observe,
  static, random, non_adaptive). All decisions are made at the start, and the same
  plans as the last step (static rows) reuse its decisions: the per-layer question is a
  lookup, because the Python a skip row pays over a dense one is time its skips do not save.
- `AdaptiveStep`: some row decides as it goes (adaptive, aligned). The paper's rule
  fires in `observe`: cos(h, out) >= threshold on a hot layer skips the FFN of the
  next k hot layers, once per token. `aligned` rows follow the same rule but decide
  together: at each hot layer their skip wishes are votes, and when at least a quorum
  of the aligned rows vote skip, the FFN is skipped for all of them (else it runs for
  all). Skipping then removes the layer's weight read itself, which per-row skipping
  almost never does in a batch. A row that is skipped without voting does not fire there.

The per-row bookkeeping (run counters, fired flags, votes) lives on the host as plain
Python values: at decode batch sizes (1-16 rows) that is a few microseconds per layer,
where the same logic as tensor ops cost dozens of small kernels per layer, a
measurable share of a CPU decode step. The one tensor computation is the cosine, and
only for the rows that can still fire on this layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

from ffnskip.config import Policy, SkipParams
from ffnskip.engine.segments import residual_similarity


@dataclass(frozen=True)
class RowPlan:
    """A sequence's policy, precomputed once at admission."""

    params: SkipParams
    hot: tuple[bool, ...]  # per layer: cold_start <= layer < cold_end
    static: tuple[bool, ...]  # per layer: in the fixed skip set of `static`
    run_length: int  # k; None (up to cold_end) becomes L

    @staticmethod
    def build(params: SkipParams, num_layers: int) -> RowPlan:
        assert params.cold_end is not None, "plans are built from resolved parameters"
        hot = tuple(params.cold_start <= layer < params.cold_end for layer in range(num_layers))
        chosen = set(params.static_layers) if params.policy is Policy.STATIC else set()
        static = tuple(layer in chosen for layer in range(num_layers))
        run_length = num_layers if params.max_skip is None else params.max_skip
        return RowPlan(params=params, hot=hot, static=static, run_length=run_length)

    def draw(self, generator: torch.Generator) -> Seq[bool] | None:
        """This token's planned skips per layer for `static` and the random baselines; None for
        the rules that decide as they go."""
        policy = self.params.policy
        if policy is Policy.STATIC:
            return self.static
        if policy in (Policy.RANDOM, Policy.NON_ADAPTIVE):
            planned = (torch.rand(len(self.hot), generator=generator) < self.params.probability).tolist()
            return [p and h for p, h in zip(planned, self.hot)] if policy is Policy.NON_ADAPTIVE else planned
        return None


class FfnRows(Enum):
    """Which rows of the batch run a layer's FFN."""

    ALL = "all"
    NONE = "none"  # no row: the layer's FFN weights are not read
    SOME = "some"


@dataclass(frozen=True)
class Decision:
    """What one layer's FFN does for the batch; `rows` are the rows that run it, for SOME."""

    kind: FfnRows
    rows: tuple[int, ...] | None = None


RUN_ALL = Decision(FfnRows.ALL)
RUN_NONE = Decision(FfnRows.NONE)


def decide_layer(layer: int, skip: Seq[bool], skipped: list[list[int]]) -> Decision:
    """The decision for a layer whose rows skip where `skip[b]`; each skipping row's list in
    `skipped` gets the layer."""
    for b, skips in enumerate(skip):
        if skips:
            skipped[b].append(layer)
    run = tuple(b for b, skips in enumerate(skip) if not skips)
    if len(run) == len(skip):
        return RUN_ALL
    return Decision(FfnRows.SOME, run) if run else RUN_NONE


@dataclass(frozen=True)
class StepOutcome:
    """What a decode step skipped: per row, the layers whose FFN did not run for it; per row
    and layer cos(h, out) when recorded (else None); and `ffn_reads`, the layers whose FFN ran
    for at least one row (a read of its weights)."""

    skipped: list[list[int]]
    similarity: list[list[float]] | None
    ffn_reads: int


class StepSkips(Protocol):
    """One decode step's skip decisions, asked layer by layer by the runner."""

    def decide(self, layer: int) -> Decision: ...

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor, similarity: torch.Tensor | None) -> None:
        """h, out: [B, 1, D] before and after the FFN (out == h where it was skipped);
        `similarity`: cos(h, out) per row when the FFN segment computed it already."""

    def outcome(self) -> StepOutcome: ...


def similarities(h: torch.Tensor, out: torch.Tensor, rows: list[int] | None,
                 computed: torch.Tensor | None) -> list[float]:
    """cos(h, out) of `rows` (None: every row), from the segment's own values when it computed them."""
    if computed is not None:
        values = computed.tolist()
        return values if rows is None else [values[b] for b in rows]
    if rows is not None:
        index = torch.tensor(rows, device=h.device)
        h, out = h.index_select(0, index), out.index_select(0, index)
    return residual_similarity(h, out).tolist()


class SimilarityRecord:
    """cos(h, out) per row and layer for one step (the observe policy: calibration's instrument)."""

    def __init__(self, batch: int, num_layers: int) -> None:
        self.values = [[math.nan] * num_layers for _ in range(batch)]

    def add(self, layer: int, rows: Seq[int], values: Seq[float]) -> None:
        for b, value in zip(rows, values):
            self.values[b][layer] = value


class PlannedStep:
    """A step whose every decision was made before its first layer."""

    def __init__(self, decisions: Seq[Decision], skipped: list[list[int]], ffn_reads: int,
                 record: SimilarityRecord | None) -> None:
        self.decisions = decisions
        self.skipped = skipped
        self.ffn_reads = ffn_reads
        self.record = record

    def decide(self, layer: int) -> Decision:
        return self.decisions[layer]

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor, similarity: torch.Tensor | None) -> None:
        if self.record is not None:
            rows = range(h.shape[0])
            self.record.add(layer, rows, similarities(h, out, None, similarity))

    def outcome(self) -> StepOutcome:
        return StepOutcome(self.skipped, None if self.record is None else self.record.values, self.ffn_reads)


class AdaptiveStep:
    """A step in which adaptive or aligned rows decide layer by layer (planned rows may share it)."""

    def __init__(self, plans: Seq[RowPlan], policies: Seq[Policy], planned: Seq[Seq[bool] | None],
                 hot_rows: Seq[tuple[int, ...]], record: SimilarityRecord | None) -> None:
        batch = len(plans)
        self.plans = plans
        self.batch = batch
        self.planned = planned
        self.planning = any(p is not None for p in planned)
        self.hot_rows = hot_rows  # per layer, the adaptive rows that are hot there
        self.aligned_rows = [b for b, policy in enumerate(policies) if policy is Policy.ALIGNED]
        self.quorum = min((plans[b].params.quorum for b in self.aligned_rows), default=1.0)
        self.record = record
        self.remaining = [0] * batch  # per row, the hot layers left in its run of k
        self.fired = [False] * batch  # per row, whether it fired on this token
        self.no_skips = [False] * batch
        self.skip_now: Seq[bool] = self.no_skips  # this layer's skips, per row
        self.wished: list[int] = []  # this layer's rows in a run (their skip wishes, or votes)
        # adaptive rows still to fire or in their run of k; at 0 every later layer runs for every row
        self.unsettled = sum(1 for policy in policies if policy.adaptive)
        self.settled = False
        self.skipped: list[list[int]] = [[] for _ in range(batch)]
        self.ffn_reads = 0

    def decide(self, layer: int) -> Decision:
        if self.settled:
            self.ffn_reads += 1
            return RUN_ALL
        remaining = self.remaining
        self.wished = [b for b in self.hot_rows[layer] if remaining[b] > 0]
        if not (self.wished or self.planning or self.aligned_rows):  # the common layer: every row runs
            self.skip_now = self.no_skips
            self.ffn_reads += 1
            return RUN_ALL
        skip = [planned is not None and planned[layer] for planned in self.planned]
        for b in self.wished:
            skip[b] = True
        if self.aligned_rows:
            self._align(layer, skip)
        self.skip_now = skip
        decision = decide_layer(layer, skip, self.skipped)
        if decision.kind is not FfnRows.NONE:
            self.ffn_reads += 1
        return decision

    def _align(self, layer: int, skip: list[bool]) -> None:
        """One decision for all aligned rows in this hot layer, from their votes."""
        members = [b for b in self.aligned_rows if self.plans[b].hot[layer]]
        if not members:
            return
        votes = sum(1 for b in members if b in self.wished)
        together = votes >= self.quorum * len(members)
        for b in members:
            skip[b] = together

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor, similarity: torch.Tensor | None) -> None:
        if self.settled:
            return  # no row decides from similarities any more, and none are recorded
        for b in self.wished:  # a run of k is positional: outvoted wishes count too
            self.remaining[b] -= 1
            if self.remaining[b] == 0:  # only a row that fired has a run
                self.unsettled -= 1
        skip_now, fired = self.skip_now, self.fired
        candidates = [b for b in self.hot_rows[layer] if not skip_now[b] and not fired[b]]
        rows = list(range(self.batch)) if self.record is not None else candidates
        if rows:  # else nobody can fire here: no similarity to compute
            values = dict(zip(rows, similarities(h, out, None if len(rows) == self.batch else rows, similarity)))
            if self.record is not None:
                self.record.add(layer, rows, [values[b] for b in rows])
            for b in candidates:
                if values[b] >= self.plans[b].params.threshold:
                    self.remaining[b] = self.plans[b].run_length
                    self.fired[b] = True
                    if self.remaining[b] == 0:
                        self.unsettled -= 1
        # Once every adaptive row has fired and finished its run (and nothing else decides per
        # layer), the rest of the step runs every FFN without asking.
        if self.unsettled == 0 and not (self.planning or self.aligned_rows or self.record is not None):
            self.settled = True

    def outcome(self) -> StepOutcome:
        return StepOutcome(self.skipped, None if self.record is None else self.record.values, self.ffn_reads)


def step_policies(plans: Seq[RowPlan], active: Seq[bool]) -> list[Policy]:
    """The policy each row runs this step: its own once past its warm-up (`active`), else dense."""
    return [p.params.policy if on else Policy.DENSE for p, on in zip(plans, active)]


class SkipPlanner:
    """Makes each decode step's StepSkips; one per engine, keeping what steps can share."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        # the last planned step's rows' planned skips, and its decisions, skips and reads
        self._planned_key: tuple | None = None
        self._planned: tuple[list[Decision], list[list[int]], int] = ([], [], 0)
        # the last adaptive step's adaptive rows with their hot layers, and its hot rows per layer
        self._hot_key: tuple | None = None
        self._hot_rows: list[tuple[int, ...]] = []

    def begin_step(self, plans: Seq[RowPlan], active: Seq[bool], generators: Seq[torch.Generator],
                   record_similarity: bool = False) -> StepSkips:
        """`active[b]`: row b is past its warm-up, so this token may skip."""
        policies = step_policies(plans, active)
        planned = [p.draw(g) if policy.planned else None for p, policy, g in zip(plans, policies, generators)]
        record = SimilarityRecord(len(plans), self.num_layers) if record_similarity else None
        if not any(policy.adaptive for policy in policies):
            decisions, skipped, reads = self._planned_decisions(planned, len(plans))
            return PlannedStep(decisions, [list(rows) for rows in skipped], reads, record)  # the step's own lists
        adaptive_rows = [b for b, policy in enumerate(policies) if policy.adaptive]
        hot = tuple((b, plans[b].hot) for b in adaptive_rows)  # the rows themselves: a row may move
        if hot != self._hot_key:
            self._hot_key = hot
            self._hot_rows = [tuple(b for b in adaptive_rows if plans[b].hot[layer]) for layer in range(self.num_layers)]
        return AdaptiveStep(plans, policies, planned, self._hot_rows, record)

    def _planned_decisions(self, planned: Seq[Seq[bool] | None],
                           batch: int) -> tuple[list[Decision], list[list[int]], int]:
        key = tuple(None if p is None else tuple(p) for p in planned)
        if key != self._planned_key:
            skipped: list[list[int]] = [[] for _ in range(batch)]
            decisions = []
            for layer in range(self.num_layers):
                decisions.append(decide_layer(layer, [p is not None and p[layer] for p in planned], skipped))
            reads = sum(1 for decision in decisions if decision.kind is not FfnRows.NONE)
            self._planned_key, self._planned = key, (decisions, skipped, reads)
        return self._planned
