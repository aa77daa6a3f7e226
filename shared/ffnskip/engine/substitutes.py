"""What a skipped FFN contributes instead of nothing: a calibrated substitute.

A layer's block ends with `out = h + mlp(post_norm(h))`. Skipping the FFN plainly gives
`out = h`; a substitute gives `out = h + s(post_norm(h))`, where s is cheap next to the FFN:

- a bias b: the FFN's mean output (no weight read beyond one vector);
- a low-rank map: b + (n @ first) @ second, first [D, r] and second [r, D];
- a full map: b + n @ first, first [D, D] (on SmolLM2, 12.5% of the FFN's bytes).

The calibrator fits them (ffnskip.calibration.substitutes) and a profile carries them; a
`SubstituteSet` is one profile's substitutes per layer, applied to the rows that skip a layer
that has one. A row without a set, or a layer without a substitute, skips plainly.

An engine whose matrices are int8 with int8 activations (w8a8) applies a low-rank map the way it
applies its matrices (`Int8LowRank`, `SubstituteSet.int8`): a quarter of the bytes, through the
same int8 kernel. As float32 multiply-and-reduce it took 86-103 us of a 16-row step, most of
the 135 us of the FFN it replaced, so a step with rows in their warm-up (which runs the FFN)
paid nearly twice.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import cached_property

import torch

from ffnskip.engine.layers import int8_product, quantise_rows

KINDS = ("bias", "lowrank", "linear")


@dataclass(frozen=True, eq=False)
class Substitute:
    """s(n) = bias + n @ first (@ second): what one skipped FFN adds to h (n = post_norm(h))."""

    bias: torch.Tensor  # [D]
    first: torch.Tensor | None = None  # [D, r], or [D, D] for a full map
    second: torch.Tensor | None = None  # [r, D] for a low-rank map

    def __post_init__(self) -> None:
        width = self.bias.shape[-1]
        if self.bias.dim() != 1:
            raise ValueError(f"bias must be a vector, got shape {tuple(self.bias.shape)}")
        if self.first is None and self.second is not None:
            raise ValueError("a second factor needs a first")
        if self.first is not None:
            out = self.first.shape[1] if self.second is None else self.second.shape[1]
            if self.first.shape[0] != width or out != width:
                raise ValueError(f"the map must take and give {width} values")
            if self.second is not None and self.second.shape[0] != self.first.shape[1]:
                raise ValueError("the factors' inner sizes differ")

    @property
    def kind(self) -> str:
        return "bias" if self.first is None else ("linear" if self.second is None else "lowrank")

    @property
    def rank(self) -> int:
        """The inner size of a low-rank map (0 for a bias or a full map)."""
        return 0 if self.second is None else int(self.second.shape[0])

    @property
    def factors(self) -> tuple[torch.Tensor, ...]:
        """A low-rank map's factors as the compiled "substitute" package reads them:
        (first_t, second) (segments.substitute_step)."""
        assert self.second is not None, "only a low-rank map has factors"
        return self.first_t, self.second

    @property
    def nbytes(self) -> int:
        """The bytes a step reads to apply it (the cost its skip pays back)."""
        return sum(t.numel() * t.element_size() for t in (self.bias, self.first, self.second) if t is not None)

    @cached_property
    def first_t(self) -> torch.Tensor:
        """`first` transposed and contiguous [r, D]: the layout a compiled low-rank substitute reads
        (segments.substitute_step), made on first use."""
        assert self.first is not None, "a bias has no map"
        return self.first.t().contiguous()

    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [..., D] -> s(normed) [..., D] in normed's dtype."""
        out = self.bias.expand_as(normed)
        if self.first is not None:
            mapped = normed @ self.first
            out = out + (mapped if self.second is None else mapped @ self.second)
        return out

    def to(self, device: torch.device, dtype: torch.dtype) -> Substitute:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        return Substitute(move(self.bias), move(self.first), move(self.second))  # type: ignore[arg-type]

    def int8(self) -> Substitute | Int8LowRank:
        """A low-rank map with int8 factors (Int8LowRank); a bias or a full map as it is."""
        if self.second is None:
            return self
        assert self.first is not None
        # contiguous before rounding: rounded from a transposed view, the int8 copy kept its strides
        # and every product copied it back to rows
        return Int8LowRank(self.bias, *quantise_rows(self.first.t().contiguous()),
                           *quantise_rows(self.second.t().contiguous()))


def int8_factors(weights: str) -> bool:
    """Whether an engine whose matrices are in format `weights` (config.WEIGHT_FORMATS) applies a
    low-rank map with int8 factors: where its products take int8 activations too ("w8a8")."""
    return weights == "w8a8"


