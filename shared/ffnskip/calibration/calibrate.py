"""Calibration: measure cos(h, h + ffn(h)) per layer in observe mode, find the cold
regions, and tune threshold / max_skip / warm_up with real skip runs to a target
decode skip ratio. Produces a Profile (version 0; the store assigns the version).

Steps (each deterministic for a given model and prompt set):
1. Split the prompts: two thirds to measure, one third held back for tuning.
2. Observe: generate up to `tokens_per_prompt` tokens per measured prompt, batched,
   recording the similarity of every layer for every decoded token.
3. Cold regions (`cold_regions`): the first and last layers are always cold; the cold
   run at each end extends while a layer's mean similarity stays below the band
   `median - COLD_MARGIN` of the per-layer means.
4. Tuning (`tuning.py`), by the requested policy:
   - adaptive: for candidate run lengths k, choose the threshold whose predicted
     ratio (the rule replayed on the recorded similarities) meets the target, run
     each candidate for real on the held-out prompts against dense, correct the
     threshold from the measured ratio, and keep the candidate within tolerance of
     the target with the highest agreement with dense;
   - static: a few fixed FFN sets of the target's size chosen from the recorded
     similarities, each run for real; the highest agreement with dense wins.
   Then the warm-up, by real runs at 8, 16 and 32 tokens.
   - a quality budget instead of a target (`budget.py`): the static policy's FFN set, the
     longest prefix of the FFNs ordered by measured harm that keeps the budget, searched on
     the held-back prompts and confirmed on measured ones.
5. Quality (`quality.py`): teacher-forced KL and same-top-token against dense and the
   relative NLL of the free-running answers, after the warm-up, recorded in the profile.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.config import Policy, QualityBudget
from ffnskip.errors import Cancelled, InvalidArgument

if TYPE_CHECKING:
    from ffnskip.profile import Profile

MAX_PROMPTS = 512
DEFAULT_SUBSTITUTE = "lowrank64"
CALIBRATED_POLICIES = (Policy.ADAPTIVE, Policy.STATIC)  # what a profile can be tuned for
COLD_MARGIN = 0.03  # a layer this far below the median layer's mean similarity is cold
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class CalibrationRequest:
    prompts: tuple[str, ...]
    target_skip_ratio: float = 0.25
    tokens_per_prompt: int = 128
    batch_size: int = 16  # a batch step costs little more than a single one: bandwidth-bound
    job_id: str = ""
    model_id: str = ""  # recorded in the profile; defaults to the loaded model's spec
    chat: bool = True  # send prompts through the chat template (the serving regime)
    policy: Policy | None = None  # one of CALIBRATED_POLICIES (a name is accepted); None: static
    # with a budget, else adaptive
    quality_budget: QualityBudget | None = None  # the objective instead of target_skip_ratio
    # with a budget: what replaces a skipped FFN: "plain" (nothing), "bias", "lowrankR", "linear"
    substitute: str = DEFAULT_SUBSTITUTE

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InvalidArgument("prompts", "the calibration set is empty")
        if len(self.prompts) > MAX_PROMPTS:
            raise InvalidArgument("prompts", f"at most {MAX_PROMPTS} prompts, got {len(self.prompts)}")
        if len(self.prompts) < 3:
            raise InvalidArgument("prompts", f"need at least 3 prompts (two measured, one held back), got {len(self.prompts)}")
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise InvalidArgument("prompts", "every prompt must be a non-empty string")
        if not (0.0 < self.target_skip_ratio <= 0.9):
            raise InvalidArgument("target_skip_ratio", f"must be in (0, 0.9], got {self.target_skip_ratio}")
        if not (8 <= self.tokens_per_prompt <= 1024):
            raise InvalidArgument("tokens_per_prompt", f"must be in [8, 1024], got {self.tokens_per_prompt}")
        if self.policy is None:
            object.__setattr__(self, "policy", Policy.ADAPTIVE if self.quality_budget is None else Policy.STATIC)
        if self.policy not in CALIBRATED_POLICIES:
            raise InvalidArgument("policy", f"must be one of {', '.join(CALIBRATED_POLICIES)}, got {self.policy!r}")
        object.__setattr__(self, "policy", Policy(self.policy))
        if self.quality_budget is not None and self.policy is not Policy.STATIC:
            raise InvalidArgument("policy", f"a quality budget calibrates the static policy's FFN set, got {self.policy}")
        try:
            self.substitute_kind()
        except ValueError as err:
            raise InvalidArgument("substitute", f"{err} (plain, bias, lowrankR or linear)") from None
        if not (1 <= self.batch_size <= 64):
            raise InvalidArgument("batch_size", f"must be in [1, 64], got {self.batch_size}")

    def substitute_kind(self) -> SubstituteKind | None:
        """The substitute to fit for each skipped FFN; None for plain skips."""
        return None if self.substitute == "plain" else SubstituteKind.parse(self.substitute)

    def split(self) -> tuple[list[str], list[str]]:
        """(measured, held back): every third prompt is held back for the tuning runs."""
        measured = [p for i, p in enumerate(self.prompts) if i % 3 != 2]
        held = [p for i, p in enumerate(self.prompts) if i % 3 == 2]
        return measured, held


@dataclass(frozen=True)
class CalibrationOutcome:
    profile: Profile  # version 0
    plot_png: bytes
    # the substitutes of the skipped FFNs (SubstituteSet.to_bytes), whose digest, size, kind and
    # layers the profile's `substitutes` records; None when the profile skips plainly
    substitutes: bytes | None = None


class Progress:
    """Forwards (phase, done, total) and checks for cancellation between batches."""

    def __init__(self, report: ProgressFn | None, should_cancel: CancelFn | None, total: int) -> None:
        self.report, self.should_cancel, self.total, self.done = report, should_cancel, total, 0

    def advance(self, phase: str, units: int = 1) -> None:
        if self.should_cancel and self.should_cancel():
            raise Cancelled("calibration cancelled")
        self.done += units
        if self.report:
            self.report(phase, min(self.done, self.total), self.total)


def calibrate(loaded, request: CalibrationRequest, progress: ProgressFn | None = None,
              should_cancel: CancelFn | None = None) -> CalibrationOutcome:
    """Raises ffnskip.errors.Cancelled when should_cancel() becomes true between batches."""
    from ffnskip.calibration.budget import search
    from ffnskip.calibration.plots import plot_layer_similarity
    from ffnskip.calibration.runs import CalibrationRunner
    from ffnskip.calibration.tuning import BASE_WARM_UP, Choice, choice_params, tune
    from ffnskip.datasets import digest
    from ffnskip.engine.substitutes import blob_digest
    from ffnskip.profile import Profile, utc_now_iso

    assert request.policy is not None  # made a Policy by CalibrationRequest itself
    policy = request.policy
    measured, held = request.split()
    runner = CalibrationRunner(loaded, request)
    batches = lambda n: -(-n // request.batch_size)  # noqa: E731
    budget = request.quality_budget
    fit, confirm = measured[1::2], measured[::2]
    later = (batches(len(held)) * 4 + batches(len(fit)) + loaded.num_layers + batches(len(confirm)) * 4 if budget
             else batches(len(held)) * 13)
    tracker = Progress(progress, should_cancel, total=batches(len(measured)) + later)
    similarity = runner.observe(measured, tracker)
    layers = layer_stats(similarity, loaded.num_layers)
    cold_start, cold_end = cold_regions([s.mean for s in layers])
    substitutes: dict = {}
    blob: bytes | None = None
    if budget is not None:
        kind = request.substitute_kind()
        found = search(runner, fit, held, confirm, cold_start, cold_end, budget, BASE_WARM_UP, kind, tracker)
        choice = Choice(1.0, None, BASE_WARM_UP, found.skip_ratio, found.decode_skip_ratio, found.agreement,
                        found.static_layers)
        kept = found.quality
        quality_record = {**quality_fields(kept), **budget.to_dict(), "within_budget": found.within_budget}
        if found.substitutes is not None and kind is not None:
            blob = found.substitutes.to_bytes()
            substitutes = {"kind": kind.kind, "layers": sorted(found.substitutes.layers), "bytes": len(blob),
                           "digest": blob_digest(blob)}
    else:
        choice = tune(runner, similarity, held, cold_start, cold_end, request.target_skip_ratio, tracker, policy=policy)
        kept = runner.measure(held, choice_params(policy, choice, cold_start, cold_end), tracker).kept
        # measured against the default budget like any profile, never assumed within it
        default = QualityBudget()
        quality_record = {**quality_fields(kept), **default.to_dict(),
                          "within_budget": default.kept_by(kept.kl.mean, kept.relative_nll)}
    static = policy is Policy.STATIC
    profile = Profile(
        model_id=request.model_id or loaded.model_id, fingerprint=loaded.fingerprint, version=0,
        created_at=utc_now_iso(), job_id=request.job_id,
        calibration={"digest": digest(list(request.prompts)), "size": len(request.prompts),
                     "tokens_per_prompt": request.tokens_per_prompt},
        num_layers=loaded.num_layers, layers=layers, cold_start=cold_start, cold_end=cold_end,
        policy=policy, threshold=choice.threshold, max_skip=choice.max_skip, warm_up=choice.warm_up,
        static_layers=tuple(choice.static_layers), target_skip_ratio=request.target_skip_ratio,
        measured_skip_ratio=choice.skip_ratio, measured_decode_skip_ratio=choice.decode_skip_ratio,
        measured_agreement=choice.agreement, quality=quality_record, substitutes=substitutes,
    )
    title = f"{profile.model_id}: cos(h, h + ffn(h)) per layer, {len(measured)} prompts"
    plot = plot_layer_similarity(layers, cold_start, cold_end, title, threshold=None if static else choice.threshold,
                                 skipped=choice.static_layers)
    return CalibrationOutcome(profile=profile, plot_png=plot, substitutes=blob)


def quality_fields(kept) -> dict:
    """A Quality as the profile's `quality` numbers (bounded: JSON has no infinity)."""
    return {"kl": round(min(kept.kl.mean, 1e6), 6), "top_match": round(kept.top_match.mean, 6),
            "relative_nll": round(min(kept.relative_nll, 1e6), 6)}


