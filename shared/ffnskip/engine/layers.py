"""The modules traced into a decode step: a decoder layer with fused weights, and the head.

The block is two residual lines, `h = x + attn(norm(x))` and
`out = h + mlp(norm(h))`; the skip decision sits between them and nowhere else.
q/k/v and gate/up are fused into one matmul each; the HF modules keep working
because their weights become views into the fused tensors (no extra memory).
The HF model's norms are reused as they are, so variants (Llama 3 rope scaling,
Qwen2 biases) need no code here. Every matmul goes through `project`, which also takes
a weight in the blocked layout of the compiled segments (compiled.py swaps those in
while tracing), in the activations' precision or as int8 with a scale per output
(`quantise`), or as an int8 [N, K] matrix whose products take int8 activations too
(`quantise_rows`, `int8_product`). Compiled packages hash this file's source: what changes here
is recompiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ffnskip.engine import int8_kernel
from ffnskip.engine.smoothing import smoothing

BLOCK = 16  # output columns per block of a blocked weight
# An int8 product over at most this many rows runs as a multiply-and-reduce that converts each
# weight where it is read (compiled; at 1-4 rows it reads a quarter of float32's bytes and takes
# 0.3-0.7 of its time on 2 AVX-512 cores). Over more rows the library's batched GEMM reuses each
# weight across the rows, and the matrix is converted for it a slice at a time, each slice small
# enough to stay in a core's cache between its conversion and its product: converted whole, the
# float32 copy went through memory and the FFN took 1.4x float32's time at 16 rows; in slices
# 0.96x, the LM head 0.82x.
INT8_REDUCED_ROWS = 4
CONVERTED_SLICE_BYTES = 1 << 20


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / BLOCK), K, BLOCK], zero-padded: each block holds BLOCK output rows
    side by side, one contiguous run of memory that a kernel reads once and vectorises along
    its BLOCK outputs (the layout a prepacking GEMM would make, made once and shared)."""
    n, k = weight.shape
    if n % BLOCK:
        weight = F.pad(weight, (0, 0, 0, BLOCK - n % BLOCK))
    return weight.view(-1, BLOCK, k).transpose(1, 2).contiguous()


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (int8 blocked [ceil(N / BLOCK), K, BLOCK], float32 scale [ceil(N / BLOCK), 1, BLOCK]):
    symmetric, one scale per output row (max |w| / 127), so the scale multiplies the product's
    output and never enters the reduction. Weight-only: activations keep their precision."""
    rows = weight.detach().float()
    scale = rows.abs().amax(dim=1) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    values = torch.round(rows / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return blocked(values), blocked(scale[:, None]).reshape(-1, 1, BLOCK)


def dequantised(weight: torch.Tensor) -> torch.Tensor:
    """The [N, K] float32 matrix that `quantise(weight)` stands for: a model whose matrices are
    replaced by these computes what an int8 engine of it computes, to float rounding."""
    values, scale = quantise(weight)
    return (values.float() * scale).transpose(1, 2).reshape(-1, weight.shape[1])[:weight.shape[0]]


def quantise_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (int8 [N, K], float32 scale [N]): symmetric, one scale per output row (max |w| / 127),
    unblocked: `int8_product` hands the matrix to the library's integer GEMM, which packs it itself."""
    rows = weight.detach().float()
    scale = rows.abs().amax(dim=1) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(rows / safe[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_product(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 smoothing: torch.Tensor | None = None) -> torch.Tensor:
    """rows [R, K] times an int8 [N, K] `weight` with a scale per output (`quantise_rows`) -> [R, N]
    in the rows' precision. Each row is rounded to int8 with a step of its own (max |x| / 127, so a
    row's product never depends on the other rows of its batch), the integer product is summed
    exactly in int32 by the library's int8 GEMM (the CPU's int8 dot-product instructions), and
    the two scales multiply its output: what llama.cpp does with Q8_0 weights, with a row where it
    has blocks of 32. `smoothing` [K] multiplies the rows first (the weight's columns were divided
    by it: smoothing.py). On 2 AVX-512 cores the 30 FFNs of SmolLM2-135M took 7.2 ms at 1 row
    against 13.2 ms for the weight-only product that converts each weight (7.9 against 60 at 16
    rows). A decode step's few rows take int8_kernel's product where it is loaded: the same
    integer sums, at up to 2.5 times the speed."""
    if smoothing is not None:
        rows = rows * smoothing
    step = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-30) / 127
    values = torch.round(rows / step).to(torch.int8)
    if rows.shape[0] <= int8_kernel.rows() and rows.device.type == "cpu":
        sums = torch.ops.ffnskip.int8_matmul(values, weight)
    else:
        sums = torch._int_mm(values, weight.t())
    return (sums * (step * scale)).to(rows.dtype)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
            scale: torch.Tensor | None = None, smoothing: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias -> [..., n]. A [N, K] weight is F.linear; a blocked one is one batched
    matmul over its blocks, or, compiled at a single row, a multiply-and-reduce that Inductor
    vectorises itself (faster than a library GEMV on a CPU, and as fast as a prepacked frozen
    weight). Run eagerly, that product would be materialised whole (the LM head's is 113 MB for
    SmolLM2): eager code takes the batched matmul at one row too. `scale`: the weight is int8
    (`quantise`); over few rows the reduction converts each weight as it reads it (compiled), or
    ATen's weight-only int8 kernel runs on the matrix unblocked (eager). An int8 [N, K] weight
    takes int8 activations too (`int8_product`, after `smoothing`), eager or compiled, over any
    number of rows."""
    if weight.dim() == 2 and weight.dtype == torch.int8:
        assert scale is not None, "an int8 [N, K] matrix comes with its scales (quantise_rows)"
        out = int8_product(x.reshape(-1, x.shape[-1]), weight, scale, smoothing)
        out = out if bias is None else out + bias
        return out.reshape(*x.shape[:-1], n)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    compiling = torch.compiler.is_compiling()
    if scale is not None and compiling and rows.shape[0] <= INT8_REDUCED_ROWS:
        blocks = _row_times_blocks(rows, weight) * scale
    elif scale is not None and rows.shape[0] <= INT8_REDUCED_ROWS:
        # eager (a decoder serving while its packages compile): ATen's weight-only int8 kernel on
        # the [N, K] matrix: 9.7 tokens/s in process, where converting the blocks served 1.5-2.5
        matrix = weight.transpose(1, 2).reshape(-1, weight.shape[1])
        out = torch._weight_int8pack_mm(rows, matrix, scale.reshape(-1).to(rows.dtype))[:, :n]
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], n)
    elif scale is not None:
        blocks = _times_converted_slices(rows, weight) * scale
    elif rows.shape[0] == 1 and compiling:
        blocks = _row_times_blocks(rows, weight)
    else:
        blocks = torch.matmul(rows[None], weight)  # [N / BLOCK, rows, BLOCK]
    out = blocks.permute(1, 0, 2).reshape(rows.shape[0], -1)[:, :n]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


def _row_times_blocks(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [R, K] times each block [K, BLOCK] of `weight` -> [N / BLOCK, R, BLOCK] in the rows'
    precision (an int8 weight is converted where it is read), written for Inductor's CPU code:
    it vectorises a block's outputs in a loop outside the reduction over K, so a block wider
    than one vector was read in as many passes (each over a strided part of every cache line).
    One reduction per vector's width of outputs, over the same range, fuses into one loop with
    an accumulator each that reads every line once (on AVX2, 8 floats a vector: a 3072 x 576
    GEMV took 16% less time, the LM head 13%)."""
    lanes = _vector_lanes(rows.dtype, weight)
    parts = [(rows[None, :, :, None] * weight[:, None, :, start:start + lanes].to(rows.dtype)).sum(2)
             for start in range(0, weight.shape[-1], lanes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _times_converted_slices(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [R, K] times the blocks of an int8 `weight`, converted to the rows' precision a slice
    of blocks at a time (CONVERTED_SLICE_BYTES each) -> [N / BLOCK, R, BLOCK]."""
    per_block = weight.shape[1] * weight.shape[2] * rows.element_size()
    step = max(1, CONVERTED_SLICE_BYTES // per_block)
    return torch.cat([torch.matmul(rows[None], weight[start:start + step].to(rows.dtype))
                      for start in range(0, weight.shape[0], step)])


def _vector_lanes(dtype: torch.dtype, weight: torch.Tensor) -> int:
    """Elements of `dtype` per vector register of this CPU (a whole block elsewhere)."""
    if weight.device.type != "cpu":
        return weight.shape[-1]
    # local: only tracing asks, and importing Inductor costs every process that loads a model
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()  # false when this CPU has no vector unit Inductor knows
    return isa.nelements(dtype) if isa else weight.shape[-1]


class FusedLayer(nn.Module):
    """One decoder layer with fused q/k/v and gate/up weights (views shared with the HF modules)."""

    MATRICES = ("qkv_weight", "o_proj.weight", "gate_up_weight", "down_proj.weight")

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
        qkv = project(self.input_norm(x), self.qkv_weight, self.qkv_bias, self.q_size + 2 * self.kv_size,
                      *quantisation_of(self, "qkv_weight"))
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
        return project(attn, self.o_proj.weight, self.o_proj.bias, self.hidden_size,
                       *quantisation_of(self, "o_proj.weight"))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.post_norm(h), self.gate_up_weight, None, self.gate_up_size,
                           *quantisation_of(self, "gate_up_weight")).chunk(2, dim=-1)
        return project(self.act(gate) * up, self.down_proj.weight, self.down_proj.bias, self.hidden_size,
                       *quantisation_of(self, "down_proj.weight"))


def _fuse(linears: list[Any], name: str = "weight") -> nn.Parameter:
    """Concatenate the parameters and make each module's parameter a view into the result."""
    fused = nn.Parameter(torch.cat([getattr(m, name).data for m in linears], dim=0), requires_grad=False)
    offset = 0
    for module in linears:
        rows = getattr(module, name).shape[0]
        getattr(module, name).data = fused.data[offset:offset + rows]
        offset += rows
    return fused


def scale_name(name: str) -> str:
    """The parameter holding the scales of the int8 matrix `name` (qkv_weight -> qkv_scale,
    o_proj.weight -> o_proj.weight_scale)."""
    return _companion(name, "scale")


def smoothing_name(name: str) -> str:
    """The parameter holding the smoothing of a w8a8 matrix `name`'s input (qkv_weight ->
    qkv_smoothing)."""
    return _companion(name, "smoothing")


def _companion(name: str, suffix: str) -> str:
    return name.removesuffix("_weight") + "_" + suffix if name.endswith("_weight") else f"{name}_{suffix}"


def scale_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The scales of matrix `name` of `module` when it is int8, else None."""
    owner, _, attr = scale_name(name).rpartition(".")
    return getattr(module.get_submodule(owner), attr, None)


def quantisation_of(module: nn.Module, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`project`'s scale and smoothing for matrix `name` of `module` (None where it has none)."""
    owner, _, attr = smoothing_name(name).rpartition(".")
    return scale_of(module, name), getattr(module.get_submodule(owner), attr, None)


def quantise_matrices(module: FusedLayer | Head, activations: bool = False,
                      input_maxima: Mapping[str, torch.Tensor] | None = None) -> None:
    """Hold `module`'s matrices as int8 with their scales, letting the full-precision ones go:
    blocked for weight-only products (`quantise`), or, with `activations`, [N, K] for products
    that round the activations to int8 too (`quantise_rows`), each with the smoothing of its input
    (1 per channel, or smoothing.smoothing of `input_maxima`: matrix name -> max |x| per input)."""
    weights: dict[str, torch.Tensor] = {}
    for name in module.MATRICES:
        weight = module.get_parameter(name)
        if not activations:
            weights[name], weights[scale_name(name)] = quantise(weight)
            continue
        if input_maxima is None:
            factor = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
        else:
            factor = smoothing(input_maxima[name], weight).to(weight.dtype)
        weights[name], weights[scale_name(name)] = quantise_rows(weight / factor)
        weights[smoothing_name(name)] = factor
    module.adopt(weights)


def adopt(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Make each named parameter of `module` the given tensor (a matrix may change its layout:
    `project` reads either)."""
    for name, tensor in weights.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))


class Head(nn.Module):
    """The final norm and the LM head."""

    MATRICES = ("lm_head.weight",)

    def __init__(self, final_norm: Any, lm_head: Any) -> None:
        super().__init__()
        self.final_norm, self.lm_head = final_norm, lm_head
        self.vocab_size = int(lm_head.weight.shape[0])

    def adopt(self, weights: dict[str, torch.Tensor]) -> None:
        """Read `weights` (parameter name -> tensor) from now on (a tied LM head stops sharing
        the embedding's matrix)."""
        adopt(self, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.final_norm(x[:, -1]), self.lm_head.weight, self.lm_head.bias, self.vocab_size,
                       *quantisation_of(self, "lm_head.weight"))