def int8_low_rank(normed: torch.Tensor, first: torch.Tensor, first_scale: torch.Tensor,
                  second: torch.Tensor, second_scale: torch.Tensor) -> torch.Tensor:
    """(normed @ first^T) @ second^T for int8 factors with a scale per output row, each product's
    rows rounded to int8 as a w8a8 matrix's are (layers.int8_product): normed [..., D] -> [..., D].
    The one definition eager code and the compiled package (segments.substitute_step) run."""
    mapped = int8_product(normed.reshape(-1, normed.shape[-1]), first, first_scale)
    return int8_product(mapped, second, second_scale).reshape(normed.shape)


@dataclass(frozen=True, eq=False)
class Int8LowRank:
    """A low-rank substitute s(n) = bias + (n @ first^T) @ second^T with int8 factors, applied as a
    w8a8 engine applies its matrices: `first` int8 [r, D] (a float map's first factor, transposed)
    and `second` int8 [D, r], each with a float32 scale per row (layers.quantise_rows)."""

    bias: torch.Tensor  # [D]
    first: torch.Tensor  # int8 [r, D]
    first_scale: torch.Tensor  # [r]
    second: torch.Tensor  # int8 [D, r]
    second_scale: torch.Tensor  # [D]
    kind = "lowrank"

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bias, *self.factors))

    @property
    def factors(self) -> tuple[torch.Tensor, ...]:
        """As the compiled "substitute" package of a w8a8 engine reads them."""
        return self.first, self.first_scale, self.second, self.second_scale

    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        return self.bias + int8_low_rank(normed, *self.factors)

    def to(self, device: torch.device, dtype: torch.dtype) -> Int8LowRank:
        """The bias in `dtype`; the factors and their scales stay int8 and float32."""
        return Int8LowRank(self.bias.to(device=device, dtype=dtype), *(t.to(device) for t in self.factors))


AnySubstitute = Substitute | Int8LowRank


class SubstituteSet:
    """One profile's substitutes, by layer. Rows that share a set share its tensors."""

    def __init__(self, layers: Mapping[int, AnySubstitute]) -> None:
        self.layers: dict[int, AnySubstitute] = dict(sorted(layers.items()))

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> AnySubstitute:
        return self.layers[layer]

    @cached_property
    def int8(self) -> SubstituteSet:
        """The set as a w8a8 engine applies it: its low-rank maps with int8 factors (made once
        per set, so the rows that share a set share these too)."""
        if all(isinstance(s, Int8LowRank) or s.kind != "lowrank" for s in self.layers.values()):
            return self  # served already (a decoder builds a profile's set as its engine serves it)
        return SubstituteSet({layer: s if isinstance(s, Int8LowRank) else s.int8() for layer, s in self.layers.items()})

    def served_by(self, weights: str) -> SubstituteSet:
        """The set as an engine whose matrices are in format `weights` applies it (config.WEIGHT_FORMATS):
        with int8 factors where they take int8 activations too (int8_factors), else as it is."""
        return self.int8 if int8_factors(weights) else self

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers.values())

    def to(self, device: torch.device, dtype: torch.dtype) -> SubstituteSet:
        return SubstituteSet({layer: s.to(device, dtype) for layer, s in self.layers.items()})

    # ---- storage: plain float32 tensors keyed by layer and part

    def to_bytes(self) -> bytes:
        """The set as bytes (float32 tensors keyed by layer and part), for a profile store. Only a
        set as calibrated is stored (its int8 form is made from it where it is served)."""
        if any(isinstance(s, Int8LowRank) for s in self.layers.values()):
            raise ValueError("an int8 set is made from the stored one, not stored itself")
        tensors = {f"{layer}.{part}": getattr(s, part).float().cpu().contiguous()
                   for layer, s in self.layers.items() for part in ("bias", "first", "second")
                   if getattr(s, part) is not None}
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.getvalue()

    @staticmethod
    def from_bytes(blob: bytes) -> SubstituteSet:
        """The inverse of to_bytes; only tensors are read (weights_only), never code."""
        tensors = torch.load(io.BytesIO(blob), weights_only=True)
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            layer, _, part = key.partition(".")
            parts.setdefault(int(layer), {})[part] = tensor
        return SubstituteSet({layer: Substitute(**p) for layer, p in parts.items()})


def blob_digest(blob: bytes) -> str:
    """The digest a profile records for its substitutes' bytes (checked when they are read back)."""
    return hashlib.sha256(blob).hexdigest()


def substitute_groups(index: int, skipping: Seq[bool],
                      sets: Seq[SubstituteSet | None]) -> list[tuple[AnySubstitute, list[int]]]:
    """The substitutes for layer `index` of the rows that skip it (skipping[b]) and whose set has
    one, each with its rows: one group when the rows share a profile's set (the common case)."""
    groups: dict[int, tuple[AnySubstitute, list[int]]] = {}
    for b, (skips, chosen) in enumerate(zip(skipping, sets)):
        if skips and chosen is not None and index in chosen:
            substitute = chosen[index]
            groups.setdefault(id(substitute), (substitute, []))[1].append(b)
    return list(groups.values())
