"""Skip policies as per-row tensors: which rows of a decode batch run a layer's FFN.

Every sequence carries its own SkipParams, so one batch can mix policies. At the
start of a step the controller stacks the rows' plans; between the attention and
the FFN of each layer the model asks `decide(layer)`, and after the FFN it reports
back through `observe(layer, h, out)`, which is where the adaptive rule
(BRIEF section 2) fires: cos(h, out) >= threshold on a hot layer skips the FFN of
the next k hot layers, once per token.

`aligned` rows follow the same rule but decide together: at each hot layer their
skip wishes are votes, and when at least a quorum of the aligned rows vote skip,
the FFN is skipped for all of them (else it runs for all). Skipping then removes
the layer's weight read itself, which per-row skipping almost never does in a
batch. A row that is skipped without voting does not fire on that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch
import torch.nn.functional as F

from ffnskip.config import SkipParams


@dataclass(frozen=True)
class RowPlan:
    """A sequence's policy, precomputed as tensors once at admission."""

    params: SkipParams
    hot: torch.Tensor  # [L] bool: cold_start <= layer < cold_end
    static: torch.Tensor  # [L] bool: the fixed skip set of `static`
    run_length: int  # k; None (up to cold_end) becomes L

    @staticmethod
    def build(params: SkipParams, num_layers: int) -> "RowPlan":
        layers = torch.arange(num_layers)
        hot = (layers >= params.cold_start) & (layers < params.cold_end)
        static = torch.zeros(num_layers, dtype=torch.bool)
        if params.policy == "static":
            static[list(params.static_layers)] = True
        run_length = num_layers if params.max_skip is None else params.max_skip
        return RowPlan(params=params, hot=hot, static=static, run_length=run_length)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """This token's planned skips for the random baselines and `static`: [L] bool."""
        policy = self.params.policy
        if policy == "static":
            return self.static
        if policy in ("random", "non_adaptive"):
            planned = torch.rand(self.hot.shape[0], generator=generator) < self.params.probability
            return planned & self.hot if policy == "non_adaptive" else planned
        return torch.zeros_like(self.static)


@dataclass(frozen=True)
class Decision:
    """What one layer's FFN does for the batch: all rows, no rows, or `rows`."""

    kind: str  # "all" | "none" | "some"
    rows: Optional[torch.Tensor] = None  # long indices of rows that run the FFN


RUN_ALL = Decision("all")


class SkipController:
    """Per-step skip state of a decode batch; one instance per engine."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self.trivial = True

    def begin_step(self, plans: Seq[RowPlan], active: Seq[bool], generators: Seq[torch.Generator],
                   record_similarity: bool = False) -> None:
        """`active[b]`: row b is past its warm-up, so this token may skip."""
        batch = len(plans)
        kinds = [p.params.policy if on else "dense" for p, on in zip(plans, active)]
        self.batch = batch
        self.layers_run = 0  # layers whose FFN ran for at least one row (a weight read)
        self.observing = record_similarity or any(k in ("observe", "adaptive", "aligned") for k in kinds)
        self.trivial = all(k in ("dense", "observe") for k in kinds) and not self.observing
        self.skipped = torch.zeros(batch, self.num_layers, dtype=torch.bool, device=self.device)
        self.similarity = torch.full((batch, self.num_layers), float("nan"), device=self.device) if self.observing else None
        if self.trivial:
            return
        self.planned = torch.stack([p.draw(g) for p, g in zip(plans, generators)]).to(self.device)
        self.planned &= torch.tensor(active, device=self.device)[:, None]
        adaptive = torch.tensor([k in ("adaptive", "aligned") for k in kinds], device=self.device)
        aligned = torch.tensor([k == "aligned" for k in kinds], device=self.device)
        hot = torch.stack([p.hot for p in plans]).to(self.device)
        self.adaptive_hot = hot & adaptive[:, None]
        self.aligned_hot = hot & aligned[:, None]
        self.any_adaptive = bool(adaptive.any())
        self.any_aligned = bool(aligned.any())
        self.quorum = min((p.params.quorum for p, k in zip(plans, kinds) if k == "aligned"), default=1.0)
        self.threshold = torch.tensor([p.params.threshold for p in plans], device=self.device)
        self.run_length = torch.tensor([p.run_length for p in plans], device=self.device)
        self.remaining = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.fired = torch.zeros(batch, dtype=torch.bool, device=self.device)

    def decide(self, layer: int) -> Decision:
        """Which rows run this layer's FFN. The one host sync of the skip loop is here."""
        if self.trivial:
            self.layers_run += 1
            return RUN_ALL
        wishes = self.adaptive_hot[:, layer] & (self.remaining > 0)
        self.wished = wishes
        skip = self.planned[:, layer] | wishes
        if self.any_aligned:
            skip = self._align(layer, wishes, skip)
        self.skipped[:, layer] = skip
        n_skip = int(skip.sum())
        if n_skip < self.batch:
            self.layers_run += 1
        if n_skip == 0:
            return RUN_ALL
        if n_skip == self.batch:
            return Decision("none")
        return Decision("some", (~skip).nonzero().squeeze(1))

    def _align(self, layer: int, wishes: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """One decision for all aligned rows in this hot layer, from their votes."""
        members = self.aligned_hot[:, layer]
        voters = int(members.sum())
        if voters == 0:
            return skip
        votes = int((wishes & members).sum())
        together = votes >= self.quorum * voters
        return (skip & ~members) | (members if together else torch.zeros_like(members))

    def observe(self, layer: int, h: torch.Tensor, out: torch.Tensor) -> None:
        """h, out: [B, D] before and after the FFN (out == h where it was skipped)."""
        if not self.observing:
            return
        similarity = F.cosine_similarity(h.float(), out.float(), dim=-1)
        self.similarity[:, layer] = similarity
        if self.trivial or not self.any_adaptive:
            return
        hot = self.adaptive_hot[:, layer]
        skipped = self.skipped[:, layer]
        self.remaining -= (hot & self.wished).long()  # a run of k is positional: outvoted wishes count too
        fires = hot & ~skipped & ~self.fired & (similarity >= self.threshold)
        self.remaining = torch.where(fires, self.run_length, self.remaining)
        self.fired |= fires

    def end_step(self) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Per row: the layers whose FFN was skipped, and cos(h, out) per layer if observed."""
        skipped = [[i for i, s in enumerate(row) if s] for row in self.skipped.tolist()] if not self.trivial else [[] for _ in range(self.batch)]
        similarity = self.similarity.tolist() if self.similarity is not None else None
        return skipped, similarity
