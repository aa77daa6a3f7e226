"""Distilled substitutes on a tiny random Llama: training lowers the teacher-forced KL on its own
answers, changes nothing but the substitutes (a low-rank map stays low-rank), is fixed by its
seed, and zero steps give the starting substitutes back; the forward with autograd on computes
what the inference-mode one does."""

from __future__ import annotations

import pytest
import torch

from ffnskip.calibration import quality as Q
from ffnskip.calibration.distill import Distilled, distill, fitted_along
from ffnskip.calibration.forced import ForcedForward
from ffnskip.calibration.substitutes import SubstituteKind
from ffnskip.engine import Engine
from ffnskip.engine.substitutes import SubstituteSet

PROMPTS = [[1, 5, 9, 13], [2, 7, 3], [4, 4, 8, 15, 16], [6, 23, 42], [11, 3, 3, 90], [17, 60], [8, 8, 1, 30, 2], [99, 4, 12]]
TOKENS = 12
WARM_UP = 2
ORDER = [3, 2, 4]  # the FFNs skipped, in the order their substitutes are fitted


@pytest.fixture(scope="module")
def setting(tiny_loaded) -> tuple[ForcedForward, SubstituteSet]:
    """A forward over dense's answers (4 batches of 2) and the set's training-free rank-4 fits."""
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    answers = [r.tokens for r in Q.dense_references(engine, PROMPTS, TOKENS, 4)]
    fitting = ForcedForward(engine.runner, PROMPTS, answers, 1, 4)
    initial = SubstituteSet(fitted_along(fitting, ORDER, SubstituteKind("lowrank", 4)))
    return ForcedForward(engine.runner, PROMPTS, answers, WARM_UP, 2), initial


def _tensors(subs: SubstituteSet) -> list[torch.Tensor]:
    return [t for s in subs.layers.values() for t in (s.bias, s.first, s.second) if t is not None]


def _same(a: SubstituteSet, b: SubstituteSet) -> bool:
    return list(a.layers) == list(b.layers) and all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b), strict=True))


def test_distillation_lowers_the_kl_on_its_own_answers_and_keeps_the_shapes(setting):
    forward, initial = setting
    references = forward.dense()
    before = Q.pooled(forward.kl(references, ORDER, initial)).mean
    steps: list[int] = []
    result = distill(forward, ORDER, initial, steps=40, lr=1e-2, progress=lambda step, loss: steps.append(step))
    after = Q.pooled(forward.kl(references, ORDER, result.substitutes)).mean
    assert before > 0.01  # the fits leave something to learn
    assert after < 0.8 * before
    assert steps == list(range(1, 41)) and len(result.losses) == 40
    assert sum(result.losses[-8:]) < sum(result.losses[:8])  # the curve goes down (two epochs each)
    # a low-rank map stays low-rank: same kinds, shapes and bytes
    assert [s.kind for s in result.substitutes.layers.values()] == [s.kind for s in initial.layers.values()] == ["lowrank"] * 3
    assert [t.shape for t in _tensors(result.substitutes)] == [t.shape for t in _tensors(initial)]
    assert result.substitutes.nbytes == initial.nbytes


def test_only_the_substitutes_change(setting):
    forward, initial = setting
    runner = forward.runner
    params = [p for layer in runner.layers for p in layer.parameters()] + list(runner.head.parameters())
    params += list(runner.embed.parameters())
    weights = [p.detach().clone() for p in params]
    starting = SubstituteSet.from_bytes(initial.to_bytes())  # a copy made apart from the one trained
    result = distill(forward, ORDER, initial, steps=4, lr=1e-2)
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))  # bit-identical weights
    assert all(p.grad is None for p in params)  # and no gradient left on them
    assert _same(initial, starting)  # the starting set is not trained in place
    assert not any(torch.equal(a, b) for a, b in zip(_tensors(result.substitutes), _tensors(initial)))  # every tensor trained
    assert not any(t.requires_grad for t in _tensors(result.substitutes))


def test_the_seed_fixes_the_result(setting):
    forward, initial = setting
    runs = [distill(forward, ORDER, initial, steps=6, lr=1e-2, seed=seed) for seed in (0, 0, 1)]
    assert _same(runs[0].substitutes, runs[1].substitutes) and runs[0].losses == runs[1].losses
    assert not _same(runs[0].substitutes, runs[2].substitutes)  # another seed, another batch order


def test_zero_steps_give_the_starting_substitutes(setting):
    forward, initial = setting
    result = distill(forward, ORDER, initial, steps=0)
    assert isinstance(result, Distilled) and result.losses == []
    assert _same(result.substitutes, initial)
    assert result.substitutes.nbytes == initial.nbytes
    with pytest.raises(ValueError, match="never apply"):
        distill(forward, [2, 4], initial, steps=1)


def test_the_forward_with_autograd_computes_what_inference_mode_does(setting):
    forward, initial = setting
    batch = forward.batches[1]
    plain = forward.log_probs(batch, forward.run(batch, ORDER, initial).states)
    recorded = forward.log_probs(batch, forward.run(batch, ORDER, initial, grad=True).states, grad=True)
    for a, b in zip(plain, recorded, strict=True):
        assert not a.requires_grad and b.requires_grad  # the model's own parameters require grad as loaded
        assert torch.allclose(a, b.detach(), atol=1e-5)
