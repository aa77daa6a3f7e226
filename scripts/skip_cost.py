"""What a skipped FFN saves in a compiled decode step, and what its substitute costs back.

    python scripts/skip_cost.py --profile ~/.cache/ffnskip/profiles/smollm2-135m.profile.json \
        --substitutes ~/.cache/ffnskip/profiles/smollm2-135m.substitutes.<digest>.bin \
        --batches 1,16 --steps 400 --json docs/perf/skip-cost.json

One engine (compiled, the decoder's weight format) runs the same decode step three ways, one
after the other, `--steps` times: dense, the profile's FFN set skipped plainly, and skipped with
the profile's substitutes; and, over more than one row, a mixed step: a quarter of the rows in
their warm-up (running every FFN) and the rest skipping with the substitutes, as most steps of
16 streams arriving at different times are. Each variant's step runs next to the others', so the machine's drift
(seconds to minutes on a shared host) cancels in the per-step differences, which a run of whole
requests per variant cannot resolve at a few tenths of a millisecond. Reported per batch: the
median step, the mean saving against dense with its 95% interval, and the median time of the
substitutes' calls inside the step. In the other variants every row skips (no warm-up): the
saving of a step whose rows all skip, the upper bound of what a served profile gains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ffnskip.bench.inprocess import read_bandwidth_gb_s
from ffnskip.bench.json_results import write_results
from ffnskip.bench.step_profile import timed_segments
from ffnskip.engine import Engine, load_model
from ffnskip.engine.policies import RUN_ALL, PlannedStep, decision_of
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.profile import Profile
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="w8a8", choices=["full", "int8", "w8a8"])
    parser.add_argument("--profile", type=Path, required=True, help="a profile.json that records substitutes")
    parser.add_argument("--substitutes", type=Path, help="its substitutes (default: substitutes.bin beside it)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=400, help="steps per variant and batch")
    parser.add_argument("--position", type=int, default=64, help="the cache position every step decodes at")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    profile = Profile.from_dict(json.loads(args.profile.read_text()))
    blob = (args.substitutes or args.profile.with_name("substitutes.bin")).read_bytes()
    profile.check_substitutes(blob)
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cpu")
    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ), weights=args.weights)
    engine = Engine(loaded, max_batch=max(batches), max_seq_len=args.position + 8, compile=True)
    engine.warm_up(batches)
    engine.release_raw_weights()
    runner, cache, layers = engine.runner, engine.cache, engine.num_layers
    substitutes = SubstituteSet.from_bytes(blob).to(device, runner.dtype).served_by(runner.weights)
    skipped = set(profile.static_layers)
    report: dict = {"model": args.model, "weights": args.weights, "static_layers": sorted(skipped),
                    "substitutes": {str(layer): s.kind for layer, s in substitutes.layers.items()},
                    "steps": args.steps, "bandwidth_gb_s_before": round(read_bandwidth_gb_s(device), 1), "batches": {}}
    for batch in batches:
        runner.prefill(cache, list(range(batch)), [[1] * args.position] * batch)
        every = (1 << batch) - 1
        variants = {"dense": (_plan(batch, layers, set(), every), None),
                    "skipped": (_plan(batch, layers, skipped, every), None),
                    "skipped + substitutes": (_plan(batch, layers, skipped, every), [substitutes] * batch)}
        if batch > 1:  # the first quarter of the rows in their warm-up
            warming = (1 << max(1, batch // 4)) - 1
            variants["mixed + substitutes"] = (_plan(batch, layers, skipped, every & ~warming), [substitutes] * batch)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        calls: dict[str, list[float]] = {}
        with timed_segments(runner, calls):
            for _ in range(args.steps):
                for name, (skips, sets) in variants.items():
                    started = time.perf_counter()
                    runner.decode(cache, [1] * batch, [args.position] * batch, skips, sets)
                    seconds[name].append(time.perf_counter() - started)
        row: dict[str, Any] = {name: _versus(seconds["dense"], values) for name, values in seconds.items()}
        row["substitute_call_us_median"] = round(statistics.median(calls["ffn substitutes"]) * 1e6, 1)
        report["batches"][str(batch)] = row
        print(f"batch {batch}: " + "; ".join(
            f"{name} {r['step_ms_median']} ms, saves {r['saved_us_mean']} us [{r['saved_us_low']}, {r['saved_us_high']}]"
            for name, r in row.items() if isinstance(r, dict)) + f"; substitute call {row['substitute_call_us_median']} us")
    report["bandwidth_gb_s_after"] = round(read_bandwidth_gb_s(device), 1)
    print(f"read bandwidth {report['bandwidth_gb_s_before']} / {report['bandwidth_gb_s_after']} GB/s (before / after)")
    if args.json:
        write_results(args.json, report)
    return 0


def _plan(batch: int, layers: int, skipped: set[int], skipping: int) -> PlannedStep:
    """A step in which the rows of the mask `skipping` skip the FFNs of `skipped`; every other FFN
    (and every FFN of the other rows) runs."""
    decisions = [decision_of(skipping, batch) if layer in skipped else RUN_ALL for layer in range(layers)]
    reads = layers - (len(skipped) if skipping == (1 << batch) - 1 else 0)
    return PlannedStep(decisions, [sorted(skipped) if skipping >> b & 1 else [] for b in range(batch)], reads, None)


def _versus(dense: list[float], values: list[float]) -> dict:
    """A variant's median step and its mean saving per step against dense (95% interval)."""
    saved = [(d - v) * 1e6 for d, v in zip(dense, values)]
    mean = statistics.mean(saved)
    half = 1.96 * statistics.stdev(saved) / len(saved) ** 0.5
    return {"step_ms_median": round(statistics.median(values) * 1e3, 3), "saved_us_mean": round(mean, 1),
            "saved_us_low": round(mean - half, 1), "saved_us_high": round(mean + half, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
