"""How the GPU benchmark measures one batch bucket: greedy steps timed back to back, the adaptive
threshold calibrated to a target skip ratio, captured graphs checked against the eager step,
and the rows of its table (ffnskip.bench.gpu.run says what each field means)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Protocol

import torch

from ffnskip.bench.gpu.device_step import DeviceStep
from ffnskip.bench.gpu.graphs import EagerRunner, SegmentedRunner, build_runner
from ffnskip.bench.gpu.options import GpuBenchOptions
from ffnskip.bench.gpu.workload import PATTERNS, BenchPlan, pattern_rows, step_bytes
from ffnskip.engine.runner import ModelRunner


class Runner(Protocol):
    """One way of running a device step (graphs.build_runner): eagerly, or by replaying graphs."""

    def step(self) -> None: ...


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(runner: Runner, step: DeviceStep, pos0: int, tok0: torch.Tensor, steps: int) -> float:
    """`steps` greedy steps from token tok0 at position pos0 (every row); the counters start at 0."""
    step.set_inputs(tok0, [pos0] * tok0.shape[0])
    step.zero_counters()
    sync(step.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(step.device)
    return time.perf_counter() - t0


def skip_counts(step: DeviceStep, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, B] per row, [L] per layer): FFN blocks skipped, and FFN calls not made, over `steps`."""
    return steps - step.ffn_rows.cpu().long(), steps - step.ffn_calls.cpu().long()


def calibrate(runner: Runner, step: DeviceStep, pos0: int, tok0: torch.Tensor, target: float, steps: int,
              iters: int = 16) -> tuple[float, float]:
    """Bisect the threshold so the measured per-token skip ratio is close to `target`.
    Returns (threshold, skip ratio at it). Skipping falls as the threshold rises."""
    L, B = step.ffn_rows.shape

    def ratio(thr: float) -> float:
        step.set_threshold(thr)
        run_steps(runner, step, pos0, tok0, steps)
        return float(skip_counts(step, steps)[0].sum()) / (L * steps * B)

    lo, hi = -1.0, 1.0 + 1e-6
    best = (lo, ratio(lo))
    if best[1] <= target:
        return best
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        r = ratio(mid)
        if abs(r - target) < abs(best[1] - target):
            best = (mid, r)
        if r > target:
            lo = mid
        else:
            hi = mid
    return best


def self_check(runner: Runner, step: DeviceStep, options: dict, pos0: int, tok0: torch.Tensor, steps: int = 3) -> dict:
    """Captured graph vs the eager step from the same state: logits and FFN counters."""
    run_steps(runner, step, pos0, tok0, steps)
    logits_g, ran_g = step.logits.float().clone(), step.ffn_rows.clone()
    run_steps(EagerRunner(step, options), step, pos0, tok0, steps)
    logits_e, ran_e = step.logits.float().clone(), step.ffn_rows.clone()
    return {"max_abs_logit_diff": float((logits_g - logits_e).abs().max()),
            "skip_counts_equal": bool(torch.equal(ran_g, ran_e))}


