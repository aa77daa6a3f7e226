"""`ffnskip eval agreement`: agreement with dense on open-ended prompts per method and ratio:
token agreement (share of generated tokens equal to dense's at the same position), exact
match of whole responses, and token collapse (share of repeated 4-grams)."""

from __future__ import annotations

from collections.abc import Sequence

from ffnskip.evaluation.data import Item
from ffnskip.evaluation.item_generation import ItemGenerator
from ffnskip.evaluation.methods import Setting, describe
from ffnskip.evaluation.qa import expected_batches
from ffnskip.evaluation.scoring import agreement_stats, pooled_ratios, rounded
from ffnskip.evaluation.session import Session


def run_agreement(session: Session, items: list[Item], methods: list[str], targets: list[float], max_new_tokens: int,
                  data: str, argv: Sequence[str]) -> dict | None:
    generator = ItemGenerator(session.loaded, session.state, max_new_tokens, session.options.seed, task="prompts")
    settings = session.prepare("agreement", [(generator, items)], expected_batches(session, methods, targets),
                               session.calibration_todo(methods, targets),
                               lambda: session.settings(methods, targets))
    if settings is None:
        return None
    records = session.run(generator, settings, items)
    report = session.header("agreement", argv, data, items, max_new_tokens)
    report["methods"], report["targets"] = methods, targets
    report["calibration"] = session.calibrator.summary()
    report["rows"] = agreement_rows(settings, records, session.loaded.num_layers)
    return report


def agreement_rows(settings: Sequence[Setting], records: dict[str, list[dict]], num_layers: int) -> list[dict]:
    dense = records[settings[0].key]
    rows = []
    for setting in settings:
        mine = records[setting.key]
        skip_ratio, decode_ratio = pooled_ratios(mine, num_layers)
        stats = agreement_stats(mine, dense)
        rows.append({
            "method": setting.method, "target_skip": setting.target, "label": setting.label,
            "decode_skip_ratio": rounded(decode_ratio), "skip_ratio": rounded(skip_ratio),
            "agreement": rounded(stats["agreement"]), "exact_match": rounded(stats["exact_match"]),
            "repeated_4gram": rounded(stats["repeated_4gram"]), "n": len(mine),
            "tokens": sum(r["generated"] for r in mine), "warm_up": setting.warm_up,
            "settings": describe(setting), "params": setting.params(), "calibration": setting.calibration or None,
        })
    return rows


def print_table(report: dict) -> None:
    print(f"agreement with dense on {report['data']} ({report['n_items']} prompts), {report['model']}, greedy, "
          f"max {report['max_new_tokens']} new tokens, warm-up {report['warm_up']}")
    header = f"{'method':<18}{'target':>7}{'dec.skip':>9}{'skip':>7}{'agreement':>10}{'exact':>7}{'rep.4gram':>10}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        print(f"{r['method']:<18}{r['target_skip']:>7.2f}{r['decode_skip_ratio']:>9.3f}{r['skip_ratio']:>7.3f}"
              f"{r['agreement']:>10.3f}{r['exact_match']:>7.3f}{r['repeated_4gram']:>10.3f}")
