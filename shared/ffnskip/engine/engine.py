"""The engine facade: add requests, step the batch, cancel, generate or stream.

A step is the scheduler's plan run by the executor: the scheduler (scheduler.py) admits
waiting sequences into free cache rows and picks the next chunks of their prompts; the
executor (steps.py) prefills those (a prompt then complete samples its first token) and
decodes the sequences already decoding under their skip policies; the scheduler then moves
the completed prompts to the decoding rows and retires the finished sequences.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine.compiled import CompiledSegments, CompileTarget
from ffnskip.engine.loading import LoadedModel
from ffnskip.engine.policies import RowPlan
from ffnskip.engine.prompt_cache import PromptCache
from ffnskip.engine.prompts import encode_prompt, eos_ids
from ffnskip.engine.results import GenerationResult, TokenEvent
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.scheduler import Scheduler
from ffnskip.engine.sequence import IncrementalDetokenizer, Sequence, Teacher
from ffnskip.engine.stats import SkipStats
from ffnskip.engine.steps import StepExecutor
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.errors import InvalidArgument


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int = 8, max_seq_len: int | None = 2048,
                 compile: bool = False, runner: ModelRunner | None = None, eager_until_warm: bool = False,
                 prefill_chunk: int | None = None, prompt_cache: bool = False) -> None:
        """`compile`: decode segments compiled (or loaded from the compile cache) per batch bucket
        (compiled.py), on first use, or with `eager_until_warm` only by warm_up (a bucket runs
        eagerly until then). `runner`: another engine's runner, to share its weights and segments;
        this engine keeps its own cache and batch, and `compile` is the other engine's choice.
        `prefill_chunk`: the prompt tokens a step prefills at most (Scheduler). `prompt_cache`: keep
        requests' prompts in the free cache rows for later ones (prompt_cache.py)."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if runner is None:
            target = (CompileTarget(max_batch, loaded.cache_dir / "compiled", loaded.fingerprint, eager_until_warm)
                      if compile else None)
            runner = ModelRunner.of(loaded, target)
        self.runner = runner
        self.num_layers = runner.num_layers
        self.max_seq_len = min(max_seq_len or loaded.context_window, loaded.context_window)
        self.cache = runner.new_cache(max_batch, self.max_seq_len)
        self.scheduler: Scheduler[Sequence] = Scheduler(self.cache, prefill_chunk,
                                                        PromptCache(self.cache) if prompt_cache else None)
        self.executor = StepExecutor(runner, self.cache)
        self.planner = self.executor.planner
        self.weight_bytes = runner.weight_bytes()
        self.eos_ids = eos_ids(loaded)

    def warm_up(self, batch_sizes: Seq[int], on_compiled: Callable[[], None] | None = None) -> float:
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

    def add(self, prompt: str | None = None, messages: list[dict] | None = None,
            sampling: SamplingParams = SamplingParams(), skip: SkipParams = DENSE,
            request_id: str = "", prompt_ids: list[int] | None = None,
            teacher: Teacher | None = None, resumed: Seq[int] = (),
            resumed_skips: Seq[Seq[int]] = (), substitutes: SubstituteSet | None = None) -> Sequence:
        """Validate and queue a request (a prompt, chat messages or token ids); it is
        prefilled at the next step that has a free row. `teacher` sees each position's logits
        and picks its token (teacher forcing, for the quality measures). `resumed`: the tokens
        another decoder generated and delivered for this request, `resumed_skips` the layers
        each skipped; generation continues after them (Sequence.resume). A sequence those
        tokens already finish is returned finished, not queued. `substitutes`: what the FFNs
        it skips are replaced with (a profile's; None: nothing), as this engine's matrices apply them."""
        resolved = skip.resolved(self.num_layers)
        if prompt_ids is None:
            prompt_ids = encode_prompt(self.tokenizer, prompt, messages)
        elif not prompt_ids:
            raise InvalidArgument("prompt_ids", "must not be empty")
        for field, ids in (("prompt_ids", prompt_ids), ("resume.token_ids", resumed)):
            vocab = self.runner.head.vocab_size  # an id outside the embedding would fail a whole step
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        self._check_lengths(len(prompt_ids), sampling.max_new_tokens)
        seq = Sequence(
            prompt_ids=prompt_ids, sampling=sampling, skip=resolved, plan=RowPlan.build(resolved, self.num_layers),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            eos_ids=self.eos_ids, request_id=request_id, teacher=teacher,
            substitutes=None if substitutes is None else substitutes.served_by(self.runner.weights))
        if resumed:
            seq.resume(list(resumed), [list(s) for s in resumed_skips] or None, self.num_layers)
            if seq.finished:
                return seq
        self.scheduler.add(seq)
        return seq

    def _check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens >= self.loaded.context_window:
            raise InvalidArgument("prompt", f"{prompt_tokens} tokens exceed the model's context window of {self.loaded.context_window}")
        if prompt_tokens >= self.max_seq_len:
            raise InvalidArgument("prompt", f"{prompt_tokens} tokens exceed this engine's sequence length of {self.max_seq_len}")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise InvalidArgument("max_new_tokens", f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
                                  f"exceeds the engine's sequence length {self.max_seq_len}")

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a sequence (one `add` returned); it leaves the batch at the next step.
        A sequence that has already finished keeps its own finish reason."""
        seq.cancel(reason)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        """running[i].row == i: the decoding sequences first, then those still prefilling."""
        return self.scheduler.running

    @property
    def prefill_chunk(self) -> int | None:
        return self.scheduler.prefill_chunk

    @property
    def decode_layer_steps(self) -> int:  # decode-step counters: layer-steps, and FFN weight reads
        return self.executor.decode_layer_steps

    @property
    def decode_ffn_reads(self) -> int:
        return self.executor.decode_ffn_reads

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One step (the module's docstring says what it does)."""
        plan = self.scheduler.schedule()
        events = self.executor.prefill(plan.prefill) + self.executor.decode(plan.decode)
        self.scheduler.postprocess(plan)
        return events

    # -- conveniences -----------------------------------------------------------------------

    def result(self, seq: Sequence) -> GenerationResult:
        end = seq.finished_at or time.perf_counter()
        return GenerationResult(
            request_id=seq.request_id, text=seq.text, token_ids=list(seq.generated), finish_reason=seq.finish_reason or "running",
            skip_stats=SkipStats.from_records(seq.skip_records, self.num_layers, seq.skip.warm_up),
            skip_records=seq.skip_records,
            ttft_s=(seq.first_token_at or end) - seq.submitted_at, total_s=end - seq.submitted_at,
            similarity=seq.similarity, policy=seq.skip.policy.value, seed=seq.seed, prompt_tokens=len(seq.prompt_ids),
            logprobs=list(seq.logprobs), prompt_logprobs=list(seq.prompt_logprobs), resumed=seq.resumed,
        )

    def generate(self, prompts: Seq[str | list[dict]], sampling: SamplingParams = SamplingParams(),
                 skip: SkipParams = DENSE, substitutes: SubstituteSet | None = None) -> list[GenerationResult]:
        """Generate for several prompts (strings or chat message lists) as one batch."""
        seqs = [self.add(**_prompt_kwargs(p), sampling=sampling, skip=skip, substitutes=substitutes) for p in prompts]
        while any(not s.finished for s in seqs):
            self.step()
        return [self.result(s) for s in seqs]

    def stream(self, prompt: str | list[dict], sampling: SamplingParams = SamplingParams(),
               skip: SkipParams = DENSE, substitutes: SubstituteSet | None = None) -> Iterator[TokenEvent]:
        """Yield one prompt's tokens as they are generated."""
        seq = self.add(**_prompt_kwargs(prompt), sampling=sampling, skip=skip, substitutes=substitutes)
        while not seq.finished:
            for event in self.step():
                if event.seq_id == seq.seq_id:
                    yield event


def _prompt_kwargs(prompt: str | list[dict]) -> dict:
    return {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
