"""Per-token skip rules in the one-pass forced forward (calibration/token_rules.py): the paper's rule
decides there as the engine's decode steps do, a per-token choice between an FFN and its substitute
spans dense and the fixed set, skips the share it was fitted to, and decides before the FFN is paid."""

from __future__ import annotations

import pytest
import torch

from ffnskip.calibration import quality as Q
from ffnskip.calibration.forced import ForcedForward, free_running, kl_rows
from ffnskip.calibration.substitutes import SubstituteKind, fit
from ffnskip.calibration.token_rules import ChosenTokens, FixedSet, OracleRecorder, PaperRule, Probe, Signal, avoided_share
from ffnskip.config import Policy, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.substitutes import Substitute, SubstituteSet

PROMPTS = [[1, 5, 9, 13], [2, 7, 3], [4, 4, 8, 15, 16], [6, 23, 42]]
TOKENS = 12
WARM_UP = 2


def _setup(loaded):
    engine = Engine(loaded, max_batch=4, max_seq_len=64)
    references = Q.dense_references(engine, PROMPTS, TOKENS, 4)
    forward = ForcedForward(engine.runner, PROMPTS, [r.tokens for r in references], WARM_UP, 4)
    return engine, references, forward


def _kl(forward: ForcedForward, rule, substitutes=None) -> tuple[list[list[float]], dict[int, int]]:
    batch = forward.batches[0]
    dense = forward.log_probs(batch, forward.run(batch, ()).states)
    done = forward.run(batch, rule, substitutes)
    return kl_rows(dense, forward.log_probs(batch, done.states)), done.skips


def _substitutes(forward: ForcedForward, layers: tuple[int, ...]) -> SubstituteSet:
    captured = forward.run(forward.batches[0], (), capture=layers).captured
    return SubstituteSet({layer: fit(SubstituteKind("lowrank", 4), *captured[layer]) for layer in layers})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_paper_rule_decides_in_the_forced_forward_as_the_decode_steps_do(planted_loaded, k):
    """Planted model: FFNs 2 and 5 add nothing (cos 1, the rule fires there), the others dominate
    (cos far below 0.9). Every scored position fires on layer 2 and skips the next k hot layers. The
    forced forward and the engine's decode path agree on every position's KL and on the skips."""
    engine, references, forward = _setup(planted_loaded)
    skip = SkipParams(policy=Policy.ADAPTIVE, threshold=0.9, max_skip=k, cold_start=1, cold_end=7, warm_up=WARM_UP)
    ours, skips = _kl(forward, PaperRule(0.9, k, 1, 7, planted_loaded.num_layers))
    decoded = Q.divergence(engine, PROMPTS, references, skip, 4)
    for row, scored in zip(ours, decoded.kl):
        assert row == pytest.approx(scored[WARM_UP:], abs=2e-3)
    assert {layer for layer, n in skips.items() if n} == set(range(3, 3 + k))
    assert sum(skips.values()) == k * sum(map(len, ours))
    assert sum(map(sum, ours)) > 0.01  # the loud FFNs' skips do change the answers' distributions


def test_a_paper_rule_that_never_fires_is_dense(planted_loaded):
    _, _, forward = _setup(planted_loaded)
    ours, skips = _kl(forward, PaperRule(1.0, 2, 3, 5, planted_loaded.num_layers))  # 3 and 4 are loud: no fire
    assert sum(skips.values()) == 0 and all(v == 0.0 for row in ours for v in row)


@pytest.mark.parametrize("signal", list(Signal))
def test_chosen_tokens_span_dense_and_the_fixed_set(tiny_loaded, signal):
    _, _, forward = _setup(tiny_loaded)
    subs = _substitutes(forward, (2, 3))
    probes = {layer: Probe(torch.randn(tiny_loaded.model.config.hidden_size), 0.0) for layer in (2, 3)}
    none, skips = _kl(forward, ChosenTokens(subs, signal, {2: 0.0, 3: 0.0}, probes=probes), subs)
    assert sum(skips.values()) == 0 and all(v == 0.0 for row in none for v in row)
    every, _ = _kl(forward, ChosenTokens(subs, signal, {2: 1.0, 3: 1.0}, probes=probes), subs)
    fixed, _ = _kl(forward, FixedSet((2, 3)), subs)
    assert every == fixed and sum(map(sum, fixed)) > 0


@pytest.mark.parametrize("reverse", [False, True])
def test_fitted_thresholds_skip_the_share_they_were_fitted_to(tiny_loaded, reverse):
    _, _, forward = _setup(tiny_loaded)
    subs = _substitutes(forward, (1, 3))
    rule = ChosenTokens(subs, Signal.ATTENTION, {1: 0.5, 3: 0.25}, reverse=reverse)
    batch = forward.batches[0]
    first = forward.run(batch, rule, subs)
    assert set(rule.thresholds) == {1, 3}
    for layer, rate in rule.rates.items():
        assert abs(first.skips[layer] - rate * first.positions) <= 1
    fitted = dict(rule.thresholds)
    again = forward.run(batch, rule, subs)  # the thresholds are kept, so the same positions skip
    assert rule.thresholds == fitted and again.skips == first.skips
    assert torch.equal(again.states, first.states)


