"""Fitting a skipped FFN's substitute (ffnskip.engine.substitutes) from calibration activations.

The data are pairs (n, y): the FFN's normed input n = post_norm(h) and its output y = mlp(h),
taken at the positions it would be skipped, with the FFNs already chosen skipped (and
substituted) upstream, so the substitute learns the inputs it will really see. Each kind is a
least-squares fit, training-free:

- bias: the mean output;
- linear: a ridge regression y ~ b + n W over the centred data, its ridge chosen by how well it
  predicts held-out rows (a full map has D x D values, and calibration data are a few thousand
  tokens: unregularised it memorises them, and the skipped model does worse on other prompts);
- lowrank r: the linear fit's best rank-r approximation in what it predicts (reduced-rank
  regression: the fitted outputs' top r right singular vectors V; W_r = W V V^T).

The ridge is relative to the covariance's mean diagonal, so one grid serves any hidden scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ffnskip.engine.substitutes import KINDS, Substitute

# the ridges a fit chooses from, by how well each predicts held rows (validated_ridge); each is
# relative to the covariance's mean diagonal (N times the mean input variance)
RIDGES = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class SubstituteKind:
    """Which substitute to fit: `kind` one of KINDS, `rank` for lowrank."""

    kind: str
    rank: int = 0
    ridge: float | None = None  # fixed, relative to the covariance's mean diagonal; None: validated_ridge

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "lowrank") != (self.rank > 0):
            raise ValueError("a rank is given exactly for lowrank")
        if self.ridge is not None and not self.ridge >= 0:
            raise ValueError(f"the ridge must be >= 0, got {self.ridge}")

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
    ridge = kind.ridge if kind.ridge is not None else validated_ridge(nc, yc)
    weight = _ridge_solve(nc, yc, ridge)  # [D, D]
    if kind.kind == "lowrank":
        _, _, vh = torch.linalg.svd(nc @ weight, full_matrices=False)
        basis = vh[:kind.rank].T  # [D, r]
        first, second = weight @ basis, basis.T
        bias = mean_out - mean_in @ first @ second
        return Substitute(bias.float(), first.float().contiguous(), second.float().contiguous())
    bias = mean_out - mean_in @ weight
    return Substitute(bias.float(), weight.float().contiguous())


def _ridge_solve(nc: torch.Tensor, yc: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge regression of yc on nc (both centred): W [D_in, D_out]."""
    covariance = nc.T @ nc
    penalty = ridge * covariance.diagonal().mean() * torch.eye(covariance.shape[0], dtype=covariance.dtype,
                                                                 device=covariance.device)
    return torch.linalg.solve(covariance + penalty, nc.T @ yc)


def validated_ridge(nc: torch.Tensor, yc: torch.Tensor, held: float = 0.2) -> float:
    """The ridge of RIDGES whose fit on the first rows predicts the last `held` share best (the rows
    come prompt by prompt, so the held rows are mostly other prompts' tokens): as much
    regularisation as the data need, and none to speak of for data that are exactly linear."""
    split = int(nc.shape[0] * (1 - held))
    train_in, train_out, held_in, held_out = nc[:split], yc[:split], nc[split:], yc[split:]
    centre_in, centre_out = train_in.mean(0), train_out.mean(0)
    covariance = (train_in - centre_in).T @ (train_in - centre_in)
    values, vectors = torch.linalg.eigh(covariance)
    projected = vectors.T @ ((train_in - centre_in).T @ (train_out - centre_out))
    scale = covariance.diagonal().mean()
    errors = {}
    for ridge in RIDGES:
        weight = vectors @ (projected / (values + ridge * scale)[:, None])
        error = float(((held_in - centre_in) @ weight + centre_out - held_out).pow(2).mean())
        errors[ridge] = error if math.isfinite(error) else math.inf  # a ridge of 0 on a singular covariance
    return min(RIDGES, key=lambda r: (errors[r], -r))
