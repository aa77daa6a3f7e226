"""Gateway settings: read from an environment mapping (FFNSKIP_ prefix) in main only, with
ffnskip.settings.Env (an empty value means the default, an error names the variable), and
validated once into a frozen object that is passed down.

API keys are hashed here and the plain keys dropped: nothing downstream, logs
included, ever holds one.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from ffnskip.errors import InvalidArgument
from ffnskip.rpc.channels import PUBLIC_MAX_MESSAGE_BYTES
from ffnskip.settings import Env
from ffnskip.store.connection import REDIS_ENV_VARS, RedisSettings
from services.gateway.auth import KeyRing

MAX_HTTP_TIMEOUT_S = 3600.0  # the HTTP timeouts exist to bound a slow client: never off

ENV_VARS: tuple[str, ...] = (
    "FFNSKIP_GATEWAY_HOST",  # bind address of the gRPC port (default 0.0.0.0)
    "FFNSKIP_GATEWAY_PORT",  # gRPC port (default 50051; 0 = any free port)
    "FFNSKIP_GATEWAY_ID",  # this replica's id in telemetry (default gateway-<hostname>-<port>)
    "FFNSKIP_HTTP_HOST",  # bind address of the OpenAI-compatible HTTP API (default 0.0.0.0)
    "FFNSKIP_HTTP_PORT",  # its port (default 0 = off; ffnskip up and the Kubernetes manifests turn it on)
    "FFNSKIP_HTTP_KEEPALIVE_S",  # an HTTP connection idle (or with headers unfinished) this long is closed (default 75)
    "FFNSKIP_HTTP_BODY_TIMEOUT_S",  # a request body must arrive whole within this, else 408 (default 30)
    "FFNSKIP_METRICS_HOST",  # bind address of the Prometheus /metrics HTTP endpoint (default 0.0.0.0)
    "FFNSKIP_METRICS_PORT",  # its port (default 9090; 0 = off)
    "FFNSKIP_API_KEYS",  # comma-separated API keys (plain, or sha256:<hex> digests)
    "FFNSKIP_OPS_KEYS",  # comma-separated ops keys (GetTelemetry); also valid as API keys
    "FFNSKIP_AUTH_DISABLED",  # "true" serves without keys (local development only)
    "FFNSKIP_TLS_CERT",  # PEM certificate chain file: TLS on the gRPC and HTTP ports (with FFNSKIP_TLS_KEY)
    "FFNSKIP_TLS_KEY",  # PEM private key file
    *REDIS_ENV_VARS,  # FFNSKIP_REDIS_URL (redis://host:port/db), _PASSWORD, _TLS, _DB: registry, telemetry, samples
    "FFNSKIP_MAX_ATTEMPTS",  # decoders tried per request before UNAVAILABLE (default 3)
    "FFNSKIP_ATTEMPT_TIMEOUT_S",  # one attempt's deadline, within the client's (default 600)
    "FFNSKIP_FIRST_TOKEN_TIMEOUT_S",  # a decoder silent this long before the first token: try another (default 30)
    "FFNSKIP_STALL_TIMEOUT_S",  # silent this long between tokens: UNAVAILABLE "incomplete" (default 10)
    "FFNSKIP_QUARANTINE_S",  # a decoder that failed or stalled gets no new requests this long (default 5)
    "FFNSKIP_STREAM_RESUME",  # a stream whose decoder fails mid-answer continues on another (default true)
    "FFNSKIP_CONVERSATION_AFFINITY",  # a conversation returns to the pod whose prompt cache holds it (default true)
    "FFNSKIP_DISCOVERY_INTERVAL_S",  # registry refresh period (default 0.5)
    "FFNSKIP_DISCOVERY_STALE_S",  # during a Redis outage, route to last-known decoders this long (default 60)
    "FFNSKIP_MAX_NEW_TOKENS",  # cap on sampling.max_new_tokens (default 4096)
    "FFNSKIP_MAX_MESSAGE_BYTES",  # gRPC message size limit, both directions (default 4 MiB)
    "FFNSKIP_KEEPALIVE_S",  # keepalive ping period on gateway->decoder channels (default 20)
    "FFNSKIP_TELEMETRY_FLUSH_S",  # how often this replica writes its counters to Redis (default 2)
    "FFNSKIP_TELEMETRY_TTL_S",  # a replica's counters vanish this long after its last write (default 600)
    "FFNSKIP_PROMPT_SAMPLE_RATE",  # share of prompts copied into a Redis stream, [0, 1] (default 0: off)
    "FFNSKIP_PROMPT_SAMPLE_STREAM",  # that stream's key (default ffnskip:prompt-samples)
    "FFNSKIP_PROMPT_SAMPLE_MAXLEN",  # approximate cap on its length (default 10000)
    "FFNSKIP_DRAIN_TIMEOUT_S",  # on SIGTERM, time for in-flight calls to finish (default 30)
    "FFNSKIP_LOG_LEVEL",  # debug, info, warning, error (default info)
)


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "0.0.0.0"
    port: int = 50051
    gateway_id: str = ""
    http_host: str = "0.0.0.0"
    http_port: int = 0  # 0 = no HTTP API
    # Above the 60 s idle timeout of common proxies (ingress-nginx upstream keep-alive, cloud load
    # balancers), so the proxy, not the gateway, closes an idle connection and never reuses a closed one.
    http_keepalive_s: float = 75.0
    http_body_timeout_s: float = 30.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    keys: KeyRing = field(default_factory=KeyRing, repr=False)
    auth_disabled: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    redis: RedisSettings = field(default_factory=RedisSettings)
    max_attempts: int = 3
    attempt_timeout_s: float = 600.0
    first_token_timeout_s: float = 30.0
    stall_timeout_s: float = 10.0
    quarantine_s: float = 5.0
    stream_resume: bool = True
    conversation_affinity: bool = True
    discovery_interval_s: float = 0.5
    discovery_stale_s: float = 60.0
    max_new_tokens: int = 4096
    max_message_bytes: int = PUBLIC_MAX_MESSAGE_BYTES
    keepalive_s: float = 20.0
    telemetry_flush_s: float = 2.0
    telemetry_ttl_s: float = 600.0
    prompt_sample_rate: float = 0.0
    prompt_sample_stream: str = "ffnskip:prompt-samples"
    prompt_sample_maxlen: int = 10_000
    drain_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "FFNSKIP_GATEWAY_PORT", f"must be in [0, 65535], got {self.port}")
        _check(0 <= self.http_port <= 65535, "FFNSKIP_HTTP_PORT", f"must be in [0, 65535], got {self.http_port}")
        _check(0 <= self.metrics_port <= 65535, "FFNSKIP_METRICS_PORT", f"must be in [0, 65535], got {self.metrics_port}")
        _check(not self.gateway_id or ":" not in self.gateway_id, "FFNSKIP_GATEWAY_ID", "must not contain ':'")
        _check(self.auth_disabled or not self.keys.empty, "FFNSKIP_API_KEYS",
               "no API or ops keys configured; set FFNSKIP_API_KEYS / FFNSKIP_OPS_KEYS "
               "(or FFNSKIP_AUTH_DISABLED=true for local development)")
        _check((self.tls_cert is None) == (self.tls_key is None), "FFNSKIP_TLS_CERT",
               "TLS needs both FFNSKIP_TLS_CERT and FFNSKIP_TLS_KEY")
        _check(1 <= self.max_attempts <= 10, "FFNSKIP_MAX_ATTEMPTS", f"must be in [1, 10], got {self.max_attempts}")
        for name, value in (("FFNSKIP_ATTEMPT_TIMEOUT_S", self.attempt_timeout_s),
                            ("FFNSKIP_FIRST_TOKEN_TIMEOUT_S", self.first_token_timeout_s),
                            ("FFNSKIP_STALL_TIMEOUT_S", self.stall_timeout_s),
                            ("FFNSKIP_DISCOVERY_INTERVAL_S", self.discovery_interval_s),
                            ("FFNSKIP_DISCOVERY_STALE_S", self.discovery_stale_s),
                            ("FFNSKIP_KEEPALIVE_S", self.keepalive_s),
                            ("FFNSKIP_TELEMETRY_FLUSH_S", self.telemetry_flush_s),
                            ("FFNSKIP_TELEMETRY_TTL_S", self.telemetry_ttl_s)):
            _check(value > 0, name, f"must be > 0, got {value}")
        for name, value in (("FFNSKIP_HTTP_KEEPALIVE_S", self.http_keepalive_s),
                            ("FFNSKIP_HTTP_BODY_TIMEOUT_S", self.http_body_timeout_s)):
            _check(0 < value <= MAX_HTTP_TIMEOUT_S, name, f"must be in (0, {MAX_HTTP_TIMEOUT_S:g}], got {value}")
        _check(self.quarantine_s >= 0, "FFNSKIP_QUARANTINE_S", f"must be >= 0, got {self.quarantine_s}")
        _check(self.drain_timeout_s >= 0, "FFNSKIP_DRAIN_TIMEOUT_S", f"must be >= 0, got {self.drain_timeout_s}")
        _check(self.max_new_tokens >= 1, "FFNSKIP_MAX_NEW_TOKENS", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.max_message_bytes >= 1024, "FFNSKIP_MAX_MESSAGE_BYTES", f"must be >= 1024, got {self.max_message_bytes}")
        _check(0.0 <= self.prompt_sample_rate <= 1.0, "FFNSKIP_PROMPT_SAMPLE_RATE",
               f"must be in [0, 1], got {self.prompt_sample_rate}")
        _check(self.prompt_sample_maxlen >= 1, "FFNSKIP_PROMPT_SAMPLE_MAXLEN", f"must be >= 1, got {self.prompt_sample_maxlen}")

    @property
    def replica_id(self) -> str:
        return self.gateway_id or f"gateway-{socket.gethostname()}-{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewaySettings:
        """Every variable in ENV_VARS; the defaults are the dataclass's, the ranges __post_init__'s."""
        env = Env(environ)
        return cls(
            host=env.text("FFNSKIP_GATEWAY_HOST", cls.host),
            port=env.integer("FFNSKIP_GATEWAY_PORT", cls.port),
            gateway_id=env.text("FFNSKIP_GATEWAY_ID", cls.gateway_id),
            http_host=env.text("FFNSKIP_HTTP_HOST", cls.http_host),
            http_port=env.integer("FFNSKIP_HTTP_PORT", cls.http_port),
            http_keepalive_s=env.number("FFNSKIP_HTTP_KEEPALIVE_S", cls.http_keepalive_s),
            http_body_timeout_s=env.number("FFNSKIP_HTTP_BODY_TIMEOUT_S", cls.http_body_timeout_s),
            metrics_host=env.text("FFNSKIP_METRICS_HOST", cls.metrics_host),
            metrics_port=env.integer("FFNSKIP_METRICS_PORT", cls.metrics_port),
            keys=KeyRing.from_strings(env.text("FFNSKIP_API_KEYS", ""), env.text("FFNSKIP_OPS_KEYS", "")),
            auth_disabled=env.flag("FFNSKIP_AUTH_DISABLED", cls.auth_disabled),
            tls_cert=env.text("FFNSKIP_TLS_CERT", cls.tls_cert),
            tls_key=env.text("FFNSKIP_TLS_KEY", cls.tls_key),
            redis=RedisSettings.from_env(environ),
            max_attempts=env.integer("FFNSKIP_MAX_ATTEMPTS", cls.max_attempts),
            attempt_timeout_s=env.number("FFNSKIP_ATTEMPT_TIMEOUT_S", cls.attempt_timeout_s),
            first_token_timeout_s=env.number("FFNSKIP_FIRST_TOKEN_TIMEOUT_S", cls.first_token_timeout_s),
            stall_timeout_s=env.number("FFNSKIP_STALL_TIMEOUT_S", cls.stall_timeout_s),
            quarantine_s=env.number("FFNSKIP_QUARANTINE_S", cls.quarantine_s),
            stream_resume=env.flag("FFNSKIP_STREAM_RESUME", cls.stream_resume),
            conversation_affinity=env.flag("FFNSKIP_CONVERSATION_AFFINITY", cls.conversation_affinity),
            discovery_interval_s=env.number("FFNSKIP_DISCOVERY_INTERVAL_S", cls.discovery_interval_s),
            discovery_stale_s=env.number("FFNSKIP_DISCOVERY_STALE_S", cls.discovery_stale_s),
            max_new_tokens=env.integer("FFNSKIP_MAX_NEW_TOKENS", cls.max_new_tokens),
            max_message_bytes=env.integer("FFNSKIP_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            keepalive_s=env.number("FFNSKIP_KEEPALIVE_S", cls.keepalive_s),
            telemetry_flush_s=env.number("FFNSKIP_TELEMETRY_FLUSH_S", cls.telemetry_flush_s),
            telemetry_ttl_s=env.number("FFNSKIP_TELEMETRY_TTL_S", cls.telemetry_ttl_s),
            prompt_sample_rate=env.number("FFNSKIP_PROMPT_SAMPLE_RATE", cls.prompt_sample_rate),
            prompt_sample_stream=env.text("FFNSKIP_PROMPT_SAMPLE_STREAM", cls.prompt_sample_stream),
            prompt_sample_maxlen=env.integer("FFNSKIP_PROMPT_SAMPLE_MAXLEN", cls.prompt_sample_maxlen),
            drain_timeout_s=env.number("FFNSKIP_DRAIN_TIMEOUT_S", cls.drain_timeout_s),
            log_level=env.text("FFNSKIP_LOG_LEVEL", cls.log_level),
        )


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise InvalidArgument(name, problem)
