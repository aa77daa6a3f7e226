"""Activation outliers moved into the weights before a w8a8 product rounds both (SmoothQuant's idea).

A w8a8 product rounds each row of its input to int8 with one step for the whole row
(layers.int8_product). A few input channels of a language model's linears carry values tens of
times larger than the others, and they set that step: the other channels keep a few levels each.
Dividing input channel j by s_j and multiplying the weights' column j by it leaves the product as
it was, and with s_j = sqrt(max |x_j| / max |w_j|) the two roundings see ranges of similar size.
The inputs' maxima are measured once, when a runner is built, over the packaged calibration texts
(the judged prompts are not among them).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch
from torch import nn

from ffnskip.datasets import texts
from ffnskip.engine.prompts import encode_prompt

# s_j = max|x_j| ** ALPHA / max|w_j| ** (1 - ALPHA): 0.5 shares the range equally
ALPHA = 0.5
# The HF module whose input each fused matrix multiplies, relative to its decoder layer (q/k/v
# share their input, as gate/up do), and the LM head's relative to the model.
LAYER_INPUTS = {"qkv_weight": "self_attn.q_proj", "o_proj.weight": "self_attn.o_proj",
                "gate_up_weight": "mlp.gate_proj", "down_proj.weight": "mlp.down_proj"}
HEAD_INPUTS = {"lm_head.weight": "lm_head"}


def input_maxima(model: Any, token_sequences: Seq[Seq[int]]) -> dict[str, torch.Tensor]:
    """The largest |value| of each input channel of every nn.Linear of an HF causal LM, by module
    name, over one forward of each token sequence (float32, on the CPU)."""
    maxima: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().cpu()
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
        return record

    handles = [module.register_forward_pre_hook(recorder(name))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        with torch.inference_mode():
            for ids in token_sequences:
                model(torch.tensor([list(ids)], device=model.device))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing(input_maximum: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 / s per input channel of `weight` [N, K] (see the module's docstring): what a product's
    input is multiplied by before it is rounded; the weight's columns are divided by it."""
    columns = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5).cpu()
    scale = input_maximum.float().clamp(min=1e-5) ** ALPHA / columns ** (1 - ALPHA)
    return (1 / scale).to(weight.device)


def calibration_tokens(tokenizer: Any, limit: int | None = None) -> list[list[int]]:
    """The packaged calibration texts as the decoder sees a request: each a user turn in the
    model's chat template."""
    return [encode_prompt(tokenizer, None, [{"role": "user", "content": text}])
            for text in texts("calibration", "text", limit)]
