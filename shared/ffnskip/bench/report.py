"""`ffnskip bench`'s rows: medians, realised fractions per interleaved pair, precision
agreement, the llama.cpp token check, and the printed table."""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict

from ffnskip.engine.prompt_cache import common_prefix


def summarise(configs, results, runners, new_tokens: int) -> list[dict]:
    """One row per config from its runs (`inprocess.RunResult`, one per rep)."""
    rows = []
    for config in configs:
        runs = results[config.key]
        dense_runs = results[("dense", config.batch, config.dtype)]
        seconds = statistics.median(r.seconds for r in runs)
        hf = results.get(("hf_generate", config.batch, config.dtype))
        peer = results.get(("llamacpp_f32", config.batch, "float32"))
        last = runs[-1]  # every rep skips the same way (greedy, seeded): the ratios are the last run's
        skip_ratio, avoided = last.skip_ratio, last.avoided
        steps = new_tokens - 1  # decode steps: the first token comes from the prefill
        decode = [r.decode_seconds for r in runs]
        timed_steps = None not in decode  # hf_generate's decode steps cannot be timed apart
        step_seconds = statistics.median(decode) / steps if timed_steps else seconds / new_tokens
        dense_step_seconds = statistics.median(r.decode_seconds for r in dense_runs) / steps
        wb = runners[config.dtype].engine.weight_bytes
        # each rep ran dense and this row side by side: the realised fraction is the median over
        # those pairs, which cancels drift that a ratio of two medians keeps. On decode steps, r
        # counts the skipped blocks per decode step (the prefill's token never skips).
        step_ratio = skip_ratio * new_tokens / steps
        pairs = [wb.realised_fraction(step_ratio, d.decode_seconds, r.decode_seconds)
                 for d, r in zip(dense_runs, runs)] if skip_ratio > 0 else []
        request_pairs = [wb.realised_fraction(skip_ratio, d.seconds, r.seconds)
                         for d, r in zip(dense_runs, runs)] if skip_ratio > 0 else []
        rows.append({
            "policy": config.name,
            "batch": config.batch,
            "dtype": config.dtype,
            "skip_ratio": round(skip_ratio, 4),
            "decode_skip_ratio": round(last.decode_skip_ratio, 4),
            "tokens_per_s": round(config.batch * new_tokens / seconds, 2),
            "spread_tokens_per_s": [round(config.batch * new_tokens / r.seconds, 2) for r in runs],
            "step_ms": round(1000 * step_seconds, 2),  # a decode step (hf_generate: request / tokens)
            "prefill_share": round(1 - statistics.median(decode) / seconds, 4) if timed_steps else None,
            "avoided_ffn_read_share": round(avoided, 4),
            # speedup, ideal and realised are of a decode step (hf_generate: of its requests)
            "speedup_vs_dense": round(dense_step_seconds / step_seconds, 4),
            "request_speedup_vs_dense": round(statistics.median(r.seconds for r in dense_runs) / seconds, 4),
            "vs_hf_generate": round(statistics.median(r.seconds for r in hf) / seconds, 4) if hf else None,
            "vs_llamacpp_f32": round(statistics.median(r.seconds for r in peer) / seconds, 4) if peer else None,
            "ideal_speedup": round(wb.ideal_speedup(step_ratio), 4),
            "realised_fraction": round(statistics.median(pairs), 3) if pairs else None,
            "realised_fraction_pairs": [round(p, 3) for p in pairs],
            "realised_fraction_request": round(statistics.median(request_pairs), 3) if request_pairs else None,
            "realised_fraction_request_pairs": [round(p, 3) for p in request_pairs],
            # against the reads actually avoided: what a bandwidth-bound step can at best save
            "realised_fraction_of_avoided":
                round(wb.realised_fraction(avoided, dense_step_seconds, step_seconds), 3) if avoided > 0 else None,
            # weights read per second in a decode step: W - avoided x F per step
            "weights_gb_per_s": round((wb.total - avoided * wb.ffn) / step_seconds / 1e9, 2),
            "agreement_with_float32": _agreement(runners, config),
            "tokens_equal_engine_dense": _peer_equal(runners[config.dtype], config),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params": None if config.skip is None else {**asdict(config.skip), "static_layers": list(config.skip.static_layers)},
        })
    return rows


