"""Structured JSON logs for the services, with a request id bound per RPC.

`configure_logging(level)` is called once in a service's main. structlog loggers and
plain stdlib loggers (grpc, redis, transformers) then write one JSON object per line to
stderr, and every line logged while an RPC runs carries its `request_id` (taken from the
client's `x-request-id` metadata or generated), including lines from threads the RPC
handed work to with asyncio.to_thread (which copies the context).

User data stays out of the logs: tracebacks are rendered without frame locals (a local
can be a whole GenerateRequest, prompt included), and no code logs a prompt or a
generated text; `fingerprint` gives a size and a hash for debugging instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

import structlog

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str | None] = ContextVar("ffnskip_request_id", default=None)
_LEVELS = ("debug", "info", "warning", "error", "critical")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # echoed into logs: no spaces, quotes or newlines


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(level: str = "info", stream=None, cache_loggers: bool = True) -> None:
    """JSON lines on `stream` (stderr) for structlog and stdlib loggers alike; idempotent."""
    name = level.strip().lower()
    if name not in _LEVELS:
        from ffnskip.errors import InvalidArgument

        raise InvalidArgument("log_level", f"must be one of {', '.join(_LEVELS)}, got {level!r}")
    numeric = getattr(logging, name.upper())
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # a service configures once: cached loggers are cheaper; tests reconfigure, so they pass False
        cache_logger_on_first_use=cache_loggers,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # tracebacks as data, but without frame locals: they would carry prompts
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False)),
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """The logger of the module `name`: every module calls `get_logger(__name__)`, so a line's
    `logger` is the module that wrote it (`ffnskip.rpc.server`, `services.decoder.profiles`). A
    service's main module runs as `__main__` (`python -m services.decoder.main`); its lines
    carry its module's name all the same."""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return structlog.get_logger(name)


def fingerprint(text: str) -> str:
    """What a log line may say about user text: its size and a short hash, never the text."""
    digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{len(text)} chars, sha256 {digest}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from_metadata(metadata) -> str:
    """The client's x-request-id when it is a sane token, else a fresh one."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_HEADER and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return new_request_id()


def bind_request_id(request_id: str) -> None:
    """Bind `request_id` for the rest of the current task (gRPC runs each RPC in a task of its
    own, whose context ends with it: nothing to reset, and nothing reaches other RPCs)."""
    request_id_var.set(request_id)
    structlog.contextvars.bind_contextvars(request_id=request_id)


@contextlib.contextmanager
def bound_request_id(request_id: str) -> Iterator[str]:
    """Bind `request_id` for this context (an RPC's task) and its log lines.

    Enter and leave it in one context: never across a `yield` of an async generator,
    whose finalisation may run in another task's context (resetting the binding there
    raises ValueError); a generator binds with bind_request_id instead."""
    token = request_id_var.set(request_id)
    try:
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            yield request_id
    finally:
        request_id_var.reset(token)
