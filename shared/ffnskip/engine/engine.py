"""The engine facade: add requests, step the batch, generate or stream.

`step()` reads in one glance: admit waiting sequences into free cache rows, prefill
the next chunks of their prompts (those whose prompt is then complete sample their
first token), decode the sequences that were already running under their skip
policies, then retire the finished ones.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence as Seq

import torch

from ffnskip.config import DENSE, Policy, SamplingParams, SkipParams
from ffnskip.engine.compiled import CompileTarget, CompiledSegments
from ffnskip.engine.loading import LoadedModel
from ffnskip.engine.policies import RowPlan, SkipPlanner
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.prompts import encode_prompt, eos_ids
from ffnskip.engine.results import GenerationResult, TokenEvent
from ffnskip.engine.sampling import TokenLogprob, logprobs_of, sample
from ffnskip.engine.sequence import IncrementalDetokenizer, Sequence, Teacher
from ffnskip.engine.stats import SkipStats, weight_bytes
from ffnskip.errors import InvalidArgument


PREFILL_PADDING = 1.5  # a group's padded tokens (count x longest) at most this times its real tokens


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 8, max_seq_len: Optional[int] = 2048,
                 compile: bool = False, runner: Optional[ModelRunner] = None, eager_until_warm: bool = False,
                 prefill_chunk: Optional[int] = None) -> None:
        """`compile`: decode segments compiled (or loaded from the compile cache) per batch bucket
        (compiled.py), on first use, or with `eager_until_warm` only by warm_up (a bucket runs
        eagerly until then). `runner`: another engine's runner, to share its weights and segments;
        this engine keeps its own cache and batch, and `compile` is the other engine's choice.
        `prefill_chunk`: the prompt tokens a step prefills at most, for serving (a decoder's
        FFNSKIP_PREFILL_CHUNK): a long prompt, or a burst of prompts, then delays the running
        rows' next token by about one chunk's forward, and a burst's first prompts get their
        first token before its last ones are prefilled. None (batch jobs: calibration, the
        benches): every admitted prompt whole, so a batch's rows decode together from its first
        step."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidArgument("prefill_chunk", f"must be at least 1 token, got {prefill_chunk}")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if runner is None:
            target = (CompileTarget(max_batch, loaded.cache_dir / "compiled", loaded.fingerprint, eager_until_warm)
                      if compile else None)
            runner = ModelRunner(loaded.model, target)
        self.runner = runner
        self.num_layers = runner.num_layers
        self.max_seq_len = min(max_seq_len or loaded.context_window, loaded.context_window)
        self.cache = runner.new_cache(max_batch, self.max_seq_len)
        self.planner = SkipPlanner(self.num_layers)
        self.weight_bytes = weight_bytes(loaded.model)
        self.eos_ids = eos_ids(loaded)
        self.waiting: deque[Sequence] = deque()
        # running[i].row == i, the rows a contiguous prefix: the decoding sequences first, then
        # those still prefilling (a decode step works on the rows [0, decoding) as views)
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # the running ones still prefilling, in admission order
        self.prefill_chunk = prefill_chunk
        # decode-step counters: layer-steps, and those whose FFN weights were read by any row
        self.decode_layer_steps = 0
        self.decode_ffn_reads = 0

    def warm_up(self, batch_sizes: Seq[int], on_compiled: Optional[Callable[[], None]] = None) -> float:
        """Load the decode segments for these batch sizes now (compiling those not on disk,
        calling `on_compiled` after each) instead of on first use; returns the seconds it took
        (0 for an eager engine)."""
        segments = self.runner.segments
        if not isinstance(segments, CompiledSegments):
            return 0.0
        return segments.warm_up(self._buckets(batch_sizes), on_compiled)

    def release_raw_weights(self) -> int:
        """Once every bucket it will use is compiled: prefill on the compiled segments' copy of
        the weights and free the model's own (ModelRunner.release_raw_weights); bytes released."""
        return self.runner.release_raw_weights()

    def packages_to_compile(self, batch_sizes: Seq[int]) -> int:
        """Compiled segments of these batch sizes not on disk yet (0 for an eager engine)."""
        segments = self.runner.segments
        return segments.missing(self._buckets(batch_sizes)) if isinstance(segments, CompiledSegments) else 0

    def _buckets(self, batch_sizes: Seq[int]) -> list[int]:
        return sorted({self.runner.segments.bucket(b) for b in batch_sizes})

    # -- requests ---------------------------------------------------------------------------

    def add(self, prompt: Optional[str] = None, messages: Optional[list[dict]] = None,
            sampling: SamplingParams = SamplingParams(), skip: SkipParams = DENSE,
            request_id: str = "", prompt_ids: Optional[list[int]] = None,
            teacher: Optional[Teacher] = None, resumed: Seq[int] = ()) -> Sequence:
        """Validate and queue a request (a prompt, chat messages or token ids); it is
        prefilled at the next step that has a free row. `teacher` sees each position's logits
        and picks its token (teacher forcing, for the quality measures). `resumed`: the tokens
        another decoder generated and delivered for this request; generation continues after
        them (Sequence.resume)."""
        resolved = skip.resolved(self.num_layers)
        if prompt_ids is None:
            prompt_ids = encode_prompt(self.tokenizer, prompt, messages)
        elif not prompt_ids:
            raise InvalidArgument("prompt_ids", "must not be empty")
        else:
            vocab = self.runner.head.vocab_size
            bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidArgument("prompt_ids", f"token id {bad} is outside the vocabulary [0, {vocab})")
        self._check_lengths(len(prompt_ids), sampling.max_new_tokens)
        seq = Sequence(
            prompt_ids=prompt_ids, sampling=sampling, skip=resolved,
            plan=RowPlan.build(resolved, self.num_layers),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            eos_ids=self.eos_ids, request_id=request_id, teacher=teacher,
        )
        if resumed:
            seq.resume(list(resumed))
        self.waiting.append(seq)
        return seq

    def _check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens >= self.loaded.context_window:
            raise InvalidArgument("prompt", f"{prompt_tokens} tokens exceed the model's context window of {self.loaded.context_window}")
        if prompt_tokens >= self.max_seq_len:
            raise InvalidArgument("prompt", f"{prompt_tokens} tokens exceed this engine's sequence length of {self.max_seq_len}")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise InvalidArgument(
                "max_new_tokens",
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the engine's sequence length {self.max_seq_len}",
            )

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a sequence (one `add` returned); it leaves the batch at the next step.
        A sequence that has already finished keeps its own finish reason."""
        seq.cancel(reason)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        self._retire_finished()  # sequences cancelled since the last step leave first
        self._drop_cancelled_waiting()
        decoding = self.decoding
        self._admit()
        events = self._prefill() if self.prefilling else []
        if decoding:
            events += self._decode(self.running[:decoding])
        self._retire_finished()
        return events

    @property
    def decoding(self) -> int:
        """Running sequences past their prefill: they hold the rows [0, decoding)."""
        return len(self.running) - len(self.prefilling)

    def _admit(self) -> None:
        """Give waiting sequences the free cache rows, after every running one."""
        for _ in range(min(len(self.waiting), self.cache.free_rows)):
            seq = self.waiting.popleft()
            seq.row = self.cache.take_row()
            self.running.append(seq)
            self.prefilling.append(seq)

    def _prefill(self) -> list[TokenEvent]:
        """Prefill the next chunks of the prompts, in admission order and `prefill_chunk` tokens
        in all at most, in groups of similar length (one forward per group: a batch of prompts
        costs little more than one on a CPU's GEMMs, and padding to the group's longest stays
        within PREFILL_PADDING of the real tokens). A sequence whose prompt is then complete
        samples its first token and joins the decoding rows."""
        first_tokens: list[tuple[Sequence, int, Optional[TokenLogprob]]] = []
        for group in prefill_groups(self._next_chunks()):
            completing = [i for i, chunk in enumerate(group) if chunk.completes]
            started = time.perf_counter()
            states = self.runner.prefill_states(self.cache, [chunk.row for chunk in group],
                                                [chunk.tokens for chunk in group], [chunk.start for chunk in group])
            logits = self.runner.last_logits(states, [chunk.length for chunk in group], completing)
            for i, chunk in enumerate(group):
                if chunk.seq.sampling.prompt_logprobs:
                    self._record_prompt_logprobs(chunk, states[i, :chunk.length])
            ready = [group[i].seq for i in completing]
            sampled = taught(ready, logits, sample(logits, ready))
            elapsed = time.perf_counter() - started
            for chunk in group:
                chunk.seq.forward_seconds += elapsed
                chunk.seq.prefilled += chunk.length
            first_tokens += zip(ready, sampled, _logprobs(ready, logits, sampled))
        for seq, _, _ in first_tokens:
            self._join_decoding(seq)
        return [self._emit(seq, token, [], None, logprob) for seq, token, logprob in first_tokens]

    def _record_prompt_logprobs(self, chunk: PrefillChunk, states: torch.Tensor) -> None:
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

    def _next_chunks(self) -> list[PrefillChunk]:
        """This step's prompt chunks, in admission order: whole prompts while they fit in
        `prefill_chunk` tokens; a prompt longer than that goes alone, one chunk a step (a prompt
        split where a step's budget ends would make that step longer and get no token sooner)."""
        if self.prefill_chunk is None:
            return [PrefillChunk(seq, seq.prefilled, len(seq.context_ids) - seq.prefilled) for seq in self.prefilling]
        left = self.prefill_chunk
        chunks: list[PrefillChunk] = []
        for seq in self.prefilling:
            remaining = len(seq.context_ids) - seq.prefilled
            if remaining > left:
                if not chunks:
                    chunks.append(PrefillChunk(seq, seq.prefilled, left))
                break
            chunks.append(PrefillChunk(seq, seq.prefilled, remaining))
            left -= remaining
        return chunks

    def _join_decoding(self, seq: Sequence) -> None:
        """Move a sequence whose prefill is complete to the first prefilling row (the end of the
        decoding prefix), exchanging it with the sequence there."""
        assert seq.row is not None
        target = self.decoding
        if seq.row != target:
            other = self.running[target]
            self.cache.swap_rows(seq.row, target)
            self.running[seq.row], self.running[target] = other, seq
            other.row, seq.row = seq.row, target
        self.prefilling.remove(seq)

    def _decode(self, batch: list[Sequence]) -> list[TokenEvent]:
        started = time.perf_counter()
        skips = self.planner.begin_step([s.plan for s in batch], [s.past_warm_up for s in batch],
                                        [s.skip_generator for s in batch],
                                        record_similarity=any(s.skip.policy is Policy.OBSERVE for s in batch))
        logits = self.runner.decode(self.cache, [s.generated[-1] for s in batch],
                                    [s.last_position for s in batch], skips)
        tokens = taught(batch, logits, sample(logits, batch))
        logprobs = _logprobs(batch, logits, tokens)
        outcome = skips.outcome()
        self.decode_layer_steps += self.num_layers
        self.decode_ffn_reads += outcome.ffn_reads
        elapsed = time.perf_counter() - started
        events = []
        for i, seq in enumerate(batch):
            seq.forward_seconds += elapsed
            similarity = outcome.similarity[i] if outcome.similarity is not None else None
            events.append(self._emit(seq, tokens[i], outcome.skipped[i], similarity, logprobs[i]))
        return events

    def _emit(self, seq: Sequence, token: int, skipped: list[int], similarity: Optional[list[float]],
              logprob: Optional[TokenLogprob]) -> TokenEvent:
        piece = seq.append(token, skipped, similarity)
        if logprob is not None:
            seq.logprobs.append(logprob)
        return TokenEvent(seq.seq_id, seq.request_id, len(seq.generated), token, piece, skipped, seq.finish_reason,
                          logprob)

    def _drop_cancelled_waiting(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.finished)

    def _retire_finished(self) -> None:
        # from the highest row down: freeing a row moves only rows above it
        for seq in sorted((s for s in self.running if s.finished), key=lambda s: s.row or 0, reverse=True):
            self._free_row(seq)

    def _free_row(self, seq: Sequence) -> None:
        """Give back a finished sequence's row. A decoding row's hole is filled by the last
        decoding row and that one's by the last row, so both parts stay contiguous."""
        assert seq.row is not None
        row = seq.row
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            last_decoding = self.decoding - 1
            if row != last_decoding:
                mover = self.running[last_decoding]
                self.cache.copy_row(last_decoding, row)
                self.running[row], mover.row = mover, row
                self.running[last_decoding], row = seq, last_decoding
        moved = self.cache.release_row(row)
        last = self.running.pop()
        if moved is not None:
            last.row = row
            self.running[row] = last
        seq.row = None

    # -- conveniences -----------------------------------------------------------------------

    def result(self, seq: Sequence) -> GenerationResult:
        end = seq.finished_at or time.perf_counter()
        return GenerationResult(
            request_id=seq.request_id, text=seq.text, token_ids=list(seq.generated),
            finish_reason=seq.finish_reason or "running",
            skip_stats=SkipStats.from_records(seq.skip_records, self.num_layers, seq.skip.warm_up),
            skip_records=seq.skip_records,
            ttft_s=(seq.first_token_at or end) - seq.submitted_at, total_s=end - seq.submitted_at,
            similarity=seq.similarity, policy=seq.skip.policy.value, seed=seq.seed, prompt_tokens=len(seq.prompt_ids),
            logprobs=list(seq.logprobs), prompt_logprobs=list(seq.prompt_logprobs),
        )

    def generate(self, prompts: Seq[str | list[dict]], sampling: SamplingParams = SamplingParams(),
                 skip: SkipParams = DENSE) -> list[GenerationResult]:
        """Generate for several prompts (strings or chat message lists) as one batch."""
        seqs = [self.add(**_prompt_kwargs(p), sampling=sampling, skip=skip) for p in prompts]
        while any(not s.finished for s in seqs):
            self.step()
        return [self.result(s) for s in seqs]

    def stream(self, prompt: str | list[dict], sampling: SamplingParams = SamplingParams(),
               skip: SkipParams = DENSE) -> Iterator[TokenEvent]:
        """Yield one prompt's tokens as they are generated."""
        seq = self.add(**_prompt_kwargs(prompt), sampling=sampling, skip=skip)
        while not seq.finished:
            for event in self.step():
                if event.seq_id == seq.seq_id:
                    yield event


def _logprobs(seqs: Seq[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[Optional[TokenLogprob]]:
    """Each chosen token's log-probability for the sequences that asked for it (None for the rest)."""
    asked = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs]
    out: list[Optional[TokenLogprob]] = [None] * len(seqs)
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


@dataclass(frozen=True)
class PrefillChunk:
    """The prompt positions [start, start + length) of a sequence, prefilled in one step."""

    seq: Sequence
    start: int
    length: int

    @property
    def row(self) -> int:
        assert self.seq.row is not None
        return self.seq.row

    @property
    def tokens(self) -> list[int]:
        return self.seq.context_ids[self.start:self.start + self.length]

    @property
    def completes(self) -> bool:
        """Whether the prompt is whole in the cache after this chunk."""
        return self.start + self.length == len(self.seq.context_ids)


def prefill_groups(chunks: Seq[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Chunks grouped for one forward each by length, shortest first: a group takes the next
    chunk while the padding to it keeps within PREFILL_PADDING."""
    groups: list[list[PrefillChunk]] = []
    group: list[PrefillChunk] = []
    real = 0
    for chunk in sorted(chunks, key=lambda c: c.length):
        if group and (len(group) + 1) * chunk.length > PREFILL_PADDING * (real + chunk.length):
            groups.append(group)
            group, real = [], 0
        group.append(chunk)
        real += chunk.length
    if group:
        groups.append(group)
    return groups


def _prompt_kwargs(prompt: str | list[dict]) -> dict:
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
