"""Skip policies as per-row tensors: which rows of a decode batch run a layer's FFN.

Every sequence carries its own SkipParams, so one batch can mix policies. At the
start of a step the controller stacks the rows' plans; between the attention and
the FFN of each layer the model asks `decide(layer)`, and after the FFN it reports
back through `observe(layer, h, out)`, which is where the adaptive rule
fires: cos(h, out) >= threshold on a hot layer skips the FFN of
the next k hot layers, once per token.

`aligned` rows follow the same rule but decide together: at each hot layer their
skip wishes are votes, and when at least a quorum of the aligned rows vote skip,
the FFN is skipped for all of them (else it runs for all). Skipping then removes
the layer's weight read itself, which per-row skipping almost never does in a
batch. A row that is skipped without voting does not fire on that layer.
The per-row bookkeeping (run counters, fired flags, votes) lives on the host as
plain Python values: at decode batch sizes (1-16 rows) that is a few microseconds
per layer, where the same logic as tensor ops cost dozens of small kernels per
layer, a measurable share of a CPU decode step. The one tensor computation is the
cosine check, and only for the rows that can still fire on this layer: a row that
fired, or is skipped here, or is in a cold layer, costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch
import torch.nn.functional as F

from ffnskip.config import SkipParams


@dataclass(frozen=True)
class RowPlan:
    """A sequence's policy, precomputed once at admission."""

    params: SkipParams
    hot: tuple[bool, ...]  # per layer: cold_start <= layer < cold_end
    static: tuple[bool, ...]  # per layer: in the fixed skip set of `static`
    run_length: int  # k; None (up to cold_end) becomes L

    @staticmethod
    def build(params: SkipParams, num_layers: int) -> "RowPlan":
        hot = tuple(params.cold_start <= layer < params.cold_end for layer in range(num_layers))
        chosen = set(params.static_layers) if params.policy == "static" else set()
        static = tuple(layer in chosen for layer in range(num_layers))
        run_length = num_layers if params.max_skip is None else params.max_skip
        return RowPlan(params=params, hot=hot, static=static, run_length=run_length)

    def draw(self, generator: torch.Generator) -> Optional[Seq[bool]]:
        """This token's planned skips per layer for `static` and the random baselines; None for
        the rules that decide as they go."""
        policy = self.params.policy
        if policy == "static":
            return self.static
        if policy in ("random", "non_adaptive"):
            planned = (torch.rand(len(self.hot), generator=generator) < self.params.probability).tolist()
            return [p and h for p, h in zip(planned, self.hot)] if policy == "non_adaptive" else planned
        return None


@dataclass(frozen=True)
class Decision:
    """What one layer's FFN does for the batch: all rows, no rows, or `rows`."""

    kind: str  # "all" | "none" | "some"
    rows: Optional[tuple[int, ...]] = None  # the rows that run the FFN, for "some"


RUN_ALL = Decision("all")
RUN_NONE = Decision("none")


