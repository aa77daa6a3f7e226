"""Teacher-forced measures of a fixed FFN skip set in one forward pass per batch of answers.

A static skip set decides nothing per token, so decoding dense's answer token by token with the
set in place computes exactly what one causal forward over prompt + answer computes with the set
applied at the positions the decode steps would skip (each position's keys and values come from
its own skipped forward, as in the cache). One forward runs at GEMM speed where decoding runs a
GEMV per token, so the greedy selection (selection.py), which measures a few hundred sets, costs
minutes instead of hours. The engine's decode path stays the judge of the chosen set
(quality.py's runs).

Position p of a sequence predicts token p + 1. With a warm-up of w tokens the decode steps skip
from position `prompt + w - 1` on (the step that consumes generated token g runs after g + 1
tokens exist), and those are the positions scored, as quality.py scores the tokens after the
warm-up. The prompt's own positions (the prefill) never skip.

Everything runs under inference mode, except with `grad=True`: then autograd records the forward,
so a loss on its log-probs reaches the substitutes' tensors (distill.py trains them that way).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.substitutes import SubstituteSet


@dataclass(frozen=True)
class ForcedBatch:
    """Sequences right-padded to the longest, and where each one's skipping starts."""

    ids: torch.Tensor  # [B, T]
    lengths: list[int]
    skip_from: list[int]  # first skipping (and scored) position per sequence

    @property
    def skip_mask(self) -> torch.Tensor:
        """[B, T] bool: the positions whose FFNs a skip set removes."""
        positions = torch.arange(self.ids.shape[1])[None]
        return (positions >= torch.tensor(self.skip_from)[:, None]) & (positions < torch.tensor(self.lengths)[:, None])


@dataclass
class Pass:
    """One forward's results: the last layer's states, and what was asked to be kept."""

    states: torch.Tensor  # [B, T, D]
    inputs: list[torch.Tensor] | None  # per layer, its input x [B, T, D] (keep_inputs)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (post_norm(h), mlp(h)) at skip positions


class ForcedForward:
    """Teacher-forced forwards of fixed sequences through a runner's layers (no KV cache)."""

    def __init__(self, runner: ModelRunner, prompts: Seq[Seq[int]], answers: Seq[Seq[int]], warm_up: int,
                 batch_size: int) -> None:
        """Answers that end within the warm-up have no position to skip and are left out."""
        self.runner = runner
        self.batches: list[ForcedBatch] = []
        for start in range(0, len(prompts), batch_size):
            sequences, skip_from = [], []
            for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
                if len(answer) <= max(warm_up, 1):
                    continue  # it ended within the warm-up: no position would skip, nothing to score
                sequences.append(list(prompt) + list(answer[:-1]))  # the last answer token predicts nothing scored
                skip_from.append(len(prompt) + max(warm_up, 1) - 1)
            if not sequences:
                continue
            longest = max(len(s) for s in sequences)
            ids = torch.tensor([s + [0] * (longest - len(s)) for s in sequences], device=runner.device)
            self.batches.append(ForcedBatch(ids, [len(s) for s in sequences], skip_from))

    def run(self, batch: ForcedBatch, skipped: Collection[int], substitutes: SubstituteSet | None = None, *,
            start: int = 0, x: torch.Tensor | None = None, keep_inputs: bool = False,
            capture: Collection[int] = (), grad: bool = False) -> Pass:
        """The layers from `start` (whose input `x` is given; the embedding when start is 0) with
        the FFNs of `skipped` removed at the skip positions (replaced by their substitutes where the
        set has them). `capture`: layers whose FFN input and output at the skip positions to keep.
        `grad`: record autograd (an `x` from an inference-mode pass must be cloned outside it first)."""
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            return self._run(batch, skipped, substitutes, start, x, keep_inputs, capture)

    def _run(self, batch: ForcedBatch, skipped: Collection[int], substitutes: SubstituteSet | None, start: int,
             x: torch.Tensor | None, keep_inputs: bool, capture: Collection[int]) -> Pass:
        runner = self.runner
        mask = batch.skip_mask.to(runner.device)
        if x is None:
            if start:
                raise ValueError("a forward that starts after the embedding needs its input")
            x = runner.embed(batch.ids)
        positions = torch.arange(batch.ids.shape[1], device=runner.device)[None].expand_as(batch.ids)
        cos, sin = runner.rotary(x, positions, end=batch.ids.shape[1])
        inputs: list[torch.Tensor] | None = [] if keep_inputs else None
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index in range(start, runner.num_layers):
            layer = runner.layers[index]
            if inputs is not None:
                inputs.append(x)
            q, k, v = layer.qkv(x, cos, sin)
            h = x + layer.output(layer.attention(q, k, v, None, causal=True))
            ffn = layer.mlp(h)
            if index in capture:
                captured[index] = (layer.post_norm(h)[mask], ffn[mask])
            if index in skipped:
                keep = (~mask)[..., None].to(h.dtype)
                ffn = ffn * keep
                if substitutes is not None and index in substitutes:
                    ffn = ffn + substitutes[index](layer.post_norm(h)) * (1 - keep)
            x = h + ffn
        return Pass(x, inputs, captured)

    def log_probs(self, batch: ForcedBatch, states: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
        """Per sequence, the log-softmax [scored positions, V] at its scored positions (float32).
        `grad`: record autograd (the runner's position_logits runs under inference mode, so the
        head is called on the scored positions directly; answers are short, no slicing needed)."""
        out = []
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            for row, (start, length) in enumerate(zip(batch.skip_from, batch.lengths)):
                scored = states[row, start:length]
                logits = self.runner.head(scored[:, None]) if grad else self.runner.position_logits(scored)
                out.append(torch.log_softmax(logits.float(), dim=-1))
        return out

    def dense(self) -> list[list[torch.Tensor]]:
        """Per batch, dense's log-probs at the scored positions: the reference of `kl`."""
        return [self.log_probs(batch, self.run(batch, ()).states) for batch in self.batches]

    def kl(self, references: Seq[Seq[torch.Tensor]], skipped: Collection[int],
           substitutes: SubstituteSet | None = None) -> list[list[float]]:
        """Per sequence of every batch, KL(dense || the set in place) at each scored position
        (`references`: from `dense`)."""
        rows: list[list[float]] = []
        for batch, reference in zip(self.batches, references):
            rows += kl_rows(reference, self.log_probs(batch, self.run(batch, skipped, substitutes).states))
        return rows


def position_kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) at each position of two log-softmaxes [P, V] -> [P]
    (differentiable in both)."""
    return (reference.exp() * (reference - candidate)).sum(-1)


def kl_rows(reference: Seq[torch.Tensor], candidate: Seq[torch.Tensor]) -> list[list[float]]:
    """Per sequence, KL(reference || candidate) at each scored position."""
    return [position_kl(ref, cand).clamp_min(0.0).tolist() for ref, cand in zip(reference, candidate)]
