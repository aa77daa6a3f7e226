"""What the GPU benchmark (`ffnskip bench --gpu`) runs: a random-weight Llama of a named shape wrapped in the engine's
ModelRunner, the skip patterns it compares as the engine's skip parameters, and the weight bytes
a decode step reads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ffnskip.bench.gpu.device_skips import RowTensors
from ffnskip.config import Policy, SkipParams
from ffnskip.engine.policies import RowPlan
from ffnskip.engine.runner import ModelRunner

# LlamaConfig fields per model; "1b" is TinyLlama-1.1B's shape, "7b" Llama-2-7B's
CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}

PATTERNS = ("dense", "static", "adaptive")


@dataclass(frozen=True)
class BenchPlan:
    cold_start: int
    cold_end: int
    static_layers: tuple[int, ...]
    k: int  # skip run length after a firing, in hot layers

    def params(self, pattern: str) -> SkipParams:
        """The pattern as the engine's skip parameters (the adaptive threshold is calibrated later,
        on the step's tensors: random weights give it no meaning)."""
        policy = {"dense": Policy.DENSE, "static": Policy.STATIC, "adaptive": Policy.ADAPTIVE}[pattern]
        return SkipParams(policy=policy, cold_start=self.cold_start, cold_end=self.cold_end, max_skip=self.k,
                          static_layers=self.static_layers, warm_up=0, threshold=1.0)

    def gated(self, pattern: str, num_layers: int) -> list[bool]:
        """The layers whose FFN call the pattern gates on "some row runs it"."""
        if pattern == "static":
            return [layer in self.static_layers for layer in range(num_layers)]
        return [self.cold_start <= layer < self.cold_end for layer in range(num_layers)]


def default_plan(num_layers: int, cold_start: int | None = None, cold_end: int | None = None,
                 static_layers: Sequence[int] | None = None, k: int | None = None) -> BenchPlan:
    """Cold ends of ceil(L/10) layers each side; static: round(L * 8/30) hot layers spread evenly;
    k: half the hot layers (so a ~25% per-token skip ratio is reachable)."""
    L = num_layers
    edge = max(1, math.ceil(L / 10))
    cs = edge if cold_start is None else cold_start
    ce = L - edge if cold_end is None else cold_end
    if not 0 <= cs < ce <= L:
        raise ValueError(f"need 0 <= cold_start < cold_end <= {L}, got {cs}, {ce}")
    hot = ce - cs
    if static_layers is None:
        n = min(hot, max(1, round(L * 8 / 30)))
        static_layers = sorted({cs + int((j + 0.5) * hot / n) for j in range(n)})
    static_layers = tuple(sorted(set(int(layer) for layer in static_layers)))
    if any(not cs <= layer < ce for layer in static_layers):
        raise ValueError(f"static layers {static_layers} must lie in the hot range [{cs}, {ce})")
    k = max(1, hot // 2) if k is None else k
    if k < 1:
        raise ValueError("k must be >= 1")
    return BenchPlan(cs, ce, static_layers, k)


def random_model(fields: dict[str, Any], max_len: int, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A LlamaForCausalLM of the shape `fields` (LlamaConfig's, e.g. a CONFIGS entry) with HF's
    seeded random initialisation, made on `device` in `dtype` directly (a 7B model never exists in
    float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"max_position_embeddings": max(max_len, 64), "tie_word_embeddings": False, **fields})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def step_bytes(runner: ModelRunner) -> tuple[int, int]:
    """(W, F): weight bytes read per decode step, and the FFN part of them."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    ffn = sum(size(layer.post_norm.weight) + size(layer.gate_up_weight) + size(layer.down_proj.weight)
              for layer in runner.layers)
    rest = sum(size(layer.input_norm.weight) + size(layer.qkv_weight) + size(layer.o_proj.weight)
               for layer in runner.layers)
    rest += size(runner.head.final_norm.weight) + size(runner.head.lm_head.weight)
    return rest + ffn, ffn


def pattern_rows(plan: BenchPlan, pattern: str, batch: int, num_layers: int, device: torch.device) -> RowTensors:
    """Every row of the bucket under the pattern's plan (all past their warm-up)."""
    row = RowPlan.build(plan.params(pattern).resolved(num_layers), num_layers)
    planned = row.draw(torch.Generator()) if row.params.policy.planned else None
    return RowTensors.build([row] * batch, [True] * batch, [planned] * batch, device)
