"""Calibration pieces: the cold-region rule, the replay that predicts a skip ratio, and a
whole calibration of a tiny model with real skip runs."""

from __future__ import annotations

import pytest

from ffnskip.calibration.calibrate import CalibrationRequest, calibrate, cold_regions
from ffnskip.calibration.tuning import candidate_run_lengths, predicted_ratio, static_candidates, threshold_for
from ffnskip.errors import Cancelled, InvalidArgument
from ffnskip.profile import Profile


def test_cold_regions_always_include_first_and_last_layer():
    assert cold_regions([0.97] * 10) == (1, 9)


def test_cold_regions_extend_over_low_similarity_ends():
    means = [0.05, 0.80, 0.97, 0.98, 0.97, 0.98, 0.97, 0.90, 0.81]
    assert cold_regions(means) == (2, 7)


def test_cold_regions_never_swallow_the_median_layer():
    # the band is relative to the median layer, so a mostly-low profile keeps its median layers hot
    assert cold_regions([0.1, 0.2, 0.99, 0.2, 0.1]) == (1, 4)
    assert cold_regions([0.0, 0.0, 0.0]) == (1, 2)


ROWS = [  # 4 layers; hot region [1, 3)
    [0.1, 0.99, 0.5, 0.1],
    [0.1, 0.50, 0.99, 0.1],
    [0.1, 0.50, 0.50, 0.1],
]


def test_predicted_ratio_replays_the_rule():
    # threshold 0.9, k=1: row 0 fires at layer 1 and skips layer 2; row 1 fires at layer 2 (nothing left
    # in the hot region to skip); row 2 never fires -> 1 skip over 3 tokens x 4 layers
    assert predicted_ratio(ROWS, 0.9, 1, 1, 3) == pytest.approx(1 / 12)
    assert predicted_ratio(ROWS, 0.4, 1, 1, 3) == pytest.approx(3 / 12)  # every row fires at layer 1
    assert predicted_ratio(ROWS, 0.4, None, 1, 3) == pytest.approx(3 / 12)


def test_threshold_for_hits_the_target_or_says_it_cannot():
    threshold = threshold_for(ROWS, 2 / 12, 1, 1, 3)
    assert predicted_ratio(ROWS, threshold, 1, 1, 3) >= 2 / 12
    assert predicted_ratio(ROWS, threshold + 1e-3, 1, 1, 3) < 2 / 12
    assert threshold_for(ROWS, 0.5, 1, 1, 3) is None  # k=1 can skip at most 1 of 4 layers


def test_candidate_run_lengths_can_reach_the_target():
    ks = candidate_run_lengths(0.25, 30, 1, 29)
    assert ks[-1] is None and all(k * 1.0 >= 0.25 * 30 for k in ks[:-1])


def _rows(columns: dict[int, list[float]], tokens: int = 20) -> list[list[float]]:
    """Similarity rows (tokens x 8 layers): layer -> its value per token (a constant when one value)."""
    full = {0: [0.2], 7: [0.3], **columns}
    return [[(full[layer] * tokens)[t] if len(full[layer]) > 1 else full[layer][0] for layer in range(8)] for t in range(tokens)]


def test_static_candidates_rank_by_mean_by_low_percentile_and_as_a_stretch():
    # layers 3 and 4 change the state least on average but not always (two big changes in 20
    # tokens); 5 and 6 change it a little, every time
    dips = [0.999] * 18 + [0.8] * 2
    rows = _rows({1: [0.90], 2: [0.91], 3: dips, 4: dips, 5: [0.97], 6: [0.965]})
    assert static_candidates(rows, 0.25, 1, 7) == [(3, 4), (5, 6)]  # round(0.25 x 8) = 2 FFNs; the stretch is (3, 4)
    # a gap between the two best layers: the contiguous stretch is its own candidate
    rows = _rows({1: [0.90], 2: [0.91], 3: [0.99], 4: [0.93], 5: [0.985], 6: [0.95]})
    assert static_candidates(rows, 0.25, 1, 7) == [(3, 5), (5, 6)]
    assert static_candidates(rows, 0.9, 1, 7) == [(1, 2, 3, 4, 5, 6)]  # never more than the hot region


def test_request_validation():
    with pytest.raises(InvalidArgument, match="prompts"):
        CalibrationRequest(prompts=())
    with pytest.raises(InvalidArgument, match="target_skip_ratio"):
        CalibrationRequest(prompts=("a", "b", "c"), target_skip_ratio=0.95)
    with pytest.raises(InvalidArgument, match="target_skip_ratio"):
        CalibrationRequest(prompts=("a", "b", "c"), target_skip_ratio=0.0)
    with pytest.raises(InvalidArgument, match="prompts"):
        CalibrationRequest(prompts=("a", " ", "c"))
    with pytest.raises(InvalidArgument, match="policy"):
        CalibrationRequest(prompts=("a", "b", "c"), policy="random")


def test_calibrate_tiny_model_end_to_end(tiny_loaded):
    prompts = tuple(f"prompt number {i} about things" for i in range(9))
    phases = []
    outcome = calibrate(tiny_loaded, CalibrationRequest(prompts=prompts, tokens_per_prompt=12, target_skip_ratio=0.2),
                        progress=lambda phase, done, total: phases.append((phase, done, total)))
    profile = Profile.from_json(outcome.profile.to_json())
    assert profile.fingerprint == tiny_loaded.fingerprint and profile.num_layers == 6
    assert profile.cold_start >= 1 and profile.cold_end <= 5
    assert len(profile.layers) == 6 and all(layer.count > 0 for layer in profile.layers)
    assert outcome.plot_png.startswith(b"\x89PNG")
    assert phases[0][0] == "measuring similarity" and any(p[0] == "dense reference" for p in phases)
    assert [d for _, d, _ in phases] == sorted(d for _, d, _ in phases)  # progress only moves forward


def test_calibrate_static_measures_its_fixed_set(tiny_loaded):
    prompts = tuple(f"prompt number {i} about things" for i in range(9))
    request = CalibrationRequest(prompts=prompts, tokens_per_prompt=24, target_skip_ratio=0.3, policy="static")
    profile = Profile.from_json(calibrate(tiny_loaded, request).profile.to_json())
    assert profile.policy == "static" and len(profile.static_layers) == 2  # round(0.3 x 6)
    assert all(profile.cold_start <= layer < profile.cold_end for layer in profile.static_layers)
    # every token after warm-up skips exactly the set: the measured ratio is what a real run gave
    assert profile.measured_decode_skip_ratio == pytest.approx(2 / 6)
    assert profile.skip_params().policy == "static" and profile.skip_params().static_layers == profile.static_layers


def test_calibrate_can_be_cancelled(tiny_loaded):
    prompts = tuple(f"prompt {i}" for i in range(6))
    with pytest.raises(Cancelled):
        calibrate(tiny_loaded, CalibrationRequest(prompts=prompts, tokens_per_prompt=8), should_cancel=lambda: True)
