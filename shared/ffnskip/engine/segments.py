"""The pieces of a decode step between skip points, run eagerly.

`block(layer, run_ffn)` is layer i's whole step after its q/k/v: write k and v
into the cache, attend over the cache, the output projection, the FFN when
`run_ffn` (only on the rows of `row_mask`; the others keep h), the cosine
between h and the result when the segment computes it, and then layer i+1's
q/k/v, or the LM head's logits after the last layer. Cutting there keeps the
decision free (a skipped FFN is a segment without it) while giving a compiler
one large piece per layer. compiled.py provides the same interface compiled.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Protocol, Sequence as Seq

import torch
import torch.nn.functional as F
from torch import nn


def block_step(layer: nn.Module, following: nn.Module, is_last: bool, run_ffn: bool, with_similarity: bool,
               x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor, mask: torch.Tensor,
               row_mask: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
    """One layer of a decode step over batch rows [0, P) of this layer's cache `keys`/`values`
    [rows, kv_heads, positions, head_dim]; `mask` [P, 1, 1, span] is additive and its width is
    the span attended. -> (h, out, similarity [P] or None, next layer's (q, k, v) or logits)."""
    padded, span = q.shape[0], mask.shape[-1]
    rows = torch.arange(padded, device=q.device)
    keys[rows, :, write_positions] = k[:, :, 0]
    values[rows, :, write_positions] = v[:, :, 0]
    attn = layer.attention(q, keys[:padded, :, :span], values[:padded, :, :span], mask, causal=False)
    h = x + layer.o_proj(attn)
    out, similarity = h, None
    if run_ffn:
        out = h + layer.mlp(h)
        if row_mask is not None:
            out = torch.where(row_mask, out, h)
        if with_similarity:
            similarity = F.cosine_similarity(h[:, -1].float(), out[:, -1].float(), dim=-1)
    following_out = following(out) if is_last else following.qkv(out, cos, sin)
    return h, out, similarity, following_out


class Segments(Protocol):
    def bucket(self, batch: int) -> int: ...
    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> Optional[torch.Tensor]: ...
    def first_qkv(self) -> Callable: ...
    def block(self, index: int, run_ffn: bool) -> Callable: ...
    def running(self, padded: int) -> ContextManager: ...


class EagerSegments:
    """Exact batch sizes, the FFN only where a row runs it, the cosine left to the controller."""

    def __init__(self, layers: list[nn.Module], head: nn.Module) -> None:
        self.layers, self.head = layers, head

    def bucket(self, batch: int) -> int:
        return batch

    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> Optional[torch.Tensor]:
        if rows is None:
            return None
        mask = torch.zeros(padded, dtype=torch.bool)
        mask[list(rows)] = True
        return mask.to(self.head.lm_head.weight.device)[:, None, None]

    def first_qkv(self) -> Callable:
        return self.layers[0].qkv

    def running(self, padded: int) -> ContextManager:
        return nullcontext()

    def block(self, index: int, run_ffn: bool) -> Callable:
        last = index + 1 == len(self.layers)
        following = self.head if last else self.layers[index + 1]

        def run(*args):
            return block_step(self.layers[index], following, last, run_ffn, False, *args)
        return run
