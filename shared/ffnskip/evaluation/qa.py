"""`ffnskip eval qa`: factoid QA accuracy per method and target skip ratio (the paper's
Tables 2 and 3): greedy answers to each question as a chat user message, correct when an
accepted alias appears; 95% Wilson intervals, paired comparison with dense per question,
and agreement of the answers' tokens with dense."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ffnskip.evaluation.data import Item
from ffnskip.evaluation.item_generation import ItemGenerator
from ffnskip.evaluation.methods import Setting, describe, targets_of
from ffnskip.evaluation.scoring import agreement_stats, answer_position, is_correct, paired_counts, pooled_ratios, rounded, wilson_interval
from ffnskip.evaluation.session import Session


def expected_batches(session: Session, methods: Sequence[str], targets: Sequence[float]) -> list[int]:
    o = session.options
    return [o.aligned_batch if m.startswith("aligned") else o.batch_size for m in methods for _ in targets_of(m, targets)]


def run_qa(session: Session, items: list[Item], methods: list[str], targets: list[float], max_new_tokens: int,
           data: str, argv: Sequence[str]) -> dict | None:
    generator = ItemGenerator(session.loaded, session.state, max_new_tokens, session.options.seed, task="qa")
    settings = session.prepare("qa", [(generator, items)], expected_batches(session, methods, targets),
                               session.calibration_todo(methods, targets),
                               lambda: session.settings(methods, targets))
    if settings is None:
        return None
    records = session.run(generator, settings, items)
    report = session.header("qa", argv, data, items, max_new_tokens)
    report["methods"], report["targets"] = methods, targets
    report["calibration"] = session.calibrator.summary()
    report["rows"] = qa_rows(settings, items, records, session.loaded.num_layers)
    report["dense_answer_position"] = answer_positions(items, records[settings[0].key], session.loaded.tokenizer,
                                                       session.options.warm_up)
    return report


def qa_rows(settings: Sequence[Setting], items: Sequence[Item], records: dict[str, list[dict]], num_layers: int) -> list[dict]:
    dense = records[settings[0].key]  # settings[0] is dense (parse_methods puts it first)
    dense_correct = [is_correct(r["text"], i.answers) for r, i in zip(dense, items)]
    rows = []
    for setting in settings:
        mine = records[setting.key]
        correct = [is_correct(r["text"], i.answers) for r, i in zip(mine, items)]
        row = qa_row(setting, mine, correct, dense, dense_correct, num_layers)
        row["correct_ids"] = [i.id for i, ok in zip(items, correct) if ok]  # for paired comparisons in the report
        rows.append(row)
    return rows


def qa_row(setting: Setting, mine: list[dict], correct: list[bool], dense: list[dict], dense_correct: list[bool],
           num_layers: int) -> dict:
    skip_ratio, decode_ratio = pooled_ratios(mine, num_layers)
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    agreement = agreement_stats(mine, dense)
    return {
        "method": setting.method, "target_skip": setting.target, "label": setting.label,
        "decode_skip_ratio": rounded(decode_ratio), "skip_ratio": rounded(skip_ratio),
        "accuracy": rounded(k / n if n else 0.0), "ci95": [rounded(low), rounded(high)], "n": n, "correct": k,
        "agreement": rounded(agreement["agreement"]), "exact_match": rounded(agreement["exact_match"]),
        "repeated_4gram": rounded(agreement["repeated_4gram"]),
        "paired_vs_dense": paired_counts(dense_correct, correct) if setting.method != "dense" else None,
        "mean_tokens": rounded(statistics.fmean(r["generated"] for r in mine), 2) if mine else 0.0,
        "warm_up": setting.warm_up, "settings": describe(setting), "params": setting.params(),
        "calibration": setting.calibration or None,
    }


def answer_positions(items: Sequence[Item], dense: Sequence[dict], tokenizer, warm_up: int) -> dict:
    """Where dense answers name the alias: how much of the answer the warm-up already covers."""
    positions = [answer_position(r["tokens"], i.answers, tokenizer) for r, i in zip(dense, items)]
    found = [p for p in positions if p is not None]
    return {"answered": len(found), "median_token": statistics.median(found) if found else None,
            "within_warm_up": sum(p <= warm_up for p in found), "warm_up": warm_up}


def print_table(report: dict) -> None:
    print(f"factoid QA on {report['data']} ({report['n_items']} questions), {report['model']}, greedy, "
          f"max {report['max_new_tokens']} new tokens, warm-up {report['warm_up']}")
    header = f"{'method':<18}{'target':>7}{'dec.skip':>9}{'skip':>7}{'accuracy':>9}{'95% CI':>15}{'agree':>7}{'exact':>7}{'lost/won':>10}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        paired = r["paired_vs_dense"]
        lost_won = f"{paired['dense_only']}/{paired['method_only']}" if paired else "-"
        print(f"{r['method']:<18}{r['target_skip']:>7.2f}{r['decode_skip_ratio']:>9.3f}{r['skip_ratio']:>7.3f}"
              f"{r['accuracy']:>9.3f}{'[' + format(r['ci95'][0], '.3f') + ', ' + format(r['ci95'][1], '.3f') + ']':>15}"
              f"{r['agreement']:>7.3f}{r['exact_match']:>7.3f}{lost_won:>10}")
    position = report.get("dense_answer_position")
    if position and position["median_token"] is not None:
        print(f"dense answers name the alias after a median of {position['median_token']} tokens; "
              f"{position['within_warm_up']} of {position['answered']} within the {position['warm_up']}-token warm-up")
