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

The same holds for a rule that decides per token from the position's own states
(token_rules.py: the paper's rule, a per-token choice between an FFN and its substitute), so
`run` takes such a rule in place of a fixed set.

Everything runs under inference mode, except with `grad=True`: then autograd records the forward,
so a loss on its log-probs reaches the substitutes' tensors (distill.py trains them that way).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ffnskip.calibration.token_rules import TokenRule, as_rule
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.substitutes import SubstituteSet


@dataclass(frozen=True)
class ForcedBatch:
    """Sequences right-padded to the longest, and where each one's skipping starts. Positions are
    absolute: the ids start at `offset` (after keys and values a `KeysValues` holds)."""

    ids: torch.Tensor  # [B, T]
    lengths: list[int]  # one past each sequence's last position
    skip_from: list[int]  # first skipping (and scored) position per sequence
    offset: int = 0

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.ids.shape[1])[None]

    @property
    def skip_mask(self) -> torch.Tensor:
        """[B, T] bool: the positions whose FFNs a skip set removes."""
        positions = self.positions
        return (positions >= torch.tensor(self.skip_from)[:, None]) & (positions < torch.tensor(self.lengths)[:, None])


KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, the keys and values of the positions before


@dataclass
class Pass:
    """One forward's results: the last layer's states, and what was asked to be kept."""

    states: torch.Tensor  # [B, T, D]
    inputs: list[torch.Tensor] | None  # per layer, its input x [B, T, D] (keep_inputs)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (post_norm(h), mlp(h)) at skip positions
    skips: dict[int, int]  # layer -> the positions whose FFN it skipped
    positions: int  # the positions that could skip (scored)


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

    def run(self, batch: ForcedBatch, skipped: Collection[int] | TokenRule, substitutes: SubstituteSet | None = None, *,
            start: int = 0, x: torch.Tensor | None = None, keep_inputs: bool = False,
            capture: Collection[int] = (), grad: bool = False, past: KeysValues | None = None) -> Pass:
        """The layers from `start` (whose input `x` is given; the embedding when start is 0) with
        the FFNs of `skipped` removed at the skip positions (replaced by their substitutes where the
        set has them). `skipped` is a set of layers, or a per-token rule that decides the positions
        layer by layer (a rule that carries state between layers needs start 0). `capture`: layers
        whose FFN input and output at the skip positions to keep. `grad`: record autograd (an `x`
        from an inference-mode pass must be cloned outside it first). `past`: a list that keeps
        each layer's keys and values, extended by this forward: empty for a batch at offset 0, then
        one new position a forward (free_running's cache)."""
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            return self._run(batch, skipped, substitutes, start, x, keep_inputs, capture, past)

    def _run(self, batch: ForcedBatch, skipped: Collection[int] | TokenRule, substitutes: SubstituteSet | None, start: int,
             x: torch.Tensor | None, keep_inputs: bool, capture: Collection[int], past: KeysValues | None) -> Pass:
        runner = self.runner
        mask = batch.skip_mask.to(runner.device)
        if x is None:
            if start:
                raise ValueError("a forward that starts after the embedding needs its input")
            x = runner.embed(batch.ids)
        positions = batch.positions.to(runner.device).expand_as(batch.ids)
        cos, sin = runner.rotary(x, positions, end=batch.offset + batch.ids.shape[1])
        if past is not None and len(past) != (runner.num_layers if batch.offset else 0):
            raise ValueError("keys and values are kept from offset 0 on, for every layer")
        if batch.offset and (past is None or batch.ids.shape[1] != 1):
            raise ValueError("a forward after offset 0 takes one position, over the keys and values kept")
        inputs: list[torch.Tensor] | None = [] if keep_inputs else None
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        skips: dict[int, int] = {}
        rule = as_rule(skipped)
        rule.begin(mask)
        for index in range(start, runner.num_layers):
            layer = runner.layers[index]
            if inputs is not None:
                inputs.append(x)
            q, k, v = layer.qkv(x, cos, sin)
            if past is not None:
                if batch.offset:
                    k, v = torch.cat([past[index][0], k], dim=2), torch.cat([past[index][1], v], dim=2)
                    past[index] = (k, v)
                else:
                    past.append((k, v))
            h = x + layer.output(layer.attention(q, k, v, None, causal=not batch.offset))
            ffn, normed = layer.mlp(h), layer.post_norm(h)
            if index in capture:
                captured[index] = (normed[mask], ffn[mask])
            skip = rule.decide(index, x, h, normed, ffn)
            if skip is not None:
                keep = (~skip)[..., None].to(h.dtype)
                ffn = ffn * keep
                if substitutes is not None and index in substitutes:
                    ffn = ffn + substitutes[index](normed) * (1 - keep)
                skips[index] = int(skip.sum())
            x = h + ffn
            rule.observe(index, h, x)
        return Pass(x, inputs, captured, skips, int(mask.sum()))

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


def free_running(runner: ModelRunner, prompts: Seq[Seq[int]], tokens: int, warm_up: int,
                 rule: Callable[[], Collection[int] | TokenRule], substitutes: SubstituteSet | None = None,
                 eos: int | None = None) -> list[list[int]]:
    """Greedy answers of up to `tokens` tokens (ending at `eos`) with a skip rule in place from the
    token after the warm-up, as the engine's decode steps give them, for rules the engine does not
    serve: per prompt, the prompt's forward (which never skips), then one position a forward over
    the keys and values kept, each with a fresh `rule()`."""
    forward = ForcedForward(runner, [], [], warm_up, 1)
    answers: list[list[int]] = []
    for prompt in prompts:
        past: KeysValues = []
        skip_from = [len(prompt) + max(warm_up, 1) - 1]
        batch = ForcedBatch(torch.tensor([list(prompt)], device=runner.device), [len(prompt)], skip_from)
        answer: list[int] = []
        while len(answer) < tokens and not (answer and answer[-1] == eos):
            states = forward.run(batch, rule(), substitutes, past=past).states
            with torch.inference_mode():
                answer.append(int(runner.position_logits(states[:, -1]).argmax(-1)))
            position = len(prompt) + len(answer) - 1
            batch = ForcedBatch(torch.tensor([[answer[-1]]], device=runner.device), [position + 1], skip_from, position)
        answers.append(answer)
    return answers