def bench_batch(model_runner: ModelRunner, plan: BenchPlan, batch: int, options: GpuBenchOptions,
                device: torch.device, mechanism: str, meta: dict) -> list[dict]:
    """The rows (dense, static, adaptive) of one batch bucket; self-check results go into `meta`."""
    L = model_runner.num_layers
    vocab = model_runner.head.vocab_size
    max_len = options.prompt_len + max(options.new_tokens, options.calib_steps) + 4
    cache = model_runner.new_cache(batch, max_len)
    step = DeviceStep(model_runner, cache, batch)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(options.seed + batch)
    prompts = torch.randint(0, vocab, (batch, options.prompt_len), generator=gen).tolist()
    tok0 = model_runner.prefill(cache, list(range(batch)), prompts).argmax(dim=-1)
    pos0 = options.prompt_len
    step.set_inputs(tok0, [pos0] * batch)

    rows = {name: pattern_rows(plan, name, batch, L, device) for name in ("static", "adaptive")}
    step_options: dict[str, dict[str, Any]] = {"dense": dict(skips=False, advance=True),
               "static": dict(gated=plan.gated("static", L), advance=True),
               "adaptive": dict(gated=plan.gated("adaptive", L), advance=True),
               "cos": dict(skips=False, record=True, advance=True)}
    pool = torch.cuda.graph_pool_handle() if mechanism != "eager" else None
    runners = {}
    for name, opts in step_options.items():
        if name in rows:
            step.set_rows(rows[name])
        runners[name] = build_runner(step, opts, mechanism, pool)

    step.set_rows(rows["adaptive"])
    threshold, calib_ratio = calibrate(runners["adaptive"], step, pos0, tok0, options.target_skip, options.calib_steps)
    if device.type == "cuda" and mechanism != "eager" and options.self_check:
        checks = {}
        for name in ("dense", "static", "cos"):
            if name in rows:
                step.set_rows(rows[name])
            checks[name] = self_check(runners[name], step, step_options[name], pos0, tok0)
        step.set_rows(rows["adaptive"])
        for label, value in (("adaptive@-1", -1.0), ("adaptive@calibrated", threshold), ("adaptive@2", 2.0)):
            step.set_threshold(value)
            checks[label] = self_check(runners["adaptive"], step, step_options["adaptive"], pos0, tok0)
        meta.setdefault("self_check", {})[str(batch)] = checks

    # variants timed: (label, runner, rows, threshold or None, segmented read flag)
    variants: list[tuple[str, Any, str | None, float | None, bool]] = [
        ("dense", runners["dense"], None, None, True), ("static", runners["static"], "static", None, True),
        ("adaptive", runners["adaptive"], "adaptive", threshold, True),
        ("check", runners["adaptive"], "adaptive", 2.0, True), ("cos", runners["cos"], None, None, True)]
    if mechanism == "segmented":
        variants.append(("check_noread", runners["adaptive"], "adaptive", 2.0, False))
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    skipped = {name: torch.zeros(L, batch, dtype=torch.long) for name in PATTERNS}
    not_called = {name: torch.zeros(L, dtype=torch.long) for name in PATTERNS}
    measured = 0
    for rep in range(options.reps + 1):  # rep 0 is an untimed warm-up
        shift = rep % len(variants)
        for label, runner, row_name, thr, read in variants[shift:] + variants[:shift]:
            if row_name is not None:
                step.set_rows(rows[row_name])
            if thr is not None:
                step.set_threshold(thr)
            if isinstance(runner, SegmentedRunner):
                runner.read = read
            elapsed = run_steps(runner, step, pos0, tok0, options.new_tokens)
            if isinstance(runner, SegmentedRunner):
                runner.read = True
            if rep == 0:
                continue
            times[label].append(elapsed)
            if label in PATTERNS:
                per_row, per_layer = skip_counts(step, options.new_tokens)
                skipped[label] += per_row
                not_called[label] += per_layer
        if rep > 0:
            measured += options.new_tokens

    step_s = {label: statistics.median(ts) / options.new_tokens for label, ts in times.items()}
    W, Fb = step_bytes(model_runner)
    per_layer_us = lambda a, b: (step_s[a] - step_s[b]) / L * 1e6  # noqa: E731
    rows_out = []
    for pattern in PATTERNS:
        s_token = float(skipped[pattern].sum()) / (L * measured * batch)
        s_weight = float(not_called[pattern].sum()) / (L * measured)
        ideal = W / (W - s_weight * Fb)
        speedup = step_s["dense"] / step_s[pattern]
        row = {
            "model": options.model, "batch": batch, "pattern": pattern, "mechanism": mechanism,
            "tokens_per_s": batch / step_s[pattern], "ms_per_step": step_s[pattern] * 1e3,
            "speedup": speedup, "skip_ratio": s_token, "batch_skip_ratio": s_weight,
            "ideal_speedup": ideal, "ideal_speedup_token": W / (W - s_token * Fb),
            "realised_fraction": (speedup - 1) / (ideal - 1) if ideal - 1 > 1e-9 else None,
            "check_us_per_layer": None, "cos_us_per_layer": None, "sync_us_per_layer": None,
            "threshold": None, "calibration_skip_ratio": None,
            "skipped_layers": list(plan.static_layers) if pattern == "static" else None,
        }
        if pattern == "adaptive":
            row.update(check_us_per_layer=per_layer_us("check", "dense"), cos_us_per_layer=per_layer_us("cos", "dense"),
                       threshold=threshold, calibration_skip_ratio=calib_ratio,
                       skips_per_layer=[int(c) for c in skipped[pattern].sum(dim=1)])
            if mechanism == "segmented":
                conditional = runners["adaptive"].branch.conditional_segments
                row["sync_us_per_layer"] = ((step_s["check"] - step_s["check_noread"]) / conditional * 1e6
                                            if conditional else None)
        rows_out.append(row)
    del runners, step, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows_out
