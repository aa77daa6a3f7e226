"""The references the quality budget's defaults are read off (docs/quality.md, "The budget, decided
before the candidates"): no skip set enters any of them.

    python scripts/budget_references.py --prompts 24 --tokens 96 --json docs/perf/budget-references.json

Fp32 greedy dense answers the judged open-ended prompts and records its log-probabilities; then,
counting the tokens after the warm-up as the budget does:
- dense with its decoder linears rounded to Q4_0 and to Q8_0 (ffnskip.evaluation.weight_rounding),
  and dense in bfloat16: teacher-forced KL and same-top-token from fp32 dense, with prompt-clustered
  95% intervals, and the relative NLL of their greedy answers;
- dense sampled at each temperature with each seed: the relative NLL of its answers;
- run-to-run noise: fp32 dense itself teacher-forced at batch 1 against the references made at
  --batch (a different reduction order is the only difference).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.config import DENSE, SamplingParams
from ffnskip.datasets import texts
from ffnskip.engine import Engine, load_model
from ffnskip.engine.prompts import encode_prompt
from ffnskip.evaluation.weight_rounding import round_model_linears
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16, help="tokens not counted (a policy's warm-up runs dense)")
    parser.add_argument("--temperatures", default="0.3,0.7")
    parser.add_argument("--seeds", type=int, default=3, help="sampled runs per temperature")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    cache, after = cache_root(os.environ), args.warm_up
    started = time.perf_counter()

    def engine(dtype: str = "float32", rounding: str | None = None, batch: int = args.batch) -> Engine:
        loaded = load_model(args.model, device="cpu", dtype=dtype, cache_dir=cache)
        if rounding is not None:
            round_model_linears(loaded.model, rounding)
        return Engine(loaded, max_batch=batch, max_seq_len=1024)

    judge = engine()
    prompts = [encode_prompt(judge.tokenizer, None, [{"role": "user", "content": text}])
               for text in texts("prompts", "prompt")[:args.prompts]]
    references = Q.dense_references(judge, prompts, args.tokens, args.batch)
    own = [r.nll[after:] for r in references]
    results: dict = {"prompts": args.prompts, "tokens": args.tokens, "warm_up": after, "batch": args.batch}

    def relative(seqs) -> float:
        nll = Q.dense_nll(judge, prompts, [list(s.generated) for s in seqs], args.batch)
        return round(Q.relative_nll([row[after:] for row in nll], own), 4)

    def teacher_forced(candidate: Engine) -> dict:
        return Q.divergence(candidate, prompts, references, DENSE, candidate.cache.max_batch).summary(after)

    greedy = [Q.Job(p, SamplingParams(max_new_tokens=args.tokens)) for p in prompts]
    for name, candidate in (("q4_0", lambda: engine(rounding="q4_0")), ("q8_0", lambda: engine(rounding="q8_0")),
                            ("bfloat16", lambda: engine("bfloat16"))):
        built = candidate()
        results[name] = {**teacher_forced(built), "relative_nll": relative(Q.run_jobs(built, greedy, args.batch))}
        print(name, json.dumps(results[name]), flush=True)
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        scores = []
        for seed in range(args.seeds):
            jobs = [Q.Job(p, SamplingParams(max_new_tokens=args.tokens, temperature=temperature, seed=1000 * seed + i))
                    for i, p in enumerate(prompts)]
            scores.append(relative(Q.run_jobs(judge, jobs, args.batch)))
        results[f"temperature_{temperature}"] = {"relative_nll": scores}
        print(f"temperature {temperature}", scores, flush=True)
    results["noise_batch_1"] = teacher_forced(engine(batch=1))
    print("noise", json.dumps(results["noise_batch_1"]), flush=True)
    write_results(args.json, results, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
