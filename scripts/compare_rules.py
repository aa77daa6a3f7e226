"""The paper's rule against "static by measured harm" at equal decode skip ratios, on the
quality measures (ffnskip.calibration.quality) and paired QA flips.

    python scripts/compare_rules.py --targets 0.10,0.20 --prompts 24 --tokens 96 --json out.json
    python scripts/compare_rules.py --budget --prompts 24 --tokens 96 --json out.json
    python scripts/compare_rules.py --targets 0.10,0.20,0.30 --ks 1,2,4,8 --compensated lowrank64 --json out.json
    python scripts/compare_rules.py --targets 0.10,0.20 --compensated lowrank64 --order 3,4,1,15,16,17 \
        --harm-order 3,5,4,11 --paper 0.10:6:0.955,0.20:8:0.93 --json out.json

The paper's rule (`adaptive`, per row, k = --max-skip) gets its threshold bisected with
free-running runs on the open-ended prompts until its measured decode skip ratio is within
0.02 of the target. "static by measured harm" skips the round(target x L) hot FFNs whose
removal alone costs least teacher-forced KL on the calibration prompts (never the prompts it
is judged on). With --ks the paper's rule is tuned: its threshold is bisected for each k and
the k with the lowest teacher-forced KL at the target is judged. With --compensated the greedy
compensated selection (ffnskip.calibration.selection, on the calibration prompts) is judged too,
at the prefix whose net avoided FFN bytes are nearest the target. Choices already made elsewhere
(scripts/token_rules_frontier.py, teacher-forced) can be given instead of searched: --order (the
greedy compensated order; its substitutes are refitted along it), --harm-order and --paper
(target:k:threshold per target). All run at --batch rows, with the same warm-up, and are scored after it:
teacher-forced KL(dense || rule) and same-top-token with prompt-clustered 95% intervals,
dense's relative NLL of the free-running answers, and factoid QA answers lost and gained
against dense (paired, exact McNemar p).

With --budget, each rule instead gets the most skipping that keeps the quality budget
(--max-kl, --max-relative-nll; the calibrator's defaults) on the judged prompts, by the same
search for both: the paper's threshold bisected (a lower threshold skips more), static's
prefix of the harm order by doubling and bisecting; a setting is within the budget when its
teacher-forced KL and its free-running relative NLL both are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.calibration.budget import longest_prefix
from ffnskip.calibration.distill import fitted_along
from ffnskip.calibration.forced import ForcedForward
from ffnskip.calibration.prompt_sets import calibration_split, chat_ids, dense_answers, ffn_layer_bytes, judged_prompts
from ffnskip.calibration.selection import Selection, Step, select
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.config import DENSE, Policy, QualityBudget, SamplingParams, SkipParams
from ffnskip.datasets import read_jsonl, texts
from ffnskip.engine import Engine, load_model
from ffnskip.engine.stats import SkipStats
from ffnskip.evaluation.scoring import is_correct, paired_counts
from ffnskip.settings import cache_root


def free_run(engine: Engine, prompts, skip: SkipParams, tokens: int, batch: int, substitutes=None):
    seqs = Q.run_jobs(engine, [Q.Job(p, SamplingParams(max_new_tokens=tokens), skip, substitutes=substitutes)
                               for p in prompts], batch)
    stats = SkipStats.pooled([engine.result(s).skip_stats for s in seqs])
    return [list(s.generated) for s in seqs], stats.decode_skip_ratio


def net_avoided(chosen, count: int, ffn_bytes: int, layers: int) -> float:
    """The FFN bytes a step avoids with the first `count` chosen FFNs, net of their substitutes,
    as a share of all FFN bytes (per skipping step, after the warm-up)."""
    subs = chosen.prefix(count)[1]
    return (count * ffn_bytes - (subs.nbytes if subs is not None else 0)) / (ffn_bytes * layers)


def compensated_selection(engine: Engine, loaded, kind_name: str, cold_start: int, cold_end: int, warm_up: int, say,
                          steps: int, order: list[int] | None = None) -> Selection:
    """The greedy compensated order on the calibration prompts (two thirds fit, one third select),
    or, given the `order`, its substitutes refitted along it."""
    fit_prompts, select_prompts = calibration_split(loaded)
    fitting = ForcedForward(engine.runner, fit_prompts, dense_answers(engine, fit_prompts, 64), 1, 16)
    kind = None if kind_name == "plain" else SubstituteKind.parse(kind_name)
    if order is not None:
        assert kind is not None, "an order with substitutes"
        return Selection([Step(layer, Q.Estimate(math.nan, math.nan, math.nan), {}) for layer in order],
                         fitted_along(fitting, order, kind))
    selecting = ForcedForward(engine.runner, select_prompts, dense_answers(engine, select_prompts, 64), warm_up, 16)
    return select(fitting, selecting, range(cold_start, cold_end), kind, steps, lambda message: say(f"greedy: {message}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="0.10,0.20")
    parser.add_argument("--prompts", type=int, default=24, help="open-ended prompts judged (data set `prompts`)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--qa-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warm-up", type=int, default=16)
    parser.add_argument("--max-skip", type=int, default=8, help="the paper's run length k")
    parser.add_argument("--ks", help="targets: tune the paper's k over these (e.g. 1,2,4,8): the threshold is bisected "
                        "for each, and the k with the lowest teacher-forced KL at the target is judged")
    parser.add_argument("--compensated", help="targets: also judge the greedy compensated selection with this "
                        "substitute (plain, bias, lowrankR, linear) at the prefix whose net avoided FFN bytes is nearest")
    parser.add_argument("--order", help="targets: the greedy compensated order, already chosen (e.g. 3,4,1,15)")
    parser.add_argument("--harm-order", help="the FFNs by plain harm alone, already measured (skips the screening)")
    parser.add_argument("--paper", help="targets: the paper's tuned settings, already chosen: target:k:threshold,...")
    parser.add_argument("--bisections", type=int, default=7, help="--budget: steps of the paper's threshold search")
    parser.add_argument("--budget", action="store_true", help="each rule at the most skipping within the budget")
    parser.add_argument("--max-kl", type=float, default=QualityBudget().max_kl)
    parser.add_argument("--max-relative-nll", type=float, default=QualityBudget().max_relative_nll)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    tok, layers = loaded.tokenizer, loaded.num_layers
    ffn_bytes = ffn_layer_bytes(loaded)
    engine = Engine(loaded, max_batch=args.batch, max_seq_len=1024)
    cold_start, cold_end = 1, layers - 1
    prompts = judged_prompts(loaded, args.prompts)
    calibration = [chat_ids(loaded, t) for t in texts("calibration", "text")[::3]]
    qa = list(read_jsonl("factoid_qa"))
    questions = [chat_ids(loaded, row["question"]) for row in qa]

    started = time.perf_counter()
    harm: dict[int, float] = {}
    if args.harm_order:
        order = [int(layer) for layer in args.harm_order.split(",")]
    else:
        screen = Q.dense_references(engine, calibration, 48, args.batch)
        for layer in range(cold_start, cold_end):
            skip = SkipParams(policy=Policy.STATIC, static_layers=(layer,), cold_start=cold_start, cold_end=cold_end,
                              warm_up=0)
            harm[layer] = Q.pooled(Q.divergence(engine, calibration, screen, skip, args.batch).kl).mean
        order = sorted(harm, key=lambda layer: (harm[layer], layer))
    say(f"harm order {order} ({time.perf_counter() - started:.0f} s)")
    given = {float(t): (int(k), float(threshold)) for t, k, threshold in
             (item.split(":") for item in args.paper.split(","))} if args.paper else {}

    references = Q.dense_references(engine, prompts, args.tokens, args.batch)
    own = [r.nll for r in references]
    dense_qa, _ = free_run(engine, questions, DENSE, args.qa_tokens, args.batch)
    dense_right = [is_correct(tok.decode(t, skip_special_tokens=True), row["answers"]) for t, row in zip(dense_qa, qa)]

    def adaptive(threshold: float, k: int = args.max_skip) -> SkipParams:
        return SkipParams(policy=Policy.ADAPTIVE, threshold=threshold, max_skip=k, cold_start=cold_start,
                          cold_end=cold_end, warm_up=args.warm_up)

    def evaluate(name: str, target: float, skip: SkipParams, substitutes=None, **extra) -> dict:
        tokens, ratio = free_run(engine, prompts, skip, args.tokens, args.batch, substitutes)
        nll = Q.dense_nll(engine, prompts, tokens, args.batch)
        scores = Q.divergence(engine, prompts, references, skip, args.batch, substitutes=substitutes)
        kept = Q.quality(scores, nll, own, skip_from=args.warm_up)
        answers, _ = free_run(engine, questions, skip, args.qa_tokens, args.batch, substitutes)
        right = [is_correct(tok.decode(t, skip_special_tokens=True), row["answers"]) for t, row in zip(answers, qa)]
        avoided = ratio - (substitutes.nbytes / (ffn_bytes * layers) if substitutes is not None else 0.0)
        row = {"rule": name, "target": target, "decode_skip_ratio": round(ratio, 4),
               "avoided_ffn_bytes": round(avoided, 4), **extra, **kept.to_dict(),
               "qa": {"right": sum(right), "dense_right": sum(dense_right), **paired_counts(dense_right, right)}}
        say(json.dumps(row))
        return row

    def static_set(count: int) -> SkipParams:
        return SkipParams(policy=Policy.STATIC, static_layers=tuple(sorted(order[:count])), cold_start=cold_start,
                          cold_end=cold_end, warm_up=args.warm_up)

    rows = []
    if args.budget:
        budget = QualityBudget(max_kl=args.max_kl, max_relative_nll=args.max_relative_nll)

        def within(skip: SkipParams, label: str) -> bool:
            kl = Q.pooled([row[args.warm_up:] for row in Q.divergence(engine, prompts, references, skip, args.batch).kl]).mean
            tokens, ratio = free_run(engine, prompts, skip, args.tokens, args.batch)
            nll = Q.dense_nll(engine, prompts, tokens, args.batch)
            relative = Q.relative_nll([row[args.warm_up:] for row in nll], [row[args.warm_up:] for row in own])
            say(f"{label}: decode skip {ratio:.4f}, KL {kl:.4f}, relative NLL {relative:.4f}")
            return budget.kept_by(kl, relative)

        low, high = 0.90, 1.0  # within(high): a threshold of 1 never fires
        for _ in range(args.bisections):
            middle = (low + high) / 2
            low, high = (low, middle) if within(adaptive(middle), f"adaptive threshold {middle:.5f}") else (middle, high)
        rows.append(evaluate("adaptive (paper)", 0.0, adaptive(high)))
        count = longest_prefix(lambda n: within(static_set(n), f"static, {n} FFNs"), len(order))
        rows.append(evaluate("static by measured harm", 0.0, static_set(count)))
    targets = [float(t) for t in args.targets.split(",")]
    steps = round(max(targets) * layers) + 2  # enough FFNs for the largest target's net bytes
    chosen = compensated_selection(engine, loaded, args.compensated, cold_start, cold_end, args.warm_up, say, steps,
                                   [int(layer) for layer in args.order.split(",")] if args.order else None) \
        if args.compensated and not args.budget else None
    for target in [] if args.budget else targets:
        tuned = []  # per k: (teacher-forced KL at the target, k, threshold)
        for k in [] if target in given else [int(k) for k in args.ks.split(",")] if args.ks else [args.max_skip]:
            low, high = 0.90, 1.0  # threshold: a higher one fires less, so skips less
            for _ in range(8):
                middle = (low + high) / 2
                _, ratio = free_run(engine, prompts, adaptive(middle, k), args.tokens, args.batch)
                say(f"adaptive k={k} threshold {middle:.5f}: decode skip {ratio:.4f} (target {target})")
                if abs(ratio - target) <= 0.01:
                    break
                low, high = (middle, high) if ratio > target else (low, middle)
            if abs(ratio - target) > 0.01:  # this k cannot skip that much (k hot layers a token at most)
                say(f"adaptive k={k}: no threshold reaches the target (decode skip {ratio:.4f})")
                continue
            scores = Q.divergence(engine, prompts, references, adaptive(middle, k), args.batch)
            tuned.append((Q.pooled([row[args.warm_up:] for row in scores.kl]).mean, k, middle))
            say(f"adaptive k={k}: threshold {middle:.5f}, KL {tuned[-1][0]:.4f}")
        _, k, threshold = min(tuned) if tuned else (0.0, *given[target]) if target in given else (0.0, args.max_skip, middle)
        rows.append(evaluate("adaptive (paper)", target, adaptive(threshold, k), max_skip=k,
                             tuning=[{"kl": round(kl, 4), "k": kk, "threshold": round(t, 5)} for kl, kk, t in tuned]))
        rows.append(evaluate("static by measured harm", target, static_set(max(1, round(target * layers)))))
        if chosen is not None:
            count = min(range(1, len(chosen.layers) + 1), key=lambda n: abs(net_avoided(chosen, n, ffn_bytes, layers) - target))
            static_layers, subs = chosen.prefix(count)
            skip = SkipParams(policy=Policy.STATIC, static_layers=static_layers, cold_start=cold_start,
                              cold_end=cold_end, warm_up=args.warm_up)
            rows.append(evaluate(f"greedy compensated ({args.compensated})", target, skip, subs))
    print(f"{'rule':<26}{'target':>7}{'dec.skip':>9}  {'KL [95%]':<24}{'top-1 [95%]':<24}{'rel.NLL':>8}  QA lost/gained")
    for r in rows:
        kl, top, q = r["kl"], r["top_match"], r["qa"]
        print(f"{r['rule']:<26}{r['target']:>7.2f}{r['decode_skip_ratio']:>9.3f}  "
              f"{kl['mean']:.3f} [{kl['low']:.3f}, {kl['high']:.3f}]{'':<3}{top['mean']:.3f} [{top['low']:.3f}, {top['high']:.3f}]"
              f"{'':<3}{r['relative_nll']:>8.3f}  {q['dense_only']}/{q['method_only']} (p {q['mcnemar_p']:.3f})")
    write_results(args.json, {"harm": harm, "order": order, "rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
