"""The device-side decode step (ffnskip.bench.gpu.device_step) against ModelRunner.decode on a tiny random
Llama, on the CPU: the same logits, the same keys and values in the cache and the same skip
decisions, step after step, for a dense batch and for a batch whose rows skip differently (with a
padding row in the bucket); its greedy advance; and no host read anywhere in a step whose branch
does what a graph capture does."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ffnskip.bench.gpu.device_skips import RowTensors
from ffnskip.bench.gpu.device_step import DeviceStep, HostBranch
from ffnskip.config import Policy, SkipParams
from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.policies import RowPlan, SkipPlanner
from ffnskip.engine.runner import ModelRunner

LAYERS = 6
MAX_LEN = 16
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11, 12], [13, 14]]
STEPS = 4
ATOL = 1e-5


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.1: cos(h, out) spreads over 0.45-0.98, so thresholds split rows and layers
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, initializer_range=0.1)
    return ModelRunner(LlamaForCausalLM(config).eval())


def plan(policy: Policy, **fields: object) -> RowPlan:
    params = SkipParams(policy=policy, cold_start=1, cold_end=5, warm_up=0, **fields)
    return RowPlan.build(params.resolved(LAYERS), LAYERS)


DENSE_ROWS = [plan(Policy.DENSE) for _ in PROMPTS]
MIXED_ROWS = [
    plan(Policy.ADAPTIVE, threshold=0.9, max_skip=2),
    plan(Policy.DENSE),
    plan(Policy.STATIC, static_layers=(2, 3)),
    plan(Policy.NON_ADAPTIVE, probability=0.5, seed=1),
    plan(Policy.ADAPTIVE, threshold=0.95, max_skip=1),
]
PADDING = plan(Policy.DENSE)


def prefilled(runner: ModelRunner, rows: int) -> KVCache:
    cache = runner.new_cache(rows, MAX_LEN)
    runner.prefill(cache, list(range(len(PROMPTS))), PROMPTS)
    return cache


def generators(step: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 * step + b) for b in range(len(PROMPTS))]


def row_tensors(plans: list[RowPlan], step: int, bucket: int) -> RowTensors:
    """The rows' plans as tensors with this step's draws (the ones SkipPlanner makes from the same
    generators), padded with dense, inactive rows to the bucket."""
    planned = [p.draw(g) if p.params.policy.planned else None for p, g in zip(plans, generators(step))]
    pad = bucket - len(plans)
    return RowTensors.build(plans + [PADDING] * pad, [True] * len(plans) + [False] * pad,
                            planned + [None] * pad, torch.device("cpu"))


def tokens_at(step: int) -> list[int]:
    return [(17 * step + 5 * b + 3) % 256 for b in range(len(PROMPTS))]


def positions_at(step: int) -> list[int]:
    return [len(prompt) + step for prompt in PROMPTS]


def compare(runner: ModelRunner, plans: list[RowPlan], bucket: int, gated: list[bool] | None = None) -> list:
    """Teacher-forced steps through both paths; asserts they agree; -> the host's skipped layers per step."""
    batch = len(PROMPTS)
    host_cache, device_cache = prefilled(runner, batch), prefilled(runner, bucket)
    step_ = DeviceStep(runner, device_cache, bucket)
    planner = SkipPlanner(LAYERS)
    skipped_per_step = []
    for step in range(STEPS):
        skips = planner.begin_step(plans, [True] * batch, generators(step))
        expected = runner.decode(host_cache, tokens_at(step), positions_at(step), skips)
        outcome = skips.outcome()
        step_.set_rows(row_tensors(plans, step, bucket))
        step_.set_inputs(tokens_at(step), positions_at(step))
        step_.zero_counters()
        step_.run(HostBranch(), gated=gated)
        assert (step_.logits[:batch] - expected).abs().max().item() <= ATOL, step
        for name in ("keys", "values"):
            host, device = getattr(host_cache, name), getattr(device_cache, name)
            assert (host[:, :batch, :, :MAX_LEN] - device[:, :batch, :, :MAX_LEN]).abs().max().item() <= ATOL
        ran = step_.ffn_rows.T.tolist()  # [P][L]
        assert [[layer for layer in range(LAYERS) if not ran[b][layer]] for b in range(batch)] == outcome.skipped
        if gated is None:
            assert int(step_.ffn_calls.sum()) == outcome.ffn_reads
        else:
            assert step_.ffn_calls.tolist() == [1 if not g or any(r[layer] for r in ran) else 0
                                                for layer, g in enumerate(gated)]
        skipped_per_step.append(outcome.skipped)
    if bucket > batch:  # padding rows wrote only to the scratch position
        assert device_cache.keys[:, batch:bucket, :, :MAX_LEN].abs().max().item() == 0
        assert device_cache.keys[:, batch:bucket, :, MAX_LEN].abs().max().item() > 0
    return skipped_per_step


def test_dense_step_equals_the_runner(runner):
    skipped = compare(runner, DENSE_ROWS, bucket=len(PROMPTS))
    assert skipped == [[[] for _ in PROMPTS]] * STEPS


