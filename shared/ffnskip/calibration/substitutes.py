"""Fitting a skipped FFN's substitute (ffnskip.engine.substitutes) from calibration activations.

The data are pairs (n, y): the FFN's normed input n = post_norm(h) and its output y = mlp(h),
taken at the positions it would be skipped, with the FFNs already chosen skipped (and
substituted) upstream, so the substitute learns the inputs it will really see. Each kind is a
least-squares fit, training-free:

- bias: the mean output;
- linear: a ridge regression y ~ b + n W over the centred data;
- lowrank r: the linear fit's best rank-r approximation in what it predicts (reduced-rank
  regression: the fitted outputs' top r right singular vectors V; W_r = W V V^T).

The ridge is relative to the inputs' mean variance, so one setting works at any hidden scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ffnskip.engine.substitutes import KINDS, Substitute

RIDGE = 1e-3  # times the covariance's mean diagonal (N times the mean input variance): 0.1% shrinkage


@dataclass(frozen=True)
class SubstituteKind:
    """Which substitute to fit: `kind` one of KINDS, `rank` for lowrank."""

    kind: str
    rank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "lowrank") != (self.rank > 0):
            raise ValueError("a rank is given exactly for lowrank")

    @property
    def name(self) -> str:
        return f"lowrank{self.rank}" if self.kind == "lowrank" else self.kind

    @staticmethod
    def parse(text: str) -> SubstituteKind:
        """'bias', 'linear' or 'lowrankR' (e.g. lowrank64)."""
        if text.startswith("lowrank"):
            return SubstituteKind("lowrank", int(text[len("lowrank"):] or 0))
        return SubstituteKind(text)

    def parameters(self, width: int) -> int:
        """Values the substitute holds (what a step reads to apply it)."""
        return width + {"bias": 0, "linear": width * width, "lowrank": 2 * width * self.rank}[self.kind]


def fit(kind: SubstituteKind, inputs: torch.Tensor, outputs: torch.Tensor) -> Substitute:
    """inputs, outputs [N, D] -> the substitute of `kind` (float32, on their device)."""
    n, y = inputs.double(), outputs.double()
    mean_in, mean_out = n.mean(0), y.mean(0)
    if kind.kind == "bias":
        return Substitute(mean_out.float())
    nc, yc = n - mean_in, y - mean_out
    covariance = nc.T @ nc
    ridge = RIDGE * covariance.diagonal().mean()
    weight = torch.linalg.solve(covariance + ridge * torch.eye(covariance.shape[0], dtype=covariance.dtype,
                                                                device=covariance.device), nc.T @ yc)  # [D, D]
    if kind.kind == "lowrank":
        _, _, vh = torch.linalg.svd(nc @ weight, full_matrices=False)
        basis = vh[:kind.rank].T  # [D, r]
        first, second = weight @ basis, basis.T
        bias = mean_out - mean_in @ first @ second
        return Substitute(bias.float(), first.float().contiguous(), second.float().contiguous())
    bias = mean_out - mean_in @ weight
    return Substitute(bias.float(), weight.float().contiguous())
