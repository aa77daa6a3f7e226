#!/usr/bin/env python
"""The GPU decode benchmark under its older name: `ffnskip bench --gpu`, with the shape as --model.

    python scripts/gpu_bench.py --model 1b|7b|tiny --batches 1,8 --new-tokens 128 --reps 8 \
        --device cuda|cpu [--json]

runs what `ffnskip bench --gpu 1b|7b|tiny --batches 1,8 ...` runs (ffnskip.bench.gpu.run, whose
docstring says what is measured and reported).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ffnskip.bench.gpu.options import DTYPES, MECHANISMS, GpuBenchOptions
from ffnskip.bench.gpu.run import run
from ffnskip.bench.gpu.workload import CONFIGS
from ffnskip.errors import FfnSkipError


def options_from(argv: Sequence[str] | None = None) -> GpuBenchOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CONFIGS), default="1b")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (one graph bucket each)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cuda:N, cpu")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--mechanism", choices=MECHANISMS, default="auto")
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
    return GpuBenchOptions(
        model=args.model, batches=tuple(int(b) for b in args.batches.split(",") if b.strip()),
        new_tokens=args.new_tokens, reps=args.reps, device=args.device, dtype=args.dtype, mechanism=args.mechanism,
        prompt_len=args.prompt_len, target_skip=args.target_skip, calib_steps=args.calib_steps, k=args.k,
        cold_start=args.cold_start, cold_end=args.cold_end,
        static_layers=tuple(int(s) for s in args.static_layers.split(",")) if args.static_layers else None,
        seed=args.seed, self_check=not args.no_self_check, json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(options_from(argv))
    except FfnSkipError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
