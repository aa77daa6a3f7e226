"""Sampling: a pure function of logits and each request's own seeded generator.

Greedy rows are decided in one argmax; sampled rows draw from their own
torch.Generator so a request's output does not depend on its batch mates.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from ffnskip.config import SamplingParams


def sample(logits: torch.Tensor, params: Seq[SamplingParams], generators: Seq[torch.Generator]) -> list[int]:
    """logits: [B, V]; returns one token id per row."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            chosen[row] = _sample_row(logits[row].float(), p, generator)
    return chosen


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    # draw on the generator's device (CPU) so seeded results match across devices
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
