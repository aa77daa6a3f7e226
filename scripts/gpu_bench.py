#!/usr/bin/env python
"""Decode benchmark of FFN skipping through the engine, on a random-weight Llama (about 1B or 7B) in bf16 on CUDA.

    python scripts/gpu_bench.py --model 1b|7b|tiny --batches 1,8 --new-tokens 128 --reps 8 \
        --device cuda|cpu [--json]

What runs
---------
The engine itself: a `transformers.LlamaForCausalLM` with random weights built from a config
("1b" is TinyLlama-1.1B's shape, "7b" Llama-2-7B's, "tiny" a CPU smoke model; HF's own
initialisation, seeded), wrapped in `ffnskip.engine.runner.ModelRunner` (fused q/k/v and gate/up
weights, the rotary table, the KV cache), and decoded by `ffnskip.engine.device_step.DeviceStep`:
the runner's layers with the step's inputs in static device tensors, the skip decision taken by
`DeviceSkips` (the engine's skip rule as tensor operations) and the greedy next token written back
into the input, so steps replay back to back with no host work in between. The prompt is
prefilled by `ModelRunner.prefill`. Every graph (one per pattern and batch bucket; the buckets are
the --batches) reads the one copy of the weights the runner holds; the timed loop is N
back-to-back replays between two torch.cuda.synchronize().

Each layer is h = x + attn(norm(x)); out = h + mlp(norm(h)). Layers [0, cold_start) and
[cold_end, L) are cold. The patterns, as the engine's SkipParams (one RowPlan per row):
- dense: the step without any decision (`skips=False`): every FFN runs for every row.
- static (policy static): a fixed set of hot layers (8 of 30 scaled to the depth, spread evenly
  over the hot range) is skipped by every row; the decision kernels run in every layer and those
  layers' FFN calls are gated off.
- adaptive (policy adaptive, max_skip k): in a hot layer whose FFN ran for a row, cos(h, out)
  >= threshold makes the row skip the FFN of the next k hot layers, once per token.
  In a batch a layer's FFN weights are skipped only when *every* row skips it; otherwise the FFN
  runs for the whole batch and the skipping rows keep h (torch.where). So at batch > 1 the
  weight-read saving is the batch-level skip ratio, which is what the ideal speedup below uses;
  the per-token skip ratio is reported beside it.
The gated layers (whose FFN call waits on the predicate "some row runs it") are the static layers
for static and the hot layers for adaptive; the others call their FFN every step.

On-device skip decision
-----------------------
`--mechanism` (auto: conditional on CUDA when the probe passes, else segmented; eager on CPU)
says how the step runs: one CUDA graph with IF nodes, a chain of graphs with a host read per gated
layer, or op by op (ffnskip/bench/gpu/graphs.py explains each). The JSON's "mechanism" field says which
one ran. On CUDA the script also replays every captured graph against the eager step from the
same state ("self_check": largest logit difference and whether the per-layer, per-row FFN
counters agree).

Reported per row
----------------
tokens/s: batch * new_tokens / median time of --reps interleaved reps (the variants take
turns within a rep, in rotating order, after one untimed warm-up rep).
speedup: tokens/s over the dense row of the same batch.
skip_ratio: skipped FFN blocks / (L * tokens), per token (row), counted by the step on the device.
batch_skip_ratio: layer-steps in which the FFN was not called / (L * steps): the FFN weight reads
avoided; equals skip_ratio at batch 1.
ideal_speedup: W / (W - batch_skip_ratio * F), W = weight bytes read per decode step (all
layers, final norm, LM head; the embedding table is gathered, not read), F = FFN weight
bytes of all layers (gate/up, down, post-attention norm). KV-cache reads are not in W.
ideal_speedup_token: the same with skip_ratio.
realised_fraction: (speedup - 1) / (ideal_speedup - 1); null where the ideal is 1.
check_us_per_layer (adaptive row): (step time of the adaptive graph with threshold 2, so every
FFN runs but the decision kernels, the cosine and the IF nodes all execute, minus the dense step
time) / L (the decision runs in every layer). It includes the per-layer FFN counters the step
keeps (two tiny adds per layer).
cos_us_per_layer: the same for the cosine alone (the dense step recording cos(h, out)).
Random weights make cos(h, out) meaningless as data, so the adaptive threshold is picked
per batch by bisection over short calibration runs to hit --target-skip (per token), and
the skip ratios reported are the ones measured during the timed reps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from ffnskip.bench.gpu.graphs import EagerRunner, SegmentedRunner, build_runner, probe_conditional_nodes
from ffnskip.bench.gpu.workload import CONFIGS, PATTERNS, BenchPlan, default_plan, pattern_rows, random_model, step_bytes
from ffnskip.engine.device_step import DeviceStep
from ffnskip.engine.runner import ModelRunner

# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(runner, step: DeviceStep, pos0: int, tok0: torch.Tensor, steps: int) -> float:
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


def calibrate(runner, step: DeviceStep, pos0: int, tok0: torch.Tensor, target: float, steps: int,
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


def self_check(runner, step: DeviceStep, options: dict, pos0: int, tok0: torch.Tensor, steps: int = 3) -> dict:
    """Captured graph vs the eager step from the same state: logits and FFN counters."""
    run_steps(runner, step, pos0, tok0, steps)
    logits_g, ran_g = step.logits.float().clone(), step.ffn_rows.clone()
    run_steps(EagerRunner(step, options), step, pos0, tok0, steps)
    logits_e, ran_e = step.logits.float().clone(), step.ffn_rows.clone()
    return {"max_abs_logit_diff": float((logits_g - logits_e).abs().max()),
            "skip_counts_equal": bool(torch.equal(ran_g, ran_e))}


def bench_batch(model_runner: ModelRunner, plan: BenchPlan, batch: int, args, device: torch.device,
                mechanism: str, meta: dict) -> list[dict]:
    L = model_runner.num_layers
    vocab = model_runner.head.vocab_size
    max_len = args.prompt_len + max(args.new_tokens, args.calib_steps) + 4
    cache = model_runner.new_cache(batch, max_len)
    step = DeviceStep(model_runner, cache, batch)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(args.seed + batch)
    prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).tolist()
    tok0 = model_runner.prefill(cache, list(range(batch)), prompts).argmax(dim=-1)
    pos0 = args.prompt_len
    step.set_inputs(tok0, [pos0] * batch)

    rows = {name: pattern_rows(plan, name, batch, L, device) for name in ("static", "adaptive")}
    options: dict[str, dict[str, Any]] = {"dense": dict(skips=False, advance=True),
               "static": dict(gated=plan.gated("static", L), advance=True),
               "adaptive": dict(gated=plan.gated("adaptive", L), advance=True),
               "cos": dict(skips=False, record=True, advance=True)}
    pool = torch.cuda.graph_pool_handle() if mechanism != "eager" else None
    runners = {}
    for name, opts in options.items():
        if name in rows:
            step.set_rows(rows[name])
        runners[name] = build_runner(step, opts, mechanism, pool)

    step.set_rows(rows["adaptive"])
    threshold, calib_ratio = calibrate(runners["adaptive"], step, pos0, tok0, args.target_skip, args.calib_steps)
    if device.type == "cuda" and mechanism != "eager" and not args.no_self_check:
        checks = {}
        for name in ("dense", "static", "cos"):
            if name in rows:
                step.set_rows(rows[name])
            checks[name] = self_check(runners[name], step, options[name], pos0, tok0)
        step.set_rows(rows["adaptive"])
        for label, value in (("adaptive@-1", -1.0), ("adaptive@calibrated", threshold), ("adaptive@2", 2.0)):
            step.set_threshold(value)
            checks[label] = self_check(runners["adaptive"], step, options["adaptive"], pos0, tok0)
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
    for rep in range(args.reps + 1):  # rep 0 is an untimed warm-up
        shift = rep % len(variants)
        for label, runner, row_name, thr, read in variants[shift:] + variants[:shift]:
            if row_name is not None:
                step.set_rows(rows[row_name])
            if thr is not None:
                step.set_threshold(thr)
            if isinstance(runner, SegmentedRunner):
                runner.read = read
            elapsed = run_steps(runner, step, pos0, tok0, args.new_tokens)
            if isinstance(runner, SegmentedRunner):
                runner.read = True
            if rep == 0:
                continue
            times[label].append(elapsed)
            if label in PATTERNS:
                per_row, per_layer = skip_counts(step, args.new_tokens)
                skipped[label] += per_row
                not_called[label] += per_layer
        if rep > 0:
            measured += args.new_tokens

    step_s = {label: statistics.median(ts) / args.new_tokens for label, ts in times.items()}
    W, Fb = step_bytes(model_runner)
    per_layer_us = lambda a, b: (step_s[a] - step_s[b]) / L * 1e6  # noqa: E731
    rows_out = []
    for pattern in PATTERNS:
        s_token = float(skipped[pattern].sum()) / (L * measured * batch)
        s_weight = float(not_called[pattern].sum()) / (L * measured)
        ideal = W / (W - s_weight * Fb)
        speedup = step_s["dense"] / step_s[pattern]
        row = {
            "model": args.model, "batch": batch, "pattern": pattern, "mechanism": mechanism,
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


def fmt(value, spec: str) -> str:
    """format(value, spec), or a dash right-aligned to the spec's width for None."""
    if value is not None:
        return format(value, spec)
    width = re.match(r"\D*(\d*)", spec).group(1)  # type: ignore[union-attr]  # matches every string
    return format("-", f">{width}" if width else "")