class SkipController:
    """Per-step skip state of a decode batch; one instance per engine."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self.trivial = True
        self._fixed_key: Optional[tuple] = None  # the planned skips whose decisions are in _fixed_steps
        self._fixed_steps: tuple = ()
        self._hot_key: Optional[tuple] = None
        self._hot_rows: list[tuple[int, ...]] = []

    def begin_step(self, plans: Seq[RowPlan], active: Seq[bool], generators: Seq[torch.Generator],
                   record_similarity: bool = False) -> None:
        """`active[b]`: row b is past its warm-up, so this token may skip."""
        batch, layers = len(plans), self.num_layers
        kinds = [p.params.policy if on else "dense" for p, on in zip(plans, active)]
        self.batch = batch
        self.layers_run = 0  # layers whose FFN ran for at least one row (a weight read)
        self.recording = record_similarity
        self.similarity = [[math.nan] * layers for _ in range(batch)] if record_similarity else None
        self.skipped: list[list[int]] = [[] for _ in range(batch)]
        self.trivial = all(k in ("dense", "observe") for k in kinds)
        if self.trivial:
            return
        self.plans = plans
        self.planned = [p.draw(g) if k in ("static", "random", "non_adaptive") else None
                        for p, k, g in zip(plans, kinds, generators)]
        self.adaptive_rows = [b for b, k in enumerate(kinds) if k in ("adaptive", "aligned")]
        self.aligned_rows = [b for b, k in enumerate(kinds) if k == "aligned"]
        self.quorum = min((plans[b].params.quorum for b in self.aligned_rows), default=1.0)
        self.remaining = [0] * batch
        self.fired = [False] * batch
        self.no_skips = [False] * batch
        self.skip_now = self.no_skips
        self.wished: list[int] = []
        self.planning = any(p is not None for p in self.planned)
        # rows still to fire or in their run of k; at 0 every later layer runs for every row
        self.unsettled = len(self.adaptive_rows)
        self.settled = False
        hot = tuple(plans[b].hot for b in self.adaptive_rows)
        if hot != self._hot_key:  # per layer, the adaptive rows that are hot there
            self._hot_key = hot
            self._hot_rows = [tuple(b for b in self.adaptive_rows if plans[b].hot[layer]) for layer in range(layers)]
        self.fixed: Optional[list[Decision]] = None
        if not self.adaptive_rows and not record_similarity:
            # Nothing decides as it goes: every layer's decision is made now, and the per-layer
            # calls become a lookup; the same plans as the last step (static rows) reuse its
            # decisions. The Python a skip row pays over a dense one is time its skips do not save.
            key = tuple(None if p is None else tuple(p) for p in self.planned)
            if key != self._fixed_key:
                self.fixed = [self._decide(layer) for layer in range(layers)]
                self._fixed_key, self._fixed_steps = key, (self.fixed, self.skipped, self.layers_run)
            self.fixed, skipped, self.layers_run = self._fixed_steps
            self.skipped = [list(rows) for rows in skipped]  # the step's own lists: sequences keep them

    def decide(self, layer: int) -> Decision:
        """Which rows run this layer's FFN."""
        if self.trivial:
            self.layers_run += 1
            return RUN_ALL
        if self.fixed is not None:
            return self.fixed[layer]
        if self.settled:
            self.layers_run += 1
            return RUN_ALL
        return self._decide(layer)

    def _decide(self, layer: int) -> Decision:
        remaining = self.remaining
        self.wished = [b for b in self._hot_rows[layer] if remaining[b] > 0]
        if not (self.wished or self.planning or self.aligned_rows):  # the common layer: every row runs
            self.skip_now = self.no_skips
            self.layers_run += 1
            return RUN_ALL
        skip = [planned is not None and planned[layer] for planned in self.planned]
        for b in self.wished:
            skip[b] = True
        if self.aligned_rows:
            self._align(layer, skip)
        self.skip_now = skip
        run = [b for b in range(self.batch) if not skip[b]]
        for b in range(self.batch):
            if skip[b]:
                self.skipped[b].append(layer)
        if run:
            self.layers_run += 1
        if len(run) == self.batch:
            return RUN_ALL
        if not run:
            return RUN_NONE
        return Decision("some", tuple(run))

    def _align(self, layer: int, skip: list[bool]) -> None:
        """One decision for all aligned rows in this hot layer, from their votes."""
        members = [b for b in self.aligned_rows if self.plans[b].hot[layer]]
        if not members:
            return
        votes = sum(1 for b in members if b in self.wished)
        together = votes >= self.quorum * len(members)
        for b in members:
            skip[b] = together

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor,
                similarity: Optional[torch.Tensor] = None) -> None:
        """h, out: [B, 1, D] before and after the FFN (out == h where it was skipped);
        `similarity`: cos(h, out) per row when the FFN segment computed it already."""
        if self.trivial:
            if self.recording:
                self._record(layer, list(range(self.batch)), self._cosine(h, out, None, similarity))
            return
        if self.fixed is not None or self.settled:
            return  # no row decides from similarities (any more), and none are recorded
        for b in self.wished:  # a run of k is positional: outvoted wishes count too
            self.remaining[b] -= 1
            if self.remaining[b] == 0:  # only a row that fired has a run
                self.unsettled -= 1
        skip_now, fired = self.skip_now, self.fired
        candidates = [b for b in self._hot_rows[layer] if not skip_now[b] and not fired[b]]
        rows = list(range(self.batch)) if self.recording else candidates
        if rows:  # else nobody can fire here: no similarity to compute
            values = dict(zip(rows, self._cosine(h, out, None if len(rows) == self.batch else rows, similarity)))
            if self.recording:
                self._record(layer, rows, [values[b] for b in rows])
            for b in candidates:
                if values[b] >= self.plans[b].params.threshold:
                    self.remaining[b] = self.plans[b].run_length
                    self.fired[b] = True
                    if self.remaining[b] == 0:
                        self.unsettled -= 1
        self._settle()

    def _settle(self) -> None:
        """Once every adaptive row has fired and finished its run (and nothing else decides per
        layer), the rest of the step runs every FFN without asking."""
        if self.unsettled == 0 and not (self.planning or self.aligned_rows or self.recording):
            self.settled = True

    def _cosine(self, h: torch.Tensor, out: torch.Tensor, rows: Optional[list[int]],
                similarity: Optional[torch.Tensor]) -> list[float]:
        if similarity is not None:
            values = similarity.tolist()
            return values if rows is None else [values[b] for b in rows]
        h, out = h[:, -1], out[:, -1]
        if rows is not None:
            index = torch.tensor(rows, device=h.device)
            h, out = h.index_select(0, index), out.index_select(0, index)
        return F.cosine_similarity(h.float(), out.float(), dim=-1).tolist()

    def _record(self, layer: int, rows: list[int], values: list[float]) -> None:
        for b, value in zip(rows, values):
            self.similarity[b][layer] = value

    def end_step(self) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Per row: the layers whose FFN was skipped, and cos(h, out) per layer if recorded."""
        return self.skipped, self.similarity
