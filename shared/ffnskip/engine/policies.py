"""Skip policies per row of a decode batch: which rows run each layer's FFN, as the engine asks.

Every sequence carries its own SkipParams, so one batch can mix policies. At the
start of a step the planner turns the rows' plans into one `StepSkips`; between the
attention and the FFN of each layer the runner asks it `decide(layer)`, and after
the FFN it reports back through `observe(layer, h, out)`. The rule that decides is
skip_rule.py's, the one definition that every execution runs; here it runs on host
vectors (skip_rule.HOST: the rows' flags as bit masks, their counters and similarities
as sparse numbers). There are two kinds of step:

- `PlannedStep`: every row's skips are known before the first layer (dense, observe,
  static, random, non_adaptive). All decisions are made at the start, and the same
  plans as the last step (static rows) reuse its decisions: the per-layer question is a
  lookup, because the Python a skip row pays over a dense one is time its skips do not save.
- `AdaptiveStep`: some row decides as it goes (adaptive, aligned): the paper's rule fires
  on cos(h, out) >= threshold on a hot layer and skips the FFN of the next k hot layers,
  once per token; `aligned` rows vote, so that their skips remove the layer's weight read
  itself, which per-row skipping almost never does in a batch. It asks the rule only where
  the answer is not known without asking.

On the host the rule costs microseconds per layer at decode batch sizes (1-16 rows),
where the same rule as tensor operations is a dozen small kernels per layer, a
measurable share of a CPU decode step. The one tensor computation is the cosine, and
only for the rows that can still fire on this layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from itertools import compress
from typing import NamedTuple, Protocol

import torch

from ffnskip.config import Policy, SkipParams
from ffnskip.engine import skip_rule
from ffnskip.engine.segments import residual_similarity
from ffnskip.engine.skip_rule import HOST, HostNumbers, SkipState, mask_of, rows_of


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


class HostRows(NamedTuple):
    """A step's rows for the skip rule as host vectors (skip_rule.HOST): bit masks and HostNumbers."""

    hot: tuple[int, ...]  # per layer, the rows hot there
    planned: tuple[int, ...]  # per layer, the rows whose plan skips it on this token
    adaptive: int
    aligned: int
    threshold: HostNumbers
    run_length: HostNumbers
    quorum: float
    size: int  # the batch's rows
    quiet: tuple[bool, ...]  # per layer: no row plans to skip it or votes on it (only runs skip it)


def decide(rows: HostRows, state: SkipState, layer: int) -> tuple[int, int]:
    """skip_rule.decide on host vectors, or its answer where it is known without asking: with no
    row in a run (every counter at 0) on a layer no row plans to skip or votes on, nobody skips."""
    if not state.remaining.values and rows.quiet[layer]:
        return 0, 0
    return skip_rule.decide(rows, state, layer, HOST)


