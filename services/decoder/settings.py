"""Decoder settings, read from the environment once in main (prefix FFNSKIP_) with
ffnskip.settings.Env: an empty value means the default, and an error names the variable."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ffnskip.config import WEIGHT_FORMATS, Policy
from ffnskip.errors import InvalidArgument
from ffnskip.rpc.generation import OVERRIDABLE_POLICIES, OverrideLimits
from ffnskip.settings import Env, cache_root
from ffnskip.store.connection import REDIS_ENV_VARS, RedisSettings

ENV_VARS = (
    "FFNSKIP_DECODER_HOST", "FFNSKIP_DECODER_PORT", "FFNSKIP_ADVERTISE_ADDRESS", "FFNSKIP_DECODER_ID",
    "FFNSKIP_MODEL", "FFNSKIP_MODEL_NAME", "FFNSKIP_DEVICE", "FFNSKIP_DTYPE", "FFNSKIP_WEIGHTS", "FFNSKIP_CACHE",
    "FFNSKIP_COMPILE", "FFNSKIP_MAX_BATCH", "FFNSKIP_MAX_QUEUE", "FFNSKIP_MAX_SEQ_LEN", "FFNSKIP_MAX_NEW_TOKENS_CAP",
    "FFNSKIP_DEFAULT_MAX_NEW_TOKENS", "FFNSKIP_PROFILE_CACHE_DIR", "FFNSKIP_REGISTRY_TTL_S",
    "FFNSKIP_DRAIN_TIMEOUT_S", "FFNSKIP_STUCK_AFTER_S", "FFNSKIP_ALLOWED_POLICIES", "FFNSKIP_OVERRIDE_MIN_THRESHOLD",
    "FFNSKIP_OVERRIDE_MAX_SKIP", "FFNSKIP_OVERRIDE_MIN_WARM_UP", "FFNSKIP_OVERRIDE_MIN_QUORUM",
    "FFNSKIP_SKIP_POLICY", "FFNSKIP_ALIGNED_QUORUM", "FFNSKIP_LOG_LEVEL",
    "FFNSKIP_METRICS_HOST", "FFNSKIP_METRICS_PORT", "FFNSKIP_THREADS", "FFNSKIP_PREFILL_CHUNK",
    "FFNSKIP_PROMPT_CACHE",
) + REDIS_ENV_VARS


# "aligned" (default): decide an adaptive profile's rule once per batch at the quorum, so
# skipping still avoids weight reads when requests are batched; at quorum 0.5 the per-row
# calibrated threshold and k carry over (docs/batching.md); one row alone is per-row adaptive.
# "profile": serve the active profile's policy as calibrated. Static profiles stay static.
class ServingMode(str, Enum):
    PROFILE = "profile"
    ALIGNED = "aligned"

    def __str__(self) -> str:
        return self.value


SERVING_MODES = tuple(mode.value for mode in ServingMode)


@dataclass(frozen=True)
class DecoderSettings:
    host: str
    port: int
    advertise_address: str  # what the gateway dials (the pod IP in Kubernetes)
    decoder_id: str
    model: str  # what to load: embedded name, directory, .gguf
    model_name: str  # the id clients ask for and profiles are stored under
    device: str
    dtype: str
    weights: str  # auto | full | int8 (engine.loading.resolve_weights)
    compile: bool  # decode compiled: every batch bucket's segments loaded (or compiled) in the background
    max_batch: int
    max_queue: int
    max_seq_len: int
    max_new_tokens_cap: int
    default_max_new_tokens: int
    cache_dir: Path  # prepared models, weight digests, compiled decode segments
    profile_cache_dir: Path
    registry_ttl_s: float
    drain_timeout_s: float
    stuck_after_s: float  # an engine loop with work and no progress this long is stuck: liveness fails
    limits: OverrideLimits
    skip_policy: ServingMode  # how an adaptive profile is served
    aligned_quorum: float
    log_level: str
    metrics_host: str
    metrics_port: int  # Prometheus /metrics; 0 = off (several local decoders would collide)
    threads: int  # torch's CPU threads; 0 = torch's default (every core of the host, not the pod's CPU limit)
    prefill_chunk: int  # prompt tokens an engine step prefills at most; 0 = every admitted prompt whole
    prompt_cache: bool  # keep finished requests' prompts in the free cache rows (engine/prompt_cache.py)
    redis: RedisSettings

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DecoderSettings:
        """Every variable in ENV_VARS (ffnskip.settings rules: absent or empty ones keep the defaults)."""
        env = Env(environ)
        host = env.text("FFNSKIP_DECODER_HOST", "127.0.0.1")
        port = env.integer("FFNSKIP_DECODER_PORT", 50052)
        model = env.text("FFNSKIP_MODEL", "smollm2-135m")
        names = env.csv("FFNSKIP_ALLOWED_POLICIES", OVERRIDABLE_POLICIES)
        unknown = [name for name in names if name not in OVERRIDABLE_POLICIES]
        if unknown:
            raise InvalidArgument("FFNSKIP_ALLOWED_POLICIES", f"unknown policies {unknown}")
        policies = tuple(Policy(name) for name in names)
        return cls(
            host=host, port=port,
            advertise_address=env.text("FFNSKIP_ADVERTISE_ADDRESS",
                                       f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"),
            decoder_id=env.text("FFNSKIP_DECODER_ID", f"decoder-{socket.gethostname()}-{os.getpid()}"),
            model=model, model_name=env.text("FFNSKIP_MODEL_NAME", model),
            device=env.text("FFNSKIP_DEVICE", "auto"), dtype=env.text("FFNSKIP_DTYPE", "auto"),
            weights=env.choice("FFNSKIP_WEIGHTS", "auto", ("auto", *WEIGHT_FORMATS)),
            compile=env.flag("FFNSKIP_COMPILE", True),
            max_batch=env.integer("FFNSKIP_MAX_BATCH", 16), max_queue=env.integer("FFNSKIP_MAX_QUEUE", 64),
            max_seq_len=env.integer("FFNSKIP_MAX_SEQ_LEN", 2048),
            max_new_tokens_cap=env.integer("FFNSKIP_MAX_NEW_TOKENS_CAP", 1024),
            default_max_new_tokens=env.integer("FFNSKIP_DEFAULT_MAX_NEW_TOKENS", 128),
            cache_dir=cache_root(environ),
            profile_cache_dir=Path(env.text("FFNSKIP_PROFILE_CACHE_DIR", str(cache_root(environ) / "profiles"))),
            registry_ttl_s=env.number("FFNSKIP_REGISTRY_TTL_S", 10.0),
            drain_timeout_s=env.number("FFNSKIP_DRAIN_TIMEOUT_S", 30.0),
            stuck_after_s=env.number("FFNSKIP_STUCK_AFTER_S", 60.0, above=0),
            limits=OverrideLimits(
                policies=policies, min_threshold=env.number("FFNSKIP_OVERRIDE_MIN_THRESHOLD", 0.5),
                max_skip=env.integer("FFNSKIP_OVERRIDE_MAX_SKIP", 64),
                min_warm_up=env.integer("FFNSKIP_OVERRIDE_MIN_WARM_UP", 0),
                min_quorum=env.number("FFNSKIP_OVERRIDE_MIN_QUORUM", 0.25),
            ),
            skip_policy=ServingMode(env.choice("FFNSKIP_SKIP_POLICY", ServingMode.ALIGNED.value, SERVING_MODES)),
            aligned_quorum=env.number("FFNSKIP_ALIGNED_QUORUM", 0.5, above=0, maximum=1),
            log_level=env.text("FFNSKIP_LOG_LEVEL", "info"),
            metrics_host=env.text("FFNSKIP_METRICS_HOST", "0.0.0.0"),
            metrics_port=env.integer("FFNSKIP_METRICS_PORT", 0),
            threads=env.integer("FFNSKIP_THREADS", 0, minimum=0),
            # about 4 short chat prompts: a forward of 0.3-0.4 s for SmolLM2-135M fp32 on 2 CPU cores
            prefill_chunk=env.integer("FFNSKIP_PREFILL_CHUNK", 128, minimum=0),
            prompt_cache=env.flag("FFNSKIP_PROMPT_CACHE", True),
            redis=RedisSettings.from_env(environ),
        )
