"""The GPU benchmark (`ffnskip bench --gpu`, ffnskip.bench.gpu) on cpu: the device step driven as
the bench drives it (greedy, the patterns as SkipParams) against transformers' Llama, the skip
counts, the calibration, the JSON of the command and of scripts/gpu_bench.py (its thin wrapper).

The CUDA-graph paths (IF nodes, segmented graphs) need a GPU and are not exercised here; the
eager path runs the same step code with the branch predicate read on the host.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffnskip.bench.gpu import graphs, measure, workload
from ffnskip.bench.gpu.device_step import DeviceStep
from ffnskip.bench.gpu.options import GpuBenchOptions
from ffnskip.cli.app import build_parser, main
from ffnskip.cli.bench import gpu_options
from ffnskip.engine.runner import ModelRunner
from ffnskip.errors import InvalidArgument

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"
TOKENS = 6  # greedy decode steps per test
PROMPT = 3
BATCH = 2
ATOL = 1e-4

CPU = torch.device("cpu")
# 6 layers: cold 0 and 5, hot 1..4; initializer_range 0.1 so that one FFN moves the logits well
VOCAB = 256
FIELDS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1)
LAYERS = 6
STATIC = (2, 4)
MAX_LEN = PROMPT + TOKENS + 1


def plan(k: int = 2):
    return workload.default_plan(LAYERS, cold_start=1, cold_end=5, static_layers=STATIC, k=k)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(workload.random_model(FIELDS, MAX_LEN, CPU, torch.float32, seed=0))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (BATCH, PROMPT), generator=gen).tolist()


def reference(ids: torch.Tensor, zero=()) -> torch.Tensor:
    """Logits [B, TOKENS, V] of transformers' Llama fed `ids` token by token after the prompt: the
    prompt prefilled by the model as made (the bench prefills densely), the decode steps by a second
    model made the bench's way with the same seed, the FFN of each layer in `zero` outputting 0."""
    models = [workload.random_model(FIELDS, MAX_LEN, CPU, torch.float32, seed=0) for _ in range(2)]
    with torch.no_grad():
        for layer in zero:
            models[1].model.layers[layer].mlp.down_proj.weight.zero_()
        cache = models[0](ids[:, :PROMPT], use_cache=True).past_key_values
        logits = [models[1](ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                  for t in range(PROMPT, ids.shape[1])]
    return torch.stack(logits, dim=1)


def decode(runner, prompts, pattern: str, threshold=None, k: int = 2):
    """Prefill, then TOKENS greedy steps the bench's way -> (logits [B, TOKENS, V], ids [B, PROMPT +
    TOKENS]: the prompt and the tokens fed, skipped [L, B], FFN calls not made [L])."""
    cache = runner.new_cache(BATCH, MAX_LEN)
    step = DeviceStep(runner, cache, BATCH)
    first = runner.prefill(cache, list(range(BATCH)), prompts).argmax(dim=-1)
    p = plan(k)
    if pattern != "dense":
        step.set_rows(workload.pattern_rows(p, pattern, BATCH, LAYERS, CPU))
    if threshold is not None:
        step.set_threshold(threshold)
    options = {"dense": dict(skips=False), "static": dict(gated=p.gated("static", LAYERS)),
               "adaptive": dict(gated=p.gated("adaptive", LAYERS))}[pattern]
    runner_ = graphs.EagerRunner(step, dict(options, advance=True))
    fed, logits = [first], []
    step.set_inputs(first, [PROMPT] * BATCH)
    step.zero_counters()
    for _ in range(TOKENS):
        runner_.step()
        logits.append(step.logits.clone())
        fed.append(step.tokens.clone())
    ids = torch.cat([torch.tensor(prompts), torch.stack(fed[:-1], dim=1)], dim=1)
    skipped, not_called = measure.skip_counts(step, TOKENS)
    return torch.stack(logits, dim=1), ids, skipped, not_called


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return (ours - ref).abs().max().item() <= ATOL


# (a) ------------------------------------------------------------------------------------------


def test_dense_bench_step_matches_transformers(runner, prompts):
    ours, ids, skipped, not_called = decode(runner, prompts, "dense")
    assert close(ours, reference(ids))
    assert skipped.sum().item() == 0 and not_called.sum().item() == 0


def test_reference_comparison_is_discriminating(runner, prompts):
    """Removing one FFN moves the logits well beyond the tolerance, so the equalities below mean something."""
    _, ids, _, _ = decode(runner, prompts, "dense")
    assert (reference(ids, (3,)) - reference(ids)).abs().max().item() > 100 * ATOL


def test_step_bytes_count_the_weights_read(runner):
    model = workload.random_model(FIELDS, MAX_LEN, CPU, torch.float32, seed=0)
    params = dict(model.named_parameters())
    ffn = sum(t.numel() * 4 for name, t in params.items() if ".mlp." in name or "post_attention" in name)
    rest = sum(t.numel() * 4 for name, t in params.items() if "embed_tokens" not in name) - ffn
    assert workload.step_bytes(runner) == (rest + ffn, ffn)


# (b) ------------------------------------------------------------------------------------------


def test_static_skips_exactly_the_configured_layers(runner, prompts):
    ours, ids, skipped, not_called = decode(runner, prompts, "static")
    expect = [TOKENS if layer in STATIC else 0 for layer in range(LAYERS)]
    assert skipped.tolist() == [[e] * BATCH for e in expect]
    assert not_called.tolist() == expect  # every row skips them: the FFN is not called
    assert close(ours, reference(ids, STATIC))
    assert not close(ours, reference(ids))


def test_default_static_pattern_scales_with_depth():
    for name, expected in (("7b", 9), ("1b", 6), ("tiny", 1)):
        p = workload.default_plan(workload.CONFIGS[name]["num_hidden_layers"])
        assert len(p.static_layers) == expected
        assert all(p.cold_start <= layer < p.cold_end for layer in p.static_layers)
    p = workload.default_plan(workload.CONFIGS["7b"]["num_hidden_layers"])
    gaps = [b - a for a, b in zip(p.static_layers, p.static_layers[1:])]
    assert max(gaps) - min(gaps) <= 1  # spread evenly over the hot range


# (c) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_adaptive_threshold_minus_one_fires_and_skips_next_k(runner, prompts, k):
    """Every row fires at the first hot layer (1) and skips the FFN of the next k hot layers;
    once per token, so the remaining hot layers run again."""
    skipped_layers = [1, 2, 3, 4][1:1 + k]
    ours, ids, skipped, not_called = decode(runner, prompts, "adaptive", threshold=-1.0, k=k)
    expect = [TOKENS if layer in skipped_layers else 0 for layer in range(LAYERS)]
    assert skipped.tolist() == [[e] * BATCH for e in expect]
    assert not_called.tolist() == expect  # every row skips: the FFN is not called at all
    assert close(ours, reference(ids, skipped_layers))


def test_adaptive_threshold_two_skips_nothing(runner, prompts):
    ours, ids, skipped, not_called = decode(runner, prompts, "adaptive", threshold=2.0)
    assert skipped.sum().item() == 0 and not_called.sum().item() == 0
    assert close(ours, reference(ids))


def test_adaptive_mixed_batch_runs_the_ffn_and_masks_skipping_rows(runner, prompts):
    """Row 0 fires (threshold -1), row 1 never does (2): layers 2 and 3 still run their FFN for
    the batch, row 0 keeps h there, row 1 gets the FFN."""
    ours, ids, skipped, not_called = decode(runner, prompts, "adaptive", threshold=torch.tensor([-1.0, 2.0]))
    assert skipped[:, 0].tolist() == [0, 0, TOKENS, TOKENS, 0, 0]
    assert skipped[:, 1].tolist() == [0] * LAYERS
    assert not_called.tolist() == [0] * LAYERS
    assert close(ours[:1], reference(ids[:1], (2, 3)))
    assert close(ours[1:], reference(ids[1:]))


def test_adaptive_calibration_reaches_the_target(runner):
    cache = runner.new_cache(1, 16)
    step = DeviceStep(runner, cache, 1)
    step.set_rows(workload.pattern_rows(plan(k=3), "adaptive", 1, LAYERS, CPU))
    bench_runner = graphs.EagerRunner(step, dict(gated=plan(k=3).gated("adaptive", LAYERS), advance=True))
    thr, ratio = measure.calibrate(bench_runner, step, 0, torch.tensor([5]), target=0.2, steps=10)
    assert -1.0 < thr < 1.0  # a threshold strictly inside: the bisection did work
    assert abs(ratio - 0.2) <= 0.05


# (d) ------------------------------------------------------------------------------------------

ROW_KEYS = {"model", "batch", "pattern", "tokens_per_s", "speedup", "skip_ratio", "batch_skip_ratio",
            "ideal_speedup", "ideal_speedup_token", "realised_fraction", "check_us_per_layer",
            "cos_us_per_layer", "threshold", "ms_per_step"}


TINY_RUN = ["--device", "cpu", "--batches", "1,2", "--new-tokens", "3", "--reps", "2", "--prompt-len", "2",
            "--calib-steps", "2", "--json"]


def check_tiny_run(result: dict) -> None:
    meta, rows = result["meta"], result["rows"]
    assert meta["mechanism"] == "eager"
    assert meta["config"] == workload.CONFIGS["tiny"]
    assert [(r["batch"], r["pattern"]) for r in rows] == [(b, p) for b in (1, 2) for p in ("dense", "static", "adaptive")]
    W, Fb = meta["weight_bytes_per_step"], meta["ffn_weight_bytes"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert r["ideal_speedup"] == pytest.approx(W / (W - r["batch_skip_ratio"] * Fb))
        if r["pattern"] == "dense":
            assert r["speedup"] == 1.0 and r["skip_ratio"] == 0.0 and r["realised_fraction"] is None
        if r["pattern"] == "static":
            assert r["skip_ratio"] == pytest.approx(1 / 4)  # tiny: 1 of 4 layers, counted on the device
            assert r["realised_fraction"] == pytest.approx((r["speedup"] - 1) / (r["ideal_speedup"] - 1))
        if r["pattern"] == "adaptive":
            assert isinstance(r["check_us_per_layer"], float) and isinstance(r["threshold"], float)
            assert r["skip_ratio"] == pytest.approx(r["calibration_skip_ratio"])  # same steps, same threshold


def test_the_command_runs_a_tiny_cpu_bench(capsys):
    assert main(["bench", "--gpu", "tiny", *TINY_RUN]) == 0
    check_tiny_run(json.loads(capsys.readouterr().out))


def test_the_script_is_the_command_under_its_older_name():
    """scripts/gpu_bench.py takes the shape as --model and runs the same library function."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", *TINY_RUN],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    check_tiny_run(json.loads(proc.stdout))


def test_the_command_reads_its_flags_into_the_options():
    args = build_parser().parse_args(["bench", "--gpu", "--batches", "1,4", "--k", "3", "--static-layers", "2,5",
                                      "--no-self-check", "--mechanism", "segmented"])
    assert gpu_options(args) == GpuBenchOptions(model="1b", batches=(1, 4), reps=8, k=3, static_layers=(2, 5),
                                                self_check=False, mechanism="segmented")
    assert gpu_options(build_parser().parse_args(["bench", "--gpu", "7b", "--reps", "3"])).reps == 3
    assert main(["bench", "--gpu", "huge"]) == 2  # an unknown shape: one line, no traceback
    with pytest.raises(InvalidArgument, match="mechanism"):
        GpuBenchOptions(mechanism="sideways")
