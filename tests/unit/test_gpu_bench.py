"""scripts/gpu_bench.py on cpu: its decoder against transformers' Llama, the skip patterns, the JSON.

The CUDA-graph paths (IF nodes, segmented graphs) need a GPU and are not exercised here; the
eager path runs the same step code with the branch predicate read on the host.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"
TOKENS = 6  # decode steps per test sequence
BATCH = 2
ATOL = 1e-4


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)
    spec.loader.exec_module(module)
    return module


gb = _load()
CPU = torch.device("cpu")
# 6 layers: cold 0 and 5, hot 1..4 (ordinals 0..3)
CFG = gb.ModelConfig(hidden=64, inter=128, layers=6, heads=4, kv_heads=2, vocab=256)
STATIC = (2, 4)


def plan(k: int = 2):
    return gb.default_plan(CFG, cold_start=1, cold_end=5, static_layers=STATIC, k=k)


@pytest.fixture(scope="module")
def weights():
    return gb.init_weights(CFG, CPU, torch.float32, seed=0)


@pytest.fixture(scope="module")
def ids():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, CFG.vocab, (BATCH, TOKENS), generator=gen)


@pytest.fixture(scope="module")
def reference(weights, ids):
    """transformers' LlamaForCausalLM with the same weights; FFNs of `zero` layers output 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cache = {}

    def logits(zero=()) -> torch.Tensor:
        key = tuple(sorted(zero))
        if key in cache:
            return cache[key]
        hd = CFG.head_dim
        config = LlamaConfig(hidden_size=CFG.hidden, intermediate_size=CFG.inter, num_hidden_layers=CFG.layers,
                             num_attention_heads=CFG.heads, num_key_value_heads=CFG.kv_heads,
                             vocab_size=CFG.vocab, rms_norm_eps=CFG.eps, max_position_embeddings=64,
                             tie_word_embeddings=False)
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
        assert rope["rope_theta"] == CFG.rope_theta
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            m = model.model
            m.embed_tokens.weight.copy_(weights.embed)
            m.norm.weight.copy_(weights.norm)
            model.lm_head.weight.copy_(weights.lm_head)
            for i, layer in enumerate(m.layers):
                q, k, v = weights.wqkv[i].split([CFG.heads * hd, CFG.kv_heads * hd, CFG.kv_heads * hd])
                layer.self_attn.q_proj.weight.copy_(q)
                layer.self_attn.k_proj.weight.copy_(k)
                layer.self_attn.v_proj.weight.copy_(v)
                layer.self_attn.o_proj.weight.copy_(weights.wo[i])
                gate, up = weights.wgu[i].chunk(2)
                layer.mlp.gate_proj.weight.copy_(gate)
                layer.mlp.up_proj.weight.copy_(up)
                layer.mlp.down_proj.weight.copy_(torch.zeros_like(weights.wd[i]) if i in key else weights.wd[i])
                layer.input_layernorm.weight.copy_(weights.ln1[i])
                layer.post_attention_layernorm.weight.copy_(weights.ln2[i])
            cache[key] = model(ids).logits
        return cache[key]

    return logits


def decode(weights, ids, pattern, threshold=None, k=2):
    """Teacher-forced decode through the script's step; -> (logits [B, T, V], decoder)."""
    dec = gb.Decoder(CFG, weights, ids.shape[0], TOKENS + 1, plan(k), CPU, torch.float32)
    dec.count_calls = True
    if threshold is not None:
        dec.set_threshold(threshold)
    out = []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            dec.tok.copy_(ids[:, t])
            dec.step(pattern, gb.HostBranch())
            out.append(dec.logits.clone())
    return torch.stack(out, dim=1), dec


