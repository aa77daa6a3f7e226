"""The skip rule (ffnskip.engine.skip_rule) driven on tensors, for a decode step run whole on a device.

A step captured once per batch bucket (a CUDA graph) cannot ask the host between a layer's
attention and its FFN: the decision must be made by kernels, from per-row tensors, with no read
back per layer. `RowTensors` holds a batch's plans as tensors and `DeviceSkips` runs the rule's
decide and observe on them (skip_rule.TORCH): `decide(layer)` gives the rows that run the layer's
FFN, `observe(layer, similarity)` takes cos(h, out) per row after it. The engine's own decode
runs the same rule on host vectors (policies.AdaptiveStep); tests/unit/test_skip_rule.py holds
both to it, step after step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ffnskip.config import Policy
from ffnskip.engine import skip_rule
from ffnskip.engine.policies import RowPlan, step_policies
from ffnskip.engine.skip_rule import TORCH, SkipState


@dataclass(frozen=True)
class RowTensors:
    """A batch's plans as tensors (rows [B], layers [L]) on the step's device. Thresholds and the
    quorum are float64, the host's precision, so that both executions compare the same numbers."""

    hot: torch.Tensor  # [L, B] bool: the layer is in the row's hot region
    planned: torch.Tensor  # [L, B] bool: this step's planned skips (static, random, non_adaptive rows)
    adaptive: torch.Tensor  # [B] bool: the row decides as it goes (adaptive or aligned)
    aligned: torch.Tensor  # [B] bool: the row votes with the other aligned rows
    threshold: torch.Tensor  # [B] float64
    run_length: torch.Tensor  # [B] int64: k, the hot layers a firing row skips
    quorum: torch.Tensor  # [] float64: share of the aligned rows' votes that skips for them all

    @staticmethod
    def build(plans: Seq[RowPlan], active: Seq[bool], planned: Seq[Seq[bool] | None],
              device: torch.device) -> RowTensors:
        """`active[b]`: row b is past its warm-up; `planned[b]`: its drawn plan (RowPlan.draw) or None."""
        policies = step_policies(plans, active)
        layers = len(plans[0].hot)
        quorum = min((p.params.quorum for p, policy in zip(plans, policies) if policy is Policy.ALIGNED), default=1.0)
        return RowTensors(
            hot=torch.tensor([p.hot for p in plans], dtype=torch.bool, device=device).T.contiguous(),
            planned=torch.tensor([list(skips) if skips is not None else [False] * layers for skips in planned],
                                 dtype=torch.bool, device=device).T.contiguous(),
            adaptive=torch.tensor([policy.adaptive for policy in policies], dtype=torch.bool, device=device),
            aligned=torch.tensor([policy is Policy.ALIGNED for policy in policies], dtype=torch.bool, device=device),
            threshold=torch.tensor([p.params.threshold for p in plans], dtype=torch.float64, device=device),
            run_length=torch.tensor([p.run_length for p in plans], dtype=torch.int64, device=device),
            quorum=torch.tensor(quorum, dtype=torch.float64, device=device),
        )

    @staticmethod
    def dense(batch: int, layers: int, device: torch.device) -> RowTensors:
        """Plans under which every row runs every FFN."""
        return RowTensors(
            hot=torch.zeros(layers, batch, dtype=torch.bool, device=device),
            planned=torch.zeros(layers, batch, dtype=torch.bool, device=device),
            adaptive=torch.zeros(batch, dtype=torch.bool, device=device),
            aligned=torch.zeros(batch, dtype=torch.bool, device=device),
            threshold=torch.ones(batch, dtype=torch.float64, device=device),
            run_length=torch.zeros(batch, dtype=torch.int64, device=device),
            quorum=torch.ones((), dtype=torch.float64, device=device),
        )


class DeviceSkips:
    """One step's decisions; the rule's state (per row, the hot layers left in its run of k and
    whether it fired) in tensors."""

    def __init__(self, rows: RowTensors) -> None:
        self.rows = rows
        batch, device = rows.adaptive.shape[0], rows.adaptive.device
        self.state = SkipState(remaining=torch.zeros(batch, dtype=torch.int64, device=device),
                               fired=torch.zeros(batch, dtype=torch.bool, device=device))
        self._skip = self._wish = torch.zeros(batch, dtype=torch.bool, device=device)

    def decide(self, layer: int) -> torch.Tensor:
        """[B] bool: the rows that run this layer's FFN."""
        self._skip, self._wish = skip_rule.decide(self.rows, self.state, layer, TORCH)
        return ~self._skip

    def observe(self, layer: int, similarity: torch.Tensor) -> None:
        """`similarity` [B] float: cos(h, out) of this layer (any value where the FFN did not run)."""
        self.state = skip_rule.observe(self.rows, self.state, layer, self._skip, self._wish, similarity, TORCH)
