"""The quality measures and the quality-budget calibration on tiny random Llamas: a policy
that skips nothing keeps everything, a planted damaging skip shows, the budget search keeps
exactly the harmless FFNs, and the profile records what it measured."""

from __future__ import annotations

import math

import pytest

from ffnskip.calibration import quality as Q
from ffnskip.calibration.budget import longest_prefix
from ffnskip.calibration.calibrate import CalibrationRequest, calibrate
from ffnskip.config import DENSE, Policy, QualityBudget, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.errors import InvalidArgument
from ffnskip.profile import Profile
from tests.helpers.profiles import build_profile
from tests.unit.conftest import LOUD, NEUTRAL

PROMPTS = [[1, 5, 9, 13], [2, 7, 3], [4, 4, 8, 15, 16], [6, 23, 42], [11, 12]]
TOKENS = 10


def _static(*layers: int) -> SkipParams:
    return SkipParams(policy=Policy.STATIC, static_layers=layers, cold_start=1, cold_end=7, warm_up=0)


def _measure(loaded, skip: SkipParams) -> Q.Quality:
    engine = Engine(loaded, max_batch=4, max_seq_len=64)
    references = Q.dense_references(engine, PROMPTS, TOKENS, 4)
    free = Q.run_jobs(engine, [Q.Job(p, SamplingParams(max_new_tokens=TOKENS), skip) for p in PROMPTS], 4)
    nll = Q.dense_nll(engine, PROMPTS, [list(s.generated) for s in free], 4)
    return Q.quality(Q.divergence(engine, PROMPTS, references, skip, 4), nll, [r.nll for r in references])


def test_a_policy_that_skips_nothing_keeps_everything(tiny_loaded):
    kept = _measure(tiny_loaded, DENSE)
    assert kept.kl.mean == pytest.approx(0.0, abs=1e-6) and kept.kl.high == pytest.approx(0.0, abs=1e-6)
    assert kept.top_match.mean == 1.0
    assert kept.relative_nll == pytest.approx(1.0, abs=1e-3)


def test_forced_scoring_agrees_with_dense_own_record(tiny_loaded):
    """Dense's NLL of its own answer, scored by forcing it, equals what it recorded while choosing
    it (to the half precision of the record): forcing feeds the same tokens at the same positions."""
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    references = Q.dense_references(engine, PROMPTS, TOKENS, 4)
    forced = Q.dense_nll(engine, PROMPTS, [r.tokens for r in references], 4)
    for scored, reference in zip(forced, references):
        assert scored == pytest.approx(reference.nll, abs=2e-2)


def test_a_harmless_skip_costs_nothing_and_a_damaging_one_shows(planted_loaded):
    harmless = _measure(planted_loaded, _static(*NEUTRAL))  # these FFNs output exactly zero
    assert harmless.kl.mean == pytest.approx(0.0, abs=1e-6) and harmless.top_match.mean == 1.0
    damaging = _measure(planted_loaded, _static(LOUD[2]))
    assert damaging.kl.mean > 0.01 and damaging.kl.low > 0.0
    assert damaging.top_match.mean < 1.0


def test_pooled_weights_tokens_and_treats_prompts_as_clusters():
    one = Q.pooled([[1.0, 3.0]])
    assert (one.mean, one.low, one.high) == (2.0, 2.0, 2.0)  # one cluster: no spread to estimate
    two = Q.pooled([[0.0, 0.0, 0.0], [1.0]])
    assert two.mean == pytest.approx(0.25) and two.low < 0.25 < two.high
    assert math.isnan(Q.pooled([[], []]).mean)


def test_longest_prefix_finds_the_edge_with_few_probes():
    for edge in range(0, 29):
        asked: list[int] = []
        found = longest_prefix(lambda n, asked=asked, edge=edge: asked.append(n) is None and n <= edge, 28)
        assert found == edge
        assert len(asked) <= 2 * math.ceil(math.log2(29)) + 1
    assert longest_prefix(lambda n: True, 0) == 0


