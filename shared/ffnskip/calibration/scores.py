"""Quality metrics shared by calibration and evaluation."""

from __future__ import annotations

from collections.abc import Sequence as Seq


def token_agreement(candidates: Seq[Seq[int]], references: Seq[Seq[int]]) -> float:
    """Share of generated tokens equal to the reference's at the same position, pooled;
    a length mismatch counts the missing positions as disagreements."""
    matches = total = 0
    for ours, theirs in zip(candidates, references, strict=True):
        matches += sum(a == b for a, b in zip(ours, theirs))
        total += max(len(ours), len(theirs))
    return matches / total if total else 1.0


def exact_match_rate(candidates: Seq[Seq[int]], references: Seq[Seq[int]]) -> float:
    pairs = list(zip(candidates, references, strict=True))
    return sum(list(a) == list(b) for a, b in pairs) / len(pairs) if pairs else 1.0


def repeated_ngram_share(tokens: Seq[int], n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the sequence (token collapse)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)
