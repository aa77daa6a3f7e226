"""Scoring and statistics: alias accuracy, Wilson 95% intervals,
paired comparisons with an exact McNemar test, pooled skip ratios and agreement."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ffnskip.calibration.scores import exact_match_rate, repeated_ngram_share, token_agreement

Z95 = 1.959964


def is_correct(response: str, aliases: Sequence[str]) -> bool:
    """Any accepted alias appears in the response, case-insensitively (plain substring)."""
    text = response.lower()
    return any(alias.lower() in text for alias in aliases)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% score interval of a proportion; stays inside [0, 1] and is sane at 0 or n."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no 0.9999999999 for n of n
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def paired_counts(reference: Sequence[bool], other: Sequence[bool]) -> dict:
    """Per question: both right, only the reference, only the other, neither; and the exact
    two-sided McNemar p-value on the discordant pairs."""
    if len(reference) != len(other):
        raise ValueError("paired comparison needs the same questions on both sides")
    both = sum(a and b for a, b in zip(reference, other))
    ref_only = sum(a and not b for a, b in zip(reference, other))
    other_only = sum(b and not a for a, b in zip(reference, other))
    return {"both": both, "dense_only": ref_only, "method_only": other_only,
            "neither": len(reference) - both - ref_only - other_only,
            "mcnemar_p": mcnemar_exact(ref_only, other_only)}


def mcnemar_exact(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pooled_ratios(records: Sequence[dict], num_layers: int) -> tuple[float, float]:
    """(skip_ratio, decode_skip_ratio) pooled over items: skipped FFN blocks over L x tokens."""
    generated = sum(r["generated"] for r in records)
    decode = sum(r["decode_tokens"] for r in records)
    skip = sum(r["skipped"] for r in records) / (num_layers * generated) if generated else 0.0
    decode_skip = sum(r["decode_skipped"] for r in records) / (num_layers * decode) if decode else 0.0
    return skip, decode_skip


def agreement_stats(records: Sequence[dict], dense: Sequence[dict]) -> dict:
    ours = [r["tokens"] for r in records]
    theirs = [r["tokens"] for r in dense]
    shares = [repeated_ngram_share(t, 4) for t in ours]
    return {"agreement": token_agreement(ours, theirs), "exact_match": exact_match_rate(ours, theirs),
            "repeated_4gram": sum(shares) / len(shares) if shares else 0.0}


def answer_position(tokens: Sequence[int], aliases: Sequence[str], tokenizer) -> int | None:
    """The number of generated tokens after which an alias first appears in the text (None: never)."""
    for count in range(1, len(tokens) + 1):
        if is_correct(tokenizer.decode(tokens[:count], skip_special_tokens=True), aliases):
            return count
    return None


def rounded(value: float, digits: int = 4) -> float:
    return round(float(value), digits)
