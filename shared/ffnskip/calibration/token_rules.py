"""Skip rules that decide per token, measured in the teacher-forced one-pass forward (forced.py).

A rule whose decision at a position reads only that position's own states (the hidden state
before and after the layer's attention, the FFN's normed input, what the layer before did at that
position) decides the same in one causal forward over prompt + answer as in the decode steps that
produce the answer token by token: each position's keys and values come from its own decisions
either way. So such rules are measured at GEMM speed, as fixed sets are. A unit test holds the
paper's rule here equal to the engine's decode path.

- `FixedSet`: a static skip set (the same layers at every scored position).
- `PaperRule`: the paper's rule, skip_rule.py's one definition run on torch vectors whose rows are
  positions: a position fires on a hot layer whose cos(h, out) reaches the threshold and skips the
  FFN of its next k hot layers.
- `ChosenTokens`: per token, a compensated layer's real FFN or its substitute, chosen by a signal
  known before the FFN is paid (`Signal`); each layer skips the `rate` share of positions whose
  signal says the FFN is needed least, at thresholds fitted on the tokens it runs on first.
- `OracleRecorder`: the data for `Signal.PROBE`, a linear map of the FFN's input fitted to predict
  how far the substitute is from the FFN at each token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch
import torch.nn.functional as F

from ffnskip.engine import skip_rule
from ffnskip.engine.skip_rule import TORCH, SkipState
from ffnskip.engine.substitutes import AnySubstitute, SubstituteSet


class TokenRule(Protocol):
    """What the forced forward asks a rule, layer by layer."""

    def begin(self, mask: torch.Tensor) -> None:
        """A new forward: `mask` [B, T] holds the positions that may skip (the scored ones)."""

    def decide(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor,
               ffn: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool: the positions whose FFN layer `index` skips (None: none). x, h: the
        layer's input and its state after the attention; normed = post_norm(h); ffn = mlp(h),
        which only a rule that pays the FFN to decide (`Signal.ORACLE`) may read."""

    def observe(self, index: int, h: torch.Tensor, out: torch.Tensor) -> None:
        """After the layer: out = h + what its FFN (or substitute) added at each position."""


