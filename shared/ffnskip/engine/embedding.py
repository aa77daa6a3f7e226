"""The token embedding of a model whose embedding and LM head are one matrix (tied), read from the
LM head's w8a8 copy instead of a float table of its own."""

from __future__ import annotations

import torch
from torch import nn

from ffnskip.engine.layers import Head


class TiedInt8Embedding(nn.Module):
    """Token t's embedding is row t of the tied matrix W. The LM head holds W as int8 values q with a
    scale s per row, after dividing its columns by its input's smoothing f (layers.quantise_rows,
    smoothing.py), so row t is read back as q[t] * s[t] * f: W rounded like every other matrix of a
    w8a8 engine, and the float table (vocabulary x hidden: 113 MB for SmolLM2-135M) is not kept beside
    it. The head's tensors are read at each call, so the embedding follows the head when it adopts
    the compiled segments' copy."""

    def __init__(self, head: Head, dtype: torch.dtype) -> None:
        super().__init__()
        self._head = [head]  # a list: not a submodule, so its parameters are not this module's
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        matrix = self._head[0].lm_head
        rows = matrix.weight[ids].to(self.dtype) * matrix.weight_scale[ids].unsqueeze(-1).to(self.dtype)
        return rows * matrix.weight_smoothing