@lru_cache(maxsize=4096)
def decision_of(skip: int, size: int) -> Decision:
    """The decision for a layer that the rows of the mask `skip` skip, in a batch of `size` rows."""
    if not skip:
        return RUN_ALL
    run = ((1 << size) - 1) & ~skip
    return Decision(FfnRows.SOME, rows_of(run)) if run else RUN_NONE


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
    """A step in which adaptive or aligned rows decide layer by layer (planned rows may share it):
    skip_rule's decide and observe on host vectors, asked only where their answer is not known.
    Each shortcut below is what the rule would give there, without evaluating it."""

    def __init__(self, rows: HostRows, record: SimilarityRecord | None) -> None:
        self.rows = rows
        self.record = record
        self.state = SkipState(remaining=HostNumbers({}, 0, rows.size), fired=0)
        self.skip = self.wish = 0  # this layer's, for observe
        # nothing decides per layer once every adaptive row has fired and run its k (`settled`)
        self.may_settle = record is None and all(rows.quiet)
        self.settled = False
        self.skipped: list[list[int]] = [[] for _ in range(rows.size)]
        self.ffn_reads = 0

    def decide(self, layer: int) -> Decision:
        if self.settled:
            self.ffn_reads += 1
            return RUN_ALL
        self.skip, self.wish = skip, _ = decide(self.rows, self.state, layer)
        if not skip:
            self.ffn_reads += 1
            return RUN_ALL
        for b in rows_of(skip):
            self.skipped[b].append(layer)
        decision = decision_of(skip, self.rows.size)
        if decision.kind is not FfnRows.NONE:
            self.ffn_reads += 1
        return decision

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor, similarity: torch.Tensor | None) -> None:
        if self.settled:
            return
        rows, state = self.rows, self.state
        could = skip_rule.candidates(rows, state, layer, self.skip)
        if self.record is not None:
            values = similarities(h, out, None, similarity)
            self.record.add(layer, range(rows.size), values)
            computed = {b: values[b] for b in rows_of(could)}
        elif could:  # the cosine of the rows that may fire only
            ids = rows_of(could)
            if similarity is not None:
                values = similarity.tolist()
                computed = {b: values[b] for b in ids}
            else:
                computed = dict(zip(ids, similarities(h, out, None if len(ids) == rows.size else list(ids), None)))
        else:
            computed = {}
        fire = skip_rule.fires(rows, could, HostNumbers(computed, -math.inf, rows.size)) if computed else 0
        if fire or self.wish:  # else no run moves and no row fires: the state stays as it is
            self.state = state = skip_rule.advance(rows, state, self.wish, fire, HOST)
            if self.may_settle and not state.remaining.values and not rows.adaptive & ~state.fired:
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
        # the last step's rows as host vectors: by its plans and policies, and with its draws
        self._unplanned_key: tuple | None = None
        self._unplanned = self._rows_without_plans([], [])
        self._drawn_key: tuple | None = None
        self._drawn = self._unplanned
        # the last planned step's rows, with its decisions, skips and reads
        self._planned: tuple[HostRows | None, list[Decision], list[list[int]], int] = (None, [], [], 0)

    def begin_step(self, plans: Seq[RowPlan], active: Seq[bool], generators: Seq[torch.Generator],
                   record_similarity: bool = False) -> StepSkips:
        """`active[b]`: row b is past its warm-up, so this token may skip."""
        policies = step_policies(plans, active)
        planned = [p.draw(g) if policy.planned else None for p, policy, g in zip(plans, policies, generators)]
        record = SimilarityRecord(len(plans), self.num_layers) if record_similarity else None
        rows = self._host_rows(plans, policies, planned)
        if not rows.adaptive:
            decisions, skipped, reads = self._planned_decisions(rows)
            return PlannedStep(decisions, [list(layers) for layers in skipped], reads, record)  # the step's own lists
        return AdaptiveStep(rows, record)

    def _host_rows(self, plans: Seq[RowPlan], policies: Seq[Policy], planned: Seq[Seq[bool] | None]) -> HostRows:
        key = (tuple(plans), tuple(policies))  # the rows themselves: a row may move
        if key != self._unplanned_key:
            self._unplanned_key, self._unplanned = key, self._rows_without_plans(plans, policies)
            self._drawn_key = None
        if all(skips is None for skips in planned):
            return self._unplanned
        drawn_key = tuple(planned)  # a static row draws the same tuple every step
        if drawn_key != self._drawn_key:
            masks = [0] * self.num_layers
            for b, skips in enumerate(planned):
                for layer in compress(range(self.num_layers), skips or ()):
                    masks[layer] |= 1 << b
            rows = self._unplanned
            quiet = tuple(q and not mask for q, mask in zip(rows.quiet, masks))
            self._drawn_key, self._drawn = drawn_key, rows._replace(planned=tuple(masks), quiet=quiet)
        return self._drawn

    def _rows_without_plans(self, plans: Seq[RowPlan], policies: Seq[Policy]) -> HostRows:
        """The rows as host vectors, before this step's planned skips."""
        aligned = mask_of(policy is Policy.ALIGNED for policy in policies)
        hot = tuple(mask_of(p.hot[layer] for p in plans) for layer in range(self.num_layers))
        quorum = min((p.params.quorum for p, policy in zip(plans, policies) if policy is Policy.ALIGNED), default=1.0)
        return HostRows(hot=hot, planned=(0,) * self.num_layers, adaptive=mask_of(p.adaptive for p in policies),
                        aligned=aligned, threshold=HostNumbers.dense([p.params.threshold for p in plans]),
                        run_length=HostNumbers.dense([p.run_length for p in plans]), quorum=quorum, size=len(plans),
                        quiet=tuple(not aligned & mask for mask in hot))

    def _planned_decisions(self, rows: HostRows) -> tuple[list[Decision], list[list[int]], int]:
        """Every layer's decision at once: with no row deciding as it goes, the rule's state never changes."""
        if self._planned[0] is not rows:
            state = SkipState(remaining=HostNumbers({}, 0, rows.size), fired=0)
            skipped: list[list[int]] = [[] for _ in range(rows.size)]
            decisions = []
            for layer in range(self.num_layers):
                skip, _ = decide(rows, state, layer)
                for b in rows_of(skip):
                    skipped[b].append(layer)
                decisions.append(decision_of(skip, rows.size))
            reads = sum(1 for decision in decisions if decision.kind is not FfnRows.NONE)
            self._planned = (rows, decisions, skipped, reads)
        return self._planned[1:]