@pytest.mark.parametrize("signal", [s for s in Signal if s is not Signal.ORACLE])
def test_a_servable_signal_decides_before_the_ffn_is_paid(signal):
    """Every signal but the oracle decides from what exists before the FFN runs: a different FFN
    output changes nothing."""
    torch.manual_seed(0)
    x, h = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    probe = torch.randn(8)
    subs = SubstituteSet({1: Substitute(torch.randn(8), torch.randn(8, 2), torch.randn(2, 8))})
    mask = torch.ones(2, 6, dtype=torch.bool)
    decisions = []
    for ffn in (torch.randn(2, 6, 8), torch.randn(2, 6, 8) * 100):
        rule = ChosenTokens(subs, signal, {1: 0.5}, probes={1: Probe(probe, 0.1)})
        rule.begin(mask)
        rule.observe(0, x, h)
        decisions.append(rule.decide(1, x, h, h * 0.5, ffn))
    assert torch.equal(decisions[0], decisions[1])


def test_avoided_share_counts_what_the_substitutes_read():
    subs = SubstituteSet({1: Substitute(torch.zeros(25)), 2: Substitute(torch.zeros(25))})  # 100 bytes each
    # 10 positions, 4 layers of 1000 bytes; layer 1 skips 5, layer 2 skips 10
    assert avoided_share({1: 5, 2: 10}, 10, 1000, 4, None) == pytest.approx(15 * 1000 / 40_000)
    assert avoided_share({1: 5, 2: 10}, 10, 1000, 4, subs) == pytest.approx((15_000 - 1500) / 40_000)
    assert avoided_share({1: 5, 2: 10}, 10, 1000, 4, subs, read_always=(1, 2)) == pytest.approx((15_000 - 2000) / 40_000)
    assert avoided_share({}, 0, 1000, 4, subs) == 0.0


def test_a_probe_recovers_an_exactly_linear_need():
    """fit_probes is least squares: data whose log need is a linear map of the input give that map back."""
    torch.manual_seed(0)
    inputs = torch.randn(400, 8)
    weight, bias = torch.randn(8), 0.3
    recorder = OracleRecorder(SubstituteSet({2: Substitute(torch.zeros(8))}))
    recorder.rows[2] = [(inputs[:200], inputs[:200] @ weight + bias), (inputs[200:], inputs[200:] @ weight + bias)]
    probe = recorder.fit_probes(ridge=0.0)[2]
    assert torch.allclose(probe.weight, weight, atol=1e-4) and probe.bias == pytest.approx(bias, abs=1e-4)
    assert torch.allclose(probe(inputs), inputs @ weight + bias, atol=1e-4)


def test_the_oracle_recorder_skips_nothing_and_keeps_the_scored_positions(tiny_loaded):
    _, _, forward = _setup(tiny_loaded)
    subs = _substitutes(forward, (2,))
    recorder = OracleRecorder(subs)
    batch = forward.batches[0]
    done = forward.run(batch, recorder, subs)
    assert torch.equal(done.states, forward.run(batch, ()).states) and not any(done.skips.values())
    (normed, need), = recorder.rows[2]
    assert normed.shape[0] == need.shape[0] == done.positions


def test_free_running_with_a_rule_gives_the_engines_answers(tiny_loaded, planted_loaded):
    """The quadratic free-running loop decodes as the engine does: a static compensated set on the
    tiny model, and the paper's rule on the planted one."""
    engine, _, forward = _setup(tiny_loaded)
    subs = _substitutes(forward, (2, 3))
    static = SkipParams(policy=Policy.STATIC, static_layers=(2, 3), cold_start=1, cold_end=5, warm_up=WARM_UP)
    decoded = Q.run_jobs(engine, [Q.Job(p, Q.forced(TOKENS), static, substitutes=subs) for p in PROMPTS], 4)
    ours = free_running(engine.runner, PROMPTS, TOKENS, WARM_UP, lambda: FixedSet((2, 3)), subs)
    assert ours == [list(s.generated) for s in decoded]
    dense = free_running(engine.runner, PROMPTS, TOKENS, WARM_UP, lambda: ())
    assert dense != ours  # the set does change the answers

    planted = Engine(planted_loaded, max_batch=4, max_seq_len=64)
    paper = SkipParams(policy=Policy.ADAPTIVE, threshold=0.9, max_skip=2, cold_start=1, cold_end=7, warm_up=WARM_UP)
    decoded = Q.run_jobs(planted, [Q.Job(p, Q.forced(TOKENS), paper) for p in PROMPTS], 4)
    ours = free_running(planted.runner, PROMPTS, TOKENS, WARM_UP, lambda: PaperRule(0.9, 2, 1, 7, planted_loaded.num_layers))
    assert ours == [list(s.generated) for s in decoded]


def test_free_running_stops_each_answer_at_eos(tiny_loaded):
    engine, _, _ = _setup(tiny_loaded)
    full = free_running(engine.runner, PROMPTS, TOKENS, WARM_UP, lambda: ())
    eos = full[0][3]
    ended = free_running(engine.runner, PROMPTS, TOKENS, WARM_UP, lambda: (), eos=eos)
    for answer, whole in zip(ended, full):
        cut = whole.index(eos) + 1 if eos in whole else len(whole)
        assert answer == whole[:cut]