def similarity(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cos(h, out) at every position, in float32: the engine's residual_similarity, which reads
    the last position of a decode row, taken at all of them."""
    return F.cosine_similarity(h.float(), out.float(), dim=-1)


class FixedSet:
    """A static set: the FFNs of `layers` skip at every scored position."""

    def __init__(self, layers: Collection[int]) -> None:
        self.layers = frozenset(layers)
        self.mask: torch.Tensor | None = None

    def begin(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def decide(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor,
               ffn: torch.Tensor) -> torch.Tensor | None:
        return self.mask if index in self.layers else None

    def observe(self, index: int, h: torch.Tensor, out: torch.Tensor) -> None:
        pass


@dataclass
class _PositionRows:
    """skip_rule.Rows whose rows are the positions of a forced batch, flattened."""

    hot: list[torch.Tensor]
    planned: list[torch.Tensor]
    adaptive: torch.Tensor
    aligned: torch.Tensor
    threshold: torch.Tensor
    run_length: torch.Tensor
    quorum: float = 1.0


class PaperRule:
    """The paper's rule (policy `adaptive`): after a hot layer whose cos(h, out) reaches
    `threshold`, skip the FFNs of the next `k` hot layers, once per token; the hot layers are
    [cold_start, cold_end)."""

    def __init__(self, threshold: float, k: int, cold_start: int, cold_end: int, num_layers: int) -> None:
        self.threshold, self.k = threshold, k
        self.hot_layers = [cold_start <= layer < cold_end for layer in range(num_layers)]
        self.rows: _PositionRows | None = None
        self.state: SkipState | None = None
        self.shape: torch.Size | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (skip, wish) of the layer asked last

    def begin(self, mask: torch.Tensor) -> None:
        flat = mask.reshape(-1)
        count, device = flat.numel(), flat.device
        yes, no = torch.ones(count, dtype=torch.bool, device=device), torch.zeros(count, dtype=torch.bool, device=device)
        self.shape = mask.shape
        self.rows = _PositionRows(
            hot=[yes if hot else no for hot in self.hot_layers], planned=[no] * len(self.hot_layers),
            adaptive=flat, aligned=no, threshold=torch.full((count,), self.threshold, dtype=torch.float32, device=device),
            run_length=torch.full((count,), self.k, dtype=torch.int64, device=device))
        self.state = SkipState(torch.zeros(count, dtype=torch.int64, device=device), no)

    def decide(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor,
               ffn: torch.Tensor) -> torch.Tensor | None:
        assert self.rows is not None and self.state is not None and self.shape is not None, "begin first"
        self.last = skip_rule.decide(self.rows, self.state, index, TORCH)
        return self.last[0].view(self.shape)

    def observe(self, index: int, h: torch.Tensor, out: torch.Tensor) -> None:
        assert self.rows is not None and self.state is not None and self.last is not None, "decide first"
        skip, wish = self.last
        self.state = skip_rule.observe(self.rows, self.state, index, skip, wish, similarity(h, out).reshape(-1), TORCH)


class Signal(str, Enum):
    """How much a position needs a layer's FFN, known before the FFN is paid (except ORACLE).
    Higher means more needed; a rule may also be tried the other way round (`reverse`)."""

    ATTENTION = "attention"  # 1 - cos(x, h): how far this layer's attention moved the state
    SUBSTITUTE = "substitute"  # |s(n)| / |h|: how much the substitute would add (reads it at every position)
    PREVIOUS = "previous"  # 1 - cos(h, out) of the layer before: how far its FFN moved the state
    PROBE = "probe"  # a linear map of n fitted to predict log ORACLE (`fit_probes`): one D-vector read a layer
    ORACLE = "oracle"  # |mlp(h) - s(n)| / |h|: the substitute's own error; pays the FFN, so a bound only

    @property
    def reads_substitute_always(self) -> bool:
        """Whether deciding reads the substitute at positions that then run the FFN too."""
        return self in (Signal.SUBSTITUTE, Signal.ORACLE)


@dataclass
class ChosenTokens:
    """Per token, a compensated layer's FFN or its substitute: at each layer of `rates`, the
    positions whose need (`signal`, higher = more needed; lower with `reverse`) falls below the
    layer's threshold take the substitute. Thresholds not given are fitted by the first forward
    that runs the rule, as the `rates[layer]` quantile of the need over its scored positions, with
    the earlier layers' choices in place; later forwards reuse them."""

    substitutes: SubstituteSet
    signal: Signal
    rates: dict[int, float]
    reverse: bool = False
    probes: dict[int, Probe] = field(default_factory=dict)  # for Signal.PROBE
    thresholds: dict[int, float] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # 1 - cos(h, out) of the layer before, per position

    def begin(self, mask: torch.Tensor) -> None:
        self.mask, self.previous = mask, None

    def need(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor, ffn: torch.Tensor) -> torch.Tensor:
        if self.signal is Signal.ATTENTION:
            need = 1 - similarity(x, h)
        elif self.signal is Signal.SUBSTITUTE:
            need = self.substitutes[index](normed).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
        elif self.signal is Signal.PREVIOUS:  # layer 0 has no layer before: every token equally
            need = self.previous if self.previous is not None else torch.zeros(h.shape[:-1], device=h.device)
        elif self.signal is Signal.PROBE:
            need = self.probes[index](normed)
        else:
            need = oracle_need(self.substitutes[index], h, normed, ffn)
        return -need if self.reverse else need

    def decide(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor,
               ffn: torch.Tensor) -> torch.Tensor | None:
        assert self.mask is not None, "begin first"
        if index not in self.rates:
            return None
        need = self.need(index, x, h, normed, ffn)
        if index not in self.thresholds:
            self.thresholds[index] = _threshold(need[self.mask], self.rates[index])
        return self.mask & (need < self.thresholds[index])

    def observe(self, index: int, h: torch.Tensor, out: torch.Tensor) -> None:
        self.previous = 1 - similarity(h, out)


def oracle_need(substitute: AnySubstitute, h: torch.Tensor, normed: torch.Tensor, ffn: torch.Tensor) -> torch.Tensor:
    """|mlp(h) - s(n)| / |h| per position: how far the substitute is from the FFN it replaces."""
    return (ffn - substitute(normed)).float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)


