"""Compensated skips on tiny random Llamas: a zero substitute is a plain skip, a substitute fitted on
an exactly linear FFN reproduces it, the decode path applies substitutes as the one-pass forced
forward does (alone, in a mixed batch and after a resume), and the greedy selection re-measures."""

from __future__ import annotations

import pytest
import torch

from ffnskip.calibration import quality as Q
from ffnskip.calibration.forced import ForcedForward, kl_rows
from ffnskip.calibration.quality import Estimate
from ffnskip.calibration.selection import grow, select
from ffnskip.calibration.substitutes import SubstituteKind, fit, validated_ridge
from ffnskip.config import DENSE, Policy, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.substitutes import Int8LowRank, Substitute, SubstituteSet, substitute_groups

PROMPTS = [[1, 5, 9, 13], [2, 7, 3], [4, 4, 8, 15, 16], [6, 23, 42]]
TOKENS = 12
WARM_UP = 2


def _static(*layers: int, warm_up: int = WARM_UP) -> SkipParams:
    return SkipParams(policy=Policy.STATIC, static_layers=layers, cold_start=1, cold_end=5, warm_up=warm_up)


def _forced_logits(engine: Engine, skip: SkipParams, substitutes: SubstituteSet | None,
                   answers: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's logits at every decode step, forcing the given answers."""
    class Keep:
        def __init__(self, answer: list[int]) -> None:
            self.answer, self.logits = answer, []

        def choose(self, index: int, logits: torch.Tensor, predicted: int) -> int:
            self.logits.append(logits.clone())
            return self.answer[index]

    keepers = [Keep(a) for a in answers]
    Q.run_jobs(engine, [Q.Job(p, Q.forced(len(a)), skip, k, substitutes) for p, a, k in zip(PROMPTS, answers, keepers)], 4)
    return [torch.stack(k.logits) for k in keepers]


def _answers(engine: Engine) -> list[list[int]]:
    return [r.tokens for r in Q.dense_references(engine, PROMPTS, TOKENS, 4)]


def _width(loaded) -> int:
    return int(loaded.model.config.hidden_size)


def test_a_zero_substitute_equals_plain_skipping(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    answers = _answers(engine)
    zero = SubstituteSet({layer: Substitute(torch.zeros(_width(tiny_loaded))) for layer in (2, 3)})
    plain = _forced_logits(engine, _static(2, 3), None, answers)
    for ours, theirs in zip(_forced_logits(engine, _static(2, 3), zero, answers), plain):
        assert torch.equal(ours, theirs)
    dense = _forced_logits(engine, DENSE, None, answers)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, dense))  # the skip really changed something


def test_a_substitute_set_round_trips_through_bytes():
    generator = torch.Generator().manual_seed(0)
    subs = SubstituteSet({1: Substitute(torch.randn(8, generator=generator)),
                          3: Substitute(torch.randn(8, generator=generator), torch.randn(8, 2, generator=generator),
                                        torch.randn(2, 8, generator=generator)),
                          4: Substitute(torch.randn(8, generator=generator), torch.randn(8, 8, generator=generator))})
    again = SubstituteSet.from_bytes(subs.to_bytes())
    assert [s.kind for s in again.layers.values()] == ["bias", "lowrank", "linear"]
    normed = torch.randn(3, 8, generator=generator)
    for layer in (1, 3, 4):
        assert torch.equal(again[layer](normed), subs[layer](normed))
    assert again.nbytes == subs.nbytes == 4 * (8 + 8 + 32 + 8 + 64)


def test_fitting_recovers_an_exactly_linear_map_and_ranks_order():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4000, 16, generator=generator)
    weight, bias = torch.randn(16, 16, generator=generator), torch.randn(16, generator=generator)
    outputs = inputs @ weight + bias
    linear = fit(SubstituteKind("linear"), inputs, outputs)
    assert torch.allclose(linear(inputs), outputs, atol=2e-2 * float(outputs.abs().mean()))
    full_rank = fit(SubstituteKind("lowrank", 16), inputs, outputs)
    assert torch.allclose(full_rank(inputs), linear(inputs), atol=1e-4)
    errors = [float((fit(kind, inputs, outputs)(inputs) - outputs).pow(2).mean())
              for kind in (SubstituteKind("bias"), SubstituteKind("lowrank", 2), SubstituteKind("lowrank", 8))]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2
    with pytest.raises(ValueError, match="rank"):
        SubstituteKind("lowrank")
    with pytest.raises(ValueError, match="ridge"):
        SubstituteKind("linear", ridge=-1.0)
    assert SubstituteKind.parse("lowrank64") == SubstituteKind("lowrank", 64)


