"""The decoder's Prometheus metrics (vLLM's names under `ffnskip:`): queue depth for the
autoscaler, and the per-pod token and skip counters."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ffnskip.engine import GenerationResult

PREFIX = "ffnskip:"


class DecoderMetrics:
    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int],
                 profile_version: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        Gauge(PREFIX + "num_requests_running", "Sequences decoding now.", ["model_name"], registry=r) \
            .labels(**labels).set_function(running)
        # what the decoders' HorizontalPodAutoscaler scales on
        Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a batch row.", ["model_name"], registry=r) \
            .labels(**labels).set_function(waiting)
        Gauge(PREFIX + "profile_version", "Active skip profile version (0 = none).", ["model_name"], registry=r) \
            .labels(**labels).set_function(profile_version)
        self._success = Counter(PREFIX + "request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r)
        self._tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", ["model_name"], registry=r).labels(**labels)
        self._blocks = Counter(PREFIX + "ffn_blocks", "FFN blocks of generated tokens.", ["model_name"], registry=r).labels(**labels)
        self._skipped = Counter(PREFIX + "ffn_blocks_skipped", "FFN blocks skipped.", ["model_name"], registry=r).labels(**labels)
        self.model_name = model_name

    def finished(self, result: GenerationResult) -> None:
        self._success.labels(model_name=self.model_name, finished_reason=result.finish_reason).inc()
        self._tokens.inc(len(result.token_ids))
        self._blocks.inc(result.skip_stats.ffn_blocks_total)
        self._skipped.inc(result.skip_stats.ffn_blocks_skipped)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
