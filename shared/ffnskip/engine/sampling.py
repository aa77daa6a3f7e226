"""Sampling: a pure function of logits and each row's own state.

Greedy rows without adjustments are decided in one argmax for the batch. A row's logits
are adjusted first (penalties over the tokens so far; end-of-sequence masked until
min_tokens), then a sampled row draws from a generator seeded by (its seed, the token's
position): a request's output depends on neither its batch mates nor on where it started,
so a generation continued on another decoder from its delivered tokens draws what the
first decoder would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ffnskip.config import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # the golden-ratio constant: spreads (seed, position) over 64 bits
_MASK = (1 << 64) - 1


class SampledRow(Protocol):
    """What sampling reads of a sequence."""

    sampling: SamplingParams
    seed: int
    prompt_ids: list[int]
    generated: list[int]
    eos_ids: frozenset[int]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position (None: the first prompt token, unpredicted)
    and the `top` most likely (token id, log-probability) there, most likely first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: torch.Tensor, rows: Seq[SampledRow]) -> list[int]:
    """logits: [B, V]; returns one token id per row."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(rows):
        p = seq.sampling
        adjust = p.penalised or len(seq.generated) < p.min_tokens
        if p.greedy and not adjust:
            continue
        scores = logits[row].float()
        if adjust:
            scores = adjusted(scores, seq)
        chosen[row] = int(scores.argmax()) if p.greedy else _draw(scores, p, position_generator(seq.seed, len(seq.generated)))
    return chosen


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator of one sampled position: a function of the seed and the position only."""
    return torch.Generator().manual_seed(((seed * _MIX) ^ (position * 0xBF58476D1CE4E5B9)) & _MASK)


def adjusted(scores: torch.Tensor, seq: SampledRow) -> torch.Tensor:
    """A row's logits after the repetition, presence and frequency penalties, with its
    end-of-sequence tokens masked while it has fewer than min_tokens."""
    p = seq.sampling
    scores = scores.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.generated)), dtype=torch.long)
        values = scores[seen]
        scores[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.generated:
        ids, counts = torch.tensor(seq.generated, dtype=torch.long).unique(return_counts=True)
        scores[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(scores.dtype)
    if len(seq.generated) < p.min_tokens and seq.eos_ids:
        scores[torch.tensor(sorted(seq.eos_ids), dtype=torch.long)] = float("-inf")
    return scores


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    # draw on the generator's device (CPU) so seeded results match across devices
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def logprobs_of(logits: torch.Tensor, tokens: Seq[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities of `tokens` under the model's own distribution (before
    temperature, penalties and truncation): logits [N, V], one token per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(list(tokens), dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in tokens]
    return [TokenLogprob(token, value, alt) for token, value, alt in zip(tokens, chosen, alternatives)]
