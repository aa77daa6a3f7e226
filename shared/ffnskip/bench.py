"""`ffnskip bench`: dense vs skip policies on one model, interleaved, in one process.

Each repetition runs every configuration once (so drift and noise hit all rows
alike); a row reports the median over repetitions. Exactly `--new-tokens` tokens
are generated per sequence (EOS ignored). The realised fraction of the ideal
speedup uses the measured skip ratio over all generated tokens (BRIEF section 3).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ffnskip import cli
from ffnskip.config import DENSE, SamplingParams, SkipParams

STATIC_8_OF_30 = (4, 7, 10, 13, 16, 19, 22, 25)


@dataclass(frozen=True)
class BenchConfig:
    name: str
    batch: int
    skip: Optional[SkipParams]  # None = plain transformers generate


def default_configs(num_layers: int, batches: list[int]) -> list[BenchConfig]:
    static = tuple(layer for layer in STATIC_8_OF_30 if layer < num_layers)
    adaptive = dict(policy="adaptive", cold_start=1, cold_end=num_layers - 1, threshold=0.97, warm_up=16)
    per_batch = [
        ("dense", DENSE),
        ("static_8", SkipParams(policy="static", static_layers=static, warm_up=16)),
        ("adaptive_k2", SkipParams(max_skip=2, **adaptive)),
        ("adaptive_k4", SkipParams(max_skip=4, **adaptive)),
        ("adaptive_k8", SkipParams(max_skip=8, **adaptive)),
        ("random_p25", SkipParams(policy="random", probability=0.25, warm_up=16)),
        ("non_adaptive_p25", SkipParams(policy="non_adaptive", probability=0.25, cold_start=1, cold_end=num_layers - 1, warm_up=16)),
        ("aligned_k8_q50", SkipParams(**{**adaptive, "policy": "aligned"}, max_skip=8, quorum=0.5)),
        ("aligned_k8_q75", SkipParams(**{**adaptive, "policy": "aligned"}, max_skip=8, quorum=0.75)),
    ]
    configs = []
    for batch in batches:
        configs.append(BenchConfig("hf_generate", batch, None))
        # at batch 1 aligned is per-row adaptive by definition: no row to align with
        configs += [BenchConfig(name, batch, skip) for name, skip in per_batch if batch > 1 or skip.policy != "aligned"]
    return configs


def register(commands) -> None:
    parser = commands.add_parser("bench", help="tokens/s of dense vs skip policies, with the realised fraction of the ideal speedup")
    cli.add_model_args(parser)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per sequence (with --target: at most, EOS ends earlier)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions; rows report the median")
    parser.add_argument("--policies", help="comma-separated subset of row names (hf_generate, dense, static_8, ...)")
    parser.add_argument("--profile-step", action="store_true", help="also profile one dense decode step and print where the time goes")
    parser.add_argument("--json", action="store_true")
    service = parser.add_argument_group("service benchmark (with --target)")
    service.add_argument("--target", help="HOST:PORT of a running decoder: benchmark it over gRPC instead of in-process")
    service.add_argument("--concurrency", default="1,4,16")
    service.add_argument("--service-policies", default="dense,adaptive", help="'profile' = the decoder's active profile as is")
    service.add_argument("--requests-per-level", type=int, default=8)
    service.add_argument("--timeout", type=float, default=600.0)
    service.add_argument("--api-key", help="bearer key, when the target is a gateway")
    service.add_argument("--engine-baseline", action="store_true", help="also run the bare engine in-process on the same prompts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.target:
        from ffnskip import service_bench

        return service_bench.run(args)
    import torch  # here, not at import: every CLI command imports this module
    from ffnskip.engine import Engine, load_model
    from ffnskip.engine.profile_step import profile_decode_step

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    configs = default_configs(loaded.num_layers, batches)
    if args.policies:
        wanted = set(args.policies.split(","))
        configs = [c for c in configs if c.name in wanted or c.name == "dense"]
    prompts = bench_prompts(loaded.tokenizer, max(batches))
    engine = Engine(loaded, max_batch=max(batches), max_seq_len=max(len(p) for p in prompts) + args.new_tokens + 1)
    runner = BenchRunner(engine, prompts, args.new_tokens)
    timings: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], tuple[float, float]] = {}
    for rep in range(args.reps):
        for config in configs:
            seconds, skip_ratio, decode_ratio, avoided = runner.run(config)
            timings.setdefault((config.name, config.batch), []).append(seconds)
            ratios[(config.name, config.batch)] = (skip_ratio, decode_ratio, avoided)
            print(f"rep {rep + 1}/{args.reps} {config.name} b{config.batch}: {config.batch * args.new_tokens / seconds:.1f} tok/s",
                  file=sys.stderr, flush=True)
    rows = summarise(configs, timings, ratios, engine, args.new_tokens)
    report = {"model": loaded.model_id, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "reps": args.reps,
              "ffn_share": engine.weight_bytes.ffn_share, "rows": rows}
    if args.profile_step:
        report["decode_step_profile"] = profile_decode_step(engine, prompts[0])
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


def bench_prompts(tokenizer, count: int) -> list[list[int]]:
    from ffnskip.datasets import texts
    from ffnskip.engine.prompts import encode_prompt

    chosen = texts("prompts", "prompt", limit=count)
    return [encode_prompt(tokenizer, None, [{"role": "user", "content": text}]) for text in chosen]


class BenchRunner:
    def __init__(self, engine, prompts: list[list[int]], new_tokens: int) -> None:
        self.engine = engine
        self.prompts = prompts
        self.new_tokens = new_tokens
        self.sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def run(self, config: BenchConfig) -> tuple[float, float, float, float]:
        """Seconds for the batch, the pooled skip ratio and decode skip ratio, and the share
        of decode-step FFN weight reads avoided (a layer counts only when no row ran it)."""
        prompts = self.prompts[:config.batch]
        if config.skip is None:
            return self._hf_generate(prompts), 0.0, 0.0, 0.0
        engine = self.engine
        steps_before, reads_before = engine.decode_layer_steps, engine.decode_ffn_reads
        started = time.perf_counter()
        seqs = [engine.add(prompt_ids=ids, sampling=self.sampling, skip=config.skip) for ids in prompts]
        while engine.has_work:
            engine.step()
        seconds = time.perf_counter() - started
        stats = [engine.result(s).skip_stats for s in seqs]
        pooled = stats[0]
        for more in stats[1:]:
            pooled = pooled.merged(more)
        layer_steps = engine.decode_layer_steps - steps_before
        avoided = 1.0 - (engine.decode_ffn_reads - reads_before) / layer_steps if layer_steps else 0.0
        return seconds, pooled.skip_ratio, pooled.decode_skip_ratio, avoided

    def _hf_generate(self, prompts: list[list[int]]) -> float:
        import torch

        model, tokenizer = self.engine.loaded.model, self.engine.loaded.tokenizer
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                           do_sample=False, pad_token_id=pad)
        return time.perf_counter() - started


def summarise(configs, timings, ratios, engine, new_tokens: int) -> list[dict]:
    rows = []
    for config in configs:
        key = (config.name, config.batch)
        seconds = statistics.median(timings[key])
        dense = statistics.median(timings[("dense", config.batch)])
        hf = timings.get(("hf_generate", config.batch))
        skip_ratio, decode_ratio, avoided = ratios[key]
        wb = engine.weight_bytes
        rows.append({
            "policy": config.name,
            "batch": config.batch,
            "skip_ratio": round(skip_ratio, 4),
            "decode_skip_ratio": round(decode_ratio, 4),
            "tokens_per_s": round(config.batch * new_tokens / seconds, 2),
            "spread_tokens_per_s": [round(config.batch * new_tokens / t, 2) for t in timings[key]],
            "avoided_ffn_read_share": round(avoided, 4),
            "speedup_vs_dense": round(dense / seconds, 4),
            "vs_hf_generate": round(statistics.median(hf) / seconds, 4) if hf else None,
            "ideal_speedup": round(wb.ideal_speedup(skip_ratio), 4),
            "realised_fraction": round(wb.realised_fraction(skip_ratio, dense, seconds), 3) if skip_ratio > 0 else None,
            # against the reads actually avoided: what a bandwidth-bound step can at best save
            "realised_fraction_of_avoided": round(wb.realised_fraction(avoided, dense, seconds), 3) if avoided > 0 else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
    return rows


def print_table(report: dict) -> None:
    print(f"model {report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
          f"{report['new_tokens']} new tokens, median of {report['reps']} interleaved reps, F/W = {report['ffn_share']:.3f}")
    header = f"{'policy':<18}{'batch':>6}{'skip':>8}{'dec.skip':>9}{'avoided':>8}{'tok/s':>9}{'vs dense':>9}{'vs hf':>7}{'ideal':>7}{'realised':>9}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['policy']:<18}{r['batch']:>6}{r['skip_ratio']:>8.3f}{r['decode_skip_ratio']:>9.3f}{r['avoided_ffn_read_share']:>8.3f}{r['tokens_per_s']:>9.1f}"
              f"{r['speedup_vs_dense']:>9.3f}{fmt(r['vs_hf_generate'], '>7.3f')}{r['ideal_speedup']:>7.3f}{fmt(r['realised_fraction'], '>9.2f')}")
    profile = report.get("decode_step_profile")
    if profile:
        print(f"\none dense decode step (batch 1): {profile['step_ms']:.2f} ms")
        for part, ms in profile["parts_ms"].items():
            print(f"  {part:<28}{ms:>8.2f} ms  {100 * ms / profile['step_ms']:>5.1f}%")
