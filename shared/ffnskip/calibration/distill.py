"""Distilled substitutes: a skipped set's substitutes trained against dense.

This is training, the one place in ffnskip.calibration that trains anything: the substitutes'
fits (calibration/substitutes.py), the greedy selection and every measure are training-free.
Distillation starts from those training-free fits and runs gradient descent (Adam) on the
substitutes' own tensors only (the bias and the map's factors, ffnskip.engine.substitutes) to
minimise the teacher-forced KL(dense || the set in place) at the scored positions of calibration
answers.

Why that is allowed: the model is not trained. Its weights are frozen (they get no gradient and
stay bit for bit what was loaded), so the model served is the one that was downloaded; what
changes is what a profile carries anyway, the few values of each skipped FFN's substitute (a
rank-64 map of a 576-wide model holds 74k values, against the FFN's 2.65M). A low-rank
substitute stays low-rank (its factors are trained) and reads the same bytes.

What it can gain over the fits: a fit matches one FFN's output by squared error, on its own;
distillation matches what the model finally predicts, with the whole set in place, so each
substitute learns what matters downstream and makes up for the others' errors.

Each step is one Adam update on one batch of a teacher-forced forward (ForcedForward with
autograd on), the batches taken in a random order drawn from `seed`, an epoch at a time: the
seed fixes the result. Dense's log-probs are computed once per batch, without autograd, and
kept (prompts x scored positions x vocabulary x 4 bytes); so is each batch's input to the first
skipped layer, which every step starts from (the layers before it run dense).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from ffnskip.calibration.forced import ForcedBatch, ForcedForward, position_kl
from ffnskip.calibration.selection import _fit_all
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.engine.substitutes import AnySubstitute, Substitute, SubstituteSet


@dataclass(frozen=True)
class Distilled:
    """The trained substitutes, and each step's loss: its batch's mean KL per scored position,
    measured in the step's own forward (before its update)."""

    substitutes: SubstituteSet
    losses: list[float]


def distill(forward: ForcedForward, skipped: Collection[int], initial: SubstituteSet, steps: int, lr: float = 1e-4,
            seed: int = 0, progress: Callable[[int, float], None] = lambda step, loss: None) -> Distilled:
    """`initial`'s substitutes trained for `steps` Adam updates (learning rate `lr`) to minimise
    the teacher-forced KL(dense || `skipped` with the substitutes in place) on `forward`'s
    answers; `progress(step, loss)` after each. `initial` is left as it is; zero steps give
    copies of it."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not set(initial.layers) <= set(skipped):
        raise ValueError(f"substitutes for FFNs that run would never apply: {sorted(set(initial.layers) - set(skipped))}")
    device = forward.runner.device
    # fresh leaf tensors that Adam updates in place; the Substitutes built on them see each update
    trainable = {layer: _mapped(s, lambda t: t.detach().to(device).clone().requires_grad_(True))
                 for layer, s in initial.layers.items()}
    current = SubstituteSet(trainable)
    params = [t for s in trainable.values() for t in (s.bias, s.first, s.second) if t is not None]
    losses: list[float] = []
    if steps:
        if not params or not forward.batches:
            raise ValueError("nothing to train: no substitute, or no answer longer than the warm-up")
        first = min(skipped)
        cached = [_dense(forward, batch, first) for batch in forward.batches]
        optimizer = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = torch.randperm(len(cached), generator=generator).tolist()
            index = order.pop()
            batch, (references, x) = forward.batches[index], cached[index]
            states = forward.run(batch, skipped, current, start=first, x=x, grad=True).states
            candidates = forward.log_probs(batch, states, grad=True)
            loss = torch.cat([position_kl(r, c) for r, c in zip(references, candidates)]).mean()
            # autograd.grad, not backward: only the substitutes' gradients are computed, and the
            # model's parameters (which require grad as loaded) get no .grad
            for param, gradient in zip(params, torch.autograd.grad(loss, params)):
                param.grad = gradient
            optimizer.step()
            losses.append(float(loss.detach()))
            progress(step + 1, losses[-1])
    return Distilled(SubstituteSet({layer: _mapped(s, lambda t: t.detach().clone()) for layer, s in trainable.items()}), losses)


def fitted_along(fitting: ForcedForward, order: Sequence[int], kind: SubstituteKind) -> dict[int, Substitute]:
    """The training-free substitutes (of `kind`) that the greedy selection fits for FFNs joining in
    `order`: each on `fitting`'s activations with the FFNs before it skipped and substituted, as
    calibration.selection fits a candidate (distillation's usual starting point)."""
    fitted: dict[int, Substitute] = {}
    for count, layer in enumerate(order):
        before = list(order[:count])
        fitted.update(_fit_all(fitting, before, SubstituteSet(fitted) if fitted else None, [layer], kind))
    return fitted


def _dense(forward: ForcedForward, batch: ForcedBatch, first: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch's dense log-probs at its scored positions and its input to layer `first`."""
    base = forward.run(batch, (), keep_inputs=True)
    assert base.inputs is not None
    with torch.inference_mode(False):  # a copy that autograd may save (an inference tensor may not be)
        x = base.inputs[first].clone()
    return forward.log_probs(batch, base.states), x


def _mapped(substitute: AnySubstitute, change: Callable[[torch.Tensor], torch.Tensor]) -> Substitute:
    """The substitute with `change` applied to each of its tensors."""
    if not isinstance(substitute, Substitute):
        raise TypeError("distil a set as calibrated (float factors), not its int8 form")
    first, second = substitute.first, substitute.second
    return Substitute(change(substitute.bias), None if first is None else change(first), None if second is None else change(second))