def layer_stats(similarity: list[list[float]], num_layers: int):
    """Per-layer statistics over every recorded token (rows of `similarity`)."""
    from ffnskip.profile import LayerStats

    stats = []
    for layer in range(num_layers):
        # a cosine of float32 vectors can land a hair outside [-1, 1] (an FFN that outputs zero
        # gives 1.0000001), and so can the mean of many; the profile holds true cosines
        values = sorted(min(1.0, max(-1.0, row[layer])) for row in similarity)
        if not values:
            raise InvalidArgument("prompts", "no decoded tokens to measure (every answer ended at once)")
        q = partial(_nearest_rank, values)
        stats.append(LayerStats(
            layer=layer, mean=min(values[-1], max(values[0], statistics.fmean(values))), std=statistics.pstdev(values), min=values[0],
            p05=q(0.05), p25=q(0.25), p50=q(0.5), p75=q(0.75), p95=q(0.95), max=values[-1], count=len(values),
        ))
    return stats


def _nearest_rank(values: list[float], f: float) -> float:
    """The `f` quantile (0..1) of sorted `values`, by nearest rank."""
    return values[min(len(values) - 1, int(f * (len(values) - 1) + 0.5))]


def cold_regions(means: list[float]) -> tuple[int, int]:
    """(cold_start, cold_end): layers [0, cold_start) and [cold_end, L) are never skipped."""
    floor = statistics.median(means) - COLD_MARGIN
    cold_start, cold_end = 1, len(means) - 1  # the first and last layers are always cold
    while cold_start < cold_end - 1 and means[cold_start] < floor:
        cold_start += 1
    while cold_end - 1 > cold_start and means[cold_end - 1] < floor:
        cold_end -= 1
    return cold_start, cold_end
