"""The skip rule: which rows of a decode batch run each layer's FFN. Its one definition.

Per layer, for the rows of a batch (each row under its own SkipParams):

- `decide`, between the layer's attention and its FFN. A row *wishes* to skip when it decides as
  it goes (adaptive or aligned), the layer is in its hot region and it is in a run of k (its
  counter `remaining` > 0). A row skips when its plan says so (static, random, non_adaptive) or
  it wishes. The aligned rows hot on the layer decide together: their wishes are votes, and all
  of them skip when at least `quorum` of them vote skip, else all of them run the FFN.
- `observe`, after the FFN. Every wish moves its row one layer along its run (an outvoted wish
  too: a run is positional). A row *fires* when it decides as it goes, the layer is hot for it,
  the FFN ran for it, it has not fired on this token yet, and cos(h, out) >= its threshold: its
  counter becomes k (`run_length`), so it skips the next k hot layers.

The rule is written once, over "row vectors" (one entry per row, supporting `&`, `|`, `~`, `>`,
`>=` and `-`) and a namespace `xp` that gives `where` and `count`, the idea of the Python array
API. It runs in two executions, because each device needs another one:

- `TORCH`, torch tensors [B]: a decode step captured whole as a CUDA graph cannot read the host
  between layers, so there the decision has to be kernels (ffnskip.bench.gpu.device_step).
- `HOST`, host vectors: a boolean vector is a Python int used as a bit mask (row b is bit b), so
  `&`, `|` and `count` are one integer operation whatever the batch, and numbers are
  `HostNumbers`, stored sparsely (the rows in a run, the rows whose similarity was computed).
  The engine's controller (policies.py) runs it in every decode step, on a CPU and on CUDA
  alike: measured on a 2-core CPU, a 30-layer step of adaptive rows costs it about 0.05 ms at
  batch 1 and 0.15 ms at batch 16, where the same rule as tensor operations is a dozen small
  kernels per layer, 1.5-1.6 ms per step (a compiled decode step of a 135M-parameter model on
  that CPU takes 20-23 ms).

Every driver of the rule (the host controller with its shortcuts, the tensor driver) is tested
against these functions run on plain Python lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

Vector = Any  # a row vector of the execution at hand: a torch.Tensor [B], or a host mask or HostNumbers


class RowOps(Protocol):
    """What the rule needs of an execution beyond its vectors' operators."""

    def where(self, cond: Vector, yes: Any, no: Vector) -> Vector:
        """Per row: `yes` where `cond`, else `no` (`yes` may be a scalar)."""
        ...

    def count(self, mask: Vector) -> Any:
        """How many rows `mask` holds."""
        ...


class Rows(Protocol):
    """A step's plans for its rows, as vectors of one execution."""

    @property
    def hot(self) -> Any: ...  # hot[layer]: the rows whose hot region holds the layer

    @property
    def planned(self) -> Any: ...  # planned[layer]: the rows whose plan skips the layer on this token

    @property
    def adaptive(self) -> Vector: ...  # the rows that decide as they go (adaptive, aligned)

    @property
    def aligned(self) -> Vector: ...  # the rows that vote together

    @property
    def threshold(self) -> Vector: ...  # the similarity at which a row fires

    @property
    def run_length(self) -> Vector: ...  # k, the hot layers a firing row skips

    @property
    def quorum(self) -> Any: ...  # the share of the aligned rows' votes that skips for them all


class SkipState(NamedTuple):
    """What a row carries from layer to layer within one token."""

    remaining: Vector  # the hot layers left in its run of k
    fired: Vector  # whether it fired on this token


def decide(rows: Rows, state: SkipState, layer: int, xp: RowOps) -> tuple[Vector, Vector]:
    """-> (skip, wish): the rows that skip this layer's FFN, and the rows in a run (their wishes)."""
    hot = rows.hot[layer]
    wish = rows.adaptive & hot & (state.remaining > 0)
    skip = rows.planned[layer] | wish
    members = rows.aligned & hot
    together = xp.count(wish & members) >= rows.quorum * xp.count(members)
    return xp.where(members, together, skip), wish


def candidates(rows: Rows, state: SkipState, layer: int, skip: Vector) -> Vector:
    """The rows that may fire on this layer, whatever their similarity."""
    return rows.adaptive & rows.hot[layer] & ~skip & ~state.fired


def fires(rows: Rows, could: Vector, similarity: Vector) -> Vector:
    """The rows that fire: of the candidates (`could`), those whose similarity reaches their threshold."""
    return could & (similarity >= rows.threshold)


def advance(rows: Rows, state: SkipState, wish: Vector, fire: Vector, xp: RowOps) -> SkipState:
    """The state after the layer: each wish moves its row one layer along its run (an outvoted wish
    too: a run is positional), and each row that fires starts a run of k."""
    remaining = xp.where(wish, state.remaining - 1, state.remaining)
    return SkipState(xp.where(fire, rows.run_length, remaining), state.fired | fire)


def observe(rows: Rows, state: SkipState, layer: int, skip: Vector, wish: Vector, similarity: Vector,
            xp: RowOps) -> SkipState:
    """The state after this layer's FFN; `similarity`: cos(h, out) per row (only the candidates' are read)."""
    return advance(rows, state, wish, fires(rows, candidates(rows, state, layer, skip), similarity), xp)


