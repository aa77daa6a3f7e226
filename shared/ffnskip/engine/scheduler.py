"""The scheduler: which sequences wait, prefill and decode, and in which cache rows.

A sequence waits until a cache row is free, is admitted into it, prefills its prompt (whole,
or in chunks within a step's `prefill_chunk` tokens), joins the decoding rows when its prompt
is complete, and leaves when it has finished or was cancelled, giving its row back.

The rows in use are a contiguous prefix with running[i].row == i: the decoding sequences hold
[0, decoding) (a decode step works on those rows as views), those still prefilling the rows
after them. The scheduler reads and moves rows only through a RowStore (the KV cache, which
moves the rows' contents): its arithmetic runs without a model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ffnskip.engine.prompt_cache import PromptCache
from ffnskip.errors import InvalidArgument

PREFILL_PADDING = 1.5  # a group's padded tokens (count x longest) at most this times its real tokens


class Scheduled(Protocol):
    """What the scheduler reads and writes of a sequence."""

    row: int | None
    prefilled: int  # context tokens in its cache row

    @property
    def context_ids(self) -> list[int]: ...  # the tokens its prefill puts in the cache

    @property
    def finished(self) -> bool: ...


class RowStore(Protocol):
    """The cache rows, as the scheduler sees them (KVCache)."""

    @property
    def free_rows(self) -> int: ...

    def take_row(self) -> int:
        """The next free row, after every row in use."""
        ...

    def release_row(self, row: int, decoding: int = 0) -> list[tuple[int, int]]:
        """Free `row`, keeping [0, decoding) and the rows after it contiguous; the moves
        (from, to) made, in order (kv_cache.freeing_moves)."""
        ...

    def swap_rows(self, a: int, b: int) -> None: ...


S = TypeVar("S", bound=Scheduled)


@dataclass(frozen=True)
class PrefillChunk(Generic[S]):
    """The prompt positions [start, start + length) of a sequence, prefilled in one step."""

    seq: S
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


@dataclass
class StepPlan(Generic[S]):
    """One step's work: prompt chunks in groups (one forward each), then the decoding rows."""

    prefill: list[list[PrefillChunk[S]]] = field(default_factory=list)
    decode: list[S] = field(default_factory=list)  # running[:decoding], rows [0, len(decode))


