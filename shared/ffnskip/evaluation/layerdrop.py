"""The whole-layer-dropping baseline (ShortGPT, Men et al. 2024): drop the decoder layers
with the lowest Block Influence BI_l = 1 - E[cos(x_l, x_{l+1})] (input vs output of the
whole layer, attention included) measured over calibration text.

The dropped model runs through the same skip engine as every other method: a shallow
copy of the HF model whose `model.layers` holds only the kept layers (the modules and
their weights are shared, nothing is copied but the fused q/k/v and gate/up tensors the
engine builds). No engine file changes; prefill and decode both lose the layers, as in
ShortGPT, so there is no warm-up.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch

from ffnskip.engine import LoadedModel


@torch.inference_mode()
def block_influence(loaded: LoadedModel, prompts: Sequence[list[int]]) -> list[float]:
    """BI per layer, averaged over every prompt token (teacher-forced, like ShortGPT)."""
    model = loaded.model
    sums = [0.0] * loaded.num_layers
    count = 0

    def hook(index: int):
        def record(module, args, kwargs, output) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[index] += float((1.0 - cos).sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        for ids in prompts:
            model(torch.tensor([ids], device=loaded.device), use_cache=False)
            count += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(count, 1) for s in sums]


def layers_to_drop(importance: Sequence[float], count: int) -> tuple[int, ...]:
    """The `count` least influential layers (ties: the later layer first), never all of them."""
    count = max(0, min(count, len(importance) - 1))
    order = sorted(range(len(importance)), key=lambda i: (importance[i], -i))
    return tuple(sorted(order[:count]))


def pruned_model(loaded: LoadedModel, drop: Sequence[int]) -> LoadedModel:
    """A LoadedModel whose decoder has the `drop` layers removed (weights shared)."""
    hf = loaded.model
    keep = [layer for i, layer in enumerate(hf.model.layers) if i not in set(drop)]
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = len(keep)
    inner = copy.copy(hf.model)
    inner._modules = dict(hf.model._modules)  # a copy's own module table: the original keeps its layers
    inner.layers = torch.nn.ModuleList(keep)
    inner.config = config
    outer = copy.copy(hf)
    outer._modules = dict(hf._modules)
    outer.model = inner
    outer.config = config
    return replace(loaded, model=outer, model_id=f"{loaded.model_id} minus layers {list(drop)}")
