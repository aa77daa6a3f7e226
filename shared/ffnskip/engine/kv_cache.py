"""One preallocated KV cache with a row per running sequence.

Rows in use are kept as a contiguous prefix [0, n), the decoding sequences' rows
[0, decoding) first, so that a decode step works on views (cache[:decoding]) with no
gather. The cache owns the row moves that keep it so (only the filled positions are
copied): when a row is freed, the last decoding row fills a decoding row's hole and the
last row in use the hole that leaves (release_row); a prompt that completes changes
places with the first prefilling row (swap_rows). The scheduler (scheduler.py) decides
which rows are taken, freed and swapped, and moves its sequences alike. Every row has
one position past max_seq_len, the scratch position: padding rows of a batch bucket
write there, so a step may write every row of its bucket without touching a sequence's
keys.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_layers, max_batch, num_kv_heads, max_seq_len + 1, head_dim)
        # zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN
        # garbage from reused memory would poison the row.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # per-layer views made once: a decode step asks for every layer's (indexing costs us each)
        self._layers = [(self.keys[i], self.values[i]) for i in range(num_layers)]
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.scratch_position = max_seq_len  # never attended: a span is at most max_seq_len
        self.lengths = [0] * max_batch  # host-side filled length of each row
        self.in_use = 0

    @property
    def free_rows(self) -> int:
        return self.max_batch - self.in_use

    def take_row(self) -> int:
        if self.in_use >= self.max_batch:
            raise RuntimeError("no free KV cache row")  # the scheduler admits by free_rows (scheduler.py)
        row = self.in_use
        self.in_use += 1
        self.lengths[row] = 0
        return row

    def release_row(self, row: int, decoding: int = 0, keep: bool = False) -> list[tuple[int, int]]:
        """Free `row`, moving rows into the hole as freeing_moves says; returns those moves,
        (from, to) in order, for the scheduler to move its sequences alike. `keep`: the moves
        are exchanges, so the freed row's contents end in the row freed (the first free one),
        for a prompt cache (prompt_cache.py)."""
        assert 0 <= row < self.in_use, f"row {row} is not in use"
        moves = freeing_moves(row, decoding, self.in_use)
        for source, target in moves:
            (self.swap_rows if keep else self.copy_row)(source, target)
        self.in_use -= 1
        if not keep:
            self.lengths[self.in_use] = 0
        return moves

    def copy_row(self, source: int, target: int) -> None:
        """Give `target` the filled positions (and length) of `source`."""
        filled = self.lengths[source]
        self.keys[:, target, :, :filled] = self.keys[:, source, :, :filled]
        self.values[:, target, :, :filled] = self.values[:, source, :, :filled]
        self.lengths[target] = filled

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows' filled positions and lengths."""
        if a == b:
            return
        filled = max(self.lengths[a], self.lengths[b])
        for table in (self.keys, self.values):
            held = table[:, a, :, :filled].clone()
            table[:, a, :, :filled] = table[:, b, :, :filled]
            table[:, b, :, :filled] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def write_prefill(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """k, v: [kv_heads, T, head_dim] for positions [start, start + T)."""
        end = start + k.shape[1]
        self.keys[layer, row, :, start:end] = k
        self.values[layer, row, :, start:end] = v

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values [max_batch, kv_heads, max_seq_len + 1, head_dim]."""
        return self._layers[index]


def freeing_moves(row: int, decoding: int, in_use: int) -> list[tuple[int, int]]:
    """The row moves (from, to), in order, that fill the hole `row` leaves among the rows in
    use [0, in_use), keeping them a contiguous prefix whose first `decoding` rows (the decoding
    sequences'; the rest still prefill) stay contiguous too: a hole among the decoding rows is
    filled by the last decoding row, and the hole that leaves (or a prefilling row's) by the
    last row in use. `decoding` 0: the rows are one part, the last row fills the hole."""
    last = in_use - 1
    moves = []
    if row < decoding - 1:
        moves.append((decoding - 1, row))
        row = decoding - 1
    if row != last:
        moves.append((last, row))
    return moves
