"""Skip statistics and the ideal-speedup arithmetic (README, "Numbers").

A generated token's forward is the one that produced it: token 1 comes from the
prefill (never skips), token t > 1 from the decode step that consumed token t-1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SkipStats:
    num_layers: int
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens after warm-up (the paper's per-token denominator)
    ffn_blocks_total: int = 0
    ffn_blocks_skipped: int = 0
    decode_ffn_blocks_skipped: int = 0
    per_layer_skips: list[int] = field(default_factory=list)

    @staticmethod
    def from_records(records: Seq[Seq[int]], num_layers: int, warm_up: int) -> SkipStats:
        """records[t-1] = the layers skipped by generated token t."""
        per_layer = [0] * num_layers
        decode_skipped = 0
        for index, layers in enumerate(records, start=1):
            for layer in layers:
                per_layer[layer] += 1
            if index > warm_up:
                decode_skipped += len(layers)
        skipped = sum(per_layer)
        return SkipStats(
            num_layers=num_layers,
            generated_tokens=len(records),
            decode_tokens=max(0, len(records) - warm_up),
            ffn_blocks_total=num_layers * len(records),
            ffn_blocks_skipped=skipped,
            decode_ffn_blocks_skipped=decode_skipped,
            per_layer_skips=per_layer,
        )

    @property
    def skip_ratio(self) -> float:
        return self.ffn_blocks_skipped / self.ffn_blocks_total if self.ffn_blocks_total else 0.0

    @property
    def decode_skip_ratio(self) -> float:
        blocks = self.num_layers * self.decode_tokens
        return self.decode_ffn_blocks_skipped / blocks if blocks else 0.0

    @staticmethod
    def pooled(stats: Seq[SkipStats]) -> SkipStats:
        """Several requests' counts pooled (at least one)."""
        return functools.reduce(SkipStats.merged, stats)

    def merged(self, other: SkipStats) -> SkipStats:
        """Pool two requests' counts (for a batch or a whole evaluation)."""
        if not self.per_layer_skips:
            return other
        return SkipStats(
            num_layers=self.num_layers,
            generated_tokens=self.generated_tokens + other.generated_tokens,
            decode_tokens=self.decode_tokens + other.decode_tokens,
            ffn_blocks_total=self.ffn_blocks_total + other.ffn_blocks_total,
            ffn_blocks_skipped=self.ffn_blocks_skipped + other.ffn_blocks_skipped,
            decode_ffn_blocks_skipped=self.decode_ffn_blocks_skipped + other.decode_ffn_blocks_skipped,
            per_layer_skips=[a + b for a, b in zip(self.per_layer_skips, other.per_layer_skips)],
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip_ratio"] = self.skip_ratio
        data["decode_skip_ratio"] = self.decode_skip_ratio
        return data


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights read per decode step: F (all FFNs) and W (everything read;
    the embedding lookup excluded, the LM head included, a tied head counted once)."""

    ffn: int
    total: int

    @property
    def ffn_share(self) -> float:
        return self.ffn / self.total

    def ideal_time_ratio(self, skip_ratio: float) -> float:
        return 1.0 - skip_ratio * self.ffn_share

    def ideal_speedup(self, skip_ratio: float) -> float:
        return 1.0 / self.ideal_time_ratio(skip_ratio)

    def realised_fraction(self, skip_ratio: float, t_dense: float, t_skip: float) -> float:
        saved_ideal = skip_ratio * self.ffn_share
        return (1.0 - t_skip / t_dense) / saved_ideal if saved_ideal > 0 else float("nan")


def weight_bytes(hf_model: Any) -> WeightBytes:
    """FFN and total bytes a dense decode step reads, of a transformers *ForCausalLM."""
    inner = hf_model.model
    ffn = sum(p.numel() * p.element_size() for layer in inner.layers for p in layer.mlp.parameters())
    seen: set[int] = set()
    total = 0
    embed = inner.embed_tokens.weight
    for _, p in hf_model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is embed and not _tied(hf_model):
            continue  # an untied embedding is a lookup, not a read of the whole matrix
        total += p.numel() * p.element_size()
    return WeightBytes(ffn=ffn, total=total)


def _tied(hf_model: Any) -> bool:
    return hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
