"""Tune a profile's skip parameters to a target decode skip ratio with real runs.

adaptive: prediction replays the rule on similarities recorded in observe mode (a
token fires at its first hot layer with cos >= threshold and skips the next k hot
layers) to pick (threshold, max_skip) candidates.
static: the candidates are fixed sets of round(target * L) hot-layer FFNs whose
recorded change of the hidden state is smallest (by mean, by 5th percentile, or as
one contiguous stretch); batch-friendly, since every row skips the same FFNs.

Either way the prediction only picks candidates: every number kept in the profile
is measured by a real skip run on held-back prompts against dense, and the warm-up
is chosen by real runs too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ffnskip.calibration.scores import token_agreement
from ffnskip.config import DENSE, Policy, SkipParams
from ffnskip.logs import get_logger

log = get_logger(__name__)

TOLERANCE = 0.02  # measured decode ratio this close to the target needs no correction
FIRE_RATES = (1.0, 0.8)  # candidate k = target * L / rate: fire on every token, or most
WARM_UPS = (8, 16, 32)
BASE_WARM_UP = 16
AGREEMENT_SLACK = 0.02  # the smallest warm-up whose agreement is this close to the best wins


@dataclass(frozen=True)
class Choice:
    threshold: float
    max_skip: int | None
    warm_up: int
    skip_ratio: float
    decode_skip_ratio: float
    agreement: float
    static_layers: tuple[int, ...] = ()  # the static policy's FFNs; empty for adaptive


def choice_params(policy: Policy, choice: Choice, cold_start: int, cold_end: int) -> SkipParams:
    """The skip parameters a tuning choice stands for under `policy` (static or adaptive)."""
    if policy is Policy.STATIC:
        return SkipParams(policy=policy, static_layers=choice.static_layers, cold_start=cold_start, cold_end=cold_end,
                          warm_up=choice.warm_up)
    return SkipParams(policy=policy, threshold=choice.threshold, max_skip=choice.max_skip, cold_start=cold_start,
                      cold_end=cold_end, warm_up=choice.warm_up)


def predicted_ratio(similarity: list[list[float]], threshold: float, k: int | None, cold_start: int, cold_end: int) -> float:
    num_layers = len(similarity[0])
    skipped = 0
    for row in similarity:
        for layer in range(cold_start, cold_end):
            if row[layer] >= threshold:
                remaining = cold_end - layer - 1
                skipped += remaining if k is None else min(k, remaining)
                break
    return skipped / (len(similarity) * num_layers)


def threshold_for(similarity, target: float, k: int | None, cold_start: int, cold_end: int) -> float | None:
    """The highest threshold whose predicted ratio reaches `target`, or None if k cannot."""
    if predicted_ratio(similarity, 1e-6, k, cold_start, cold_end) < target:
        return None
    low, high = 1e-6, 1.0  # ratio(low) >= target > ratio(high) (or ratio(1.0) >= target)
    if predicted_ratio(similarity, high, k, cold_start, cold_end) >= target:
        return high
    for _ in range(40):
        middle = (low + high) / 2
        if predicted_ratio(similarity, middle, k, cold_start, cold_end) >= target:
            low = middle
        else:
            high = middle
    return round(low, 6)


def static_layer_count(target: float, num_layers: int, cold_start: int, cold_end: int) -> int:
    return min(cold_end - cold_start, max(1, int(target * num_layers + 0.5)))


def static_candidates(similarity, target: float, cold_start: int, cold_end: int) -> list[tuple[int, ...]]:
    """FFN sets of the target's size that change the hidden state least on the calibration set:
    highest mean similarity, highest 5th percentile (rarely a large change), and the contiguous
    stretch of highest mean. Duplicates removed, order kept."""
    num_layers = len(similarity[0])
    count = static_layer_count(target, num_layers, cold_start, cold_end)
    hot = range(cold_start, cold_end)
    columns = {layer: sorted(row[layer] for row in similarity) for layer in hot}
    mean = {layer: sum(values) / len(values) for layer, values in columns.items()}
    p05 = {layer: values[int(0.05 * (len(values) - 1) + 0.5)] for layer, values in columns.items()}
    by_mean = tuple(sorted(sorted(hot, key=lambda i: (-mean[i], i))[:count]))
    by_p05 = tuple(sorted(sorted(hot, key=lambda i: (-p05[i], i))[:count]))
    start = max(range(cold_start, cold_end - count + 1), key=lambda a: (sum(mean[i] for i in range(a, a + count)), -a))
    stretch = tuple(range(start, start + count))
    return list(dict.fromkeys([by_mean, by_p05, stretch]))


def candidate_run_lengths(target: float, num_layers: int, cold_start: int, cold_end: int) -> list[int | None]:
    hot = cold_end - cold_start
    ks = sorted({min(hot - 1, max(1, math.ceil(target * num_layers / rate))) for rate in FIRE_RATES})
    return ks + [None]


def tune(runner, similarity, held: list[str], cold_start: int, cold_end: int, target: float, tracker,
         policy: Policy = Policy.ADAPTIVE) -> Choice:
    dense = runner.generate(held, DENSE, tracker, "dense reference").tokens
    num_layers = len(similarity[0])

    def measure(threshold: float, k: int | None, warm_up: int, layers: tuple[int, ...] = ()) -> Choice:
        params = choice_params(policy, Choice(threshold, k, warm_up, 0.0, 0.0, 0.0, layers), cold_start, cold_end)
        phase = (f"tuning static {list(layers)} warm_up={warm_up}" if policy is Policy.STATIC
                 else f"tuning k={k} threshold={threshold:.4f} warm_up={warm_up}")
        run = runner.generate(held, params, tracker, phase)
        choice = Choice(threshold, k, warm_up, run.stats.skip_ratio, run.stats.decode_skip_ratio,
                        token_agreement(run.tokens, dense), layers)
        log.info("tuning run", policy=policy, threshold=threshold, max_skip=k, static_layers=list(layers), warm_up=warm_up,
                 target=target, decode_skip_ratio=round(choice.decode_skip_ratio, 4), agreement=round(choice.agreement, 4),
                 predicted=None if policy == "static" else round(predicted_ratio(similarity, threshold, k, cold_start, cold_end), 4))
        return choice

    tried: list[Choice] = []
    if policy == "static":
        tried = [measure(1.0, None, BASE_WARM_UP, layers) for layers in static_candidates(similarity, target, cold_start, cold_end)]
    else:
        for k in candidate_run_lengths(target, num_layers, cold_start, cold_end):
            threshold = threshold_for(similarity, target, k, cold_start, cold_end)
            if threshold is None:
                continue
            choice = measure(threshold, k, BASE_WARM_UP)
            tried.append(choice)
            if abs(choice.decode_skip_ratio - target) > TOLERANCE:
                tried.append(measure(corrected_threshold(similarity, choice, target, cold_start, cold_end), k, BASE_WARM_UP))
        if not tried:  # nothing can reach the target: skip as much as the hot region allows
            tried.append(measure(1e-6, None, BASE_WARM_UP))
    best = best_choice(tried, target)
    by_warm_up = {BASE_WARM_UP: best}
    for warm_up in WARM_UPS:
        if warm_up not in by_warm_up:
            by_warm_up[warm_up] = measure(best.threshold, best.max_skip, warm_up, best.static_layers)
    top = max(c.agreement for c in by_warm_up.values() if abs(c.decode_skip_ratio - target) <= 0.03 or c is best)
    return min((c for c in by_warm_up.values() if c.agreement >= top - AGREEMENT_SLACK and abs(c.decode_skip_ratio - target) <= 0.03),
               key=lambda c: c.warm_up, default=best)


def corrected_threshold(similarity, measured: Choice, target: float, cold_start: int, cold_end: int) -> float:
    """Aim the prediction at target + (target - measured): real runs drift from the replay."""
    ceiling = predicted_ratio(similarity, 1e-6, measured.max_skip, cold_start, cold_end)
    aim = min(0.95 * ceiling, max(1e-3, 2 * target - measured.decode_skip_ratio))  # stay inside what k can reach
    threshold = threshold_for(similarity, aim, measured.max_skip, cold_start, cold_end)
    return threshold if threshold is not None else 1e-6


def best_choice(tried: list[Choice], target: float) -> Choice:
    """Highest agreement among the candidates within tolerance of the target, else the closest."""
    close = [c for c in tried if abs(c.decode_skip_ratio - target) <= 0.03]
    if close:
        return max(close, key=lambda c: (c.agreement, -abs(c.decode_skip_ratio - target)))
    return min(tried, key=lambda c: abs(c.decode_skip_ratio - target))


BISECT_RUNS = 6  # real runs spent on one candidate the replay cannot aim


def bisect_threshold(run: Callable[[float], Choice], tried: list[Choice], target: float) -> None:
    """Bisect the threshold with real runs until the measured ratio is within tolerance: the
    replay predicts per-row fires, which `aligned` at a high quorum turns into far fewer skips.
    A higher threshold fires less, so the ratio falls as the threshold rises; until some run
    skips enough, the threshold steps down from the lowest one tried (0.02, 0.04, ...)."""
    above = [c.threshold for c in tried if c.decode_skip_ratio > target]
    below = [c.threshold for c in tried if c.decode_skip_ratio < target]
    low: float | None = max(above) if above else None
    high, step = min(below, default=1.0), 0.02
    for _ in range(BISECT_RUNS):
        if low is None:
            middle, step = max(1e-6, high - step), step * 2
        else:
            middle = (low + high) / 2
        choice = run(middle)
        if abs(choice.decode_skip_ratio - target) <= TOLERANCE:
            return
        if choice.decode_skip_ratio > target:
            low = middle
        else:
            high = middle