@dataclass(frozen=True)
class Probe:
    """A linear prediction of a position's need from the FFN's normed input: n @ weight + bias."""

    weight: torch.Tensor  # [D]
    bias: float

    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        return normed.float() @ self.weight + self.bias


class OracleRecorder:
    """A rule that skips nothing and keeps, at each layer of `substitutes`, the scored positions'
    normed inputs and log oracle need: the data `fit_probes` regresses."""

    def __init__(self, substitutes: SubstituteSet) -> None:
        self.substitutes = substitutes
        self.mask: torch.Tensor | None = None
        self.rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in substitutes.layers}

    def begin(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def decide(self, index: int, x: torch.Tensor, h: torch.Tensor, normed: torch.Tensor,
               ffn: torch.Tensor) -> torch.Tensor | None:
        assert self.mask is not None, "begin first"
        if index in self.substitutes:
            need = oracle_need(self.substitutes[index], h, normed, ffn)
            self.rows[index].append((normed[self.mask].float(), need[self.mask].clamp_min(1e-12).log()))
        return None

    def observe(self, index: int, h: torch.Tensor, out: torch.Tensor) -> None:
        pass

    def fit_probes(self, ridge: float = 1e-2) -> dict[int, Probe]:
        """Per layer, the least-squares probe (ridge relative to the inputs' mean variance)."""
        probes = {}
        for layer, rows in self.rows.items():
            inputs = torch.cat([r[0] for r in rows]).double()
            target = torch.cat([r[1] for r in rows]).double()
            mean, centre = inputs.mean(0), target.mean()
            centred = inputs - mean
            gram = centred.T @ centred
            gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            weight = torch.linalg.solve(gram, centred.T @ (target - centre))
            probes[layer] = Probe(weight.float(), float(centre - mean @ weight))
        return probes


def _threshold(need: torch.Tensor, rate: float) -> float:
    """The need below which the `rate` share of these positions falls (all of them at 1, none at 0)."""
    if rate >= 1.0 or not need.numel():
        return float("inf") if rate >= 1.0 else float("-inf")
    return float(torch.quantile(need.float(), rate)) if rate > 0.0 else float("-inf")


def as_rule(skipped: Collection[int] | TokenRule) -> TokenRule:
    """A rule from a fixed set of layers, or the rule itself."""
    return skipped if hasattr(skipped, "decide") else FixedSet(skipped)  # type: ignore[return-value]


def avoided_share(skips: dict[int, int], positions: int, ffn_bytes: int, num_layers: int,
                  substitutes: SubstituteSet | None, read_always: Sequence[int] = ()) -> float:
    """The FFN bytes a rule avoided per scored position, net of the substitutes it read, as a share
    of all FFN bytes at batch 1: each skip saves one FFN's bytes and reads its substitute; a layer in
    `read_always` reads its substitute at every position (a fixed set, or a signal that needs it)."""
    if not positions:
        return 0.0
    saved = sum(skips.values()) * ffn_bytes
    if substitutes is not None:
        for layer, sub in substitutes.layers.items():
            saved -= sub.nbytes * (positions if layer in read_always else skips.get(layer, 0))
    return saved / (positions * ffn_bytes * num_layers)
