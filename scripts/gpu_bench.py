#!/usr/bin/env python
"""Decode benchmark of FFN skipping on a random-weight Llama (about 1B or 7B) in bf16 on CUDA.

    python scripts/gpu_bench.py --model 1b|7b|tiny --batches 1,8 --new-tokens 128 --reps 8 \
        --device cuda|cpu [--json]

What runs
---------
A Llama decoder written here in plain torch: RMSNorm, fused q/k/v projection, rotary
embeddings, grouped-query attention against a static KV cache [B, kv_heads, max_len, hd]
written by index at the current position (a device tensor), SwiGLU MLP with a fused
gate/up projection, greedy next token written back into the input buffer. Weights are
`torch.randn * 0.02` (norm weights 1 + 0.1 * randn) from a config: "1b" is TinyLlama-1.1B's
shape, "7b" Llama-2-7B's, "tiny" a CPU smoke model. No host work happens inside a decode
step: position, KV writes, masks, skip state and the next token all live on the device,
so a step is one CUDA graph per (pattern, batch bucket; the buckets are the --batches) and
the timed loop is N back-to-back graph replays between two torch.cuda.synchronize().

Each layer is h = x + attn(norm(x)); out = h + mlp(norm(h)). Layers [0, cold_start) and
[cold_end, L) are cold: their FFN always runs. Three patterns per batch size:
- dense: every FFN runs.
- static: a fixed set of hot layers (8 of 30 scaled to the depth, spread evenly over the
  hot range) has no FFN at all; the graph simply does not contain those FFNs.
- adaptive (FFN-SkipLLM): in a hot layer whose FFN ran, cos(h, out) per row; when it is
  >= threshold the row skips the FFN of the next k hot layers, once per token (a row fires
  at most once per token; the run of k is positional). State per row: `until` (int32,
  device): -1 = armed, else the last hot ordinal this row skips.
  In a batch a layer's FFN weights are skipped only when *every* row skips it; otherwise
  the FFN runs for the whole batch and the skipping rows keep h (masked with torch.where).
  So at batch > 1 the weight-read saving is the batch-level skip ratio, which is what the
  ideal speedup below uses; the per-token skip ratio is reported beside it.

On-device skip decision (CUDA)
------------------------------
`--mechanism auto` (default on CUDA) first probes CUDA-graph conditional nodes: torch 2.13
exposes `torch.cuda.CUDAGraph.begin_capture_to_if_node(pred)` /
`end_capture_to_conditional_node()` (declared in torch/_C/__init__.pyi for `_CUDAGraph`,
defined in torch/csrc/cuda/Graph.cpp; it is the primitive that
torch/_higher_order_ops/cudagraph_conditional_nodes.py uses to capture `torch.cond`, pytorch
PRs #130386 and #168912). `pred` is a 0-dim bool CUDA tensor that a kernel inside the graph
writes into the conditional handle (cudaGraphSetConditional) at replay, so the FFN body of
each hot layer is an IF node whose predicate ("some row still runs this FFN") is computed
on the device. A whole decode step, all layers, is one graph with no host sync: any sync
during capture would have raised. It needs torch built with CUDA >= 12.4 and a driver with
conditional nodes; the probe captures a matmul in an IF node and checks it with the
predicate true and false.
  mechanism "conditional": one graph per (pattern, batch), IF nodes for the adaptive FFNs.
  mechanism "segmented" (fallback when the probe fails, or by flag): the step is captured
  as a chain of graphs cut at every adaptive FFN; the host reads the predicate
  (`pred.item()`, one device->host sync per conditional layer) and replays the FFN graph
  only when it is true. The JSON then reports `sync_us_per_layer`: the same chain replayed
  with and without those reads, divided by the conditional layers.
  mechanism "eager" (CPU, or by flag): the same step run op by op; the branch reads the
  predicate on the host (free on CPU, a sync on CUDA).
The JSON's "mechanism" field says which one ran. On CUDA the script also replays every
captured graph against the eager step from the same state ("self_check": largest logit
difference and whether the per-layer skip counts agree).

Reported per row
----------------
tokens/s: batch * new_tokens / median time of --reps interleaved reps (the patterns take
turns within a rep, in rotating order, after one untimed warm-up rep each).
speedup: tokens/s over the dense row of the same batch.
skip_ratio: skipped FFN blocks / (L * tokens), per token (row).
batch_skip_ratio: layer-steps in which no row ran the FFN / (L * steps): the FFN weight reads
avoided; equals skip_ratio at batch 1.
ideal_speedup: W / (W - batch_skip_ratio * F), W = weight bytes read per decode step (all
layers, final norm, LM head; the embedding table is gathered, not read), F = FFN weight
bytes of all layers (gate/up, down, post-attention norm). KV-cache reads are not in W.
ideal_speedup_token: the same with skip_ratio (the formula as written in README, "Numbers").
realised_fraction: (speedup - 1) / (ideal_speedup - 1); null where the ideal is 1.
check_us_per_layer (adaptive row): (step time of the adaptive graph with threshold 2, so
every FFN runs but the cosine, the decision kernels and the IF nodes all execute, minus the
dense step time) / hot layers with a check. It includes the per-layer skip counters the
bench keeps (one or two tiny adds per executed hot FFN).
cos_us_per_layer: the same for the cosine alone (dense graph plus cos(h, out)).
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
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, also when imported by path
from gpu_graphs import (EagerRunner, HostBranch, SegmentedRunner, build_runner,  # noqa: E402,F401 (HostBranch: tests)
                        probe_conditional_nodes)
from gpu_model import (CONFIGS, PATTERNS, Decoder, ModelConfig, SkipPlan, Weights,  # noqa: E402
                       default_plan, init_weights)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(runner, dec: Decoder, pos0: int, tok0: torch.Tensor, steps: int) -> float:
    dec.reset(pos0, tok0)
    sync(dec.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(dec.device)
    return time.perf_counter() - t0


def calibrate(runner, dec: Decoder, pos0: int, tok0: torch.Tensor, target: float, steps: int,
              iters: int = 16) -> tuple[float, float]:
    """Bisect the threshold so the measured per-token skip ratio is close to `target`.
    Returns (threshold, skip ratio at it). Skipping falls as the threshold rises."""
    L, B = dec.cfg.layers, dec.batch

    def ratio(thr: float) -> float:
        dec.set_threshold(thr)
        dec.zero_stats()
        run_steps(runner, dec, pos0, tok0, steps)
        return float(dec.skipped_per_layer(steps).sum()) / (L * steps * B)

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


def self_check(runner, dec: Decoder, pattern: str, pos0: int, tok0: torch.Tensor, steps: int = 3) -> dict:
    """Captured graph vs the eager step from the same state: logits and skip counters."""
    dec.zero_stats()
    run_steps(runner, dec, pos0, tok0, steps)
    logits_g, ran_g = dec.logits.float().clone(), dec.ran_rows.clone()
    dec.zero_stats()
    run_steps(EagerRunner(dec, pattern), dec, pos0, tok0, steps)
    logits_e, ran_e = dec.logits.float().clone(), dec.ran_rows.clone()
    dec.zero_stats()
    return {"max_abs_logit_diff": float((logits_g - logits_e).abs().max()),
            "skip_counts_equal": bool(torch.equal(ran_g, ran_e))}


def bench_batch(cfg: ModelConfig, weights: Weights, plan: SkipPlan, batch: int, args, device: torch.device,
                dtype: torch.dtype, mechanism: str, meta: dict) -> list[dict]:
    max_len = args.prompt_len + max(args.new_tokens, args.calib_steps) + 4
    dec = Decoder(cfg, weights, batch, max_len, plan, device, dtype)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(args.seed + batch)
    prompt = torch.randint(0, cfg.vocab, (batch, args.prompt_len), generator=gen).to(device)

    runners = {name: build_runner(dec, name, mechanism) for name in ("dense", "static", "adaptive", "cos")}

    # prefill the KV cache (teacher-forced prompt through the dense step), then decode from there
    dec.reset(0, prompt[:, 0])
    for t in range(args.prompt_len):
        dec.tok.copy_(prompt[:, t])
        runners["dense"].step()
    sync(device)
    pos0, tok0 = args.prompt_len, dec.tok.clone()

    threshold, calib_ratio = calibrate(runners["adaptive"], dec, pos0, tok0, args.target_skip, args.calib_steps)
    checks = {}
    if device.type == "cuda" and mechanism != "eager" and not args.no_self_check:
        for name in ("dense", "static", "cos"):
            checks[name] = self_check(runners[name], dec, name, pos0, tok0)
        for label, thr in (("adaptive@-1", -1.0), ("adaptive@calibrated", threshold), ("adaptive@2", 2.0)):
            dec.set_threshold(thr)
            checks[label] = self_check(runners["adaptive"], dec, "adaptive", pos0, tok0)
        meta.setdefault("self_check", {})[str(batch)] = checks

    # variants timed: (label, runner, threshold or None, segmented read flag)
    variants = [("dense", runners["dense"], None, True), ("static", runners["static"], None, True),
                ("adaptive", runners["adaptive"], threshold, True), ("check", runners["adaptive"], 2.0, True),
                ("cos", runners["cos"], None, True)]
    if mechanism == "segmented":
        variants.append(("check_noread", runners["adaptive"], 2.0, False))
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    adaptive_steps = 0
    dec.zero_stats()
    for rep in range(args.reps + 1):  # rep 0 is an untimed warm-up
        shift = rep % len(variants)
        for label, runner, thr, read in variants[shift:] + variants[:shift]:
            saved = None
            if thr is not None:
                dec.set_threshold(thr)
                if label != "adaptive":
                    saved = (dec.ran_rows.clone(), dec.ran_any.clone())
            if isinstance(runner, SegmentedRunner):
                runner.read = read
            elapsed = run_steps(runner, dec, pos0, tok0, args.new_tokens)
            if isinstance(runner, SegmentedRunner):
                runner.read = True
            if saved is not None:
                dec.ran_rows.copy_(saved[0])
                dec.ran_any.copy_(saved[1])
            if rep == 0:
                if label == "adaptive":
                    dec.zero_stats()
                continue
            times[label].append(elapsed)
            if label == "adaptive":
                adaptive_steps += args.new_tokens

    step_s = {label: statistics.median(ts) / args.new_tokens for label, ts in times.items()}
    L = cfg.layers
    W, Fb = weights.step_bytes()
    n_checked = dec.n_checked
    per_layer = lambda a, b: (step_s[a] - step_s[b]) / n_checked * 1e6 if n_checked else None  # noqa: E731
    skipped = dec.skipped_per_layer(adaptive_steps)
    weight_skips = dec.weight_skips_per_layer(adaptive_steps)
    n_static = len(plan.static_layers)
    skip = {"dense": (0.0, 0.0), "static": (n_static / L, n_static / L),
            "adaptive": (float(skipped.sum()) / (L * adaptive_steps * batch),
                         float(weight_skips.sum()) / (L * adaptive_steps))}
    rows = []
    for pattern in PATTERNS:
        s_token, s_weight = skip[pattern]
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
            row.update(check_us_per_layer=per_layer("check", "dense"), cos_us_per_layer=per_layer("cos", "dense"),
                       threshold=threshold, calibration_skip_ratio=calib_ratio,
                       skips_per_layer=[int(c) for c in skipped.sum(dim=1)])
            if mechanism == "segmented":
                conditional = runners["adaptive"].branch.conditional_segments
                row["sync_us_per_layer"] = ((step_s["check"] - step_s["check_noread"]) / conditional * 1e6
                                            if conditional else None)
        rows.append(row)
    del runners, dec
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fmt(value, spec: str) -> str:
    """format(value, spec), or a dash right-aligned to the spec's width for None."""
    if value is not None:
        return format(value, spec)
    width = re.match(r"\D*(\d*)", spec).group(1)
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device (this torch: %s)" % torch.__version__)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    cfg = CONFIGS[args.model]
    static = [int(s) for s in args.static_layers.split(",")] if args.static_layers else None
    plan = default_plan(cfg, args.cold_start, args.cold_end, static, args.k)

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
            note = ("graphs cut at each adaptive FFN, predicate read on the host per conditional layer"
                    + ("" if args.mechanism == "segmented" else f" (fallback: {note})"))
        else:
            note = "one CUDA graph per (pattern, batch); adaptive FFNs in IF nodes predicated on the device; " + note

    with torch.inference_mode():
        weights = init_weights(cfg, device, dtype, args.seed)
        W, Fb = weights.step_bytes()
        n_params = sum(t.numel() for t in [weights.embed, weights.norm, weights.lm_head] + weights.ln1 + weights.wqkv
                       + weights.wo + weights.ln2 + weights.wgu + weights.wd)
        meta = {
            "model": args.model, "config": asdict(cfg), "params_b": n_params / 1e9, "device": str(device),
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
                "check/cos us per layer: step time over dense, divided by the hot layers with a check "
                "(adaptive graph at threshold 2: every FFN runs, cosine + decision + IF node execute).",
            ],
        }
        rows: list[dict] = []
        for batch in args.batch_list:
            try:
                rows.extend(bench_batch(cfg, weights, plan, batch, args, device, dtype, mechanism, meta))
            except RuntimeError as exc:
                if not (mechanism == "conditional" and args.mechanism == "auto"):
                    raise
                # the probe passed but capturing the model with IF nodes did not: fall back, say so
                mechanism = meta["mechanism"] = "segmented"
                meta["mechanism_note"] = ("graphs cut at each adaptive FFN, predicate read on the host per "
                                          f"conditional layer (fallback: IF-node capture of the model failed at "
                                          f"batch {batch}: {type(exc).__name__}: {exc})")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                rows.extend(bench_batch(cfg, weights, plan, batch, args, device, dtype, mechanism, meta))
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
