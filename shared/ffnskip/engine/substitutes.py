"""What a skipped FFN contributes instead of nothing: a calibrated substitute.

A layer's block ends with `out = h + mlp(post_norm(h))`. Skipping the FFN plainly gives
`out = h`; a substitute gives `out = h + s(post_norm(h))`, where s is cheap next to the FFN:

- a bias b: the FFN's mean output (no weight read beyond one vector);
- a low-rank map: b + (n @ first) @ second, first [D, r] and second [r, D];
- a full map: b + n @ first, first [D, D] (on SmolLM2, 12.5% of the FFN's bytes).

The calibrator fits them (ffnskip.calibration.substitutes) and a profile carries them; a
`SubstituteSet` is one profile's substitutes per layer, applied to the rows that skip a layer
that has one. A row without a set, or a layer without a substitute, skips plainly.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import cached_property

import torch

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


class SubstituteSet:
    """One profile's substitutes, by layer. Rows that share a set share its tensors."""

    def __init__(self, layers: Mapping[int, Substitute]) -> None:
        self.layers: dict[int, Substitute] = dict(sorted(layers.items()))

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> Substitute:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers.values())

    def to(self, device: torch.device, dtype: torch.dtype) -> SubstituteSet:
        return SubstituteSet({layer: s.to(device, dtype) for layer, s in self.layers.items()})

    # ---- storage: plain float32 tensors keyed by layer and part

    def to_bytes(self) -> bytes:
        """The set as bytes (float32 tensors keyed by layer and part), for a profile store."""
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
                      sets: Seq[SubstituteSet | None]) -> list[tuple[Substitute, list[int]]]:
    """The substitutes for layer `index` of the rows that skip it (skipping[b]) and whose set has
    one, each with its rows: one group when the rows share a profile's set (the common case)."""
    groups: dict[int, tuple[Substitute, list[int]]] = {}
    for b, (skips, chosen) in enumerate(zip(skipping, sets)):
        if skips and chosen is not None and index in chosen:
            substitute = chosen[index]
            groups.setdefault(id(substitute), (substitute, []))[1].append(b)
    return list(groups.values())