def test_the_validated_ridge_regularises_noisy_data_and_leaves_exact_data_alone():
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(300, 64, generator=generator, dtype=torch.float64)
    weight = torch.randn(64, 64, generator=generator, dtype=torch.float64) * 0.1
    exact = inputs @ weight
    noisy = exact + torch.randn(300, 64, generator=generator, dtype=torch.float64) * 3.0
    centred = inputs - inputs.mean(0)
    assert validated_ridge(centred, exact - exact.mean(0)) <= 1e-3
    assert validated_ridge(centred, noisy - noisy.mean(0)) >= 1.0


def test_a_substitute_fitted_on_an_exactly_linear_ffn_reproduces_it(tiny_dir, engine_cache):
    """Layer 3's FFN replaced by an affine map of its normed input: the fitted linear substitute
    makes skipping it cost nothing, where the plain skip costs something."""
    from ffnskip.engine import load_model

    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=engine_cache)
    engine = Engine(loaded, max_batch=4, max_seq_len=64)
    layer = engine.runner.layers[3]
    generator = torch.Generator().manual_seed(2)
    width = _width(loaded)
    weight, bias = torch.randn(width, width, generator=generator) * 0.3, torch.randn(width, generator=generator)
    layer.mlp = lambda h: layer.post_norm(h) @ weight + bias  # type: ignore[method-assign]
    answers = _answers(engine)
    fitting = ForcedForward(engine.runner, PROMPTS * 20, answers * 20, 1, 8)  # the same data, enough rows
    captured = [fitting.run(batch, (3,), capture=(3,)).captured[3] for batch in fitting.batches]
    substitute = fit(SubstituteKind("linear"), torch.cat([c[0] for c in captured]), torch.cat([c[1] for c in captured]))
    subs = SubstituteSet({3: substitute})
    dense = _forced_logits(engine, DENSE, None, answers)
    compensated = _forced_logits(engine, _static(3), subs, answers)
    plain = _forced_logits(engine, _static(3), None, answers)
    worst = max(float((a - b).abs().max()) for a, b in zip(compensated, dense))
    assert worst < 1e-2 * max(float(d.abs().max()) for d in dense)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, dense)) > 10 * worst


def test_substitute_groups_gather_the_skipping_rows_of_each_substitute():
    """Rows that share a profile's set form one group; a row of another set, a row that runs the
    FFN, and a row whose set has no substitute for the layer are left out of it."""
    shared = SubstituteSet({2: Substitute(torch.zeros(4)), 3: Substitute(torch.ones(4))})
    other = SubstituteSet({2: Substitute(torch.ones(4))})
    sets = [shared, shared, other, None, shared]
    groups = substitute_groups(2, [True, True, True, True, False], sets)
    assert [(substitute, rows) for substitute, rows in groups] == [(shared[2], [0, 1]), (other[2], [2])]
    assert substitute_groups(3, [True] * 5, sets) == [(shared[3], [0, 1, 4])]
    assert substitute_groups(5, [True] * 5, sets) == []


def test_a_low_rank_substitutes_transposed_factor_is_its_first_one():
    first = torch.arange(12.0).reshape(4, 3)
    substitute = Substitute(torch.zeros(4), first, torch.ones(3, 4))
    assert torch.equal(substitute.first_t, first.t()) and substitute.first_t.is_contiguous()


def test_a_w8a8_engine_serves_a_sets_low_rank_maps_with_int8_factors(tiny_loaded):
    """An engine whose matrices take int8 activations (w8a8) applies a low-rank map as an
    Int8LowRank, made once per set; a bias as it is; other engines the set as it is. The int8 form
    is never stored (the calibrated set is)."""
    width = _width(tiny_loaded)
    lowrank, bias = Substitute(torch.zeros(width), torch.ones(width, 2), torch.ones(2, width)), Substitute(torch.ones(width))
    subs = SubstituteSet({1: lowrank, 2: bias})
    served = subs.served_by("w8a8")
    assert isinstance(served[1], Int8LowRank) and served[1].rank == 2 and served[2] is bias
    assert subs.served_by("w8a8") is served
    assert subs.served_by("full") is subs and subs.served_by("int8") is subs
    seq = Engine(tiny_loaded, max_batch=1, max_seq_len=256).add(prompt_ids=[1, 2], substitutes=subs)
    assert seq.substitutes is subs  # a float32 engine
    with pytest.raises(ValueError, match="int8"):
        served.to_bytes()


