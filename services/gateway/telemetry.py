"""Per-request telemetry of one gateway replica, kept twice:

- Prometheus metrics (vLLM's names, types, units and bucket lists under `ffnskip:`,
  labels model_name and decoder, never a request id), scraped from /metrics;
- a flat counter map (field -> number) that fleet.py writes into Redis and sums across
  replicas for GetTelemetry. Histograms appear there as per-bucket counts keyed by the
  bucket's upper bound, so replicas add up bucket by bucket.

Both are updated from the event loop only, so no lock is needed.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "ffnskip:"
NO_MODEL = "-"  # requests refused before a model was resolved
NO_DECODER = "-"  # requests that never reached a decoder

# vLLM's bucket lists (seconds), so dashboards built for vLLM carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "inter_token_latency_seconds": ITL_BUCKETS,
    "e2e_request_latency_seconds": E2E_BUCKETS,
    "request_skip_ratio": RATIO_BUCKETS,
    "request_decode_skip_ratio": RATIO_BUCKETS,
}
INF = "+Inf"


def field(model: str, decoder: str, metric: str, label: str = "") -> str:
    """A counter-map key; JSON so that no model or decoder id can collide with another."""
    return json.dumps([model, decoder, metric, label], separators=(",", ":"))


def parse_field(key: str) -> tuple[str, str, str, str]:
    model, decoder, metric, label = json.loads(key)
    return str(model), str(decoder), str(metric), str(label)


def bucket_label(bounds: Sequence[float], value: float) -> str:
    index = bisect.bisect_left(bounds, value)  # first bound >= value: Prometheus' `le`
    return repr(float(bounds[index])) if index < len(bounds) else INF


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.counters: dict[str, float] = {}
        labels = ["model_name", "decoder"]
        r = self.registry
        self._hist = {
            name: Histogram(PREFIX + name, doc, labels, buckets=HISTOGRAMS[name], registry=r)
            for name, doc in (
                ("time_to_first_token_seconds", "Time to first token at the gateway, from receiving the request."),
                ("inter_token_latency_seconds", "Time between consecutive tokens at the gateway."),
                ("e2e_request_latency_seconds", "Duration of successful requests at the gateway."),
                ("request_skip_ratio", "Per-request FFN skip ratio (skipped blocks / (layers x tokens))."),
                ("request_decode_skip_ratio", "Per-request FFN skip ratio over tokens after warm-up."),
            )
        }
        self._success = Counter(PREFIX + "request_success", "Successful requests.", [*labels, "finished_reason"], registry=r)
        self._errors = Counter(PREFIX + "request_errors", "Requests that ended with an error status.", [*labels, "code"], registry=r)
        self._failovers = Counter(PREFIX + "request_failovers", "Attempts on a decoder that failed with UNAVAILABLE "
                                  "before the first token and were retried elsewhere.", labels, registry=r)
        self._resumes = Counter(PREFIX + "request_resumes", "Streams continued on another decoder after this one "
                                "failed or stalled mid-stream (labelled with the one that failed).", labels, registry=r)
        self._tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", labels, registry=r)
        self._blocks = Counter(PREFIX + "ffn_blocks", "FFN blocks of generated tokens (layers x tokens).", labels, registry=r)
        self._skipped = Counter(PREFIX + "ffn_blocks_skipped", "FFN blocks skipped.", labels, registry=r)
        self._layer_skipped = Counter(PREFIX + "ffn_layer_skipped", "FFN blocks skipped, per layer.", [*labels, "layer"], registry=r)
        self._running = Gauge(PREFIX + "num_requests_running", "Requests in flight through this gateway.", labels, registry=r)

    # -- the counter map --------------------------------------------------------------

    def _add(self, key: str, amount: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + amount

    def _observe(self, model: str, decoder: str, name: str, value: float) -> None:
        self._hist[name].labels(model, decoder).observe(value)
        self._add(field(model, decoder, name, bucket_label(HISTOGRAMS[name], value)))
        self._add(field(model, decoder, name + ":sum"), value)

    def seed(self, counters: Mapping[str, float]) -> None:
        """Continue from a previous run's counters (a restart with the same replica id)."""
        for key, value in counters.items():
            self._add(key, value)

    def snapshot(self) -> dict[str, float]:
        return dict(self.counters)

    # -- events -----------------------------------------------------------------------

    def started(self, model: str, decoder: str) -> None:
        self._running.labels(model, decoder).inc()

    def ended(self, model: str, decoder: str) -> None:
        self._running.labels(model, decoder).dec()

    def first_token(self, model: str, decoder: str, seconds: float) -> None:
        self._observe(model, decoder, "time_to_first_token_seconds", seconds)

    def next_token(self, model: str, decoder: str, seconds: float) -> None:
        self._observe(model, decoder, "inter_token_latency_seconds", seconds)

    def failover(self, model: str, decoder: str) -> None:
        self._failovers.labels(model, decoder).inc()
        self._add(field(model, decoder, "failovers"))

    def resume(self, model: str, decoder: str) -> None:
        self._resumes.labels(model, decoder).inc()
        self._add(field(model, decoder, "resumes"))

    def error(self, model: str, decoder: str, code: str) -> None:
        self._errors.labels(model, decoder, code).inc()
        self._add(field(model, decoder, "errors", code))

    def success(self, model: str, decoder: str, finish_reason: str, e2e_s: float, generated_tokens: int,
                ffn_blocks_total: int, ffn_blocks_skipped: int, per_layer_skips: Iterable[int],
                skip_ratio: float, decode_skip_ratio: float) -> None:
        self._success.labels(model, decoder, finish_reason).inc()
        self._add(field(model, decoder, "finished", finish_reason))
        for counter, name, amount in ((self._tokens, "generated_tokens", generated_tokens),
                                      (self._blocks, "ffn_blocks_total", ffn_blocks_total),
                                      (self._skipped, "ffn_blocks_skipped", ffn_blocks_skipped)):
            counter.labels(model, decoder).inc(amount)
            self._add(field(model, decoder, name), amount)
        for layer, count in enumerate(per_layer_skips):
            self._layer_skipped.labels(model, decoder, str(layer)).inc(count)  # zeros too: the series exists
            self._add(field(model, decoder, "layer_skipped", str(layer)), count)
        self._observe(model, decoder, "e2e_request_latency_seconds", e2e_s)
        if generated_tokens > 0:
            self._observe(model, decoder, "request_skip_ratio", skip_ratio)
            self._observe(model, decoder, "request_decode_skip_ratio", decode_skip_ratio)
