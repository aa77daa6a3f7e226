"""The decoder's Prometheus metrics (vLLM's names under `ffnskip:`): queue depth for the
autoscaler, and the per-pod token and skip counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ffnskip.engine import Engine, GenerationResult
from ffnskip.engine.prompt_cache import PromptCache

PREFIX = "ffnskip:"


class DecoderMetrics:
    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int],
                 profile_version: Callable[[], int], substitute_bytes: Callable[[], int] = lambda: 0) -> None:
        self.registry = r = CollectorRegistry()
        # process_resident_memory_bytes and the other process_* series (Linux): the pod's memory
        # next to its work, e.g. for `ffnskip bench --metrics-url`
        ProcessCollector(registry=r)
        labels = {"model_name": model_name}
        Gauge(PREFIX + "num_requests_running", "Sequences decoding now.", ["model_name"], registry=r) \
            .labels(**labels).set_function(running)
        # what the decoders' HorizontalPodAutoscaler scales on
        Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a batch row.", ["model_name"], registry=r) \
            .labels(**labels).set_function(waiting)
        Gauge(PREFIX + "profile_version", "Active skip profile version (0 = none).", ["model_name"], registry=r) \
            .labels(**labels).set_function(profile_version)
        # what the active profile's FFN substitutes hold on the device (the engine's dtype); 0 = plain skips
        Gauge(PREFIX + "profile_substitute_bytes", "Bytes of the active profile's FFN substitutes as served (0 = none).",
              ["model_name"], registry=r).labels(**labels).set_function(substitute_bytes)
        # every sequence that ended, as vLLM counts them: finished_reason "cancelled" and "deadline" included
        self._success = Counter(PREFIX + "request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r)
        self._tokens = Counter(PREFIX + "generation_tokens", "Generated tokens (of cancelled and expired requests too).",
                               ["model_name"], registry=r).labels(**labels)
        self._blocks = Counter(PREFIX + "ffn_blocks", "FFN blocks of generated tokens.", ["model_name"], registry=r).labels(**labels)
        self._skipped = Counter(PREFIX + "ffn_blocks_skipped", "FFN blocks skipped.", ["model_name"], registry=r).labels(**labels)
        # after each request's warm-up, per served policy: the counterpart of a profile's
        # measured_decode_skip_ratio, so ops can compare what is served with what was calibrated
        self._decode_blocks = Counter(PREFIX + "decode_ffn_blocks", "FFN blocks of tokens after the warm-up.",
                                      ["model_name", "policy"], registry=r)
        self._decode_skipped = Counter(PREFIX + "decode_ffn_blocks_skipped", "FFN blocks skipped after the warm-up.",
                                       ["model_name", "policy"], registry=r)
        self._after_cancel = Histogram(
            PREFIX + "request_tokens_after_cancel", "Tokens a cancelled request generated after its cancel reached "
            "the decoder (the decode step in progress: at most 1).", ["model_name"], buckets=(0, 1, 2, 4, 8, 16, 64),
            registry=r).labels(**labels)
        # the engine's own share of a served token (the rest is the decoder loop, gRPC and the gateway)
        self._step_seconds = Histogram(
            PREFIX + "engine_step_seconds", "Seconds of one engine step (prefill of the admitted prompts and/or one "
            "decode step of the running rows).", ["model_name"],
            buckets=(0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r
        ).labels(**labels)
        self._engine = Info(PREFIX + "engine", "What the engine runs: device, activations' dtype, weight format and int8 kernel build.",
                            ["model_name"], registry=r).labels(**labels)
        self._weight_bytes = Gauge(PREFIX + "engine_weight_bytes", "Bytes of weights a dense decode step reads.",
                                   ["model_name"], registry=r).labels(**labels)
        self.model_name = model_name

    def describe_engine(self, device: str, dtype: str, weights: str, int8_kernel: str, weight_bytes: int) -> None:
        self._engine.info({"device": device, "dtype": dtype, "weights": weights, "int8_kernel": int8_kernel})
        self._weight_bytes.set(weight_bytes)

    def watch_prompt_cache(self, cache: PromptCache | None) -> None:
        """Export the engine's prompt cache counters (none when it has no prompt cache)."""
        if cache is not None:
            self.registry.register(ScrapedCounters(
                self.model_name, tuple((f"prompt_cache_{name}", text) for name, text in PROMPT_CACHE_COUNTERS),
                lambda name: getattr(cache.stats, name.removeprefix("prompt_cache_"))))

    def watch_ffn_reads(self, engine: Engine) -> None:
        """Export the engine's decode-step counters: what skipping saved in weight reads."""
        self.registry.register(ScrapedCounters(self.model_name, FFN_READ_COUNTERS, lambda name: getattr(engine, name)))

    def stepped(self, seconds: float) -> None:
        self._step_seconds.observe(seconds)

    def finished(self, result: GenerationResult, tokens_after_cancel: int | None = None) -> None:
        if tokens_after_cancel is not None:
            self._after_cancel.observe(tokens_after_cancel)
        self._success.labels(model_name=self.model_name, finished_reason=result.finish_reason).inc()
        stats, policy = result.own_stats, {"model_name": self.model_name, "policy": result.policy}  # this pod's work
        self._tokens.inc(stats.generated_tokens)
        self._blocks.inc(stats.ffn_blocks_total)
        self._skipped.inc(stats.ffn_blocks_skipped)
        self._decode_blocks.labels(**policy).inc(stats.decode_tokens * stats.num_layers)
        self._decode_skipped.labels(**policy).inc(stats.decode_ffn_blocks_skipped)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)


class ScrapedCounters(Collector):
    """Counters the engine thread keeps as plain ints, read at each scrape: (name, help) pairs,
    each exported as `ffnskip:<name>_total` with the value `read(name)`."""

    def __init__(self, model_name: str, counters: tuple[tuple[str, str], ...], read: Callable[[str], int]) -> None:
        self.model_name, self.counters, self.read = model_name, counters, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text in self.counters:
            family = CounterMetricFamily(f"{PREFIX}{name}", text, labels=["model_name"])
            family.add_metric([self.model_name], self.read(name))
            yield family


PROMPT_CACHE_COUNTERS = (("hits", "Requests prefilled after a prefix a cache row held."),
                         ("misses", "Requests prefilled from their first token."),
                         ("evictions", "Kept prompt rows overwritten."),
                         ("reused_tokens", "Prompt tokens not prefilled thanks to the prompt cache."))
# A skip saves a read only when no row of the step runs that FFN: 1 - reads / layer_steps is the
# share of FFN reads the served skipping avoided (below the decode skip ratio when the rows of a
# batch disagree, e.g. while some are still in their warm-up).
FFN_READ_COUNTERS = (("decode_layer_steps", "Layers of the decode steps run (steps x layers)."),
                     ("decode_ffn_reads", "Layers of the decode steps whose FFN ran for at least one row."))
