"""The frontier of compensated FFN skipping on the embedded model: avoided FFN bytes (net of what
the substitutes read) against teacher-forced KL from dense, per substitute kind, with the skipped
set chosen greedily by measured harm (ffnskip.calibration.selection).

    python scripts/compensated_frontier.py --kinds plain,bias,lowrank64,linear --steps 10 \
        --json docs/perf/compensated-frontier.json

Prompts: the 48 calibration prompts answer the selection (two thirds fit the substitutes, one third
measures each candidate's KL); the first --judge open-ended prompts judge every prefix of every
chosen order, never seen by the selection. Every KL is teacher-forced on dense's greedy answer with
the one-pass forward (calibration/forced.py, which the unit tests hold equal to the decode path),
counted after the warm-up, with prompt-clustered 95% intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from functools import partial

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.calibration.forced import ForcedForward, kl_rows
from ffnskip.calibration.prompt_sets import calibration_split, dense_answers, judged_prompts
from ffnskip.calibration.selection import select
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.engine import Engine, load_model
from ffnskip.settings import cache_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", default="plain,bias,lowrank64,linear", help="plain, bias, linear, lowrankR")
    parser.add_argument("--steps", type=int, default=10, help="FFNs to choose per kind")
    parser.add_argument("--ridge", type=float, help="a fixed ridge for the substitutes (relative to the inputs' "
                        "covariance's mean diagonal; default: each fit validates its own, substitutes.validated_ridge)")
    parser.add_argument("--calibration-tokens", type=int, default=64)
    parser.add_argument("--judge", type=int, default=24, help="open-ended prompts that judge")
    parser.add_argument("--judge-tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16)
    parser.add_argument("--cold-start", type=int, default=1)
    parser.add_argument("--cold-end", type=int, default=29)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", help="write the frontier here")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=args.batch, max_seq_len=1024)
    answers = partial(dense_answers, engine)
    fit_prompts, select_prompts = calibration_split(loaded)
    judged = judged_prompts(loaded, args.judge)
    fitting = ForcedForward(engine.runner, fit_prompts, answers(fit_prompts, args.calibration_tokens), 1, args.batch)
    selecting = ForcedForward(engine.runner, select_prompts, answers(select_prompts, args.calibration_tokens),
                              args.warm_up, args.batch)
    judging = ForcedForward(engine.runner, judged, answers(judged, args.judge_tokens), args.warm_up, args.batch)
    references = [judging.log_probs(b, judging.run(b, ()).states) for b in judging.batches]
    print(f"answers ready in {time.perf_counter() - started:.0f} s", flush=True)

    hidden = int(loaded.model.config.hidden_size)
    ffn_bytes = 3 * hidden * int(loaded.model.config.intermediate_size) * 4  # fp32 gate, up, down
    all_ffn = ffn_bytes * loaded.num_layers
    results: dict = {"model": args.model, "ridge": args.ridge, "fingerprint": loaded.fingerprint, "judge_prompts": args.judge,
                     "judge_tokens": args.judge_tokens, "warm_up": args.warm_up, "ffn_bytes": ffn_bytes,
                     "num_layers": loaded.num_layers, "kinds": {}}
    for name in args.kinds.split(","):
        kind = None if name == "plain" else SubstituteKind.parse(name)
        if kind is not None and args.ridge is not None:
            kind = dataclasses.replace(kind, ridge=args.ridge)
        began = time.perf_counter()
        chosen = select(fitting, selecting, range(args.cold_start, args.cold_end), kind, args.steps,
                        lambda message, name=name, began=began: print(
                            f"  {name}: {message} ({time.perf_counter() - began:.0f} s)", flush=True))
        points = []
        for count in range(1, len(chosen.layers) + 1):
            layers, subs = chosen.prefix(count)
            rows: list[list[float]] = []
            for batch, reference in zip(judging.batches, references):
                rows += kl_rows(reference, judging.log_probs(batch, judging.run(batch, layers, subs).states))
            substitute_bytes = subs.nbytes if subs is not None else 0
            points.append({"ffns": count, "layers": list(layers), "selection_kl": round(chosen.steps[count - 1].kl.mean, 5),
                           "judged_kl": Q.pooled(rows).to_dict(5), "substitute_bytes": substitute_bytes,
                           "avoided_ffn_bytes": round((count * ffn_bytes - substitute_bytes) / all_ffn, 4)})
            print(f"{name} {json.dumps(points[-1])}", flush=True)
        results["kinds"][name] = {"order": chosen.layers, "seconds": round(time.perf_counter() - began, 1),
                                  "steps": [{"layer": s.layer, "candidates": s.candidates} for s in chosen.steps],
                                  "points": points}
        write_results(args.json, results, started)  # after every kind: a stopped run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