def _peer_equal(runner, config) -> bool | None:
    """llama.cpp rows: its greedy tokens equal the engine's dense tokens at the same precision."""
    if not config.name.startswith("llamacpp") or 1 not in runner.dense_tokens:
        return None
    return runner.peer_tokens == runner.dense_tokens[1][0]


def _agreement(runners, config) -> float | None:
    """Dense rows of other precisions: the share of greedy tokens generated before the first
    difference from float32's, averaged over the batch's sequences (once a token differs, the
    texts go their own ways and later positions say nothing)."""
    if config.name != "dense" or config.dtype == "float32" or "float32" not in runners:
        return None
    ours, reference = runners[config.dtype].dense_tokens.get(config.batch), runners["float32"].dense_tokens.get(config.batch)
    if not ours or not reference:
        return None
    shares = [common_prefix(mine, theirs) / len(theirs) for mine, theirs in zip(ours, reference)]
    return round(sum(shares) / len(shares), 4)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}..{max(values):.2f}" if values else "-"


def print_table(report: dict) -> None:
    print(f"model {report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads), "
          f"{report['new_tokens']} new tokens, median of {report['reps']} interleaved reps, F/W = {report['ffn_share']:.3f}")
    if "memory_read_gb_per_s" in report:
        print(f"memory read bandwidth {report['memory_read_gb_per_s']:.1f} GB/s: batch-1 limit "
              f"{report['bandwidth_limit_tokens_per_s']:.1f} tokens/s at {report['weight_bytes_per_step'] / 1e6:.0f} MB per step")
    if report.get("compiled"):
        print("decode segments ready: " + ", ".join(
            f"{d} {s:.0f} s ({report['packages_compiled'][d]} packages compiled)" for d, s in report["warm_up_seconds"].items()))
    print("tok/s, vs hf, vs llcpp: whole requests; step ms, GB/s, vs dense, ideal, realised: decode steps; "
          "realised req.: whole requests")
    header = (f"{'policy':<18}{'batch':>6}{'dtype':>10}{'skip':>8}{'dec.skip':>9}{'avoided':>8}{'tok/s':>9}{'vs hf':>7}{'vs llcpp':>9}"
              f"{'step ms':>8}{'GB/s':>7}{'vs dense':>9}{'ideal':>7}{'realised':>9}{'spread':>13}{'realised req.':>14}{'agree':>7}")
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        fmt = lambda v, spec: format(v, spec) if v is not None else format("-", spec.split(".")[0])  # noqa: E731
        print(f"{r['policy']:<18}{r['batch']:>6}{r['dtype']:>10}{r['skip_ratio']:>8.3f}{r['decode_skip_ratio']:>9.3f}{r['avoided_ffn_read_share']:>8.3f}"
              f"{r['tokens_per_s']:>9.1f}{fmt(r['vs_hf_generate'], '>7.3f')}{fmt(r['vs_llamacpp_f32'], '>9.3f')}"
              f"{r['step_ms']:>8.2f}{r['weights_gb_per_s']:>7.1f}{r['speedup_vs_dense']:>9.3f}{r['ideal_speedup']:>7.3f}"
              f"{fmt(r['realised_fraction'], '>9.2f')}{_spread(r['realised_fraction_pairs']):>13}"
              f"{fmt(r['realised_fraction_request'], '>14.2f')}"
              f"{fmt(r['agreement_with_float32'], '>7.3f')}")
    for r in report["rows"]:
        if r["tokens_equal_engine_dense"] is not None:
            print(f"{r['policy']}: greedy tokens {'equal' if r['tokens_equal_engine_dense'] else 'DIFFER FROM'} "
                  f"the engine's dense tokens in {r['dtype']}")
    profile = report.get("decode_step_profile")
    if profile:
        print(f"\none dense decode step (batch 1): {profile['step_ms']:.2f} ms")
        for part, ms in profile["parts_ms"].items():
            print(f"  {part:<44}{ms:>8.2f} ms  {100 * ms / profile['step_ms']:>5.1f}%")
        print("  by segment call (a second pass, without the profiler):")
        for kind, timing in profile["segments_ms"].items():
            per_call = f"  {timing['us_per_call']:>6.0f} us x {timing['calls_per_step']:.0f}" if "us_per_call" in timing else ""
            print(f"    {kind:<42}{timing['ms_per_step']:>8.2f} ms{per_call}")
