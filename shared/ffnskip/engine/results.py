"""What the engine hands out: a token as it is generated, and a finished request's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from ffnskip.engine.sampling import TokenLogprob
from ffnskip.engine.stats import SkipStats


@dataclass(frozen=True)
class TokenEvent:
    seq_id: int  # the sequence's own id (Sequence.seq_id): request ids are labels and may repeat
    request_id: str
    index: int  # 1-based position among the generated tokens
    token_id: int
    text: str  # the piece this token releases (may be empty)
    skipped_layers: list[int]
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # when the request asked for logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    skip_stats: SkipStats
    skip_records: list[list[int]]
    ttft_s: float
    total_s: float
    similarity: list[list[float] | None] = field(default_factory=list)
    policy: str = "dense"  # the skip policy it ran under
    seed: int = 0  # the sampling seed it ran with (the caller's or a fresh one)
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated here (not resumed ones)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    resumed: int = 0  # leading tokens another decoder generated (replayed here, not generated)

    @property
    def own_stats(self) -> SkipStats:
        """The skip statistics of the tokens generated here (a resumed request's replayed ones excluded)."""
        stats = self.skip_stats
        warm_up = stats.generated_tokens - stats.decode_tokens
        return SkipStats.from_records(self.skip_records[self.resumed:], stats.num_layers, max(0, warm_up - self.resumed))

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "tokens": self.token_ids,
            "finish_reason": self.finish_reason,
            "skip_stats": self.skip_stats.to_dict(),
            "skip_records": self.skip_records,
            "timings": {"ttft_s": self.ttft_s, "total_s": self.total_s, "tokens_per_s": self.tokens_per_s},
        }
