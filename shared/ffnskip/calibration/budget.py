"""Calibrate to a quality budget: the largest fixed set of FFNs whose skipping keeps the budget.

The rule ("greedy by measured harm, compensated"): the set grows one FFN at a time; each step
fits every remaining hot FFN's substitute with the chosen set in place and measures its
teacher-forced KL from dense with the whole set in place (selection.py), and the least harmful
joins, while the set's KL keeps the budget. Two FFNs harmless alone can be harmful together,
so nothing is summed: every set is measured. A skipped FFN is replaced by its substitute (a
calibrated bias or linear map: ffnskip.engine.substitutes), or by nothing with `substitute`
None. Then the free-running answers must keep the relative NLL, stepping back one FFN at a
time while they do not. A fixed set is the same for every row of a batch, so each skipped FFN
is a weight read avoided at any batch size, and the ratio the profile records is the one served.

Prompts: substitutes are fitted on one part of the calibration set, candidates measured on
another, and every number the profile keeps is measured again with the decode path on a third
the search never saw; a profile that misses its budget there is stored but only activated when
forced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ffnskip.calibration.quality import Quality, relative_nll
from ffnskip.calibration.scores import token_agreement
from ffnskip.calibration.selection import Selection, select
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.config import Policy, QualityBudget, SkipParams
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class BudgetChoice:
    static_layers: tuple[int, ...]
    order: list[tuple[int, float]]  # the FFNs in the order they joined, with the set's KL then (search prompts)
    quality: Quality  # on the confirmation prompts
    skip_ratio: float
    decode_skip_ratio: float
    agreement: float  # token agreement of the free-running answers with dense's
    within_budget: bool
    substitutes: SubstituteSet | None  # of the skipped FFNs; None: plain skips


def search(runner, fit_prompts: list[str], search_prompts: list[str], confirm_prompts: list[str], cold_start: int,
           cold_end: int, budget: QualityBudget, warm_up: int, substitute: SubstituteKind | None,
           tracker) -> BudgetChoice:
    """`runner`: a CalibrationRunner. The budget's limits apply to the tokens after `warm_up`."""
    fitting = runner.forced(fit_prompts, 1, tracker)
    judging = runner.forced(search_prompts, warm_up, tracker)
    chosen = select(fitting, judging, range(cold_start, cold_end), substitute, cold_end - cold_start,
                    progress=lambda message: tracker.advance(f"budget: {message}"), limit=budget.max_kl)
    log.info("budget search", order=chosen.layers, kl=[round(s.kl.mean, 4) for s in chosen.steps], max_kl=budget.max_kl)

    def params(count: int) -> SkipParams:
        return SkipParams(policy=Policy.STATIC, static_layers=chosen.prefix(count)[0],
                          cold_start=cold_start, cold_end=cold_end, warm_up=warm_up)

    count = len(chosen.layers)
    references = runner.references(search_prompts, tracker) if count else []
    own = [r.nll[warm_up:] for r in references]
    while count > 0:  # the free-running check, stepping back while the answers read worse than allowed
        subs = chosen.prefix(count)[1]
        run = runner.generate(search_prompts, params(count), tracker, f"budget: {count} FFNs, free-running", subs)
        nll = runner.dense_nll(search_prompts, run.tokens, tracker)
        ratio = relative_nll([row[warm_up:] for row in nll], own)
        log.info("budget search", ffns=count, relative_nll=round(ratio, 4), max_relative_nll=budget.max_relative_nll)
        if ratio <= budget.max_relative_nll:
            break
        count -= 1
    return confirm(runner, confirm_prompts, params(count), chosen, count, budget, tracker)


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


def confirm(runner, prompts: list[str], params: SkipParams, chosen: Selection, count: int, budget: QualityBudget,
            tracker) -> BudgetChoice:
    """The chosen set measured on prompts the search never saw, with the decode path: the numbers
    the profile keeps."""
    subs = chosen.prefix(count)[1]
    measured = runner.measure(prompts, params, tracker, subs)
    run = measured.run
    return BudgetChoice(static_layers=params.static_layers,
                        order=[(step.layer, round(step.kl.mean, 5)) for step in chosen.steps],
                        quality=measured.kept, skip_ratio=run.stats.skip_ratio,
                        decode_skip_ratio=run.stats.decode_skip_ratio,
                        agreement=token_agreement(run.tokens, [r.tokens for r in measured.references]),
                        within_budget=budget.kept_by(measured.kept.kl.mean, measured.kept.relative_nll),
                        substitutes=subs)
