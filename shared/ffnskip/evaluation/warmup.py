"""`ffnskip eval warmup`: the warm-up ablation (the paper's Figure 5): the calibrated rule at one
target ratio with 0..N warm-up tokens, scored by agreement and collapse on the prompts and by
QA accuracy. The threshold and k stay those calibrated at the default warm-up, so only the
warm-up changes (the decode skip ratio, over the tokens after it, stays about the target)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ffnskip.evaluation.data import Item
from ffnskip.evaluation.item_generation import ItemGenerator
from ffnskip.evaluation.methods import Setting, with_warm_up
from ffnskip.evaluation.scoring import agreement_stats, is_correct, pooled_ratios, rounded, wilson_interval
from ffnskip.evaluation.session import Session


def run_warmup(session: Session, method: str, target: float, warm_ups: list[int], prompts: list[Item],
               qa_items: list[Item], max_new_tokens: int, qa_max_new_tokens: int, data: str, qa_data: str,
               argv: Sequence[str]) -> dict | None:
    o = session.options
    prompt_generator = ItemGenerator(session.loaded, session.state, max_new_tokens, o.seed, task="prompts")
    qa_generator = ItemGenerator(session.loaded, session.state, qa_max_new_tokens, o.seed, task="qa")
    runs = [(prompt_generator, prompts)] + ([(qa_generator, qa_items)] if qa_items else [])
    batch = o.aligned_batch if method.startswith("aligned") else o.batch_size

    def build() -> list[Setting]:
        dense, calibrated = session.settings(["dense", method], [target])
        # the default warm-up keeps its plain key, so it shares results with `eval qa` / `eval agreement`
        return [dense] + [calibrated if w == o.warm_up else with_warm_up(calibrated, w) for w in warm_ups]

    settings = session.prepare("warmup", runs, [o.batch_size] + [batch] * len(warm_ups),
                               session.calibration_todo(["dense", method], [target]), build)
    if settings is None:
        return None
    prompt_records = session.run(prompt_generator, settings, prompts)
    qa_records = session.run(qa_generator, settings, qa_items) if qa_items else {}
    report = session.header("warmup", argv, data, prompts, max_new_tokens)
    report.update(method=method, target_skip=target, warm_ups=warm_ups, qa_data=qa_data if qa_items else None,
                  qa_n_items=len(qa_items), qa_max_new_tokens=qa_max_new_tokens)
    dense = settings[0]
    rows = []
    for setting in settings:
        mine = prompt_records[setting.key]
        skip_ratio, decode_ratio = pooled_ratios(mine, session.loaded.num_layers)
        stats = agreement_stats(mine, prompt_records[dense.key])
        row: dict[str, Any] = {
            "method": setting.method, "warm_up": setting.warm_up if setting is not dense else None,
            "target_skip": setting.target, "decode_skip_ratio": rounded(decode_ratio), "skip_ratio": rounded(skip_ratio),
            "agreement": rounded(stats["agreement"]), "exact_match": rounded(stats["exact_match"]),
            "repeated_4gram": rounded(stats["repeated_4gram"]), "n": len(mine)}
        if qa_items:
            answers = qa_records[setting.key]
            correct = sum(is_correct(r["text"], i.answers) for r, i in zip(answers, qa_items))
            low, high = wilson_interval(correct, len(qa_items))
            qa_stats = agreement_stats(answers, qa_records[dense.key])
            row.update(qa_accuracy=rounded(correct / len(qa_items)), qa_ci95=[rounded(low), rounded(high)],
                       qa_correct=correct, qa_agreement=rounded(qa_stats["agreement"]),
                       qa_skip_ratio=rounded(pooled_ratios(answers, session.loaded.num_layers)[0]),
                       qa_decode_skip_ratio=rounded(pooled_ratios(answers, session.loaded.num_layers)[1]),
                       qa_mean_tokens=rounded(sum(r["generated"] for r in answers) / len(answers), 2))
        rows.append(row)
    report["rows"] = rows
    return report


def print_table(report: dict) -> None:
    print(f"warm-up ablation: {report['method']} at target {report['target_skip']:.2f} on {report['data']} "
          f"({report['n_items']} prompts)" + (f" and {report['qa_data']} ({report['qa_n_items']} questions)" if report["qa_data"] else ""))
    header = f"{'warm-up':>8}{'dec.skip':>9}{'agreement':>10}{'exact':>7}{'rep.4gram':>10}{'qa acc':>8}{'qa agree':>9}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        name = "dense" if r["warm_up"] is None else str(r["warm_up"])
        qa = f"{r['qa_accuracy']:>8.3f}{r['qa_agreement']:>9.3f}" if "qa_accuracy" in r else f"{'-':>8}{'-':>9}"
        print(f"{name:>8}{r['decode_skip_ratio']:>9.3f}{r['agreement']:>10.3f}{r['exact_match']:>7.3f}{r['repeated_4gram']:>10.3f}{qa}")
