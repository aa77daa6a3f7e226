"""What relative NLL different-but-fine answers score: dense's own answers sampled at a
temperature, and dense in bfloat16, judged by float32 dense against its own greedy answers on the
open-ended prompts (after the warm-up, as the quality budget counts). The scale the budget's
`max_relative_nll` is set on: greedy decoding picks dense's most likely token at every step, so
any answer that leaves its path scores above 1, fine or not.

    python scripts/nll_reference.py --prompts 24 --tokens 96 --temperatures 0.3,0.7
"""

from __future__ import annotations

import argparse
import os

from ffnskip.calibration import quality as Q
from ffnskip.config import DENSE, SamplingParams
from ffnskip.datasets import texts
from ffnskip.engine import Engine, load_model
from ffnskip.engine.prompts import encode_prompt
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16, help="tokens not counted (a policy's warm-up runs dense)")
    parser.add_argument("--temperatures", default="0.3,0.7")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cache, after = cache_root(os.environ), args.warm_up

    def engine(dtype: str) -> Engine:
        return Engine(load_model(args.model, device="cpu", dtype=dtype, cache_dir=cache), max_batch=args.batch, max_seq_len=1024)

    judge = engine("float32")
    prompts = [encode_prompt(judge.tokenizer, None, [{"role": "user", "content": text}])
               for text in texts("prompts", "prompt")[:args.prompts]]
    references = Q.dense_references(judge, prompts, args.tokens, args.batch)
    own = [r.nll[after:] for r in references]

    def report(name: str, seqs) -> None:
        nll = Q.dense_nll(judge, prompts, [list(s.generated) for s in seqs], args.batch)
        print(f"{name}: relative NLL {Q.relative_nll([row[after:] for row in nll], own):.4f}", flush=True)

    for temperature in [float(t) for t in args.temperatures.split(",")]:
        jobs = [Q.Job(p, SamplingParams(max_new_tokens=args.tokens, temperature=temperature, seed=i)) for i, p in enumerate(prompts)]
        report(f"dense sampled at temperature {temperature}", Q.run_jobs(judge, jobs, args.batch))
    half = engine("bfloat16")
    greedy_jobs = [Q.Job(p, SamplingParams(max_new_tokens=args.tokens)) for p in prompts]
    report("dense in bfloat16, greedy", Q.run_jobs(half, greedy_jobs, args.batch))
    kl = Q.divergence(half, prompts, references, DENSE, args.batch)
    print(f"dense in bfloat16, teacher-forced: KL {Q.pooled([row[after:] for row in kl.kl]).mean:.4f}, same top token "
          f"{Q.pooled([[float(t) for t in row[after:]] for row in kl.top]).mean:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
