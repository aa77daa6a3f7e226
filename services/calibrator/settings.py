"""The calibrator's configuration, read from an environment mapping in main (never at import).

Variables (all optional; read with ffnskip.settings.Env, so an empty value means the default,
booleans are 1/0, true/false, yes/no, on/off, and an error names the variable):

    FFNSKIP_CALIBRATOR_HOST              interface to listen on (default 0.0.0.0)
    FFNSKIP_CALIBRATOR_PORT              gRPC port (default 50053)
    FFNSKIP_MODELS                       comma-separated model specs this calibrator may calibrate
                                         (default "smollm2-135m"); a spec is an embedded name, a
                                         model directory, a .gguf file or a cached HF id
    FFNSKIP_DEVICE                       auto | cpu | cuda | cuda:N (default auto)
    FFNSKIP_DTYPE                        auto | float32 | bfloat16 | float16 (default auto)
    FFNSKIP_CACHE                        prepared models and weight digests (default ~/.cache/ffnskip)
    FFNSKIP_CALIBRATOR_WORKERS           calibration worker threads (default 1; 0 = serve the API only)
    FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS   a running job whose worker sent no heartbeat for this long is
                                         taken over by another worker (default 60000); workers heartbeat
                                         every third of it
    FFNSKIP_CALIBRATOR_BATCH_SIZE        prompts decoded together while calibrating (default: the
                                         calibration's own, ffnskip.calibration.calibrate.CalibrationRequest)
    FFNSKIP_DRAIN_TIMEOUT_S              on SIGTERM, how long in-flight RPCs and jobs may finish (default 20)
    FFNSKIP_LOG_LEVEL                    debug | info | warning | error (default info)
    FFNSKIP_REDIS_URL, FFNSKIP_REDIS_PASSWORD, FFNSKIP_REDIS_TLS, FFNSKIP_REDIS_DB
                                         Redis connection (ffnskip.store.RedisSettings.from_env)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ffnskip.config import EngineConfig
from ffnskip.errors import InvalidArgument
from ffnskip.settings import Env, cache_root
from ffnskip.store import REDIS_ENV_VARS, RedisSettings

ENV_VARS: tuple[str, ...] = (
    "FFNSKIP_CALIBRATOR_HOST",
    "FFNSKIP_CALIBRATOR_PORT",
    "FFNSKIP_MODELS",
    "FFNSKIP_DEVICE",
    "FFNSKIP_DTYPE",
    "FFNSKIP_CACHE",
    "FFNSKIP_CALIBRATOR_WORKERS",
    "FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS",
    "FFNSKIP_CALIBRATOR_BATCH_SIZE",
    "FFNSKIP_DRAIN_TIMEOUT_S",
    "FFNSKIP_LOG_LEVEL",
    *REDIS_ENV_VARS,
)


@dataclass(frozen=True)
class CalibratorSettings:
    host: str = "0.0.0.0"
    port: int = 50053
    models: tuple[str, ...] = ("smollm2-135m",)
    device: str = "auto"
    dtype: str = "auto"
    workers: int = 1
    reclaim_idle_ms: int = 60_000
    batch_size: int | None = None  # None = the calibration's default
    drain_timeout_s: float = 20.0
    log_level: str = "info"
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache_dir: Path = field(default_factory=lambda: cache_root({}))

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidArgument("FFNSKIP_CALIBRATOR_HOST", "must not be empty")
        if not (0 <= self.port <= 65535):  # 0 = any free port
            raise InvalidArgument("FFNSKIP_CALIBRATOR_PORT", f"must be in [0, 65535], got {self.port}")
        if not self.models or any(not m or ":" in m or m != m.strip() for m in self.models):
            raise InvalidArgument("FFNSKIP_MODELS", f"must list model specs without ':' or spaces, got {self.models!r}")
        try:
            EngineConfig(model=self.models[0], device=self.device, dtype=self.dtype)  # the engine's own checks
        except InvalidArgument as err:
            raise InvalidArgument(f"FFNSKIP_{err.field.upper()}", err.problem) from None
        if not (0 <= self.workers <= 64):
            raise InvalidArgument("FFNSKIP_CALIBRATOR_WORKERS", f"must be in [0, 64], got {self.workers}")
        if self.reclaim_idle_ms < 300:
            raise InvalidArgument("FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS", f"must be >= 300, got {self.reclaim_idle_ms}")
        if self.batch_size is not None and not (1 <= self.batch_size <= 64):
            raise InvalidArgument("FFNSKIP_CALIBRATOR_BATCH_SIZE", f"must be in [1, 64], got {self.batch_size}")
        if self.drain_timeout_s < 0:
            raise InvalidArgument("FFNSKIP_DRAIN_TIMEOUT_S", f"must be >= 0, got {self.drain_timeout_s}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def heartbeat_s(self) -> float:
        return self.reclaim_idle_ms / 3000

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> CalibratorSettings:
        """Every variable in ENV_VARS; the defaults are the dataclass's, the ranges __post_init__'s."""
        env = Env(environ)
        return cls(
            host=env.text("FFNSKIP_CALIBRATOR_HOST", cls.host),
            port=env.integer("FFNSKIP_CALIBRATOR_PORT", cls.port),
            models=env.csv("FFNSKIP_MODELS", cls.models),
            device=env.text("FFNSKIP_DEVICE", cls.device),
            dtype=env.text("FFNSKIP_DTYPE", cls.dtype),
            workers=env.integer("FFNSKIP_CALIBRATOR_WORKERS", cls.workers),
            reclaim_idle_ms=env.integer("FFNSKIP_CALIBRATOR_RECLAIM_IDLE_MS", cls.reclaim_idle_ms),
            batch_size=env.integer("FFNSKIP_CALIBRATOR_BATCH_SIZE", cls.batch_size),
            drain_timeout_s=env.number("FFNSKIP_DRAIN_TIMEOUT_S", cls.drain_timeout_s),
            log_level=env.text("FFNSKIP_LOG_LEVEL", cls.log_level).lower(),
            redis=RedisSettings.from_env(environ),
            cache_dir=cache_root(environ),
        )
