"""Greedy selection of the FFNs to skip, by measured harm, re-measured after every choice.

Single-layer harms do not add up: two FFNs that are harmless alone can be harmful together. So
the set grows one FFN at a time, and each step measures every remaining candidate with the
chosen set in place: the candidate's substitute is fitted on activations taken with the chosen
FFNs skipped and substituted (fit prompts), and its teacher-forced KL from dense is measured
with the whole set in place (selection prompts, disjoint from the fit prompts, so a substitute
that only memorised its data is not preferred). The candidate that raises the KL least joins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ffnskip.calibration.forced import ForcedForward, kl_rows
from ffnskip.calibration.quality import Estimate, pooled
from ffnskip.calibration.substitutes import SubstituteKind, fit
from ffnskip.engine.substitutes import Substitute, SubstituteSet


@dataclass(frozen=True)
class Step:
    """One greedy step: the FFN that joined, the set's KL with it, and every candidate's KL."""

    layer: int
    kl: Estimate
    candidates: dict[int, float]


@dataclass
class Selection:
    """The chosen FFNs in the order they joined, with their substitutes (none for plain skips)."""

    steps: list[Step] = field(default_factory=list)
    substitutes: dict[int, Substitute] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return [step.layer for step in self.steps]

    def prefix(self, count: int) -> tuple[tuple[int, ...], SubstituteSet | None]:
        """The first `count` chosen FFNs (sorted) and their substitutes."""
        layers = tuple(sorted(self.layers[:count]))
        subs = {layer: self.substitutes[layer] for layer in layers if layer in self.substitutes}
        return layers, SubstituteSet(subs) if subs else None


def grow(candidates: Sequence[int], steps: int,
         measure: Callable[[list[int], list[int]], dict[int, Estimate]],
         progress: Callable[[str], None] = lambda _: None, limit: float = math.inf) -> list[Step]:
    """The greedy loop: `measure(chosen, remaining)` gives each remaining candidate's KL with the
    chosen set and itself in place; the least harmful joins, up to `steps` FFNs and while the
    set's KL stays within `limit`."""
    chosen: list[Step] = []
    remaining = list(candidates)
    for _ in range(min(steps, len(remaining))):
        scores = measure([step.layer for step in chosen], remaining)
        best = min(remaining, key=lambda layer: (scores[layer].mean, layer))
        if scores[best].mean > limit:
            progress(f"no FFN keeps KL {limit} with {len(chosen)} chosen (least: FFN {best}, {scores[best].mean:.4f})")
            break
        chosen.append(Step(best, scores[best], {layer: round(e.mean, 5) for layer, e in scores.items()}))
        remaining.remove(best)
        progress(f"FFN {best} chosen ({len(chosen)} of {steps}), KL {scores[best].mean:.4f}")
    return chosen


def select(fitting: ForcedForward, judging: ForcedForward, candidates: Sequence[int], kind: SubstituteKind | None,
           steps: int, progress: Callable[[str], None] = lambda _: None, limit: float = math.inf) -> Selection:
    """Grow a set of up to `steps` FFNs from `candidates` greedily while its KL stays within
    `limit`, each candidate's substitute of `kind` (None: plain skips) fitted with the chosen set
    in place."""
    if not judging.batches:
        progress("every answer ended within the warm-up: nothing to measure, nothing skipped")
        return Selection()
    references = [judging.log_probs(batch, judging.run(batch, ()).states) for batch in judging.batches]
    chosen: dict[int, Substitute] = {}  # the substitutes of the chosen FFNs
    fitted: dict[int, Substitute] = {}  # this step's candidates'

    def measure(layers: list[int], remaining: list[int]) -> dict[int, Estimate]:
        for layer in layers:  # the last step's winner keeps its substitute
            if layer in fitted and layer not in chosen:
                chosen[layer] = fitted[layer]
        current = SubstituteSet(chosen) if chosen else None
        fitted.clear()
        fitted.update(_fit_all(fitting, layers, current, remaining, kind))
        bases = [judging.run(batch, layers, current, keep_inputs=True) for batch in judging.batches]
        scores = {}
        for layer in remaining:
            subs = {**chosen, **({layer: fitted[layer]} if layer in fitted else {})}
            trial = SubstituteSet(subs) if subs else None
            rows: list[list[float]] = []
            for batch, base, reference in zip(judging.batches, bases, references):
                assert base.inputs is not None
                states = judging.run(batch, (*layers, layer), trial, start=layer, x=base.inputs[layer]).states
                rows += kl_rows(reference, judging.log_probs(batch, states))
            scores[layer] = pooled(rows)
        return scores

    steps_taken = grow(candidates, steps, measure, progress, limit)
    winners = {step.layer for step in steps_taken}
    substitutes = {layer: s for layer, s in {**chosen, **fitted}.items() if layer in winners}
    return Selection(steps_taken, substitutes)


def _fit_all(fitting: ForcedForward, chosen: list[int], current: SubstituteSet | None, candidates: list[int],
             kind: SubstituteKind | None) -> dict[int, Substitute]:
    """Every candidate's substitute, fitted on activations with the chosen set in place."""
    if kind is None:
        return {}
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in candidates}
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in candidates}
    for batch in fitting.batches:
        captured = fitting.run(batch, chosen, current, capture=candidates).captured
        for layer, (normed, ffn) in captured.items():
            inputs[layer].append(normed)
            outputs[layer].append(ffn)
    return {layer: fit(kind, torch.cat(inputs[layer]), torch.cat(outputs[layer])) for layer in candidates}
