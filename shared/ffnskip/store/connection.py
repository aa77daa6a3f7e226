"""Redis connection settings and the one place Redis failures become Unavailable.

Settings come from an explicit environment mapping (never os.environ at import), read
with ffnskip.settings.Env like every service's settings, and the client retries
connection errors with bounded exponential backoff, so a Redis blip is absorbed and an
outage surfaces after a known, short time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ffnskip.errors import InvalidArgument, Unavailable
from ffnskip.settings import Env

# The variables RedisSettings.from_env reads; each service that connects to Redis lists them
# in its settings' ENV_VARS (the Kubernetes manifests are checked against those).
REDIS_ENV_VARS: tuple[str, ...] = ("FFNSKIP_REDIS_URL", "FFNSKIP_REDIS_PASSWORD", "FFNSKIP_REDIS_TLS", "FFNSKIP_REDIS_DB")


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    tls: bool = False
    db: int | None = None  # overrides the URL's database when set
    retries: int = 5
    socket_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if urlparse(self.url).scheme not in ("redis", "rediss", "unix"):
            raise InvalidArgument("redis.url", f"must be redis://, rediss:// or unix://, got {self.url!r}")
        if self.db is not None and self.db < 0:
            raise InvalidArgument("redis.db", f"must be >= 0, got {self.db}")
        if self.retries < 0:
            raise InvalidArgument("redis.retries", f"must be >= 0, got {self.retries}")
        if self.socket_timeout_s <= 0:
            raise InvalidArgument("redis.socket_timeout_s", f"must be > 0, got {self.socket_timeout_s}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedisSettings:
        """Read FFNSKIP_REDIS_URL, _PASSWORD, _TLS and _DB (ffnskip.settings rules: absent or
        empty ones keep the defaults); a refused value names its variable."""
        env = Env(environ)
        try:
            return cls(
                url=env.text("FFNSKIP_REDIS_URL", cls.url),
                password=env.text("FFNSKIP_REDIS_PASSWORD", cls.password),
                tls=env.flag("FFNSKIP_REDIS_TLS", cls.tls),
                db=env.integer("FFNSKIP_REDIS_DB", cls.db, minimum=0),
            )
        except InvalidArgument as err:
            if err.field == "redis.url":  # __post_init__ names the field; the operator set the variable
                raise InvalidArgument("FFNSKIP_REDIS_URL", err.problem) from None
            raise

    @property
    def address(self) -> str:
        """host:port for messages (never includes the password)."""
        parsed = urlparse(self.url)
        return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"


def connect(settings: RedisSettings) -> redis.Redis:
    """A client that retries connection errors with bounded exponential backoff.

    Nothing is sent until the first command, so this never fails on a Redis outage.
    """
    kwargs: dict = {
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), settings.retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": 15,  # PING a pooled connection idle this long before reuse
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "decode_responses": False,
    }
    if settings.password is not None:
        kwargs["password"] = settings.password
    parsed = urlparse(settings.url)
    if settings.db is not None:
        if parsed.scheme == "unix":
            kwargs["db"] = settings.db
        else:
            parsed = parsed._replace(path=f"/{settings.db}")  # from_url lets the URL's /db win over kwargs
    if settings.tls and parsed.scheme == "redis":
        parsed = parsed._replace(scheme="rediss")
    return redis.Redis.from_url(urlunparse(parsed), **kwargs)


def address_of(client: redis.Redis) -> str:
    """host:port of a client's pool, for error messages."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


@contextlib.contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Turn Redis failures into the taxonomy: the store's callers never see redis exceptions."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as err:
        raise Unavailable(f"redis at {address_of(client)} is unreachable: {err}") from err
    except RedisError as err:
        # A refused command (OOM, READONLY replica, NOSCRIPT after failover) is a dependency failure too.
        raise Unavailable(f"redis at {address_of(client)} refused the command: {err}") from err
