"""`ffnskip bench --gpu`: decode benchmark of FFN skipping on a random-weight Llama (about 1B or
7B) in bf16 on CUDA, the decode step captured whole as a CUDA graph.

    ffnskip bench --gpu 1b|7b|tiny --batches 1,8 --new-tokens 128 --reps 8 --device cuda|cpu [--json]

(scripts/gpu_bench.py takes the same flags, with --model for the shape.)

What runs
---------
The engine itself: a `transformers.LlamaForCausalLM` with random weights built from a config
("1b" is TinyLlama-1.1B's shape, "7b" Llama-2-7B's, "tiny" a CPU smoke model; HF's own
initialisation, seeded), wrapped in `ffnskip.engine.runner.ModelRunner` (fused q/k/v and gate/up
weights, the rotary table, the KV cache), and decoded by `ffnskip.bench.gpu.device_step.DeviceStep`:
the runner's layers with the step's inputs in static device tensors, the skip decision taken by
`DeviceSkips` (the engine's skip rule, ffnskip.engine.skip_rule, run on tensors) and the greedy
next token written back into the input, so steps replay back to back with no host work in between. The prompt is
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
layer, or op by op (ffnskip.bench.gpu.graphs explains each). The JSON's "mechanism" field says which
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

import json
import re
import sys
from dataclasses import asdict

import torch

from ffnskip.bench.gpu.graphs import probe_conditional_nodes
from ffnskip.bench.gpu.measure import bench_batch
from ffnskip.bench.gpu.options import DTYPES, GpuBenchOptions
from ffnskip.bench.gpu.workload import CONFIGS, BenchPlan, default_plan, random_model, step_bytes
from ffnskip.engine.runner import ModelRunner
from ffnskip.errors import FailedPrecondition, InvalidArgument


def run(options: GpuBenchOptions) -> dict:
    """Bench every batch bucket; prints the table (or the JSON) and returns {"meta", "rows"}."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"--device {options.device}: no CUDA device (this torch: {torch.__version__})")
    dtype = DTYPES.get(options.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    num_layers = CONFIGS[options.model]["num_hidden_layers"]
    try:
        plan = default_plan(num_layers, options.cold_start, options.cold_end, options.static_layers, options.k)
    except ValueError as exc:
        raise InvalidArgument("plan", str(exc)) from None
    mechanism, note = choose_mechanism(options.mechanism, device, dtype)
    with torch.inference_mode():
        max_len = options.prompt_len + max(options.new_tokens, options.calib_steps) + 4
        model = random_model(CONFIGS[options.model], max_len, device, dtype, options.seed)
        model_runner = ModelRunner(model)  # the engine's layers: the one copy of the weights every graph reads
        meta = describe(options, model, model_runner, plan, device, dtype, mechanism, note)
        rows: list[dict] = []
        for batch in options.batches:
            try:
                rows.extend(bench_batch(model_runner, plan, batch, options, device, mechanism, meta))
            except RuntimeError as exc:
                if not (mechanism == "conditional" and options.mechanism == "auto"):
                    raise
                # the probe passed but capturing the model with IF nodes did not: fall back, say so
                mechanism = meta["mechanism"] = "segmented"
                meta["mechanism_note"] = ("graphs cut at each gated FFN, predicate read on the host per "
                                          f"gated layer (fallback: IF-node capture of the model failed at "
                                          f"batch {batch}: {type(exc).__name__}: {exc})")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                rows.extend(bench_batch(model_runner, plan, batch, options, device, mechanism, meta))
        checks = [c for per_batch in meta.get("self_check", {}).values() for c in per_batch.values()]
        if checks:
            worst = max(c["max_abs_logit_diff"] for c in checks)
            agree = all(c["skip_counts_equal"] for c in checks)
            meta["notes"].append(f"self-check (captured graphs vs eager step, 3 steps from the same state): "
                                 f"largest logit difference {worst:.3g}, skip counters "
                                 + ("identical" if agree else "DIFFER - the graph path is suspect"))
    result = {"meta": meta, "rows": rows}
    text = table(rows, meta)
    if options.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(text)
    return result


def choose_mechanism(asked: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(mechanism, a note saying why) for the `asked` one on this device."""
    if device.type == "cpu":
        if asked not in ("auto", "eager"):
            raise InvalidArgument("mechanism", "CUDA graphs need --device cuda; on cpu the mechanism is eager")
        return "eager", "eager ops; the skip predicate is read on the host (free on cpu)"
    if asked == "eager":
        return "eager", "eager ops; the skip predicate is read on the host (one sync per layer)"
    ok, note = probe_conditional_nodes(device, dtype)
    if asked == "conditional" and not ok:
        raise FailedPrecondition(note)
    if ok and asked != "segmented":
        return "conditional", "one CUDA graph per (pattern, batch); gated FFNs in IF nodes predicated on the device; " + note
    return "segmented", ("graphs cut at each gated FFN, predicate read on the host per gated layer"
                         + ("" if asked == "segmented" else f" (fallback: {note})"))


def describe(options: GpuBenchOptions, model: torch.nn.Module, model_runner: ModelRunner, plan: BenchPlan,
             device: torch.device, dtype: torch.dtype, mechanism: str, note: str) -> dict:
    """The run's "meta": what ran, on what, and the notes the table ends with."""
    W, Fb = step_bytes(model_runner)
    return {
        "model": options.model, "config": CONFIGS[options.model],
        "params_b": sum(t.numel() for t in model.parameters()) / 1e9, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", ""),
        "mechanism": mechanism, "mechanism_note": note,
        "plan": asdict(plan), "weight_bytes_per_step": W, "ffn_weight_bytes": Fb,
        "new_tokens": options.new_tokens, "reps": options.reps, "prompt_len": options.prompt_len,
        "target_skip": options.target_skip,
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
