"""A step's execution: the scheduler's plan run on the model, its tokens sampled and emitted.

Prefill runs each group of prompt chunks in one forward (recording prompt log-probabilities
where asked) and samples the first token of each prompt it completes; decode runs the
decoding rows under their skip policies and samples their next tokens. Row bookkeeping is
the scheduler's (scheduler.py); sampling and the skip plans are sampling.py's and policies.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from ffnskip.config import Policy
from ffnskip.engine.kv_cache import KVCache
from ffnskip.engine.policies import SkipPlanner
from ffnskip.engine.results import TokenEvent
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.sampling import TokenLogprob, logprobs_of, sample
from ffnskip.engine.scheduler import PrefillChunk
from ffnskip.engine.sequence import Sequence


class StepExecutor:
    def __init__(self, runner: ModelRunner, cache: KVCache) -> None:
        self.runner = runner
        self.cache = cache
        self.num_layers = runner.num_layers
        self.planner = SkipPlanner(self.num_layers)
        # decode-step counters: layer-steps, and those whose FFN weights were read by any row
        self.decode_layer_steps = 0
        self.decode_ffn_reads = 0

    def prefill(self, groups: list[list[PrefillChunk[Sequence]]]) -> list[TokenEvent]:
        """Prefill each group of chunks in one forward (a batch of prompts costs little more
        than one on a CPU's GEMMs); a sequence whose prompt the chunk completes samples its
        first token (a resumed one does not: its first decode step consumes its last delivered
        token, and its delivered tokens are prefilled skipping what their decode steps skipped).
        The scheduler counts the chunks in and moves the rows afterwards."""
        first_tokens: list[tuple[Sequence, int, TokenLogprob | None]] = []
        for group in groups:
            completing = [i for i, chunk in enumerate(group) if chunk.completes and chunk.seq.samples_after_prefill]
            started = time.perf_counter()
            states = self.runner.prefill_states(self.cache, [chunk.row for chunk in group],
                                                [chunk.tokens for chunk in group], [chunk.start for chunk in group],
                                                [chunk.seq.context_skips(chunk.start, chunk.length) for chunk in group],
                                                [chunk.seq.substitutes for chunk in group])
            logits = self.runner.last_logits(states, [chunk.length for chunk in group], completing)
            for i, chunk in enumerate(group):
                if chunk.seq.sampling.prompt_logprobs:
                    self._record_prompt_logprobs(chunk, states[i, :chunk.length])
            ready = [group[i].seq for i in completing]
            sampled = taught(ready, logits, sample(logits, ready))
            elapsed = time.perf_counter() - started
            for chunk in group:
                chunk.seq.forward_seconds += elapsed
            first_tokens += zip(ready, sampled, token_logprobs(ready, logits, sampled))
        return [emit(seq, token, [], None, logprob) for seq, token, logprob in first_tokens]

    def _record_prompt_logprobs(self, chunk: PrefillChunk[Sequence], states: torch.Tensor) -> None:
        """The log-probability of each prompt token in this chunk given the ones before it
        (the chunk's position p predicts token p + 1; the first prompt token has none)."""
        seq, prompt = chunk.seq, chunk.seq.prompt_ids
        if chunk.start == 0:
            seq.prompt_logprobs.append(TokenLogprob(prompt[0], None))
        predicted = min(chunk.start + chunk.length, len(prompt) - 1) - chunk.start  # positions whose next token is in the prompt
        if predicted > 0:
            logits = self.runner.position_logits(states[:predicted])
            targets = prompt[chunk.start + 1:chunk.start + 1 + predicted]
            seq.prompt_logprobs += logprobs_of(logits, targets, seq.sampling.top_logprobs)

    def decode(self, batch: list[Sequence]) -> list[TokenEvent]:
        """One token for each decoding sequence (`batch` holds the rows [0, len(batch)))."""
        if not batch:
            return []
        started = time.perf_counter()
        skips = self.planner.begin_step([s.plan for s in batch], [s.past_warm_up for s in batch],
                                        [s.skip_generator for s in batch],
                                        record_similarity=any(s.skip.policy is Policy.OBSERVE for s in batch))
        logits = self.runner.decode(self.cache, [s.generated[-1] for s in batch],
                                    [s.last_position for s in batch], skips, [s.substitutes for s in batch])
        tokens = taught(batch, logits, sample(logits, batch))
        logprobs = token_logprobs(batch, logits, tokens)
        outcome = skips.outcome()
        self.decode_layer_steps += self.num_layers
        self.decode_ffn_reads += outcome.ffn_reads
        elapsed = time.perf_counter() - started
        events = []
        for i, seq in enumerate(batch):
            seq.forward_seconds += elapsed
            similarity = outcome.similarity[i] if outcome.similarity is not None else None
            events.append(emit(seq, tokens[i], outcome.skipped[i], similarity, logprobs[i]))
        return events


def emit(seq: Sequence, token: int, skipped: list[int], similarity: list[float] | None,
         logprob: TokenLogprob | None) -> TokenEvent:
    """Append a generated token to its sequence; the event that reports it."""
    piece = seq.append(token, skipped, similarity)
    if logprob is not None:
        seq.logprobs.append(logprob)
    return TokenEvent(seq.seq_id, seq.request_id, len(seq.generated), token, piece, skipped, seq.finish_reason,
                      logprob)


def token_logprobs(seqs: Seq[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
    """Each chosen token's log-probability for the sequences that asked for it (None for the rest)."""
    asked = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if asked:
        top = max(seqs[i].sampling.top_logprobs for i in asked)
        for i, logprob in zip(asked, logprobs_of(logits[asked], [tokens[i] for i in asked], top)):
            out[i] = replace(logprob, top=logprob.top[:seqs[i].sampling.top_logprobs])
    return out


def taught(seqs: Seq[Sequence], logits: torch.Tensor, sampled: list[int]) -> list[int]:
    """The sampled tokens, with each taught sequence's teacher choosing its own."""
    for i, seq in enumerate(seqs):
        if seq.teacher is not None:
            sampled[i] = seq.teacher.choose(len(seq.generated), logits[i], sampled[i])
    return sampled
