"""What the running service keeps of dense: factoid QA through the gateway with `skip.policy=dense`
and with the served default (paired), and dense's relative NLL of the served answers to the
open-ended prompts (after the warm-up, and over whole answers), scored in-process.

    python scripts/served_quality.py --address 127.0.0.1:50051 --api-key KEY
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

from ffnskip.calibration import quality as Q
from ffnskip.calibration.prompt_sets import chat_ids
from ffnskip.client import GatewayClient, build_request
from ffnskip.datasets import read_jsonl, texts
from ffnskip.engine import Engine, load_model
from ffnskip.evaluation.scoring import is_correct, paired_counts
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the gateway's HOST:PORT")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--warm-up", type=int, default=16, help="the served profile's warm-up")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    qa = list(read_jsonl("factoid_qa"))
    prompts = texts("prompts", "prompt")[:args.prompts]

    def call(job: tuple[str, str, int]):
        text, policy, tokens = job
        with GatewayClient(args.address, api_key=args.api_key, timeout_s=600) as client:
            return client.generate(build_request(args.model, chat=text, max_new_tokens=tokens, policy=policy))

    with ThreadPoolExecutor(args.concurrency) as pool:
        dense_qa = list(pool.map(call, [(q["question"], "dense", 64) for q in qa]))
        served_qa = list(pool.map(call, [(q["question"], "", 64) for q in qa]))
        dense_open = list(pool.map(call, [(p, "dense", 96) for p in prompts]))
        served_open = list(pool.map(call, [(p, "", 96) for p in prompts]))
    dense_right = [is_correct(r.text, q["answers"]) for r, q in zip(dense_qa, qa)]
    served_right = [is_correct(r.text, q["answers"]) for r, q in zip(served_qa, qa)]
    print(f"served policy {served_qa[0].policy}, profile v{served_qa[0].profile_version}")
    print(f"QA: dense {sum(dense_right)}, served {sum(served_right)} of {len(qa)}: {paired_counts(dense_right, served_right)}")
    print(f"served decode skip ratios: {sorted({round(r.skip_stats.decode_skip_ratio, 3) for r in served_open})}")

    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=8, max_seq_len=1024)
    ids = [chat_ids(loaded, p) for p in prompts]
    own = Q.dense_nll(engine, ids, [list(r.token_ids) for r in dense_open], 8)
    served = Q.dense_nll(engine, ids, [list(r.token_ids) for r in served_open], 8)
    after = args.warm_up
    print(f"dense's relative NLL of the served answers: {Q.relative_nll([x[after:] for x in served], [x[after:] for x in own]):.4f} "
          f"after the warm-up, {Q.relative_nll(served, own):.4f} over whole answers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
