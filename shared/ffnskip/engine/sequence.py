"""Per-request state: ids, cache row, parameters, skip records, stop checks, text."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine.policies import RowPlan
from ffnskip.engine.sampling import TokenLogprob
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.errors import InvalidArgument

_ids = itertools.count(1)


class IncrementalDetokenizer:
    """Turns token ids into text pieces that never split a UTF-8 character
    (the prefix/read offset method: decode a short window, emit what grew)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])  # a little context so leading spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = str(self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True))
        full = str(self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


class Teacher(Protocol):
    """Sees the logits of each generated position and picks the token appended there: the
    reference's token for teacher forcing (every step then sees the same prefix, whatever the
    model predicted), or `predicted` to only watch. Quality measures are built on it."""

    def choose(self, index: int, logits: torch.Tensor, predicted: int) -> int:
        """`index`: 0-based position among the generated tokens; `logits`: [V] for it."""
        ...


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams
    skip: SkipParams  # resolved against the model
    plan: RowPlan
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    request_id: str = ""  # a label for logs and results; the caller's, so not necessarily unique
    seq_id: int = field(default_factory=lambda: next(_ids), init=False)  # the identity: the engine's own, unique
    generated: list[int] = field(default_factory=list)
    skip_records: list[list[int]] = field(default_factory=list)
    similarity: list[list[float] | None] = field(default_factory=list)
    text: str = ""
    pending: str = ""  # text held back because it may be the start of a stop string
    row: int | None = None
    prefilled: int = 0  # prompt tokens in its cache row (a long prompt prefills in chunks, over several steps)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    forward_seconds: float = 0.0
    teacher: Teacher | None = None
    substitutes: SubstituteSet | None = None  # what its skipped FFNs are replaced with (None: nothing)
    resumed: int = 0  # generated tokens another decoder delivered before this one continued
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated here, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"
        # no seed given: a fresh one, so unseeded sampled answers differ (reported, to replay one)
        self.seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
        self.skip_generator = torch.Generator().manual_seed(self.skip.seed)

    def resume(self, delivered: list[int], skipped: list[list[int]] | None = None, num_layers: int = 0) -> None:
        """Continue after `delivered`, the tokens another decoder generated and delivered (with
        `skipped`, the layers each skipped, so the skip statistics cover the whole answer): they
        are replayed through the text and stop-string state, so this sequence releases exactly
        the text that follows, and prefilled after the prompt; its next token is generated
        token len(delivered) + 1. Tokens that already end the generation (end-of-sequence, a
        stop string, max_new_tokens: the first decoder failed before its summary) leave it
        finished, with nothing left to generate."""
        skipped = skipped if skipped is not None else [[] for _ in delivered]
        if len(skipped) != len(delivered):
            raise InvalidArgument("resume.skipped_layers", f"{len(skipped)} entries for {len(delivered)} tokens")
        if any(not 0 <= layer < num_layers for layers in skipped for layer in layers):
            raise InvalidArgument("resume.skipped_layers", f"layers must be in [0, {num_layers})")
        for index, (token_id, layers) in enumerate(zip(delivered, skipped)):
            if self.finished:
                raise InvalidArgument("resume.token_ids", f"the generation ended ({self.finish_reason}) at token "
                                      f"{index} of the {len(delivered)} delivered")
            self.append(token_id, sorted(layers), None)
        self.resumed = len(delivered)
        self.first_token_at = None

    @property
    def context_ids(self) -> list[int]:
        """The tokens its prefill puts in the cache: the prompt, and a resumed sequence's
        delivered tokens but the last, which its first decode step consumes as the failed
        decoder's step did (the same skip decision, the next token sampled the same way)."""
        return self.prompt_ids + self.generated[:self.resumed - 1] if self.resumed else self.prompt_ids

    @property
    def samples_after_prefill(self) -> bool:
        """Whether its prefill's last logits give its next token (not for a resumed sequence)."""
        return not self.resumed

    def context_skips(self, start: int, length: int) -> list[list[int]] | None:
        """The layers skipped at context positions [start, start + length): none in the prompt; at
        a delivered token's position, those the forward that generated the next token skipped.
        None when nothing is skipped."""
        if not self.resumed:
            return None
        prompt = len(self.prompt_ids)
        skips = [self.skip_records[position - prompt + 1] if position >= prompt else []
                 for position in range(start, start + length)]
        return skips if any(skips) else None

    def dense_ids(self) -> list[int]:
        """The tokens whose keys and values it puts in its cache row as a dense prefill of them
        would: the prompt, then its tokens up to the first position whose forward skipped an FFN
        (position p past the prompt is the forward that generated token p - prompt + 1). What a
        prompt cache may give another request; the row's filled length bounds it further."""
        dense = len(self.prompt_ids)
        for skipped in self.skip_records[1:]:
            if skipped:
                break
            dense += 1
        return (self.prompt_ids + self.generated)[:dense]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether part of its prompt is still to be prefilled (it has no token yet)."""
        return self.prefilled < len(self.context_ids)

    @property
    def past_warm_up(self) -> bool:
        """Whether the next token's forward may skip (tokens 1..warm_up run in full)."""
        return len(self.generated) >= self.skip.warm_up

    @property
    def last_position(self) -> int:
        """Position of the last token in the cache, fed to the next decode step."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def append(self, token_id: int, skipped: list[int], similarity: list[float] | None) -> str:
        """Record a generated token; return the text piece it releases to the client."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token_id)
        self.skip_records.append(skipped)
        self.similarity.append(similarity)
        if token_id in self.eos_ids and not self.sampling.ignore_eos and len(self.generated) > self.sampling.min_tokens:
            return self._finish("eos", now, flush=True)
        piece = self._release(self.detokenizer.push(token_id))
        if self.finished:
            return piece
        if len(self.generated) >= self.sampling.max_new_tokens:
            return piece + self._finish("length", now, flush=True)
        return piece

    def _release(self, piece: str) -> str:
        """Apply stop strings: emit text unless it could still become a stop string."""
        candidate = self.pending + piece
        if len(self.generated) < self.sampling.min_tokens:  # stop strings count from min_tokens on
            self.text += candidate
            self.pending = ""
            return candidate
        for stop in self.sampling.stop:
            cut = (self.text + candidate).find(stop)
            if cut >= 0:
                emitted = (self.text + candidate)[:cut][len(self.text):]
                self.text += emitted
                self.pending = ""
                self._finish("stop", time.perf_counter(), flush=False)
                return emitted
        hold = max((_overlap(candidate, stop) for stop in self.sampling.stop), default=0)
        emitted, self.pending = candidate[:len(candidate) - hold], candidate[len(candidate) - hold:]
        self.text += emitted
        return emitted

    def _finish(self, reason: str, now: float, flush: bool) -> str:
        self.finish_reason = reason
        self.finished_at = now
        rest = self.pending if flush else ""
        self.text += rest
        self.pending = ""
        return rest

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.finished:
            self._finish(reason, time.perf_counter(), flush=False)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
