"""The pieces of a decode step between skip points: the `Segments` interface, its eager
implementation (EagerSegments), and the functions both implementations run (attention_step
and ffn_step, which compiled.py traces; device_step.py reuses attention_step and
residual_similarity, the one definition of the similarity).

Per layer a decode step is two segments with the skip decision between them:
`attention(i, ...)` is layer i's q/k/v, the write of k and v into the cache, the
attention over the cache and the output projection with its residual (-> h);
`ffn(i, ...)` is the FFN on the rows of `row_mask` (the others keep h) and, when the
segment computes it, the cosine between h and the result (-> (out, cos or None)). An FFN
no row runs is a segment not called, so it costs nothing, and no weight is in two segments.
`substitute(i, h, x, row_mask, s)` adds a skipped FFN's calibrated substitute (substitutes.py)
on the rows of `row_mask`. `head(x)` is the final norm and the LM head, at the last position.
compiled.py provides the same interface compiled (CompiledSegments). A batch runs padded to `bucket(batch)` rows
(the batch itself when eager, the next compiled size when compiled), the first dimension of
every tensor here.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ffnskip.engine.layers import FusedLayer, Head
from ffnskip.engine.substitutes import AnySubstitute, int8_low_rank


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one decode step reads besides its weights, its cache and x.

    Rows [0, batch) are the sequences; rows [batch, padded) pad the batch to its bucket."""

    batch: int
    padded: int
    cos: torch.Tensor  # [P, 1, head_dim] rotary angles at each row's position
    sin: torch.Tensor
    mask: torch.Tensor  # [P, 1, 1, span] additive; its width is the span attended
    write_positions: torch.Tensor  # [P] where each row writes its k and v

    def real(self, rows: torch.Tensor) -> torch.Tensor:
        """The sequences' rows of a per-row tensor (padding dropped)."""
        return rows if self.padded == self.batch else rows[:self.batch]


def residual_similarity(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cos(h, out) per row at the last position, in float32: how little the FFN changed the
    hidden state (1 = not at all). The one definition the skip rules and calibration read."""
    return F.cosine_similarity(h[:, -1].float(), out[:, -1].float(), dim=-1)


def attention_step(layer: FusedLayer, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   write_positions: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [P, 1, D] over batch rows [0, P) of this layer's cache `keys`/`values` [rows, kv_heads,
    positions, head_dim]; `mask` [P, 1, 1, span] is additive and its width is the span attended.
    Row b writes its k and v at write_positions[b]. -> h = x + o_proj(attention)."""
    padded, span = x.shape[0], mask.shape[-1]
    q, k, v = layer.qkv(x, cos, sin)
    rows = torch.arange(padded, device=x.device)
    keys[rows, :, write_positions] = k[:, :, 0]
    values[rows, :, write_positions] = v[:, :, 0]
    attn = layer.attention(q, keys[:padded, :, :span], values[:padded, :, :span], mask, causal=False)
    return x + layer.output(attn)


def ffn_step(layer: FusedLayer, with_similarity: bool, h: torch.Tensor,
             row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (out = h + FFN(h) on the rows of row_mask, h elsewhere; cos(h, out) [P] or None)."""
    out = h + layer.mlp(h)
    if row_mask is not None:
        out = torch.where(row_mask, out, h)
    return out, residual_similarity(h, out) if with_similarity else None


def substitute_step(layer: FusedLayer, h: torch.Tensor, x: torch.Tensor, row_mask: torch.Tensor,
                    bias: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """x + s(post_norm(h)) on the rows of row_mask, x elsewhere, for a low-rank substitute
    s(n) = bias + (n @ first) @ second given by its `factors` (Substitute.factors,
    Int8LowRank.factors). Float factors (first_t [r, D], each output of the first product reading
    one contiguous row; second [r, D]) are multiplied and reduced, which Inductor fuses into loops
    (a library GEMM call per product took 69 us a decode step, these 39); int8 ones are two int8
    products, as a w8a8 engine's matrices are."""
    normed = layer.post_norm(h)
    if len(factors) == 2:
        first_t, second = factors
        mapped = (normed[..., None, :] * first_t).sum(-1)  # [P, 1, r]
        added = (mapped[..., :, None] * second).sum(-2)
    else:
        added = int8_low_rank(normed, *factors)
    return torch.where(row_mask, x + (bias + added), x)


class Segments(Protocol):
    def bucket(self, batch: int) -> int: ...
    def row_mask(self, padded: int, rows: Seq[int] | None) -> torch.Tensor | None: ...
    def attention(self, index: int, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor: ...
    def ffn(self, index: int, h: torch.Tensor,
            row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def substitute(self, index: int, h: torch.Tensor, x: torch.Tensor, row_mask: torch.Tensor | None,
                   substitute: AnySubstitute) -> torch.Tensor: ...
    def head(self, x: torch.Tensor) -> torch.Tensor: ...


class EagerSegments:
    """Exact batch sizes, the FFN only where a row runs it, the cosine left to the skip rules."""

    def __init__(self, layers: Seq[FusedLayer], head: Head) -> None:
        self.layers, self._head = layers, head
        self.device = head.lm_head.weight.device

    def bucket(self, batch: int) -> int:
        return batch

    def row_mask(self, padded: int, rows: Seq[int] | None) -> torch.Tensor | None:
        if rows is None:
            return None
        mask = torch.zeros(padded, dtype=torch.bool)
        mask[list(rows)] = True
        return mask.to(self.device)[:, None, None]

    def attention(self, index: int, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        return attention_step(self.layers[index], x, keys, values, step.write_positions, step.mask, step.cos, step.sin)

    def ffn(self, index: int, h: torch.Tensor,
            row_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return ffn_step(self.layers[index], False, h, row_mask)

    def substitute(self, index: int, h: torch.Tensor, x: torch.Tensor, row_mask: torch.Tensor | None,
                   substitute: AnySubstitute) -> torch.Tensor:
        out = x + substitute(self.layers[index].post_norm(h))
        return out if row_mask is None else torch.where(row_mask, out, x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(x)
