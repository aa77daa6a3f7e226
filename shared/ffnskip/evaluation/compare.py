"""Sentences for docs/RESULTS.md computed from the measured rows: the method ordering per
ratio, the paper comparison, the verdict on the candidate rule, and the headline.

Rule: every number in these sentences comes from the JSON outputs of this run, except the
paper's own figures, which are quoted as the paper's (PAPER) and never mixed with ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ffnskip.evaluation.scoring import mcnemar_exact

PAPER: dict[str, Any] = {  # FFN-SkipLLM (arXiv 2404.03865) as quoted in the project brief
    "quality": "adaptive FFN skipping of LLaMA-2 7B/13B loses under 1 point of factoid-QA accuracy near 25-30% "
               "FFN skip, while random skipping and layer dropping degrade more (Tables 2 and 3)",
    "dense_tok_s": 9.08, "skip20_tok_s": 10.22, "skip30_tok_s": 10.89,
    "speed_setup": "Table 4: RTX A6000, HF Accelerate, batch 1",
}
EQUAL_RATIO = 0.02  # measured decode ratios this close count as "equal ratio"


def find(rows: Sequence[dict], method: str, target: float | None = None) -> dict | None:
    for row in rows:
        if row["method"] == method and not row.get("label") and (target is None or abs(row["target_skip"] - target) < 1e-9):
            return row
    return None


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def points(delta: float) -> str:
    return f"{100 * delta:+.1f} points"


def paired(a: dict, b: dict) -> dict:
    """Questions only a got right, only b got right, and the exact McNemar p (same questions)."""
    right_a, right_b = set(a["correct_ids"]), set(b["correct_ids"])
    only_a, only_b = len(right_a - right_b), len(right_b - right_a)
    return {"only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)}


def ordering(qa_rows: Sequence[dict], agreement_rows: Sequence[dict], targets: Sequence[float]) -> list[str]:
    """Per target: does adaptive >= non_adaptive >= random hold, by QA accuracy and by agreement?"""
    chain = ("adaptive", "non_adaptive", "random")
    lines = []
    for target in targets:
        parts = []
        for name, rows, field in (("QA accuracy", qa_rows, "accuracy"), ("QA-answer agreement", qa_rows, "agreement"),
                                  ("prompt agreement", agreement_rows, "agreement")):
            found = [r for r in (find(rows, m, target) for m in chain) if r is not None]
            if len(found) < len(chain):
                continue
            values = [r[field] for r in found]
            holds = values[0] >= values[1] >= values[2]
            text = " >= ".join(f"{m} {v:.3f}" for m, v in zip(chain, values)) if holds else \
                ", ".join(f"{m} {v:.3f}" for m, v in zip(chain, values))
            parts.append(f"{name}: {'holds' if holds else 'does not hold'} ({text})")  # ties count as holding
        adaptive, random = find(qa_rows, "adaptive", target), find(qa_rows, "random", target)
        if adaptive and random:
            test = paired(adaptive, random)
            parts.append(f"adaptive vs random per question: {test['only_a']} only adaptive right, {test['only_b']} only random "
                         f"right (McNemar p = {test['p']:.2f})")
        if parts:
            lines.append(f"- target {target:.2f}: " + "; ".join(parts) + ".")
    return lines


def quality_vs_paper(qa_rows: Sequence[dict], targets: Sequence[float]) -> list[str]:
    dense = find(qa_rows, "dense")
    if dense is None:
        return []
    lines = [f"- Paper: {PAPER['quality']}.",
             f"- Here: dense answers {pct(dense['accuracy'])} of {dense['n']} questions "
             f"(95% CI {pct(dense['ci95'][0])} to {pct(dense['ci95'][1])})."]
    near = [t for t in targets if 0.2 <= t <= 0.35] or list(targets)
    for target in near:
        adaptive = find(qa_rows, "adaptive", target)
        if adaptive is None:
            continue
        delta = adaptive["accuracy"] - dense["accuracy"]
        pair = adaptive["paired_vs_dense"]
        verdict = "within the paper's 1-point loss" if delta > -0.01 else "a larger loss than the paper's under 1 point"
        others = []
        for method in ("random", "non_adaptive", "layer_drop"):
            row = find(qa_rows, method, target)
            if row is not None:
                others.append(f"{method} {points(row['accuracy'] - dense['accuracy'])} at {row['decode_skip_ratio']:.3f}")
        lines.append(
            f"- Here at target {target:.2f}: adaptive skips {adaptive['decode_skip_ratio']:.3f} of decode FFN blocks and scores "
            f"{pct(adaptive['accuracy'])} ({points(delta)}; {pair['dense_only']} questions lost, {pair['method_only']} gained, "
            f"McNemar p = {pair['mcnemar_p']:.2f}): {verdict}. Same target: " + ("; ".join(others) or "no baselines") + ".")
    return lines


def speed_vs_paper(bench: dict | None) -> list[str]:
    p = PAPER
    lines = [f"- Paper ({p['speed_setup']}): {p['dense_tok_s']} tok/s dense, {p['skip20_tok_s']} at about 20% skip "
             f"(x{p['skip20_tok_s'] / p['dense_tok_s']:.3f}), "
             f"{p['skip30_tok_s']} at about 30% (x{p['skip30_tok_s'] / p['dense_tok_s']:.3f})."]
    if not bench:
        return lines + ["- Here: no bench output was given to the report."]
    rows = skip_rows(bench, batch=1) or skip_rows(bench)
    dense = next((r for r in bench["rows"] if r["policy"] == "dense" and r["batch"] == (rows[0]["batch"] if rows else 1)), None)
    if dense is None:
        return lines
    for goal in (0.2, 0.3):
        best = min(rows, key=lambda r: abs(r["skip_ratio"] - goal), default=None)
        if best is None:
            continue
        realised = f", {best['realised_fraction']:.2f} of the ideal realised" if best.get("realised_fraction") is not None else ""
        lines.append(f"- Here, the bench row closest to {goal:.0%} skip ({best['policy']}, batch {best['batch']}, measured skip "
                     f"{best['skip_ratio']:.3f}): {dense['tokens_per_s']:.1f} -> {best['tokens_per_s']:.1f} tok/s "
                     f"(x{best['speedup_vs_dense']:.3f}; ideal x{best['ideal_speedup']:.3f}{realised}).")
    return lines


def skip_rows(bench: dict, batch: int | None = None) -> list[dict]:
    """Bench rows that really skipped something (at one batch size if given)."""
    return [r for r in bench["rows"] if r["policy"] not in ("dense", "hf_generate") and r["skip_ratio"] > 0
            and (batch is None or r["batch"] == batch)]


def ordering_summary(qa_rows: Sequence[dict], agreement_rows: Sequence[dict], targets: Sequence[float]) -> str:
    lines = ordering(qa_rows, agreement_rows, targets)
    by_acc = sum("QA accuracy: holds" in line for line in lines)
    by_agree = sum("prompt agreement: holds" in line for line in lines)
    return (f"adaptive >= non_adaptive >= random held at {by_acc} of {len(lines)} ratios by QA accuracy"
            + (f" and at {by_agree} of {len(lines)} by prompt agreement" if agreement_rows else ""))


def window_verdict(qa_rows: Sequence[dict], agreement_rows: Sequence[dict], targets: Sequence[float]) -> tuple[list[str], bool]:
    """adaptive_window vs adaptive at equal measured ratio: better on QA accuracy and agreement?"""
    lines, wins, compared = [], 0, 0
    for target in targets:
        a, w = find(qa_rows, "adaptive", target), find(qa_rows, "adaptive_window", target)
        if a is None or w is None:
            continue
        pa, pw = find(agreement_rows, "adaptive", target), find(agreement_rows, "adaptive_window", target)
        gap = w["decode_skip_ratio"] - a["decode_skip_ratio"]
        # prompt rows count only when both methods have them
        equal = abs(gap) <= EQUAL_RATIO and (pa is None or pw is None
                                             or abs(pw["decode_skip_ratio"] - pa["decode_skip_ratio"]) <= EQUAL_RATIO)
        better_acc = w["accuracy"] >= a["accuracy"]
        better_agree = w["agreement"] > a["agreement"] and (pa is None or pw is None
                                                            or pw["agreement"] > pa["agreement"])
        compared += 1
        win = equal and better_acc and better_agree
        wins += win
        test = paired(w, a)
        prompt_part = f", prompt agreement {pw['agreement']:.3f} vs {pa['agreement']:.3f}" if pa and pw else ""
        lines.append(
            f"- target {target:.2f}: measured decode skip {w['decode_skip_ratio']:.3f} vs {a['decode_skip_ratio']:.3f} "
            f"({'equal' if equal else 'not equal'} within {EQUAL_RATIO}); QA accuracy {pct(w['accuracy'])} vs {pct(a['accuracy'])} "
            f"({test['only_a']} only window right, {test['only_b']} only adaptive right, p = {test['p']:.2f}); QA-answer agreement "
            f"{w['agreement']:.3f} vs {a['agreement']:.3f}{prompt_part}: {'better on both' if win else 'not better on both'}.")
    keep = compared > 0 and wins == compared
    return lines, keep


def headline(qa: dict, agreement: dict | None, bench: dict | None, targets: Sequence[float]) -> list[str]:
    rows = qa["rows"]
    dense = find(rows, "dense")
    out = []
    if dense:
        out.append(f"dense {qa['model']} answers {pct(dense['accuracy'])} of {dense['n']} factoid questions "
                   f"(95% CI {pct(dense['ci95'][0])}-{pct(dense['ci95'][1])})")
    for target in targets:
        a = find(rows, "adaptive", target)
        if a and dense:
            agree = find(agreement["rows"], "adaptive", target) if agreement else None
            extra = f", prompt agreement {agree['agreement']:.3f}" if agree else ""
            out.append(f"adaptive at {a['decode_skip_ratio']:.3f} decode skip: {pct(a['accuracy'])} "
                       f"({points(a['accuracy'] - dense['accuracy'])}), QA-answer agreement {a['agreement']:.3f}{extra}")
    if bench:
        best = max(skip_rows(bench, batch=1), key=lambda r: r["speedup_vs_dense"], default=None)
        if best:
            out.append(f"fastest bench row at batch 1: {best['policy']} x{best['speedup_vs_dense']:.3f} over dense at "
                       f"{best['skip_ratio']:.3f} skip (ideal x{best['ideal_speedup']:.3f})")
    return out
