"""The modules traced into a decode step: a decoder layer with fused weights, and the head.

The block is two residual lines, `h = x + attn(norm(x))` and
`out = h + mlp(norm(h))`; the skip decision sits between them and nowhere else.
q/k/v and gate/up are fused into one matmul each; the HF modules keep working
because their weights become views into the fused tensors (no extra memory).
The HF model's norms are reused as they are, so variants (Llama 3 rope scaling,
Qwen2 biases) need no code here. Every matmul goes through `project`, which also takes
a weight in the blocked layout of the compiled segments (compiled.py swaps those in
while tracing). Compiled packages hash this file's source: what changes here is recompiled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

BLOCK = 16  # output columns per block of a blocked weight


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / BLOCK), K, BLOCK], zero-padded: each block holds BLOCK output rows
    side by side, one contiguous run of memory that a kernel reads once and vectorises along
    its BLOCK outputs (the layout a prepacking GEMM would make, made once and shared)."""
    n, k = weight.shape
    if n % BLOCK:
        weight = F.pad(weight, (0, 0, 0, BLOCK - n % BLOCK))
    return weight.view(-1, BLOCK, k).transpose(1, 2).contiguous()


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x @ weight.T + bias -> [..., n]. A [N, K] weight is F.linear; a blocked one is one batched
    matmul over its blocks, or, compiled at a single row, a multiply-and-reduce that Inductor
    vectorises itself (faster than a library GEMV on a CPU, and as fast as a prepacked frozen
    weight). Run eagerly, that product would be materialised whole (the LM head's is 113 MB for
    SmolLM2): eager code takes the batched matmul at one row too."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1 and torch.compiler.is_compiling():
        blocks = _row_times_blocks(rows, weight)
    else:
        blocks = torch.matmul(rows[None], weight)  # [N / BLOCK, rows, BLOCK]
    out = blocks.permute(1, 0, 2).reshape(rows.shape[0], -1)[:, :n]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


def _row_times_blocks(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """row [1, K] times each block [K, BLOCK] of `weight` -> [N / BLOCK, 1, BLOCK], written for
    Inductor's CPU code: it vectorises a block's outputs in a loop outside the reduction over K,
    so a block wider than one vector was read in as many passes (each over a strided part of
    every cache line). One reduction per vector's width of outputs, over the same range, fuses
    into one loop with an accumulator each that reads every line once (on AVX2, 8 floats a
    vector: a 3072 x 576 GEMV took 16% less time, the LM head 13%)."""
    lanes = _vector_lanes(weight)
    parts = [(row[None, :, :, None] * weight[:, None, :, start:start + lanes]).sum(2)
             for start in range(0, weight.shape[-1], lanes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _vector_lanes(weight: torch.Tensor) -> int:
    """Elements of the weight's dtype per vector register of this CPU (a whole block elsewhere)."""
    if weight.device.type != "cpu":
        return weight.shape[-1]
    # local: only tracing asks, and importing Inductor costs every process that loads a model
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()  # false when this CPU has no vector unit Inductor knows
    return isa.nelements(weight.dtype) if isa else weight.shape[-1]


class FusedLayer(nn.Module):
    """One decoder layer with fused q/k/v and gate/up weights (views shared with the HF modules)."""

    def __init__(self, layer: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """`layer`: a transformers Llama-family decoder layer (its submodules are read by name)."""
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv_weight = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias") if attn.q_proj.bias is not None else None
        self.o_proj = attn.o_proj
        self.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act = mlp.act_fn
        # the HF linears whose weights are now views into the fused tensors (released by adopt)
        self._fused_into = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.hidden_size = int(self.o_proj.weight.shape[0])
        self.gate_up_size = int(self.gate_up_weight.shape[0])

    def adopt(self, weights: dict[str, torch.Tensor]) -> None:
        """Read `weights` (parameter name -> tensor, e.g. the compiled segments' blocked copies)
        from now on and let the layer's own matrices go, so the process holds one copy of them.
        The HF modules this layer was built from cannot run afterwards."""
        adopt(self, weights)
        for module in self._fused_into:  # their weights were views of the fused tensors
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> rotated q [B, H, T, hd], k and v [B, KV, T, hd]."""
        batch, length, _ = x.shape
        qkv = project(self.input_norm(x), self.qkv_weight, self.qkv_bias, self.q_size + 2 * self.kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """q [B, H, T, hd] over keys/values [B, KV, S, hd] -> [B, T, H * hd], ready for o_proj."""
        batch, _, length, _ = q.shape
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.num_kv_heads != self.num_heads)
        return attn.transpose(1, 2).reshape(batch, length, self.q_size)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """The attention's output projection."""
        return project(attn, self.o_proj.weight, self.o_proj.bias, self.hidden_size)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.post_norm(h), self.gate_up_weight, None, self.gate_up_size).chunk(2, dim=-1)
        return project(self.act(gate) * up, self.down_proj.weight, self.down_proj.bias, self.hidden_size)


def _fuse(linears: list[Any], name: str = "weight") -> nn.Parameter:
    """Concatenate the parameters and make each module's parameter a view into the result."""
    fused = nn.Parameter(torch.cat([getattr(m, name).data for m in linears], dim=0), requires_grad=False)
    offset = 0
    for module in linears:
        rows = getattr(module, name).shape[0]
        getattr(module, name).data = fused.data[offset:offset + rows]
        offset += rows
    return fused


def adopt(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Make each named parameter of `module` the given tensor (a matrix may change its layout:
    `project` reads either)."""
    for name, tensor in weights.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))


class Head(nn.Module):
    """The final norm and the LM head."""

    def __init__(self, final_norm: Any, lm_head: Any) -> None:
        super().__init__()
        self.final_norm, self.lm_head = final_norm, lm_head
        self.vocab_size = int(lm_head.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.final_norm(x[:, -1]), self.lm_head.weight, self.lm_head.bias, self.vocab_size)
