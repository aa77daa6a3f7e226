"""The pieces of a decode step between skip points, run eagerly.

Per layer a decode step is two segments with the skip decision between them:
`attention(i)` is layer i's q/k/v, the write of k and v into the cache, the
attention over the cache and the output projection with its residual (-> h);
`ffn(i)` is the FFN on the rows of `row_mask` (the others keep h) and, when the
segment computes it, the cosine between h and the result (-> out). A skipped FFN
is a segment not called, so it costs nothing, and no weight is in two segments.
`head()` is the final norm and the LM head. compiled.py provides the same
interface compiled.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Protocol, Sequence as Seq

import torch
import torch.nn.functional as F
from torch import nn


def attention_step(layer: nn.Module, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
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
    return x + layer.o_proj(attn)


def ffn_step(layer: nn.Module, with_similarity: bool, h: torch.Tensor, row_mask: Optional[torch.Tensor]):
    """-> (out = h + FFN(h) on the rows of row_mask, h elsewhere; cos(h, out) [P] or None)."""
    out = h + layer.mlp(h)
    if row_mask is not None:
        out = torch.where(row_mask, out, h)
    similarity = F.cosine_similarity(h[:, -1].float(), out[:, -1].float(), dim=-1) if with_similarity else None
    return out, similarity


class Segments(Protocol):
    def bucket(self, batch: int) -> int: ...
    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> Optional[torch.Tensor]: ...
    def attention(self, index: int) -> Callable: ...
    def ffn(self, index: int) -> Callable: ...
    def head(self) -> Callable: ...
    def running(self, padded: int) -> ContextManager: ...


class EagerSegments:
    """Exact batch sizes, the FFN only where a row runs it, the cosine left to the controller."""

    def __init__(self, layers: list[nn.Module], head: nn.Module) -> None:
        self.layers, self._head = layers, head

    def bucket(self, batch: int) -> int:
        return batch

    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> Optional[torch.Tensor]:
        if rows is None:
            return None
        mask = torch.zeros(padded, dtype=torch.bool)
        mask[list(rows)] = True
        return mask.to(self._head.lm_head.weight.device)[:, None, None]

    def running(self, padded: int) -> ContextManager:
        return nullcontext()

    def attention(self, index: int) -> Callable:
        layer = self.layers[index]
        return lambda *args: attention_step(layer, *args)

    def ffn(self, index: int) -> Callable:
        layer = self.layers[index]
        return lambda h, row_mask: ffn_step(layer, False, h, row_mask)

    def head(self) -> Callable:
        return self._head