def table(rows: list[dict], meta: dict) -> str:
    head = (f"{'batch':>5} {'pattern':<9} {'tok/s':>10} {'speedup':>8} {'skip':>6} {'b-skip':>6} "
            f"{'ideal':>6} {'realised':>8} {'check us/l':>10} {'cos us/l':>9} {'thr':>8}")
    lines = [f"model {meta['model']} ({meta['params_b']:.2f}B params) on {meta['device_name']}, {meta['dtype']}, "
             f"mechanism {meta['mechanism']}: {meta['mechanism_note']}", head]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['pattern']:<9} {r['tokens_per_s']:>10.1f} {r['speedup']:>8.3f} "
                     f"{r['skip_ratio']:>6.3f} {r['batch_skip_ratio']:>6.3f} {r['ideal_speedup']:>6.3f} "
                     f"{fmt(r['realised_fraction'], '>8.3f')} {fmt(r['check_us_per_layer'], '>10.2f')} "
                     f"{fmt(r['cos_us_per_layer'], '>9.2f')} {fmt(r['threshold'], '>8.4f')}")
        if r.get("sync_us_per_layer") is not None:
            lines.append(f"{'':>15} host sync per conditional layer: {r['sync_us_per_layer']:.2f} us")
    lines.extend(f"note: {n}" for n in meta["notes"])
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CONFIGS), default="1b")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (one graph bucket each)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--mechanism", choices=("auto", "conditional", "segmented", "eager"), default="auto")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--target-skip", type=float, default=0.25, help="per-token skip ratio the calibration aims at")
    p.add_argument("--calib-steps", type=int, default=8)
    p.add_argument("--k", type=int, default=None, help="skip run length (default: half the hot layers)")
    p.add_argument("--cold-start", type=int, default=None)
    p.add_argument("--cold-end", type=int, default=None)
    p.add_argument("--static-layers", default=None, help="comma-separated layers for `static`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-self-check", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batch_list or min(args.batch_list) < 1:
        p.error("--batches needs positive integers")
    if args.new_tokens < 1 or args.reps < 1 or args.prompt_len < 1 or args.calib_steps < 1:
        p.error("--new-tokens, --reps, --prompt-len and --calib-steps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: no CUDA device (this torch: {torch.__version__})")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    num_layers = CONFIGS[args.model]["num_hidden_layers"]
    static = [int(s) for s in args.static_layers.split(",")] if args.static_layers else None
    plan = default_plan(num_layers, args.cold_start, args.cold_end, static, args.k)
    if device.type == "cpu":
        if args.mechanism not in ("auto", "eager"):
            sys.exit("CUDA graphs need --device cuda; on cpu the mechanism is eager")
        mechanism, note = "eager", "eager ops; the skip predicate is read on the host (free on cpu)"
    elif args.mechanism == "eager":
        mechanism, note = "eager", "eager ops; the skip predicate is read on the host (one sync per layer)"
    else:
        ok, note = probe_conditional_nodes(device, dtype)
        if args.mechanism == "conditional" and not ok:
            sys.exit(note)
        mechanism = "conditional" if ok and args.mechanism != "segmented" else "segmented"
        if mechanism == "segmented":
            note = ("graphs cut at each gated FFN, predicate read on the host per gated layer"
                    + ("" if args.mechanism == "segmented" else f" (fallback: {note})"))
        else:
            note = "one CUDA graph per (pattern, batch); gated FFNs in IF nodes predicated on the device; " + note

    with torch.inference_mode():
        max_len = args.prompt_len + max(args.new_tokens, args.calib_steps) + 4
        model = random_model(CONFIGS[args.model], max_len, device, dtype, args.seed)
        model_runner = ModelRunner(model)  # the engine's layers: the one copy of the weights every graph reads
        W, Fb = step_bytes(model_runner)
        n_params = sum(t.numel() for t in model.parameters())
        meta = {
            "model": args.model, "config": CONFIGS[args.model], "params_b": n_params / 1e9, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", ""),
            "mechanism": mechanism, "mechanism_note": note,
            "plan": asdict(plan), "weight_bytes_per_step": W, "ffn_weight_bytes": Fb,
            "new_tokens": args.new_tokens, "reps": args.reps, "prompt_len": args.prompt_len,
            "target_skip": args.target_skip,
            "notes": [
                "batch > 1: a layer's FFN weights are skipped only when every row skips it; otherwise the FFN "
                "runs for the batch and skipping rows keep h (masked). ideal_speedup uses batch_skip_ratio "
                "(weight reads avoided); ideal_speedup_token uses the per-token skip_ratio.",
                "random weights: cos(h, out) carries no meaning; the adaptive threshold is calibrated per batch "
                "to the target per-token skip ratio and the reported ratios are measured in the timed reps.",
                "check/cos us per layer: step time over dense, divided by the layers (adaptive graph at "
                "threshold 2: every FFN runs, the decision and cosine run in every layer, IF nodes in the hot ones).",
                "every graph of every batch reads the ModelRunner's one copy of the weights.",
            ],
        }
        rows: list[dict] = []
        for batch in args.batch_list:
            try:
                rows.extend(bench_batch(model_runner, plan, batch, args, device, mechanism, meta))
            except RuntimeError as exc:
                if not (mechanism == "conditional" and args.mechanism == "auto"):
                    raise
                # the probe passed but capturing the model with IF nodes did not: fall back, say so
                mechanism = meta["mechanism"] = "segmented"
                meta["mechanism_note"] = ("graphs cut at each gated FFN, predicate read on the host per "
                                          f"gated layer (fallback: IF-node capture of the model failed at "
                                          f"batch {batch}: {type(exc).__name__}: {exc})")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                rows.extend(bench_batch(model_runner, plan, batch, args, device, mechanism, meta))
        checks = [c for per_batch in meta.get("self_check", {}).values() for c in per_batch.values()]
        if checks:
            worst = max(c["max_abs_logit_diff"] for c in checks)
            agree = all(c["skip_counts_equal"] for c in checks)
            meta["notes"].append(f"self-check (captured graphs vs eager step, 3 steps from the same state): "
                                 f"largest logit difference {worst:.3g}, skip counters "
                                 + ("identical" if agree else "DIFFER - the graph path is suspect"))
    result = {"meta": meta, "rows": rows}
    text = table(rows, meta)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
