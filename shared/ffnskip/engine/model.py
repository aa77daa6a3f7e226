"""A minimal Llama-family forward over the loaded HF weights, with the skip hook.

The block is two residual lines, `h = x + attn(norm(x))` and
`out = h + mlp(norm(h))`; the skip decision sits between them and nowhere else.
q/k/v and gate/up are fused into one matmul each; the HF modules keep working
because their weights become views into the fused tensors (no extra memory).
The HF model's norms and rotary embedding are reused as they are, so variants
(Llama 3 rope scaling, Qwen2 biases) need no code here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.policies import SkipController


@dataclass
class FusedLayer:
    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o_proj: torch.nn.Module
    gate_up_weight: torch.Tensor
    down_proj: torch.nn.Module
    act: torch.nn.Module

    @staticmethod
    def from_hf(layer: torch.nn.Module) -> "FusedLayer":
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
        return FusedLayer(
            input_norm=layer.input_layernorm,
            post_norm=layer.post_attention_layernorm,
            qkv_weight=qkv_weight,
            qkv_bias=qkv_bias,
            o_proj=attn.o_proj,
            gate_up_weight=_fuse([mlp.gate_proj, mlp.up_proj]),
            down_proj=mlp.down_proj,
            act=mlp.act_fn,
        )

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self.post_norm(h), self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _fuse(linears: list[torch.nn.Linear], name: str = "weight") -> torch.Tensor:
    """Concatenate the parameters and make each module's parameter a view into the result."""
    fused = torch.cat([getattr(m, name).data for m in linears], dim=0)
    offset = 0
    for module in linears:
        rows = getattr(module, name).shape[0]
        getattr(module, name).data = fused[offset:offset + rows]
        offset += rows
    return fused


class SkipModel:
    """Prefill one sequence into a cache row; decode a batch of rows under a skip policy."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.rotary = inner.rotary_emb
        self.layers = [FusedLayer.from_hf(layer) for layer in inner.layers]
        self.num_layers = len(self.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        weight = self.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype

    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        return KVCache(self.num_layers, max_batch, self.num_kv_heads, max_seq_len, self.head_dim, self.device, self.dtype)

    def _qkv(self, layer: FusedLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, length, _ = x.shape
        qkv = F.linear(layer.input_norm(x), layer.qkv_weight, layer.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _attend(self, layer: FusedLayer, x: torch.Tensor, q, keys, values, mask, causal: bool) -> torch.Tensor:
        batch, length, _ = x.shape
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.num_kv_heads != self.num_heads)
        return x + layer.o_proj(attn.transpose(1, 2).reshape(batch, length, self.q_size))

    @torch.inference_mode()
    def prefill(self, cache: KVCache, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the full model over one prompt into cache row `row`; return last logits [V]."""
        x = self.embed(input_ids[None])
        positions = torch.arange(input_ids.shape[0], device=self.device)[None]
        cos, sin = self.rotary(x, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            cache.write_prefill(index, row, k[0], v[0])
            h = self._attend(layer, x, q, k, v, None, causal=True)
            x = h + layer.mlp(h)
        cache.lengths[row] = input_ids.shape[0]
        return self.lm_head(self.final_norm(x[:, -1]))[0]

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: list[int], positions: list[int],
               controller: SkipController) -> torch.Tensor:
        """One decode step for rows [0, B): each row's last token at its position; logits [B, V]."""
        batch, host_positions = len(tokens), positions
        span = max(positions) + 1
        x = self.embed(torch.tensor(tokens, device=self.device)[:, None])
        positions = torch.tensor(positions, device=self.device)
        cos, sin = self.rotary(x, positions[:, None])
        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            cache.write_decode(index, batch, positions, k, v)
            keys, values = cache.view(index, batch, span)
            h = self._attend(layer, x, q, keys, values, mask, causal=False)
            x = self._ffn(index, layer, h, controller)
        cache.lengths[:batch] = [p + 1 for p in host_positions]
        return self.lm_head(self.final_norm(x[:, -1]))

    def _ffn(self, index: int, layer: FusedLayer, h: torch.Tensor, controller: SkipController) -> torch.Tensor:
        """The skip point: the FFN runs on all rows, none, or a gathered subset."""
        decision = controller.decide(index)
        if decision.kind == "all":
            out = h + layer.mlp(h)
        elif decision.kind == "none":
            out = h
        else:
            rows = decision.rows
            part = h.index_select(0, rows)
            out = h.index_copy(0, rows, part + layer.mlp(part))
        controller.observe(index, h, out)
        return out
