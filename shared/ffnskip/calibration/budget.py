"""Calibrate to a quality budget: the largest fixed set of FFNs whose skipping keeps the budget.

The rule ("static by measured harm"): skip each hot FFN alone on the search prompts and
measure its teacher-forced KL from dense, order the FFNs from least to most harmful, and
take the longest prefix of that order whose skipping, run for real with the served warm-up,
keeps both limits of the budget. Harm adds up roughly, so the KL grows with the prefix and
the longest prefix is found by doubling and then bisecting. A fixed set is the same for every
row of a batch, so each skipped FFN is a weight read avoided at any batch size, and the ratio
the profile records is the one served.

Every number the profile keeps is measured again on confirmation prompts the search never
saw; a profile that misses its budget there is stored but only activated when forced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ffnskip.calibration.quality import Quality, Reference, pooled, relative_nll
from ffnskip.calibration.scores import token_agreement
from ffnskip.config import Policy, QualityBudget, SkipParams
from ffnskip.logs import get_logger

log = get_logger(__name__)

@dataclass(frozen=True)
class BudgetChoice:
    static_layers: tuple[int, ...]
    harm: dict[int, float]  # each hot FFN skipped alone: its teacher-forced KL on the search prompts
    quality: Quality  # on the confirmation prompts
    skip_ratio: float
    decode_skip_ratio: float
    agreement: float  # token agreement of the free-running answers with dense's
    within_budget: bool


def search_runs(hot_layers: int) -> int:
    """Batches of generation the search costs per batch of prompts, at most (for progress)."""
    return 1 + hot_layers + 2 * math.ceil(math.log2(hot_layers + 1)) + 2 * 3 + 4


def search(runner, search_prompts: list[str], confirm_prompts: list[str], cold_start: int, cold_end: int,
           budget: QualityBudget, warm_up: int, tracker) -> BudgetChoice:
    """`runner`: a CalibrationRunner. The budget's limits apply to the tokens after `warm_up`."""
    references = runner.references(search_prompts, tracker)
    harm = layer_harm(runner, search_prompts, references, cold_start, cold_end, tracker)
    order = sorted(harm, key=lambda layer: (harm[layer], layer))

    def params(count: int) -> SkipParams:
        return SkipParams(policy=Policy.STATIC, static_layers=tuple(sorted(order[:count])),
                          cold_start=cold_start, cold_end=cold_end, warm_up=warm_up)

    def kl_within(count: int) -> bool:
        scores = runner.divergence(search_prompts, references, params(count), tracker, f"budget: {count} FFNs")
        kl = pooled([row[warm_up:] for row in scores.kl]).mean
        log.info("budget search", ffns=count, kl=round(kl, 4), max_kl=budget.max_kl)
        return kl <= budget.max_kl

    count = longest_prefix(kl_within, len(order))
    own = [r.nll[warm_up:] for r in references]
    while count > 0:  # the free-running check, stepping back while the answers read worse than allowed
        run = runner.generate(search_prompts, params(count), tracker, f"budget: {count} FFNs, free-running")
        nll = runner.dense_nll(search_prompts, run.tokens, tracker)
        ratio = relative_nll([row[warm_up:] for row in nll], own)
        log.info("budget search", ffns=count, relative_nll=round(ratio, 4), max_relative_nll=budget.max_relative_nll)
        if ratio <= budget.max_relative_nll:
            break
        count -= 1
    return confirm(runner, confirm_prompts, params(count), harm, budget, tracker)


def longest_prefix(within: Callable[[int], bool], limit: int) -> int:
    """The largest n in [0, limit] with within(n), for a within() that holds up to some n and
    fails after it (n = 0, nothing skipped, holds by definition): doubling, then bisecting."""
    good, bad = 0, limit + 1  # within(good) holds; bad: the smallest n known to fail
    probe = 1
    while probe <= limit:
        if not within(probe):
            bad = probe
            break
        good = probe
        if probe == limit:
            return limit
        probe = min(2 * probe, limit)
    while bad - good > 1:
        middle = (good + bad) // 2
        if within(middle):
            good = middle
        else:
            bad = middle
    return good


def layer_harm(runner, prompts: list[str], references: list[Reference], cold_start: int, cold_end: int,
               tracker) -> dict[int, float]:
    """Teacher-forced KL of skipping each hot FFN alone on every token (no warm-up)."""
    harm = {}
    for layer in range(cold_start, cold_end):
        skip = SkipParams(policy=Policy.STATIC, static_layers=(layer,), cold_start=cold_start, cold_end=cold_end, warm_up=0)
        harm[layer] = pooled(runner.divergence(prompts, references, skip, tracker, f"harm of FFN {layer}").kl).mean
    return harm


def confirm(runner, prompts: list[str], params: SkipParams, harm: dict[int, float], budget: QualityBudget,
            tracker) -> BudgetChoice:
    """The chosen set measured on prompts the search never saw: the numbers the profile keeps."""
    measured = runner.measure(prompts, params, tracker)
    run = measured.run
    return BudgetChoice(static_layers=params.static_layers, harm=harm, quality=measured.kept,
                        skip_ratio=run.stats.skip_ratio, decode_skip_ratio=run.stats.decode_skip_ratio,
                        agreement=token_agreement(run.tokens, [r.tokens for r in measured.references]),
                        within_budget=budget.kept_by(measured.kept.kl.mean, measured.kept.relative_nll))