def calls(dec) -> list[int]:
    return [dec.mlp_calls[i] for i in range(CFG.layers)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= ATOL


# (a) ------------------------------------------------------------------------------------------


def test_dense_step_matches_transformers(weights, ids, reference):
    ours, dec = decode(weights, ids, "dense")
    assert (ours - reference()).abs().max().item() <= ATOL
    assert calls(dec) == [TOKENS] * CFG.layers
    assert int(dec.pos) == TOKENS


def test_reference_comparison_is_discriminating(weights, ids, reference):
    """Removing one FFN moves the logits well beyond the tolerance, so the equalities below mean something."""
    assert (reference((3,)) - reference()).abs().max().item() > 100 * ATOL


# (b) ------------------------------------------------------------------------------------------


def test_static_skips_exactly_the_configured_layers(weights, ids, reference):
    ours, dec = decode(weights, ids, "static")
    assert calls(dec) == [0 if i in STATIC else TOKENS for i in range(CFG.layers)]
    assert close(ours, reference(STATIC))
    assert not close(ours, reference())


def test_default_static_pattern_scales_with_depth():
    for name, expected in (("7b", 9), ("1b", 6), ("tiny", 1)):
        cfg = gb.CONFIGS[name]
        p = gb.default_plan(cfg)
        assert len(p.static_layers) == expected
        assert all(p.cold_start <= layer < p.cold_end for layer in p.static_layers)
    p = gb.default_plan(gb.CONFIGS["7b"])
    gaps = [b - a for a, b in zip(p.static_layers, p.static_layers[1:])]
    assert max(gaps) - min(gaps) <= 1  # spread evenly over the hot range


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_adaptive_threshold_minus_one_fires_and_skips_next_k(weights, ids, reference, k):
    """Every row fires at the first hot layer (1) and skips the FFN of the next k hot layers;
    once per token, so the remaining hot layers run again."""
    hot = [1, 2, 3, 4]
    skipped = hot[1:1 + k]
    ours, dec = decode(weights, ids, "adaptive", threshold=-1.0, k=k)
    expect = [TOKENS if i in skipped else 0 for i in range(CFG.layers)]
    assert dec.skipped_per_layer(TOKENS).tolist() == [[e] * BATCH for e in expect]
    assert dec.weight_skips_per_layer(TOKENS).tolist() == expect
    assert calls(dec) == [TOKENS - e for e in expect]  # every row skips: the FFN does not run at all
    assert close(ours, reference(skipped))


def test_adaptive_threshold_two_skips_nothing(weights, ids, reference):
    ours, dec = decode(weights, ids, "adaptive", threshold=2.0)
    assert dec.skipped_per_layer(TOKENS).sum().item() == 0
    assert calls(dec) == [TOKENS] * CFG.layers
    assert close(ours, reference())


def test_adaptive_mixed_batch_runs_the_ffn_and_masks_skipping_rows(weights, ids, reference):
    """Row 0 fires (threshold -1), row 1 never does (2): layers 2 and 3 still run their FFN for
    the batch, row 0 keeps h there, row 1 gets the FFN."""
    ours, dec = decode(weights, ids, "adaptive", threshold=torch.tensor([-1.0, 2.0]))
    per_row = dec.skipped_per_layer(TOKENS)
    assert per_row[:, 0].tolist() == [0, 0, TOKENS, TOKENS, 0, 0]
    assert per_row[:, 1].tolist() == [0] * CFG.layers
    assert dec.weight_skips_per_layer(TOKENS).tolist() == [0] * CFG.layers
    assert calls(dec) == [TOKENS] * CFG.layers
    assert close(ours[0], reference((2, 3))[0])
    assert close(ours[1], reference()[1])


def test_adaptive_calibration_reaches_the_target(weights):
    dec = gb.Decoder(CFG, weights, 1, 12, plan(k=3), CPU, torch.float32)
    runner = gb.EagerRunner(dec, "adaptive")
    with torch.inference_mode():
        thr, ratio = gb.calibrate(runner, dec, 0, torch.tensor([5]), target=0.2, steps=10)
    assert -1.0 < thr < 1.0  # a threshold strictly inside: the bisection did work
    assert abs(ratio - 0.2) <= 0.05


# (d) ------------------------------------------------------------------------------------------

ROW_KEYS = {"model", "batch", "pattern", "tokens_per_s", "speedup", "skip_ratio", "batch_skip_ratio",
            "ideal_speedup", "ideal_speedup_token", "realised_fraction", "check_us_per_layer",
            "cos_us_per_layer", "threshold", "ms_per_step"}


def test_json_output_of_a_tiny_cpu_run():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--batches", "1,2",
         "--new-tokens", "3", "--reps", "2", "--prompt-len", "2", "--calib-steps", "2", "--json"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    meta, rows = result["meta"], result["rows"]
    assert meta["mechanism"] == "eager"
    assert [(r["batch"], r["pattern"]) for r in rows] == [(b, p) for b in (1, 2) for p in ("dense", "static", "adaptive")]
    W, Fb = meta["weight_bytes_per_step"], meta["ffn_weight_bytes"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert r["ideal_speedup"] == pytest.approx(W / (W - r["batch_skip_ratio"] * Fb))
        if r["pattern"] == "dense":
            assert r["speedup"] == 1.0 and r["skip_ratio"] == 0.0 and r["realised_fraction"] is None
        if r["pattern"] == "static":
            assert r["skip_ratio"] == pytest.approx(1 / 4)  # tiny: 1 of 4 layers
            assert r["realised_fraction"] == pytest.approx((r["speedup"] - 1) / (r["ideal_speedup"] - 1))
        if r["pattern"] == "adaptive":
            assert isinstance(r["check_us_per_layer"], float) and isinstance(r["threshold"], float)
