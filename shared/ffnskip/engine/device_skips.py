"""One decode step's skip decisions as tensor operations, for a step that runs whole on a device.

A step captured once per batch bucket (a CUDA graph) cannot ask the host between a layer's
attention and its FFN: the decision must be made by kernels, from per-row tensors, with no read
back per layer. `DeviceSkips` is the same rule as policies.PlannedStep and policies.AdaptiveStep
(planned skips; the paper's rule per row; aligned rows voting together), kept in tensors:
`decide(layer)` gives the rows that run the layer's FFN, `observe(layer, similarity)` takes cos(h,
out) per row after it. The CPU engine keeps the host-side controller, which at 1-16 rows costs a
few microseconds per layer where these are a dozen small kernels; the tests hold the two to the
same decisions, step after step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ffnskip.config import Policy
from ffnskip.engine.policies import RowPlan, step_policies


@dataclass(frozen=True)
class RowTensors:
    """A batch's plans as tensors (rows [B], layers [L]) on the step's device."""

    hot: torch.Tensor  # [B, L] bool: the layer is in the row's hot region
    planned: torch.Tensor  # [B, L] bool: this step's planned skips (static, random, non_adaptive rows)
    adaptive: torch.Tensor  # [B] bool: the row decides as it goes (adaptive or aligned)
    aligned: torch.Tensor  # [B] bool: the row votes with the other aligned rows
    threshold: torch.Tensor  # [B] float32
    run_length: torch.Tensor  # [B] int64: k, the hot layers a firing row skips
    quorum: torch.Tensor  # [] float32: share of the aligned rows' votes that skips for them all

    @staticmethod
    def build(plans: Seq[RowPlan], active: Seq[bool], planned: Seq[Seq[bool] | None],
              device: torch.device) -> RowTensors:
        """`active[b]`: row b is past its warm-up; `planned[b]`: its drawn plan (RowPlan.draw) or None."""
        policies = step_policies(plans, active)
        layers = len(plans[0].hot)
        quorum = min((p.params.quorum for p, policy in zip(plans, policies) if policy is Policy.ALIGNED), default=1.0)
        return RowTensors(
            hot=torch.tensor([p.hot for p in plans], dtype=torch.bool, device=device),
            planned=torch.tensor([list(skips) if skips is not None else [False] * layers for skips in planned],
                                 dtype=torch.bool, device=device),
            adaptive=torch.tensor([policy.adaptive for policy in policies], dtype=torch.bool, device=device),
            aligned=torch.tensor([policy is Policy.ALIGNED for policy in policies], dtype=torch.bool, device=device),
            threshold=torch.tensor([p.params.threshold for p in plans], dtype=torch.float32, device=device),
            run_length=torch.tensor([p.run_length for p in plans], dtype=torch.int64, device=device),
            quorum=torch.tensor(quorum, dtype=torch.float32, device=device),
        )


class DeviceSkips:
    """One step's decisions: per row, the hot layers left in its run of k and whether it fired."""

    def __init__(self, rows: RowTensors) -> None:
        self.rows = rows
        batch = rows.adaptive.shape[0]
        self.remaining = torch.zeros(batch, dtype=torch.int64, device=rows.adaptive.device)
        self.fired = torch.zeros(batch, dtype=torch.bool, device=rows.adaptive.device)
        self._wish = self._skip = torch.zeros_like(self.fired)

    def decide(self, layer: int) -> torch.Tensor:
        """[B] bool: the rows that run this layer's FFN."""
        rows = self.rows
        hot = rows.hot[:, layer]
        wish = rows.adaptive & hot & (self.remaining > 0)  # rows in a run of k
        skip = rows.planned[:, layer] | wish
        members = rows.aligned & hot  # aligned rows decide together: skip when a quorum wishes to
        together = (wish & members).sum() >= rows.quorum * members.sum()
        skip = torch.where(members, together, skip)
        self._wish, self._skip = wish, skip
        return ~skip

    def observe(self, layer: int, similarity: torch.Tensor) -> None:
        """`similarity` [B] float: cos(h, out) of this layer (any value where the FFN did not run)."""
        rows = self.rows
        self.remaining = self.remaining - self._wish.long()  # a run is positional: outvoted wishes count
        # a row fires once per token, on a hot layer whose FFN ran for it
        fire = rows.adaptive & rows.hot[:, layer] & ~self._skip & ~self.fired & (similarity >= rows.threshold)
        self.remaining = torch.where(fire, rows.run_length, self.remaining)
        self.fired = self.fired | fire
