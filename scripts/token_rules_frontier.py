"""Skip rules side by side at equal avoided FFN bytes, teacher-forced: static by measured harm, the
greedy compensated selection, the paper's rule tuned over k and its threshold, and the paper's
idea on compensated layers (per token, each compensated FFN or its substitute, by a signal known
before the FFN is paid).

    python scripts/token_rules_frontier.py --targets 0.10,0.20,0.30 --json docs/perf/token-rules-frontier.json

Prompts (calibration/prompt_sets.py): two thirds of the calibration texts fit substitutes and the
per-token thresholds, the other third selects (the greedy order, the paper's threshold, each
per-token rule's layer span); the first --judge open-ended prompts judge, never seen by any choice.
Every number is the one-pass teacher-forced forward (calibration/forced.py, held equal to the
decode path by the unit tests) over dense's greedy answers, counted after the warm-up, KL with
prompt-clustered 95% intervals. Avoided FFN bytes are per token at batch 1, net of the substitute
bytes read. The free-running measures (relative NLL, QA flips) of the chosen settings come from
scripts/compare_rules.py with --order and --paper, which decode them with the engine, and, for the
per-token rules the engine does not serve, from --free-running here (forced.free_running, a loop
the unit tests hold equal to the engine's answers; --cross-check runs it on the greedy set too).

Rules at each target t (a share of all FFN bytes):
- static by measured harm: the round(t x L) FFNs whose plain skip alone costs least KL;
- greedy compensated: the prefix of the greedy order (selection.py) whose net bytes are nearest t;
- the paper's rule: for each k of --ks that can reach t (k / L >= t), the threshold bisected to
  within 0.01 of t on the judged prompts; the k with the lowest judged KL is its best (both choices
  in its favour);
- per-token compensated (token_rules.ChosenTokens): the first m FFNs of the greedy order with their
  substitutes, m = n x span for the spans given (n: the greedy prefix's size at t), each skipping
  the share of tokens that makes the net bytes t; every signal both ways round (the probe, a linear
  map fitted on the fit prompts to predict the oracle, one way), the span chosen on the select
  prompts. The oracle signal pays the FFN to decide, so it is a bound only.

A per-token rule's thresholds are quantiles of its signal over the tokens of the set it runs on,
fitted anew on each set, and the paper's threshold is bisected on the judged set: a threshold is a
byte budget, and rules compared at equal bytes must avoid them on the same tokens. Everything
that decides quality (the order, the span, the signal and its direction) is chosen on the select
prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial

from ffnskip.bench.json_results import write_results
from ffnskip.calibration import quality as Q
from ffnskip.calibration.distill import fitted_along
from ffnskip.calibration.forced import ForcedForward, free_running, kl_rows
from ffnskip.calibration.prompt_sets import calibration_split, chat_ids, dense_answers, ffn_layer_bytes, judged_prompts
from ffnskip.calibration.selection import select
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.calibration.token_rules import ChosenTokens, FixedSet, OracleRecorder, PaperRule, Signal, TokenRule, avoided_share
from ffnskip.datasets import read_jsonl
from ffnskip.engine import Engine, load_model
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.evaluation.scoring import is_correct, paired_counts
from ffnskip.settings import cache_root


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Judge:
    """Teacher-forced KL and avoided bytes of rules on one prompt set, against its dense log-probs."""

    def __init__(self, forward: ForcedForward, ffn_bytes: int, num_layers: int) -> None:
        self.forward, self.ffn_bytes, self.num_layers = forward, ffn_bytes, num_layers
        self.references = [forward.log_probs(b, forward.run(b, ()).states) for b in forward.batches]

    def skips(self, rule: Sequence[int] | TokenRule, subs: SubstituteSet | None = None) -> tuple[Counter, int]:
        """(skipped positions per layer, scored positions), without the head."""
        skips: Counter = Counter()
        positions = 0
        for batch in self.forward.batches:
            done = self.forward.run(batch, rule, subs)
            skips.update(done.skips)
            positions += done.positions
        return skips, positions

    def measure(self, rule: Sequence[int] | TokenRule, subs: SubstituteSet | None = None,
                read_always: Sequence[int] = ()) -> dict:
        rows: list[list[float]] = []
        skips: Counter = Counter()
        positions = 0
        for batch, reference in zip(self.forward.batches, self.references):
            done = self.forward.run(batch, rule, subs)
            rows += kl_rows(reference, self.forward.log_probs(batch, done.states))
            skips.update(done.skips)
            positions += done.positions
        return {"kl": Q.pooled(rows).to_dict(5), "skip_ratio": round(sum(skips.values()) / (positions * self.num_layers), 4),
                "avoided_ffn_bytes": round(avoided_share(dict(skips), positions, self.ffn_bytes, self.num_layers, subs,
                                                         read_always), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="0.10,0.20,0.30")
    parser.add_argument("--substitute", default="lowrank64", help="the compensated FFNs' substitute kind")
    parser.add_argument("--order", help="the greedy compensated order, if already chosen (e.g. 3,4,1,15): "
                        "its substitutes are refitted along it; default: chosen here")
    parser.add_argument("--steps", type=int, default=12, help="FFNs the greedy selection chooses")
    parser.add_argument("--pool", type=int, default=18, help="the greedy selection's candidates: the FFNs of least "
                        "plain harm alone")
    parser.add_argument("--ks", default="1,2,3,4,5,6,7,8,10,12", help="the paper's run lengths tried")
    parser.add_argument("--bisections", type=int, default=10)
    parser.add_argument("--spans", default="1.5,2,3", help="per-token rules: layers over the greedy prefix's size")
    parser.add_argument("--signals", default=",".join(s.value for s in Signal))
    parser.add_argument("--calibration-tokens", type=int, default=64)
    parser.add_argument("--judge", type=int, default=24)
    parser.add_argument("--judge-tokens", type=int, default=96)
    parser.add_argument("--warm-up", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--free-running", action="store_true", help="also decode the best per-token rule's answers "
                        "(forced.free_running) for dense's relative NLL of them and its QA flips against dense")
    parser.add_argument("--qa-tokens", type=int, default=64, help="--free-running: 0 leaves QA out")
    parser.add_argument("--cross-check", default="0.10", help="--free-running: targets at which the greedy "
                        "compensated set is decoded by the same loop, to set beside the engine's numbers")
    parser.add_argument("--json", help="write the results here (after every stage)")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype="float32", cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=args.batch, max_seq_len=1024)
    layers, runner = loaded.num_layers, engine.runner
    ffn_bytes = ffn_layer_bytes(loaded)
    cold_start, cold_end = 1, layers - 1
    fit_prompts, select_prompts = calibration_split(loaded)
    judged = judged_prompts(loaded, args.judge)
    fit_answers = dense_answers(engine, fit_prompts, args.calibration_tokens)
    fitting = ForcedForward(runner, fit_prompts, fit_answers, 1, args.batch)
    # one batch each, so a per-token rule's thresholds are quantiles over all of a set's tokens
    selecting = Judge(ForcedForward(runner, select_prompts, dense_answers(engine, select_prompts, args.calibration_tokens),
                                    args.warm_up, len(select_prompts)), ffn_bytes, layers)
    judging = Judge(ForcedForward(runner, judged, dense_answers(engine, judged, args.judge_tokens), args.warm_up,
                                  len(judged)), ffn_bytes, layers)
    results: dict = {"model": args.model, "fingerprint": loaded.fingerprint, "ffn_bytes": ffn_bytes, "num_layers": layers,
                     "args": vars(args)}
    say(f"answers ready ({time.perf_counter() - started:.0f} s)")
    cross_check = {float(t) for t in args.cross_check.split(",") if t}
    eos = loaded.tokenizer.eos_token_id
    qa = list(read_jsonl("factoid_qa"))
    questions = [chat_ids(loaded, row["question"]) for row in qa]

    def decoded(rule_factory, subs) -> tuple[list[list[int]], list[bool]]:
        """Free-running answers to the judged prompts, and which QA answers are right (none with no QA tokens)."""
        answers = free_running(runner, judged, args.judge_tokens, args.warm_up, rule_factory, subs, eos)
        replies = free_running(runner, questions, args.qa_tokens, args.warm_up, rule_factory, subs, eos) \
            if args.qa_tokens else []
        return answers, [is_correct(loaded.tokenizer.decode(t, skip_special_tokens=True), row["answers"])
                         for t, row in zip(replies, qa)]

    if args.free_running:  # dense's own answers (EOS ends them), their NLL, and its QA answers
        own = [r.nll[args.warm_up:] for r in Q.dense_references(engine, judged, args.judge_tokens, args.batch)]
        dense_right = decoded(lambda: (), None)[1]

    def free_measures(rule_factory, subs) -> dict:
        """Dense's relative NLL of the rule's free-running answers, and its QA flips against dense."""
        answers, right = decoded(rule_factory, subs)
        nll = Q.dense_nll(engine, judged, answers, args.batch)
        measures: dict = {"relative_nll": round(Q.relative_nll([row[args.warm_up:] for row in nll], own), 4)}
        if args.qa_tokens:
            measures["qa"] = {"right": sum(right), "dense_right": sum(dense_right), **paired_counts(dense_right, right)}
        return measures

    hot = range(cold_start, cold_end)
    harm = {layer: selecting.measure((layer,))["kl"]["mean"] for layer in hot}
    by_harm = sorted(hot, key=lambda layer: (harm[layer], layer))
    results["harm"] = harm
    say(f"harm order {by_harm} ({time.perf_counter() - started:.0f} s)")

    kind = SubstituteKind.parse(args.substitute)
    if args.order:
        order = [int(layer) for layer in args.order.split(",")]
        results["selection"] = {"order": order, "given": True}
    else:
        chosen = select(fitting, selecting.forward, by_harm[:args.pool], kind, args.steps,
                        lambda message: say(f"greedy: {message} ({time.perf_counter() - started:.0f} s)"))
        order = chosen.layers
        results["selection"] = {"order": order, "pool": by_harm[:args.pool],
                                "steps": [{"layer": s.layer, "kl": s.kl.to_dict(5), "candidates": s.candidates}
                                          for s in chosen.steps]}
    fitted = fitted_along(fitting, order, kind)
    write_results(args.json, results, started)
    say(f"order {order} ({time.perf_counter() - started:.0f} s)")

    def compensated(count: int) -> tuple[list[int], SubstituteSet]:
        return order[:count], SubstituteSet({layer: fitted[layer] for layer in order[:count]})

    def net(count: int) -> float:
        return (count * ffn_bytes - compensated(count)[1].nbytes) / (ffn_bytes * layers)

    results["targets"] = []
    for target in [float(t) for t in args.targets.split(",")]:
        entry: dict = {"target": target, "rows": []}
        results["targets"].append(entry)

        plain = sorted(by_harm[:max(1, round(target * layers))])
        count = min(range(1, len(order) + 1), key=lambda n: abs(net(n) - target))
        greedy_layers, greedy_subs = compensated(count)
        for name, fixed, subs in (("static by measured harm", plain, None),
                                  (f"greedy compensated ({args.substitute})", greedy_layers, greedy_subs)):
            entry["rows"].append({"rule": name, "layers": sorted(fixed), **judging.measure(fixed, subs)})
            say(json.dumps(entry["rows"][-1]))

        tuned = []
        for k in [int(k) for k in args.ks.split(",") if k]:
            if k / layers < target - 0.01:
                continue  # fires once per token: it never skips more than k FFNs of L
            low, high = 0.5, 1.0  # a higher threshold fires less
            for _ in range(args.bisections):
                middle = (low + high) / 2
                skips, positions = judging.skips(PaperRule(middle, k, cold_start, cold_end, layers))
                ratio = sum(skips.values()) / (positions * layers)
                if abs(ratio - target) <= 0.01:
                    break
                low, high = (middle, high) if ratio > target else (low, middle)
            if abs(ratio - target) > 0.01:
                say(f"paper k={k}: no threshold reaches {target} (skip ratio {ratio:.4f})")
                continue
            row = judging.measure(PaperRule(middle, k, cold_start, cold_end, layers))
            tuned.append({"k": k, "threshold": round(middle, 5), **row})
            say(f"paper k={k} threshold {middle:.5f}: {json.dumps(row)}")
        entry["paper_tuning"] = tuned
        if tuned:
            best = min(tuned, key=lambda r: r["kl"]["mean"])
            entry["rows"].append({"rule": "the paper's rule (tuned)", **best})
        write_results(args.json, results, started)

        variants: list[dict] = []
        runs: dict[int, tuple] = {}  # variant -> (its rule with the judged thresholds, its substitutes)
        for signal in [Signal(s) for s in args.signals.split(",")]:
            for reverse in (False,) if signal in (Signal.ORACLE, Signal.PROBE) else (False, True):
                trials = []
                for span in sorted({min(len(order), math.ceil(count * float(s))) for s in args.spans.split(",")}):
                    if span <= count:
                        continue
                    names, subs = compensated(span)
                    always = names if signal.reads_substitute_always else ()
                    saved = sum(ffn_bytes - (0 if always else subs[layer].nbytes) for layer in names)
                    rate = (target * ffn_bytes * layers + (subs.nbytes if always else 0)) / saved
                    if rate > 1:
                        continue
                    probes = {}
                    if signal is Signal.PROBE:  # fitted on dense's fit-prompt activations
                        recorder = OracleRecorder(subs)
                        for batch in fitting.batches:
                            fitting.run(batch, recorder)
                        probes = recorder.fit_probes()
                    rule = partial(ChosenTokens, subs, signal, dict.fromkeys(names, rate), reverse=reverse, probes=probes)
                    trials.append({"span": span, "rate": round(rate, 4), "rule": rule,
                                   "select": selecting.measure(rule(), subs, always), "always": always, "subs": subs})
                    say(f"{signal.value}{' reversed' if reverse else ''} span {span} rate {rate:.3f}: "
                        f"{json.dumps(trials[-1]['select'])}")
                if not trials:
                    continue
                best = min(trials, key=lambda t: t["select"]["kl"]["mean"])
                judged_rule = best["rule"]()
                row = judging.measure(judged_rule, best["subs"], best["always"])  # thresholds fitted anew there
                with_thresholds = partial(best["rule"], thresholds=dict(judged_rule.thresholds))
                variants.append({"signal": signal.value, "reverse": reverse, "span": best["span"], "rate": best["rate"],
                                 "layers": sorted(order[:best["span"]]), "select": best["select"], **row,
                                 "trials": [{k: t[k] for k in ("span", "rate", "select")} for t in trials]})
                runs[len(variants) - 1] = (with_thresholds, best["subs"])
                say(f"judged {json.dumps({k: v for k, v in variants[-1].items() if k != 'trials'})}")
        entry["per_token"] = variants
        servable = [v for v in variants if v["signal"] != Signal.ORACLE.value]
        if servable:
            best = min(servable, key=lambda v: v["select"]["kl"]["mean"])
            entry["rows"].append({"rule": f"per-token compensated ({best['signal']}"
                                  f"{', reversed' if best['reverse'] else ''})", **best})
            if args.free_running:  # the engine does not serve it: its free-running answers decoded here
                entry["rows"][-1]["free_running"] = free_measures(*runs[variants.index(best)])
                say(f"per-token {best['signal']}: {json.dumps(entry['rows'][-1]['free_running'])}")
            if args.free_running and target in cross_check:  # the same loop on a set the engine decodes too
                entry["rows"][1]["free_running_loop"] = free_measures(partial(FixedSet, greedy_layers), greedy_subs)
                say(f"greedy compensated, free-running loop: {json.dumps(entry['rows'][1]['free_running_loop'])}")
        write_results(args.json, results, started)

    print(f"{'target':>6}  {'rule':<44}{'avoided':>8}  KL [95%]")
    for entry in results["targets"]:
        for row in entry["rows"]:
            kl = row["kl"]
            print(f"{entry['target']:>6.2f}  {row['rule']:<44}{row['avoided_ffn_bytes']:>8.3f}  "
                  f"{kl['mean']:.3f} [{kl['low']:.3f}, {kl['high']:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
