"""The life of a service process, the same for every service: settings from the
environment, logging, serve until a signal, an exit code.

Exit codes: 0 stopped cleanly (a drain after SIGTERM), 1 failed while serving, 2 the
settings are wrong (one line on stderr naming the variable, before any logging is set up).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

from ffnskip.errors import FfnSkipError
from ffnskip.logs import configure_logging, get_logger

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2


class ServiceSettings(Protocol):
    @property  # read-only, so frozen dataclasses match
    def log_level(self) -> str: ...


S = TypeVar("S", bound=ServiceSettings)


def run_service(name: str, read_settings: Callable[[Mapping[str, str]], S],
                serve: Callable[[S], Coroutine[Any, Any, object]], environ: Mapping[str, str] | None = None) -> int:
    """Read settings, configure logging, run `serve(settings)`; the process's exit code."""
    try:
        settings = read_settings(os.environ if environ is None else environ)
        configure_logging(settings.log_level)
    except FfnSkipError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        asyncio.run(serve(settings))
    except FfnSkipError as exc:
        get_logger(__name__).error(f"{name} failed", error=exc.message)
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
