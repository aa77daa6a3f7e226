"""What each serving precision costs in quality, against float32 dense: the engine itself in each
precision (not a simulation), dense, on the judged open-ended prompts.

    python scripts/precision_quality.py --prompts 24 --tokens 96 --json docs/perf/precision-quality.json

Float32 greedy dense answers the prompts; each precision is teacher-forced on those answers
(KL from float32 and same-top-token, after the warm-up, prompt-clustered 95% intervals) and
answers greedily itself (relative NLL of its answers under float32 dense, and the share of its
tokens equal to float32's). Precisions: bfloat16 (activations and weights), int8 (int8 weight
matrices with a scale per output row, float32 activations: what `FFNSKIP_WEIGHTS=int8` serves),
w8a8 (the same matrices, each product's activations rounded to int8 with a scale per row:
`FFNSKIP_WEIGHTS=w8a8`),
and Q8_0 rounding in float32 (llama.cpp's int8 format, blocks of 32 inputs) as the reference.

With `--profile` (a profile.json and its substitutes), each precision is also teacher-forced under
that profile, its substitutes applied as that precision's engine applies them (w8a8: int8 factors):

    python scripts/precision_quality.py --precisions w8a8 \
        --profile ~/.cache/ffnskip/profiles/smollm2-135m.profile.json \
        --substitutes ~/.cache/ffnskip/profiles/smollm2-135m.substitutes.<digest>.bin
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.config import DENSE, SamplingParams
from ffnskip.datasets import texts
from ffnskip.engine import Engine, load_model
from ffnskip.engine.prompts import encode_prompt
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.evaluation.weight_rounding import round_model_linears
from ffnskip.profile import Profile
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16, help="tokens not counted (as the quality budget counts)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="w8a8,int8,bfloat16,q8_0")
    parser.add_argument("--profile", type=Path, help="also each precision under this profile.json")
    parser.add_argument("--substitutes", type=Path, help="the profile's substitutes (default: substitutes.bin beside it)")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    profile, substitutes = None, None
    if args.profile is not None:
        profile = Profile.from_dict(json.loads(args.profile.read_text()))
        blob = (args.substitutes or args.profile.with_name("substitutes.bin")).read_bytes() if profile.substitutes else None
        profile.check_substitutes(blob)
        substitutes = None if blob is None else SubstituteSet.from_bytes(blob)
    cache, after = cache_root(os.environ), args.warm_up
    started = time.perf_counter()

    def engine(precision: str) -> Engine:
        dtype = "bfloat16" if precision == "bfloat16" else "float32"
        loaded = load_model(args.model, device="cpu", dtype=dtype, cache_dir=cache,
                            weights=precision if precision in ("int8", "w8a8") else "full")
        if precision == "q8_0":
            round_model_linears(loaded.model, "q8_0")
        return Engine(loaded, max_batch=args.batch, max_seq_len=1024)

    judge = engine("float32")
    prompts = [encode_prompt(judge.tokenizer, None, [{"role": "user", "content": text}])
               for text in texts("prompts", "prompt")[:args.prompts]]
    references = Q.dense_references(judge, prompts, args.tokens, args.batch)
    own = [r.nll[after:] for r in references]
    greedy = [Q.Job(p, SamplingParams(max_new_tokens=args.tokens)) for p in prompts]
    results: dict = {"prompts": args.prompts, "tokens": args.tokens, "warm_up": after, "batch": args.batch}
    for precision in args.precisions.split(","):
        candidate = engine(precision)
        scores = Q.divergence(candidate, prompts, references, DENSE, args.batch)
        answers = [list(s.generated) for s in Q.run_jobs(candidate, greedy, args.batch)]
        nll = Q.dense_nll(judge, prompts, answers, args.batch)
        equal = sum(a == b for ours, ref in zip(answers, references) for a, b in zip(ours, ref.tokens))
        results[precision] = {
            **scores.summary(after),
            "relative_nll": round(Q.relative_nll([row[after:] for row in nll], own), 4),
            "greedy_tokens_equal_float32": round(equal / sum(len(r.tokens) for r in references), 4),
            "weight_bytes_per_step": candidate.weight_bytes.total,
        }
        print(precision, json.dumps(results[precision]), flush=True)
        if profile is not None:
            under = Q.divergence(candidate, prompts, references, profile.skip_params(), args.batch, substitutes=substitutes)
            results[f"{precision} + profile"] = under.summary(after)
            print(f"{precision} + profile", json.dumps(results[f"{precision} + profile"]), flush=True)
    write_results(args.json, results, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
