"""Skip decisions against hand-computed traces on a model with planted FFNs.

The planted model (8 layers) has FFNs that output exactly zero in layers 2 and 5,
so cos(h, h + ffn(h)) == 1 there, and FFNs that swamp the residual elsewhere, so
the similarity stays below the thresholds used here. The adaptive rule must fire
on the first hot zero-FFN layer and skip the next k hot layers, once per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine

SAMPLING = SamplingParams(max_new_tokens=8, ignore_eos=True)


def records(loaded, skip: SkipParams, prompt: str = "planted") -> list[list[int]]:
    return Engine(loaded, max_batch=2, max_seq_len=64).generate([prompt], SAMPLING, skip)[0].skip_records


def adaptive(**kwargs) -> SkipParams:
    base = dict(policy="adaptive", cold_start=1, cold_end=7, threshold=0.99, max_skip=2, warm_up=0)
    base.update(kwargs)
    return SkipParams(**base)


def test_fires_on_first_saturated_hot_layer_and_skips_next_k(planted_loaded):
    trace = records(planted_loaded, adaptive())
    assert trace[0] == []  # token 1 comes from the prefill, which never skips
    assert trace[1:] == [[3, 4]] * 7  # fires at layer 2, skips 3 and 4, then runs in full (no second trigger at 5)


def test_max_skip_none_skips_up_to_cold_end(planted_loaded):
    assert records(planted_loaded, adaptive(max_skip=None))[1:] == [[3, 4, 5, 6]] * 7


def test_cold_regions_are_never_skipped(planted_loaded):
    # layer 2 is cold now, so the first hot saturated layer is 5; layer 7 stays cold
    assert records(planted_loaded, adaptive(cold_start=3, max_skip=None))[1:] == [[6]] * 7


def test_warm_up_tokens_run_in_full(planted_loaded):
    trace = records(planted_loaded, adaptive(warm_up=3))
    assert trace[:3] == [[], [], []]
    assert trace[3:] == [[3, 4]] * 5


def test_similarity_is_cosine_of_h_and_h_plus_ffn(planted_loaded):
    """Pins the metric: cos(h, h + ffn(h)), not cos(x, ffn(x)) (which is undefined for a zero FFN)."""
    result = Engine(planted_loaded, max_batch=1, max_seq_len=64).generate(["planted"], SAMPLING, SkipParams(policy="observe", warm_up=0))[0]
    assert result.skip_stats.ffn_blocks_skipped == 0
    for token in result.similarity[1:]:
        assert token[2] == pytest.approx(1.0, abs=1e-6) and token[5] == pytest.approx(1.0, abs=1e-6)
        assert all(token[i] < 0.98 for i in (0, 1, 3, 4, 6, 7))  # below every threshold used here


def test_skipped_ffn_really_is_not_run(planted_loaded):
    """Skipping layers 3 and 4 must give the logits of a model whose FFNs 3 and 4 output zero."""
    engine = Engine(planted_loaded, max_batch=1, max_seq_len=64)
    skip = SkipParams(policy="static", static_layers=(3, 4), warm_up=0)
    ours = engine.generate(["planted"], SAMPLING, skip)[0].token_ids
    hf = planted_loaded.model
    saved = [hf.model.layers[i].mlp.down_proj.weight.detach().clone() for i in (3, 4)]
    try:
        prompt = torch.tensor([planted_loaded.tokenizer("planted")["input_ids"]])
        with torch.no_grad():
            out = hf(prompt, use_cache=True)  # the prefill runs the full model
            ids, past = [int(out.logits[0, -1].argmax())], out.past_key_values
            for i in (3, 4):
                hf.model.layers[i].mlp.down_proj.weight.zero_()
            for _ in range(len(ours) - 1):
                out = hf(torch.tensor([[ids[-1]]]), past_key_values=past, use_cache=True)
                ids.append(int(out.logits[0, -1].argmax()))
                past = out.past_key_values
    finally:
        with torch.no_grad():
            for i, weight in zip((3, 4), saved):
                hf.model.layers[i].mlp.down_proj.weight.copy_(weight)
    assert ours == ids


@pytest.mark.parametrize(
    "skip, expected",
    [
        (SkipParams(policy="dense"), []),
        (SkipParams(policy="static", static_layers=(0, 6), warm_up=0), [0, 6]),
        (SkipParams(policy="random", probability=1.0, warm_up=0), list(range(8))),
        (SkipParams(policy="non_adaptive", probability=1.0, cold_start=2, cold_end=5, warm_up=0), [2, 3, 4]),
        (SkipParams(policy="random", probability=0.0, warm_up=0), []),
    ],
)
def test_baseline_policies(planted_loaded, skip, expected):
    assert records(planted_loaded, skip)[1:] == [expected] * 7


def test_random_policy_is_seeded(planted_loaded):
    a = records(planted_loaded, SkipParams(policy="random", probability=0.5, warm_up=0, seed=1))
    b = records(planted_loaded, SkipParams(policy="random", probability=0.5, warm_up=0, seed=1))
    c = records(planted_loaded, SkipParams(policy="random", probability=0.5, warm_up=0, seed=2))
    assert a == b and a != c


def test_mixed_policies_in_one_batch_gather_only_rows_that_need_the_ffn(planted_loaded):
    engine = Engine(planted_loaded, max_batch=2, max_seq_len=64)
    seqs = [engine.add(prompt="planted", sampling=SAMPLING, skip=adaptive()),
            engine.add(prompt="planted", sampling=SAMPLING, skip=SkipParams(policy="dense"))]
    while engine.has_work:
        engine.step()
    assert seqs[0].skip_records[1:] == [[3, 4]] * 7
    assert seqs[1].skip_records == [[]] * 8
    # the skipped rows' tokens equal a run of that sequence alone
    assert seqs[0].generated == engine.generate(["planted"], SAMPLING, adaptive())[0].token_ids


def test_skip_stats_follow_the_definitions(planted_loaded):
    result = Engine(planted_loaded, max_batch=1, max_seq_len=64).generate(["planted"], SAMPLING, adaptive(warm_up=2))[0]
    stats = result.skip_stats
    # 8 tokens x 8 layers; tokens 3..8 skip 2 FFNs each
    assert (stats.ffn_blocks_total, stats.ffn_blocks_skipped) == (64, 12)
    assert math.isclose(stats.skip_ratio, 12 / 64)
    assert math.isclose(stats.decode_skip_ratio, 12 / (8 * 6))
    assert stats.per_layer_skips == [0, 0, 0, 6, 6, 0, 0, 0]


def run_pair(loaded, first: SkipParams, second: SkipParams) -> tuple[list[list[int]], list[list[int]], int]:
    """Two sequences decoded together; returns both skip traces and the FFN weight reads of the decode steps."""
    engine = Engine(loaded, max_batch=2, max_seq_len=64)
    seqs = [engine.add(prompt="planted", sampling=SAMPLING, skip=first),
            engine.add(prompt="planted", sampling=SAMPLING, skip=second)]
    while engine.has_work:
        engine.step()
    return seqs[0].skip_records, seqs[1].skip_records, engine.decode_ffn_reads


def aligned(**kwargs) -> SkipParams:
    return adaptive(policy="aligned", **kwargs)


def test_aligned_quorum_met_skips_the_layer_for_every_row(planted_loaded):
    # row 0 fires at layer 2 and votes to skip 3 and 4; row 1 (k=0) never votes: 1 of 2 meets quorum 0.5
    voter, bystander, reads = run_pair(planted_loaded, aligned(quorum=0.5), aligned(quorum=0.5, max_skip=0))
    assert voter[1:] == [[3, 4]] * 7
    assert bystander[1:] == [[3, 4]] * 7
    assert reads == 7 * (8 - 2)  # layers 3 and 4 are not read at all in the 7 decode steps


def test_aligned_quorum_missed_runs_the_layer_for_every_row(planted_loaded):
    voter, bystander, reads = run_pair(planted_loaded, aligned(quorum=1.0), aligned(quorum=1.0, max_skip=0))
    assert voter[1:] == [[]] * 7 and bystander[1:] == [[]] * 7
    assert reads == 7 * 8


def test_per_row_adaptive_in_a_batch_still_reads_the_weights(planted_loaded):
    voter, bystander, reads = run_pair(planted_loaded, adaptive(), adaptive(max_skip=0))
    assert voter[1:] == [[3, 4]] * 7 and bystander[1:] == [[]] * 7
    assert reads == 7 * 8  # row 1 needs every FFN, so every layer's weights are read


def test_planned_decisions_are_reused_only_while_the_plans_are_the_same():
    from ffnskip.engine.policies import RowPlan, SkipPlanner

    planner = SkipPlanner(6)
    first_plan = RowPlan.build(SkipParams(policy="static", static_layers=(1, 2)).resolved(6), 6)
    other_plan = RowPlan.build(SkipParams(policy="static", static_layers=(3,)).resolved(6), 6)

    def step(plans):
        skips = planner.begin_step(plans, [True] * len(plans), [torch.Generator() for _ in plans])
        kinds = [skips.decide(layer).kind.value for layer in range(6)]
        outcome = skips.outcome()
        return kinds, outcome.skipped, outcome.ffn_reads

    first = step([first_plan])
    assert first == (["all", "none", "none", "all", "all", "all"], [[1, 2]], 4)
    again = step([first_plan])
    assert again == first
    assert again[1][0] is not first[1][0]  # every step hands out its own lists
    assert step([other_plan]) == (["all", "all", "all", "none", "all", "all"], [[3]], 5)
    assert step([first_plan, other_plan]) == (["all", "some", "some", "some", "all", "all"], [[1, 2], [3]], 6)
    assert step([first_plan]) == first