def test_compensated_decode_equals_the_one_pass_forced_forward(tiny_loaded):
    """The engine's decode steps with a static set and its substitutes score the same KL as the
    calibration's one-pass forward: two independent computations of the same thing."""
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    references = Q.dense_references(engine, PROMPTS, TOKENS, 4)
    answers = [r.tokens for r in references]
    forward = ForcedForward(engine.runner, PROMPTS, answers, WARM_UP, 4)
    batch = forward.batches[0]
    captured = forward.run(batch, (), capture=(2, 4)).captured
    subs = SubstituteSet({2: fit(SubstituteKind("bias"), *captured[2]), 4: fit(SubstituteKind("lowrank", 4), *captured[4])})
    dense = forward.log_probs(batch, forward.run(batch, ()).states)
    ours = kl_rows(dense, forward.log_probs(batch, forward.run(batch, (2, 3, 4), subs).states))
    decoded = Q.divergence(engine, PROMPTS, references, _static(2, 3, 4), 4, substitutes=subs)
    for row, scored in zip(ours, decoded.kl):
        assert row == pytest.approx(scored[WARM_UP:], abs=2e-3)
    assert sum(map(sum, ours)) > 0.01  # the set does change the answers' distributions


def test_compensated_rows_share_a_batch_and_resume_as_uninterrupted(tiny_loaded):
    generator = torch.Generator().manual_seed(3)
    width = _width(tiny_loaded)
    subs = SubstituteSet({2: Substitute(torch.randn(width, generator=generator) * 3,
                                        torch.randn(width, width, generator=generator))})
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    rows = [(_static(2, 3), subs), (DENSE, subs), (_static(2, 3), None),
            (SkipParams(policy=Policy.ADAPTIVE, threshold=0.5, cold_start=1, cold_end=5, warm_up=1), subs)]

    def run(engine: Engine, chosen: list[int]) -> list[list[int]]:
        seqs = [engine.add(prompt_ids=PROMPTS[i], sampling=sampling, skip=rows[i][0], substitutes=rows[i][1]) for i in chosen]
        while engine.has_work:
            engine.step()
        return [list(s.generated) for s in seqs]

    together = run(Engine(tiny_loaded, max_batch=4, max_seq_len=64), [0, 1, 2, 3])
    alone = [run(Engine(tiny_loaded, max_batch=1, max_seq_len=64), [i])[0] for i in range(4)]
    assert together == alone
    assert together[0] != together[2]  # the substitutes changed the compensated row's answer
    # a compensated answer resumed after its 5th token continues as the uninterrupted one, to
    # the log-probabilities (its cache holds the substituted positions as the first run's did)
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=64)
    scored = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, logprobs=True)
    first = engine.add(prompt_ids=PROMPTS[0], sampling=scored, skip=rows[0][0], substitutes=subs)
    while engine.has_work:
        engine.step()
    resumed = engine.add(prompt_ids=PROMPTS[0], sampling=scored, skip=rows[0][0], substitutes=subs,
                         resumed=first.generated[:5], resumed_skips=first.skip_records[:5])
    while engine.has_work:
        engine.step()
    assert list(resumed.generated) == list(first.generated)
    assert [p.logprob for p in resumed.logprobs] == pytest.approx([p.logprob for p in first.logprobs[5:]], abs=1e-5)


def test_the_greedy_loop_remeasures_so_a_planted_pair_is_not_chosen_together():
    """FFNs 1 and 2 each cost little alone but much together; 3 costs a little more alone.
    Summed single harms would take 1 and 2; measuring each set as it grows takes 1 and then 3."""
    def kl_of(layers: set[int]) -> float:
        cost = {1: 0.10, 2: 0.11, 3: 0.15, 4: 0.5}
        return 1.0 if {1, 2} <= layers else sum(cost[layer] for layer in layers)

    measured: list[tuple[list[int], list[int]]] = []

    def measure(chosen: list[int], remaining: list[int]) -> dict[int, Estimate]:
        measured.append((list(chosen), list(remaining)))
        return {layer: Estimate(kl_of({*chosen, layer}), 0.0, 0.0) for layer in remaining}

    steps = grow([1, 2, 3, 4], 2, measure)
    assert [s.layer for s in steps] == [1, 3]
    assert steps[1].candidates[2] == 1.0 and measured[1] == ([1], [2, 3, 4])


def test_select_grows_distinct_layers_with_their_substitutes(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    answers = _answers(engine)
    fitting = ForcedForward(engine.runner, PROMPTS[:2], answers[:2], 1, 2)
    judging = ForcedForward(engine.runner, PROMPTS[2:], answers[2:], WARM_UP, 2)
    chosen = select(fitting, judging, [1, 2, 3, 4], SubstituteKind("lowrank", 2), 3)
    assert len(set(chosen.layers)) == 3 and set(chosen.substitutes) == set(chosen.layers)
    kls = [step.kl.mean for step in chosen.steps]
    assert kls == sorted(kls)  # a growing set costs more
    layers, subs = chosen.prefix(2)
    assert layers == tuple(sorted(chosen.layers[:2])) and subs is not None and set(subs.layers) == set(layers)
