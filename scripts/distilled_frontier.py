"""Distilled substitutes on the embedded model: teacher-forced KL from dense on the judged prompts
for prefixes of the greedy compensated order, with the training-free substitutes and with the same
substitutes after distillation (ffnskip.calibration.distill).

    python scripts/distilled_frontier.py --sizes 3,4,5,6 --steps 40 --lr 1e-4 --seed 0 \
        --json docs/perf/distilled-frontier.json

Distillation is training: only the substitutes' tensors change (Adam on the teacher-forced KL on
the calibration prompts, with the set in place; the model's weights are frozen). Everything else
here is training-free, as in scripts/compensated_frontier.py, whose setting this repeats: the
order is the one its greedy selection chose for --kind with validated ridges (read from --frontier,
or given with --order, or chosen again with --order select), and each FFN's starting substitute is
fitted as the selection fitted it (two thirds of the 48 calibration prompts, the FFNs before it in
the order skipped and substituted). Distillation trains on all 48 calibration prompts, each prefix
from its own training-free fits; the first --judge open-ended prompts, which neither ever sees,
judge before and after. Every KL is teacher-forced on dense's greedy answer with the one-pass
forward (calibration/forced.py), counted after the warm-up, with prompt-clustered 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.calibration.distill import distill, fitted_along
from ffnskip.calibration.forced import ForcedForward
from ffnskip.calibration.prompt_sets import calibration_split, dense_answers, judged_prompts
from ffnskip.calibration.selection import select
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.engine import Engine, load_model
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.settings import cache_root


def frontier_run(path: str, kind: str) -> dict:
    """compensated_frontier's run of `kind` with validated ridges (its `ridge` recorded as null) in
    its JSON: one run as the script writes it, or the collected runs under "runs"."""
    with open(path) as source:
        data = json.load(source)
    for run in data.get("runs", {"": data}).values():
        if "ridge" in run and run["ridge"] is None and kind in run.get("kinds", {}):
            return run["kinds"][kind]
    raise SystemExit(f"{path}: no run of {kind} with validated ridges; give --order")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kind", default="lowrank64", help="the substitutes: bias, linear, lowrankR")
    parser.add_argument("--sizes", default="3,4,5,6", help="prefixes of the order to distil")
    parser.add_argument("--steps", type=int, default=40, help="Adam updates per prefix, one training batch each")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0, help="the training batches' order")
    parser.add_argument("--train-batch", type=int, default=4, help="calibration prompts per update")
    parser.add_argument("--order", help="the FFNs in the order they joined (e.g. 3,4,1,15,16,17), or 'select' to run "
                        "the greedy selection again (about 15 minutes); default: the order in --frontier")
    parser.add_argument("--frontier", default="docs/perf/compensated-frontier.json")
    parser.add_argument("--calibration-tokens", type=int, default=64)
    parser.add_argument("--judge", type=int, default=24, help="open-ended prompts that judge")
    parser.add_argument("--judge-tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="rows per decode batch and per measuring forward")
    parser.add_argument("--json", help="write the results here (after every prefix)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kind = SubstituteKind.parse(args.kind)
    started = time.perf_counter()
    say = lambda message: print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)  # noqa: E731

    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=args.batch, max_seq_len=1024)
    runner = engine.runner
    answers = partial(dense_answers, engine)

    say("dense answers to the calibration and judged prompts")
    # decoded in the selection's two groups, as compensated_frontier decodes them (a batch's rows
    # can round differently in another batch): its fits are reproduced exactly
    fit_prompts, select_prompts = calibration_split(loaded)
    fit_answers = answers(fit_prompts, args.calibration_tokens)
    select_answers = answers(select_prompts, args.calibration_tokens)
    judged = judged_prompts(loaded, args.judge)
    judging = ForcedForward(runner, judged, answers(judged, args.judge_tokens), args.warm_up, args.batch)
    references = judging.dense()
    training = ForcedForward(runner, fit_prompts + select_prompts, fit_answers + select_answers, args.warm_up,
                             args.train_batch)
    fitting = ForcedForward(runner, fit_prompts, fit_answers, 1, args.batch)

    frontier: dict | None = None
    if args.order == "select":
        say(f"greedy selection with {kind.name} substitutes")
        selecting = ForcedForward(runner, select_prompts, select_answers, args.warm_up, args.batch)
        chosen = select(fitting, selecting, range(1, loaded.num_layers - 1), kind, max(sizes), lambda m: say(f"  {m}"))
        order, fitted = chosen.layers, chosen.substitutes
    else:
        if args.order:
            order = [int(layer) for layer in args.order.split(",")]
        else:
            frontier = frontier_run(args.frontier, kind.name)
            order = frontier["order"]
        order = order[:max(sizes)]
        say(f"fitting {kind.name} substitutes along the order {order} (training-free)")
        fitted = fitted_along(fitting, order, kind)
    if len(order) < max(sizes):
        raise SystemExit(f"the order {order} has fewer than {max(sizes)} FFNs")

    ffn_bytes = 3 * int(loaded.model.config.hidden_size) * int(loaded.model.config.intermediate_size) * 4  # fp32 gate, up, down
    results: dict = {"model": args.model, "fingerprint": loaded.fingerprint, "kind": kind.name, "order": order,
                     "order_from": args.order or args.frontier, "training": "the substitutes' tensors only (Adam); the model is frozen",
                     "steps": args.steps, "lr": args.lr, "seed": args.seed, "train_batch": args.train_batch,
                     "calibration_prompts": len(fit_prompts) + len(select_prompts), "calibration_tokens": args.calibration_tokens,
                     "judge_prompts": args.judge, "judge_tokens": args.judge_tokens, "warm_up": args.warm_up,
                     "ffn_bytes": ffn_bytes, "num_layers": loaded.num_layers, "points": []}
    every = max(1, args.steps // 10)  # progress lines per prefix: about ten
    say("ready")
    for size in sizes:
        layers = sorted(order[:size])
        initial = SubstituteSet({layer: fitted[layer] for layer in layers})
        began = time.perf_counter()
        before = Q.pooled(judging.kl(references, layers, initial))
        say(f"{size} FFNs {layers}: judged KL before {before.mean:.4f} [{before.low:.4f}, {before.high:.4f}]; distilling")

        def report(step: int, loss: float, size: int = size) -> None:
            if step % every == 0 or step == args.steps:
                say(f"  {size} FFNs: step {step}/{args.steps}, training KL {loss:.4f}")

        result = distill(training, layers, initial, args.steps, args.lr, args.seed, report)
        after = Q.pooled(judging.kl(references, layers, result.substitutes))
        epoch = len(training.batches)
        point = {"ffns": size, "layers": layers, "judged_kl_before": before.to_dict(5), "judged_kl_after": after.to_dict(5),
                 "substitute_bytes": result.substitutes.nbytes,
                 "avoided_ffn_bytes": round((size * ffn_bytes - result.substitutes.nbytes) / (ffn_bytes * loaded.num_layers), 4),
                 "training_kl_first_epoch": round(sum(result.losses[:epoch]) / max(1, len(result.losses[:epoch])), 5),
                 "training_kl_last_epoch": round(sum(result.losses[-epoch:]) / max(1, len(result.losses[-epoch:])), 5),
                 "losses": [round(loss, 5) for loss in result.losses], "seconds": round(time.perf_counter() - began, 1)}
        if frontier is not None:  # the same prefix as compensated_frontier judged it (a check of the setting)
            point["frontier_judged_kl"] = next((p["judged_kl"] for p in frontier["points"] if p["ffns"] == size), None)
        results["points"].append(point)
        say(f"{size} FFNs: judged KL {before.mean:.4f} -> {after.mean:.4f} [{after.low:.4f}, {after.high:.4f}] "
            f"({point['seconds']:.0f} s)")
        write_results(args.json, results, started)  # after every prefix: a stopped run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