def test_budget_and_request_validation():
    with pytest.raises(InvalidArgument, match="max_kl"):
        QualityBudget(max_kl=0.0)
    with pytest.raises(InvalidArgument, match="max_relative_nll"):
        QualityBudget(max_relative_nll=0.9)
    assert CalibrationRequest(prompts=("a", "b", "c"), quality_budget=QualityBudget()).policy is Policy.STATIC
    assert CalibrationRequest(prompts=("a", "b", "c")).policy is Policy.ADAPTIVE
    with pytest.raises(InvalidArgument, match="policy"):
        CalibrationRequest(prompts=("a", "b", "c"), quality_budget=QualityBudget(), policy="adaptive")


def test_calibrating_to_a_budget_keeps_exactly_the_harmless_ffns(planted_loaded):
    prompts = tuple(f"prompt number {i} about topic {i * 7}" for i in range(9))
    budget = QualityBudget(max_kl=1e-3, max_relative_nll=1.01)
    request = CalibrationRequest(prompts=prompts, tokens_per_prompt=24, batch_size=4, quality_budget=budget)
    profile = Profile.from_json(calibrate(planted_loaded, request).profile.to_json())
    hot_neutral = [layer for layer in NEUTRAL if profile.cold_start <= layer < profile.cold_end]
    assert hot_neutral and profile.policy is Policy.STATIC
    assert list(profile.static_layers) == hot_neutral  # every harmless FFN, no damaging one
    assert profile.quality["within_budget"] and profile.within_budget
    assert profile.quality["kl"] <= 1e-3 and profile.quality["max_kl"] == 1e-3
    assert profile.measured_decode_skip_ratio == pytest.approx(len(hot_neutral) / profile.num_layers)


def test_a_compensated_budget_profile_carries_its_substitutes(planted_loaded):
    """The default substitute: the chosen FFNs' low-rank maps, in the outcome's blob, recorded by
    the profile (kind, layers, size, digest)."""
    from ffnskip.engine.substitutes import SubstituteSet, blob_digest

    prompts = tuple(f"prompt number {i} about topic {i * 7}" for i in range(9))
    request = CalibrationRequest(prompts=prompts, tokens_per_prompt=24, batch_size=4,
                                 quality_budget=QualityBudget(max_kl=1e-3, max_relative_nll=1.01), substitute="bias")
    outcome = calibrate(planted_loaded, request)
    record = outcome.profile.substitutes
    assert outcome.substitutes is not None and record["digest"] == blob_digest(outcome.substitutes)
    assert record["kind"] == "bias" and record["layers"] == list(outcome.profile.static_layers)
    assert sorted(SubstituteSet.from_bytes(outcome.substitutes).layers) == record["layers"]
    with pytest.raises(InvalidArgument, match="substitute"):
        CalibrationRequest(prompts=prompts, substitute="lowrank")


def test_a_target_ratio_profile_is_measured_against_the_default_budget(planted_loaded):
    """A target that forces damaging FFNs into the set: the profile says it misses the default
    budget (measured, not assumed), so activating it needs force."""
    prompts = tuple(f"prompt number {i} about topic {i * 7}" for i in range(9))
    request = CalibrationRequest(prompts=prompts, tokens_per_prompt=24, batch_size=4, policy="static",
                                 target_skip_ratio=0.6)
    profile = calibrate(planted_loaded, request).profile
    assert any(layer in LOUD for layer in profile.static_layers)
    assert profile.quality["max_kl"] == QualityBudget().max_kl
    assert not profile.within_budget and "kl" in profile.budget_verdict()


def test_profiles_keep_their_quality_and_old_ones_still_load():
    missed = build_profile(quality={"kl": 0.2, "top_match": 0.8, "relative_nll": 1.4, "max_kl": 0.06,
                                    "max_relative_nll": 1.1, "within_budget": False})
    again = Profile.from_json(missed.to_json())
    assert not again.within_budget and "kl 0.2000 > 0.06" in again.budget_verdict()
    old = build_profile().to_dict()
    old.pop("quality")  # a profile stored before quality was measured
    assert Profile.from_dict(old).within_budget
    with pytest.raises(InvalidArgument, match="profile.quality.within_budget"):
        build_profile(quality={"kl": 0.1, "top_match": 0.9, "relative_nll": 1.0, "within_budget": "yes"})
