"""Weights rounded as llama.cpp's block formats round them, kept in float: a reference for how far
a weight format users run as "the model" moves its outputs (the quality budget is set on it).

Both formats cut each row of a weight matrix into blocks of 32 consecutive inputs with one scale
per block. Q8_0: scale = max|w| / 127, w ~ round(w / scale) * scale. Q4_0: the block's value of
largest magnitude m gives scale = m / -8, and w ~ (q - 8) * scale with q = floor(w / scale + 8.5)
clamped to [0, 15].
"""

from __future__ import annotations

import torch

BLOCK = 32
FORMATS = ("q8_0", "q4_0")
LINEAR_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def round_blocks(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """`weight` [out, in] (in a multiple of 32) rounded to `fmt`, as float32."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    rows, inputs = weight.shape
    if inputs % BLOCK:
        raise ValueError(f"the input width {inputs} is not a multiple of {BLOCK}")
    blocks = weight.float().reshape(rows, inputs // BLOCK, BLOCK)
    if fmt == "q8_0":
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        rounded = torch.round(blocks / safe) * scale
    else:
        largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # signed
        scale = largest / -8
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.floor(blocks / safe + 8.5).clamp(0, 15)
        rounded = (q - 8) * scale
    return rounded.reshape(rows, inputs)


@torch.no_grad()
def round_model_linears(model: torch.nn.Module, fmt: str) -> int:
    """Round every decoder layer's linear weights in place; returns how many were rounded."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_PARTS:
            module.weight.copy_(round_blocks(module.weight, fmt).to(module.weight.dtype))
            count += 1
    return count
