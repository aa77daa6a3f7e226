"""A prompt cache in the KV cache's free rows: a new request whose tokens start as an earlier
one's did is prefilled from where they part.

A chat client resends the whole conversation every turn, and requests often share a system
prompt. When a sequence leaves, its row's keys and values are kept in the free row it leaves
behind, with the tokens they stand for; a row taken for a new sequence first receives the
longest prefix of its context held by any row (a kept one, or a running sequence's), and its
prefill starts after it. No memory is added: the free rows are the cache, the least recently
used one is overwritten first, and a full batch leaves nothing to keep.

Only keys and values that a dense prefill of the same tokens would compute are kept or shared:
the prompt, then the generated tokens up to the first whose forward skipped an FFN
(Sequence.dense_ids). So a skip profile never hands its skips to another request, a reused
prefix gives the answer a fresh prefill gives, and nothing needs keying by profile.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from ffnskip.engine.kv_cache import KVCache

# A shorter common prefix is prefilled anew: taking it costs a row copy and saves less than a
# decode step's worth of prefill.
MIN_REUSED_TOKENS = 16


@dataclass
class Kept:
    """What a free row holds: the keys and values of `tokens` at positions [0, len(tokens))."""

    tokens: list[int]
    used: int  # when it was kept or last reused (a clock tick): the oldest goes first


@dataclass
class PromptCacheStats:
    hits: int = 0  # sequences that started from a held prefix
    misses: int = 0  # sequences prefilled from their first token
    evictions: int = 0  # kept rows overwritten
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to a hit


class PromptCache:
    """The kept rows of one KVCache, and the taking of a row with the longest held prefix."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.kept: dict[int, Kept] = {}  # free row -> what it holds
        self.stats = PromptCacheStats()
        self._clock = itertools.count()

    def release_row(self, row: int, decoding: int, tokens: list[int]) -> list[tuple[int, int]]:
        """Free `row` as KVCache.release_row does, keeping its keys and values of `tokens` (a
        leaving sequence's dense ones) in the free row it leaves behind; the same moves."""
        if not tokens:
            return self.cache.release_row(row, decoding)
        moves = self.cache.release_row(row, decoding, keep=True)
        freed = self.cache.in_use
        self.kept[freed] = Kept(tokens[:self.cache.lengths[freed]], next(self._clock))
        return moves

    def take_row(self, context: list[int], running: Iterable[tuple[int, list[int]]] = ()) -> tuple[int, int]:
        """Take the next free row for a sequence whose prefill puts `context` in the cache, filled
        with the longest prefix of it that a row holds: a kept free row (the two rows change
        places, so what the taken row held stays kept) or a running row, `running` naming each
        (row, its dense tokens; the prefix is copied). At least the last context token is left
        to prefill: its logits give the first token. Returns (row, positions filled)."""
        row = self.cache.in_use
        source, length = self._longest(context, running)
        from_kept = source is not None and source in self.kept
        if source is not None and from_kept:  # the two rows change places: what `row` held (if anything) is kept at `source`
            del self.kept[source]
            self.cache.swap_rows(source, row)
            if row in self.kept:
                self.kept[source] = self.kept.pop(row)
        else:
            self._move_aside(row)
        assert self.cache.take_row() == row
        if source is None:
            self.stats.misses += 1
            return row, 0
        if not from_kept:
            self.cache.copy_row(source, row)  # a running row's prefix
        self.cache.lengths[row] = length
        self.stats.hits += 1
        self.stats.reused_tokens += length
        return row, length

    def _longest(self, context: list[int], running: Iterable[tuple[int, list[int]]]) -> tuple[int | None, int]:
        """The row holding the longest prefix of `context` (at least MIN_REUSED_TOKENS, at most all
        but its last token) and that prefix's length; (None, 0) when none does."""
        limit = len(context) - 1
        best_row, best = None, MIN_REUSED_TOKENS - 1
        for source, tokens in [*((r, k.tokens) for r, k in self.kept.items()), *running]:
            length = min(common_prefix(tokens[:self.cache.lengths[source]], context), limit)
            if length > best:
                best_row, best = source, length
        return (best_row, best) if best_row is not None else (None, 0)

    def _move_aside(self, row: int) -> None:
        """What free `row` holds moves to the free row that holds nothing or the least recently
        used one (whose contents are evicted), before `row` is taken."""
        if row not in self.kept:
            return
        free = range(self.cache.in_use + 1, self.cache.max_batch)
        if not free:
            del self.kept[row]
            self.stats.evictions += 1
            return
        target = min(free, key=lambda r: self.kept[r].used if r in self.kept else -1)
        if target in self.kept:
            self.stats.evictions += 1
        self.cache.copy_row(row, target)
        self.kept[target] = self.kept.pop(row)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))
