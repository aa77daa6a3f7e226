"""Calibrated settings for the evaluation, cheaper than one `calibrate()` per target:

1. one observe run over two thirds of the calibration prompts (cos(h, h + ffn(h)) per layer
   per decoded token) gives the layer statistics and the cold regions (calibration.py);
2. per (rule, target), tuning.threshold_for picks a threshold for each candidate k from the
   replayed rule, a real run on the held-out third measures it against dense, a mis-hit is
   corrected once (tuning.corrected_threshold), and the candidate closest to the target with the
   highest agreement wins (tuning.best_choice) - the calibrator's own steps, without its warm-up
   search: the warm-up is fixed here for all methods and studied by `ffnskip eval warmup`;
3. ShortGPT's Block Influence per layer, for layer_drop, over the same prompts.

Every product is cached in the state file, keyed by the model and the calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING

from ffnskip.calibration.calibrate import CalibrationRequest, cold_regions, layer_stats
from ffnskip.calibration.scores import token_agreement
from ffnskip.calibration.tuning import (
    TOLERANCE,
    Choice,
    best_choice,
    bisect_threshold,
    candidate_run_lengths,
    corrected_threshold,
    static_candidates,
    threshold_for,
)
from ffnskip.config import DENSE, Policy, SkipParams
from ffnskip.evaluation.methods import window_candidates
from ffnskip.evaluation.state import StateFile, digest_of

if TYPE_CHECKING:
    from ffnskip.calibration.runs import CalibrationRunner

# Part of every cached tuning's digest: a change to how settings are tuned retunes them
# (2: a candidate the replay cannot aim is bisected with real runs, tuning.bisect_threshold).
TUNING_VERSION = 2
Advance = Callable[[str], None]  # called once per generated chunk with the phase name


class Tracker:
    """The `advance(phase)` interface CalibrationRunner reports to."""

    def __init__(self, advance: Advance | None) -> None:
        self._advance = advance

    def advance(self, phase: str, units: int = 1) -> None:
        if self._advance:
            self._advance(phase)


class Calibrator:
    def __init__(self, loaded, prompts: list[str], tokens: int, batch_size: int, state: StateFile,
                 advance: Advance | None = None) -> None:
        self.loaded = loaded
        self.num_layers = loaded.num_layers
        self.request = CalibrationRequest(prompts=tuple(prompts), tokens_per_prompt=tokens, batch_size=batch_size)
        self.state = state
        self.tracker = Tracker(advance)
        self.base = digest_of(loaded.fingerprint, list(prompts), tokens, batch_size)
        self._runner: CalibrationRunner | None = None
        self.measured, self.held = self.request.split()

    @property
    def runner(self) -> CalibrationRunner:  # built on first use: a cached calibration needs no engine
        if self._runner is None:
            from ffnskip.calibration.runs import CalibrationRunner

            self._runner = CalibrationRunner(self.loaded, self.request)
        return self._runner

    def _cached(self, key: str, compute: Callable[[], object], *extra: object):
        digest = digest_of(self.base, *extra)
        value = self.state.get(f"calibration|{key}", digest)
        if value is None:
            value = compute()
            self.state.put(f"calibration|{key}", digest, value)
        return value

    def _has(self, key: str, *extra: object) -> bool:
        return self.state.get(f"calibration|{key}", digest_of(self.base, *extra)) is not None

    @staticmethod
    def _tuned_key(rule: str, target: float, warm_up: int, quorum: float) -> tuple[str, tuple]:
        return f"tuned|{rule}|{target:.4f}|w{warm_up}|q{quorum:g}", (rule, target, warm_up, quorum, TUNING_VERSION)

    def observation(self) -> dict:
        def compute() -> dict:
            similarity = self.runner.observe(self.measured, self.tracker)
            layers = layer_stats(similarity, self.num_layers)
            cold_start, cold_end = cold_regions([s.mean for s in layers])
            return {"similarity": similarity, "layers": [asdict(s) for s in layers],
                    "means": [s.mean for s in layers], "cold_start": cold_start, "cold_end": cold_end}
        return self._cached("observe", compute)

    def dense_held(self) -> list[list[int]]:
        return self._cached("dense_held", lambda: self.runner.generate(
            self.held, DENSE, self.tracker, "calibration: dense reference").tokens)

    def importance(self) -> list[float]:
        from ffnskip.evaluation.layerdrop import block_influence

        def compute() -> list[float]:
            self.tracker.advance("calibration: block influence")
            return block_influence(self.loaded, [self.runner.encoded[p] for p in self.measured])
        return self._cached("block_influence", compute)

    def tuned(self, rule: str, target: float, warm_up: int, quorum: float) -> dict:
        """{"params": SkipParams fields, "held_out": measured ratio and agreement, "tried": [...]}."""
        key, extra = self._tuned_key(rule, target, warm_up, quorum)
        return self._cached(key, lambda: self._tune(rule, target, warm_up, quorum), *extra)

    def _tune(self, rule: str, target: float, warm_up: int, quorum: float) -> dict:
        obs = self.observation()
        similarity, cold_start, cold_end = obs["similarity"], obs["cold_start"], obs["cold_end"]
        policy = Policy(rule) if rule in ("aligned", "static") else Policy.ADAPTIVE
        dense = self.dense_held()
        tried: list[tuple[Choice, SkipParams]] = []

        def measure(a: int, b: int, threshold: float, k: int | None, layers: tuple[int, ...] = ()) -> Choice:
            params = SkipParams(policy=policy, cold_start=a, cold_end=b, threshold=threshold, max_skip=k,
                                warm_up=warm_up, quorum=quorum, static_layers=layers)
            run = self.runner.generate(self.held, params, self.tracker, f"calibration: {rule} @ {target:.2f}")
            choice = Choice(threshold, k, warm_up, run.stats.skip_ratio, run.stats.decode_skip_ratio,
                            token_agreement(run.tokens, dense), layers)
            tried.append((choice, params))
            return choice

        if rule == "static":  # the calibrator's candidate FFN sets, each checked by a real run
            for layers in static_candidates(similarity, target, cold_start, cold_end):
                measure(cold_start, cold_end, 1.0, None, layers)
        else:
            spans: list[tuple[int, int, int | None]]  # (cold_start, cold_end, k)
            if rule == "adaptive_window":
                spans = [(a, b, None) for a, b in window_candidates(obs["means"], target, self.num_layers, cold_start, cold_end)]
            else:
                spans = [(cold_start, cold_end, k) for k in candidate_run_lengths(target, self.num_layers, cold_start, cold_end)]
            for a, b, k in spans:
                threshold = threshold_for(similarity, target, k, a, b)
                if threshold is None:
                    continue
                here = [measure(a, b, threshold, k)]
                if abs(here[0].decode_skip_ratio - target) > TOLERANCE:
                    here.append(measure(a, b, corrected_threshold(similarity, here[0], target, a, b), k))
                if all(abs(c.decode_skip_ratio - target) > TOLERANCE for c in here):
                    bisect_threshold(partial(measure, a, b, k=k), here, target)
            if not tried:  # no candidate reaches the target: skip as much as the hot region allows
                measure(cold_start, cold_end, 1e-6, None)
        best = best_choice([c for c, _ in tried], target)
        params = next(p for c, p in tried if c is best)
        fields = asdict(params)
        fields["static_layers"] = list(fields["static_layers"])
        return {"params": fields,
                "held_out": {"decode_skip_ratio": round(best.decode_skip_ratio, 4), "agreement": round(best.agreement, 4)},
                "tried": [{"cold_start": p.cold_start, "cold_end": p.cold_end, "threshold": c.threshold,
                           "max_skip": c.max_skip, "static_layers": list(c.static_layers),
                           "decode_skip_ratio": c.decode_skip_ratio, "agreement": c.agreement}
                          for c, p in tried]}

    def summary(self) -> dict | None:
        """What the report needs: layer statistics, cold regions, and the layer importances if measured."""
        if not self._has("observe"):
            return None  # e.g. only dense and layer_drop ran: nothing was observed
        obs = self.observation()
        summary = {"prompts": len(self.request.prompts), "measured_prompts": len(self.measured),
                   "held_out_prompts": len(self.held), "tokens_per_prompt": self.request.tokens_per_prompt,
                   "cold_start": obs["cold_start"], "cold_end": obs["cold_end"], "layers": obs["layers"]}
        if self._has("block_influence"):
            summary["block_influence"] = self.importance()
        return summary

    def chunks_to_generate(self, tunings: list[tuple[str, float, int, float]], observe: bool, importance: bool) -> int:
        """About how many chunks the calibration still has to generate (for the time estimate)."""
        chunks = lambda n: -(-n // self.request.batch_size)  # noqa: E731
        todo_tunings = []
        for tuning in tunings:
            key, extra = self._tuned_key(*tuning)
            if not self._has(key, *extra):
                todo_tunings.append(tuning)
        todo = chunks(len(self.measured)) if (observe or todo_tunings) and not self._has("observe") else 0
        if todo_tunings and not self._has("dense_held"):
            todo += chunks(len(self.held))
        if importance and not self._has("block_influence"):
            todo += 1
        return todo + 4 * len(todo_tunings) * chunks(len(self.held))  # about four tuning runs each

