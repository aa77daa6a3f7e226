"""A minimal Llama-family forward over the loaded HF weights, with the skip hook.

The block is two residual lines, `h = x + attn(norm(x))` and
`out = h + mlp(norm(h))`; the skip decision sits between them and nowhere else.
q/k/v and gate/up are fused into one matmul each; the HF modules keep working
because their weights become views into the fused tensors (no extra memory).
The HF model's norms and rotary embedding are reused as they are, so variants
(Llama 3 rope scaling, Qwen2 biases) need no code here.

A decode step runs as segments cut at the skip point (see segments.py): per
layer "q/k/v + cache write + attention + o_proj", then the decision, then "FFN"
unless it is skipped; the LM head after the last layer. A skipped FFN is a call
not made, so none of its weights is read. Segments run eagerly or compiled
(compiled.py) with the same code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.policies import SkipController
from ffnskip.engine.segments import EagerSegments, Segments


class FusedLayer(nn.Module):
    """One decoder layer with fused q/k/v and gate/up weights (views shared with the HF modules)."""

    def __init__(self, layer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
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
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> rotated q [B, H, T, hd], k and v [B, KV, T, hd]."""
        batch, length, _ = x.shape
        qkv = F.linear(self.input_norm(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        """q [B, H, T, hd] over keys/values [B, KV, S, hd] -> [B, T, H * hd], ready for o_proj."""
        batch, _, length, _ = q.shape
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.num_kv_heads != self.num_heads)
        return attn.transpose(1, 2).reshape(batch, length, self.q_size)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self.post_norm(h), self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _fuse(linears: list[nn.Linear], name: str = "weight") -> nn.Parameter:
    """Concatenate the parameters and make each module's parameter a view into the result."""
    fused = nn.Parameter(torch.cat([getattr(m, name).data for m in linears], dim=0), requires_grad=False)
    offset = 0
    for module in linears:
        rows = getattr(module, name).shape[0]
        getattr(module, name).data = fused.data[offset:offset + rows]
        offset += rows
    return fused


class Head(nn.Module):
    """The final norm and the LM head."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.final_norm, self.lm_head = final_norm, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x[:, -1]))


class SkipModel:
    """Prefill one sequence into a cache row; decode a batch of rows under a skip policy."""

    def __init__(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.head = Head(inner.norm, hf_model.lm_head)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.layers = [FusedLayer(layer, self.num_heads, self.num_kv_heads, self.head_dim) for layer in inner.layers]
        self.num_layers = len(self.layers)
        weight = hf_model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.segments: Segments = EagerSegments(self.layers, self.head)

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        return KVCache(self.num_layers, max_batch, self.num_kv_heads, max_seq_len, self.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the full model over one prompt into cache row `row`; return last logits [V]."""
        x = self.embed(input_ids[None])
        positions = torch.arange(input_ids.shape[0], device=self.device)[None]
        cos, sin = self.rotary(x, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            cache.write_prefill(index, row, k[0], v[0])
            h = x + layer.o_proj(layer.attention(q, k, v, None, causal=True))
            x = h + layer.mlp(h)
        cache.lengths[row] = input_ids.shape[0]
        return self.head(x)[0]

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: list[int], positions: list[int],
               controller: SkipController) -> torch.Tensor:
        """One decode step for rows [0, B): each row's last token at its position; logits [B, V].

        Compiled segments run on a fixed batch bucket P >= B: the padding rows attend to
        position 0 of cache rows [B, P) and write their keys to the scratch position."""
        batch, host_positions = len(tokens), positions
        padded = self.segments.bucket(batch)
        if padded > cache.max_batch:
            raise ValueError(f"batch bucket {padded} exceeds the cache's {cache.max_batch} rows")
        pad = padded - batch
        span = max(positions) + 1
        x = self.embed(torch.tensor(tokens + [0] * pad, device=self.device)[:, None])
        positions = torch.tensor(positions + [0] * pad, device=self.device)
        write_positions = torch.tensor(host_positions + [cache.scratch_position] * pad, device=self.device)
        cos, sin = self.rotary(x, positions[:, None])
        visible = torch.arange(span, device=self.device)[None, :] <= positions[:, None]
        # an additive mask made once per step (SDPA would convert a boolean one in every layer)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None, :]
        with self.segments.running(padded):
            logits = self._layers(cache, controller, batch, padded, x, cos, sin, mask, write_positions)
        cache.lengths[:batch] = [p + 1 for p in host_positions]
        return logits[:batch]

    def _layers(self, cache, controller, batch, padded, x, cos, sin, mask, write_positions) -> torch.Tensor:
        real = (lambda t: t) if padded == batch else (lambda t: t[:batch])  # the rows that are not padding
        segments = self.segments
        for index in range(self.num_layers):
            keys, values = cache.layer(index)
            h = segments.attention(index)(x, keys, values, write_positions, mask, cos, sin)
            decision = controller.decide(index)
            x, similarity = h, None
            if decision.kind != "none":
                x, similarity = segments.ffn(index)(h, segments.row_mask(padded, decision.rows))
            controller.observe(index, real(h), real(x), None if similarity is None else real(similarity))
        return segments.head()(x)
