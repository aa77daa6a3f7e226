"""Timed streaming calls and their aggregation: what one request's stream looked like
(tokens, time to first token, the gaps between tokens, end to end) and a concurrency
level's row of percentiles over many, whatever served them (the decoder or gateway over
gRPC, llama.cpp's llama-server over HTTP)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

Request = TypeVar("Request")

QUANTILES = (("p50", .5), ("p95", .95), ("p99", .99))


@dataclass
class CallResult:
    """One streamed request as its caller saw it."""

    ok: bool
    code: str = "OK"  # the failure's name (a gRPC status, an HTTP status, an exception) when not ok
    tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    decode_skip_ratio: float | None = None  # None: the server does not skip (llama-server)
    text: str = ""  # the answer (a chat's next turn resends it)
    last_token_at: float = field(default=0.0, repr=False)

    def add_tokens(self, count: int, now: float, started: float) -> None:
        """`count` tokens arrived at `now` (perf_counter) of a call started at `started`; a
        message carrying several tokens makes the later ones gaps of 0."""
        for _ in range(count):
            if self.tokens == 0:
                self.ttft_s = now - started
            else:
                self.gaps_s.append(now - self.last_token_at)
            self.last_token_at = now
            self.tokens += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_level(call: Callable[[Request], CallResult], requests: Sequence[Request], concurrency: int) -> dict:
    """Run `call` on every request with `concurrency` of them in flight at a time; the row:
    tokens/s over the wall time of the whole level, and TTFT, inter-token (ITL) and
    end-to-end percentiles in ms over the calls that succeeded."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(call, requests))
    return summarise_level(results, concurrency, time.perf_counter() - started)


def summarise_level(results: list[CallResult], concurrency: int, wall_s: float) -> dict:
    good = [r for r in results if r.ok]
    gaps = [g for r in good for g in r.gaps_s]
    skip_ratios = [r.decode_skip_ratio for r in good if r.decode_skip_ratio is not None]

    def ms(values: list[float]) -> dict[str, float]:
        return {name: round(percentile(values, q) * 1e3, 1) for name, q in QUANTILES}

    tokens = sum(r.tokens for r in good)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(good),
        "error_codes": sorted({r.code for r in results if not r.ok}),
        "tokens": tokens, "tokens_per_s": round(tokens / wall_s, 2),
        "decode_skip_ratio": round(statistics.fmean(skip_ratios), 4) if skip_ratios else None,
        "ttft_ms": ms([r.ttft_s for r in good]), "itl_ms": ms(gaps), "e2e_ms": ms([r.e2e_s for r in good]),
    }
