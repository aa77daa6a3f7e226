import pytest
import torch

from ffnskip.evaluation.weight_rounding import round_blocks, round_model_linears


def test_values_on_the_grid_are_kept() -> None:
    # a block whose values are multiples of its scale survives both formats exactly
    block = torch.arange(-8, 8, dtype=torch.float32).repeat(2)[None] * 0.25  # largest magnitude -2 -> scale 0.25
    assert torch.equal(round_blocks(block, "q4_0"), block)
    assert torch.equal(round_blocks(torch.full((1, 32), 3.0), "q8_0"), torch.full((1, 32), 3.0))


def test_error_is_bounded_by_the_step() -> None:
    # Q8_0 rounds to the nearest of a symmetric grid; Q4_0's grid reaches the largest value
    # exactly but only 7 steps the other way, so the far end can be a whole step off
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for fmt, levels, bound in (("q8_0", 127, 0.5), ("q4_0", 8, 1.0)):
        blocks = weight.reshape(4, 2, 32)
        step = blocks.abs().amax(-1, keepdim=True) / levels
        error = (round_blocks(weight, fmt).reshape(4, 2, 32) - blocks).abs()
        assert bool((error <= step * bound + 1e-6).all()), fmt
        assert float(error.max()) > 0  # random values are not on the grid


def test_zero_block_and_bad_input() -> None:
    assert torch.equal(round_blocks(torch.zeros(2, 32), "q4_0"), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        round_blocks(torch.zeros(2, 33), "q8_0")
    with pytest.raises(ValueError, match="format"):
        round_blocks(torch.zeros(2, 32), "q2")


def test_only_decoder_linears_are_rounded() -> None:
    model = torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(32, 4), "lm_head": torch.nn.Linear(32, 4)})
    head = model["lm_head"].weight.clone()
    assert round_model_linears(model, "q4_0") == 1
    assert torch.equal(model["lm_head"].weight, head)