# ---- the device execution: torch tensors


class TorchOps:
    """Row vectors are torch tensors [B] (bool masks, int64 counters, float64 thresholds)."""

    @staticmethod
    def where(cond: torch.Tensor, yes: Any, no: torch.Tensor) -> torch.Tensor:
        return torch.where(cond, yes, no)

    @staticmethod
    def count(mask: torch.Tensor) -> torch.Tensor:
        return mask.sum()


TORCH = TorchOps()


# ---- the host execution: bit masks and sparse numbers


# the rows of each byte of a mask, for the first 8 bytes (64 rows): a mask's rows are a few lookups
_BYTE_ROWS = [[tuple(8 * k + b for b in range(8) if byte >> b & 1) for byte in range(256)] for k in range(8)]


def rows_of(mask: int) -> tuple[int, ...]:
    """The rows of a bit mask, lowest first."""
    if mask < 0:
        raise ValueError("a row mask is never negative (a bare ~mask is not one)")
    rows = _BYTE_ROWS[0][mask & 255]
    mask >>= 8
    k = 1
    while mask and k < 8:
        rows += _BYTE_ROWS[k][mask & 255]
        mask >>= 8
        k += 1
    if mask:  # rows past the 64th
        rows += tuple(8 * k + b for b in range(mask.bit_length()) if mask >> b & 1)
    return rows


class HostNumbers:
    """Per-row numbers on the host, stored sparsely: `values` {row: value}, every other of the
    `size` rows holding `default`. Never changed once made."""

    __slots__ = ("values", "default", "size", "_low")

    def __init__(self, values: dict[int, float], default: float, size: int) -> None:
        self.values = values
        self.default = default
        self.size = size
        self._low: float | None = None

    def low(self) -> float:
        """The smallest value of any row (what a comparison with this on the right needs)."""
        if self._low is None:
            low = min(self.values.values(), default=self.default)
            self._low = low if len(self.values) == self.size else min(low, self.default)
        return self._low

    @staticmethod
    def dense(values: Sequence[float]) -> HostNumbers:
        return HostNumbers(dict(enumerate(values)), math.inf, len(values))

    def at(self, row: int) -> float:
        return self.values.get(row, self.default)

    def _rows(self, holds_at_default: bool) -> dict[int, float]:
        """The rows a comparison must look at: the stored ones, unless the default may hold too."""
        return {b: self.at(b) for b in range(self.size)} if holds_at_default else self.values

    # > and >= against a number or HostNumbers: when the default fails against the other side's
    # smallest value it fails at every row, so only the stored rows need a look

    def __gt__(self, other: HostNumbers | float) -> int:
        mask = 0
        if isinstance(other, HostNumbers):
            get, default = other.values.get, other.default
            for b, value in self._rows(self.default > other.low()).items():
                if value > get(b, default):
                    mask |= 1 << b
        else:
            for b, value in self._rows(self.default > other).items():
                if value > other:
                    mask |= 1 << b
        return mask

    def __ge__(self, other: HostNumbers | float) -> int:
        mask = 0
        if isinstance(other, HostNumbers):
            get, default = other.values.get, other.default
            for b, value in self._rows(self.default >= other.low()).items():
                if value >= get(b, default):
                    mask |= 1 << b
        else:
            for b, value in self._rows(self.default >= other).items():
                if value >= other:
                    mask |= 1 << b
        return mask

    def __sub__(self, other: float) -> HostNumbers:
        values = self.values.copy()
        for b, value in values.items():
            values[b] = value - other
        return HostNumbers(values, self.default - other, self.size)

    def where(self, cond: int, yes: HostNumbers | float) -> HostNumbers:
        """Per row: `yes` where `cond`, else this; rows that end at the default are not stored."""
        values, default = self.values.copy(), self.default
        if isinstance(yes, HostNumbers):
            get, other = yes.values.get, yes.default
            for b in rows_of(cond):
                values[b] = get(b, other)
        else:
            values.update(dict.fromkeys(rows_of(cond), yes))
        if default in values.values():
            values = {b: value for b, value in values.items() if value != default}
        return HostNumbers(values, default, self.size)

    def __repr__(self) -> str:
        return f"HostNumbers({[self.at(b) for b in range(self.size)]})"


class HostOps:
    """Boolean row vectors are int bit masks: `&`, `|` are exact; `~m` is -m - 1 (every other row,
    and every bit above the batch), which the rule only ever ANDs with a row mask. Numbers are
    HostNumbers."""

    @staticmethod
    def where(cond: int, yes: Any, no: Any) -> Any:
        if not cond:
            return no
        if isinstance(no, HostNumbers):
            return no.where(cond, yes)
        if isinstance(yes, bool):  # one answer for every row: all of them, or none
            yes = -1 if yes else 0
        return (yes & cond) | (no & ~cond)

    @staticmethod
    def count(mask: int) -> int:
        return mask.bit_count()


HOST = HostOps()


def mask_of(flags: Any) -> int:
    """The bit mask of an iterable of per-row truth values."""
    return sum(1 << b for b, flag in enumerate(flags) if flag)