def test_rows_that_skip_differently_equal_the_runner(runner):
    skipped = compare(runner, MIXED_ROWS, bucket=len(PROMPTS) + 1)
    # the batch is discriminating: every row but the dense one skips something, the rows differ,
    # and some layer runs its FFN for some rows only
    flat = [tuple(tuple(rows) for rows in step) for step in skipped]
    assert all(step[1] == () for step in flat)
    assert all(any(step[b]) for step in flat for b in (0, 2, 3)) and any(step[4] for step in flat)
    assert all(len(set(step)) >= 3 for step in flat)


def test_a_layer_that_every_sequence_skips_is_not_called(runner):
    """Every sequence skips layers 2 and 3 and the bucket has a (dense) padding row: those FFNs are
    not called at all, as the runner does not call them."""
    skipped = compare(runner, [plan(Policy.STATIC, static_layers=(2, 3))] * len(PROMPTS), bucket=len(PROMPTS) + 1)
    assert skipped == [[[2, 3]] * len(PROMPTS)] * STEPS


def test_ungated_layers_give_the_same_values(runner):
    """An ungated FFN is called every step, masked per row: the values stay the runner's."""
    compare(runner, MIXED_ROWS, bucket=len(PROMPTS), gated=[False, True, False, True, True, False])


def test_skipping_changes_the_logits(runner):
    """The mixed batch's logits are far from the dense batch's, so the equalities above mean something."""
    cache = prefilled(runner, len(PROMPTS))
    step = DeviceStep(runner, cache, len(PROMPTS))
    step.set_inputs(tokens_at(0), positions_at(0))
    step.run(HostBranch(), skips=False)
    dense = step.logits.clone()
    step.set_rows(row_tensors(MIXED_ROWS, 0, len(PROMPTS)))
    step.run(HostBranch())
    differs = (step.logits - dense).abs().amax(dim=-1)
    assert differs[1].item() <= ATOL  # the dense row
    assert all(differs[b].item() > 100 * ATOL for b in (0, 2, 3))


def test_greedy_advance_equals_a_host_loop(runner):
    batch, bucket = len(PROMPTS), len(PROMPTS) + 1
    host_cache, device_cache = prefilled(runner, batch), prefilled(runner, bucket)
    step = DeviceStep(runner, device_cache, bucket)
    planner = SkipPlanner(LAYERS)
    plans = [p for p in MIXED_ROWS if not p.params.policy.planned]  # the draws are fixed once on the device
    plans += [plan(Policy.STATIC, static_layers=(1, 4))] * (batch - len(plans))
    step.set_rows(row_tensors(plans, 0, bucket))
    tokens, positions = tokens_at(0), positions_at(0)
    step.set_inputs(tokens, positions)
    for n in range(STEPS):
        skips = planner.begin_step(plans, [True] * batch, generators(n))
        logits = runner.decode(host_cache, tokens, positions, skips)
        step.run(HostBranch(), advance=True)
        assert (step.logits[:batch] - logits).abs().max().item() <= ATOL
        tokens, positions = logits.argmax(dim=-1).tolist(), [p + 1 for p in positions]
        assert step.tokens[:batch].tolist() == tokens
        assert step.positions.tolist() == positions + [0]
        assert step.write_positions.tolist() == positions + [device_cache.scratch_position]


HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item", "equal"}


class NoHostReads(TorchDispatchMode):
    """Fails on an operator whose result the host must wait for (a sync on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            raise AssertionError(f"host read in the step: {func}")
        return func(*args, **(kwargs or {}))


def test_a_capture_style_step_has_no_host_read(runner):
    """Every body run without reading its predicate (as a capture records it): no operator of the
    step reads a value back, and the values are the eager ones. The detector itself is checked
    on the eager branch, which reads each predicate."""
    bucket = len(PROMPTS) + 1
    step = DeviceStep(runner, prefilled(runner, bucket), bucket)
    step.set_rows(row_tensors(MIXED_ROWS, 0, bucket))
    step.set_inputs(tokens_at(0), positions_at(0))
    step.run(HostBranch())
    eager, ran = step.logits.clone(), step.ffn_rows.clone()
    step.zero_counters()
    with NoHostReads():
        step.run(HostBranch(force=True), record=True, advance=True)
    assert (step.logits - eager).abs().max().item() <= ATOL
    assert torch.equal(step.ffn_rows, ran)
    step.set_inputs(tokens_at(0), positions_at(0))
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        step.run(HostBranch())


def test_bad_shapes_are_refused(runner):
    cache = runner.new_cache(2, MAX_LEN)
    with pytest.raises(ValueError, match="bucket"):
        DeviceStep(runner, cache, 3)
    step = DeviceStep(runner, cache, 2)
    with pytest.raises(ValueError, match="tokens"):
        step.set_inputs([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="rows"):
        step.set_rows(row_tensors(MIXED_ROWS, 0, len(MIXED_ROWS)))