class Scheduler(Generic[S]):
    def __init__(self, rows: RowStore, prefill_chunk: int | None = None, prompt_cache: PromptCache | None = None) -> None:
        """`prefill_chunk`: the prompt tokens a step prefills at most, for serving (a decoder's
        FFNSKIP_PREFILL_CHUNK): a long prompt, or a burst of prompts, then delays the running
        rows' next token by about one chunk's forward, and a burst's first prompts get their
        first token before its last ones are prefilled. None (batch jobs: calibration, the
        benches): every admitted prompt whole, so a batch's rows decode together from its first
        step. `prompt_cache` (over the same cache as `rows`): a leaving sequence's row is kept, and
        an admitted one starts after the longest prefix of its context a row holds (Sequence
        rows only: it reads their dense_ids and prompt_logprobs)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidArgument("prefill_chunk", f"must be at least 1 token, got {prefill_chunk}")
        self.rows = rows
        self.prefill_chunk = prefill_chunk
        self.prompt_cache = prompt_cache
        self.waiting: deque[S] = deque()
        self.running: list[S] = []  # running[i].row == i: the decoding sequences first, then the prefilling
        self.prefilling: list[S] = []  # the running ones still prefilling, in admission order

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def decoding(self) -> int:
        """Running sequences past their prefill: they hold the rows [0, decoding)."""
        return len(self.running) - len(self.prefilling)

    def schedule(self) -> StepPlan[S]:
        """The next step's plan: the sequences cancelled since the last step leave, waiting ones
        take the free rows, and the prefilling ones' next chunks are grouped for their forwards."""
        self.retire_finished()
        self.waiting = deque(s for s in self.waiting if not s.finished)
        self._admit()
        return StepPlan(prefill_groups(self._next_chunks()), self.running[:self.decoding])

    def postprocess(self, plan: StepPlan[S]) -> None:
        """After the step ran: count the prefilled chunks (a sequence whose prompt is then
        complete joins the decoding rows, in the order of the plan) and retire the finished."""
        for chunk in (chunk for group in plan.prefill for chunk in group):
            chunk.seq.prefilled += chunk.length
            if chunk.completes:
                self._join_decoding(chunk.seq)
        self.retire_finished()

    def _admit(self) -> None:
        """Give waiting sequences the free rows, after every running one."""
        for _ in range(min(len(self.waiting), self.rows.free_rows)):
            seq = self.waiting.popleft()
            # a request for its prompt's log-probabilities prefills the whole prompt: they come from the prefill
            if self.prompt_cache is None or seq.sampling.prompt_logprobs:  # type: ignore[attr-defined]
                seq.row = self.rows.take_row()
            else:
                running = [(s.row, s.dense_ids()) for s in self.running if s.row is not None]  # type: ignore[attr-defined]
                seq.row, seq.prefilled = self.prompt_cache.take_row(seq.context_ids, running)
            self.running.append(seq)
            self.prefilling.append(seq)

    def _next_chunks(self) -> list[PrefillChunk[S]]:
        """This step's prompt chunks, in admission order: whole prompts while they fit in
        `prefill_chunk` tokens; a prompt longer than that goes alone, one chunk a step (a prompt
        split where a step's budget ends would make that step longer and get no token sooner).
        While no row decodes, the budget grows to the first prompt's whole remainder: no running
        row waits for the forward, so splitting that prompt would only delay its own first token
        (and read every weight once more per chunk)."""
        if self.prefill_chunk is None:
            return [PrefillChunk(seq, seq.prefilled, len(seq.context_ids) - seq.prefilled) for seq in self.prefilling]
        left = self.prefill_chunk
        if self.prefilling and not self.decoding:
            first = self.prefilling[0]
            left = max(left, len(first.context_ids) - first.prefilled)
        chunks: list[PrefillChunk[S]] = []
        for seq in self.prefilling:
            remaining = len(seq.context_ids) - seq.prefilled
            if remaining > left:
                if not chunks:
                    chunks.append(PrefillChunk(seq, seq.prefilled, left))
                break
            chunks.append(PrefillChunk(seq, seq.prefilled, remaining))
            left -= remaining
        return chunks

    def _join_decoding(self, seq: S) -> None:
        """Move a sequence whose prefill is complete to the first prefilling row (the end of the
        decoding prefix), exchanging it with the sequence there."""
        assert seq.row is not None
        target = self.decoding
        if seq.row != target:
            other = self.running[target]
            self.rows.swap_rows(seq.row, target)
            self.running[seq.row], self.running[target] = other, seq
            other.row, seq.row = seq.row, target
        self.prefilling.remove(seq)

    def retire_finished(self) -> None:
        """Free the rows of the finished (or cancelled) running sequences."""
        # from the highest row down: freeing a row moves only rows above it
        for seq in sorted((s for s in self.running if s.finished), key=lambda s: s.row or 0, reverse=True):
            self._free_row(seq)

    def _free_row(self, seq: S) -> None:
        """Give back a sequence's row; the cache fills the hole so that the decoding rows and
        the prefilling rows stay contiguous, and the sequences move with their rows."""
        assert seq.row is not None
        decoding = self.decoding
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        moves = (self.rows.release_row(seq.row, decoding) if self.prompt_cache is None
                 else self.prompt_cache.release_row(seq.row, decoding, seq.dense_ids()))  # type: ignore[attr-defined]
        for source, target in moves:
            mover = self.running[source]
            mover.row, self.running[target] = target, mover
        self.running.pop()
        seq.row = None


def prefill_groups(chunks: Seq[PrefillChunk[S]]) -> list[list[PrefillChunk[S]]]:
    """Chunks grouped for one forward each by length, shortest first: a group takes the next
    chunk while the padding to it keeps within PREFILL_PADDING."""
    groups: list[list[PrefillChunk[S]]] = []
    group: list[PrefillChunk[S]] = []
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
