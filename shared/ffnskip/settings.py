"""One way to read settings from an environment mapping, shared by every service and by
RedisSettings.

The rules, the same for every variable:

- a value is stripped of surrounding whitespace, and an empty or whitespace-only value means
  unset: the default applies (a ConfigMap entry can then be blanked without deleting it);
- booleans are 1/0, true/false, yes/no, on/off, in any case;
- a value that does not parse or is out of range raises ffnskip.errors.InvalidArgument whose
  field is the variable's name, so the message says which variable to fix.

Env reads only the mapping it is given (never os.environ), so settings stay explicit and
testable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import overload

from ffnskip.errors import InvalidArgument

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

Bound = int | float


def threads_per_process(processes: int) -> int:
    """Compute threads for each of `processes` compute processes sharing this host's CPUs (those
    this process may run on): their OpenMP workers spin while they wait, so more threads than CPUs
    in all slow every one of them down."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def cache_root(environ: Mapping[str, str]) -> Path:
    """Where prepared models, weight-file digests, compiled decode segments and the local stack's
    data live: FFNSKIP_CACHE, default ~/.cache/ffnskip. Read here, passed down to the engine."""
    return Path(Env(environ).text("FFNSKIP_CACHE", str(Path.home() / ".cache" / "ffnskip"))).expanduser()


class Env:
    """Typed, validated reads of FFNSKIP_* style variables from one environment mapping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def value(self, name: str) -> str | None:
        """The stripped value, or None when the variable is absent, empty or only whitespace."""
        raw = self._environ.get(name)
        if raw is None:
            return None
        return raw.strip() or None

    @overload
    def text(self, name: str, default: str) -> str: ...
    @overload
    def text(self, name: str, default: None) -> str | None: ...

    def text(self, name: str, default: str | None) -> str | None:
        value = self.value(name)
        return default if value is None else value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        """A text value that must be one of `choices` (compared exactly)."""
        value = self.value(name)
        if value is None:
            return default
        if value not in choices:
            raise InvalidArgument(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def csv(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Comma-separated items, each stripped; empty items are dropped ("a,,b" = "a,b")."""
        value = self.value(name)
        if value is None:
            return default
        return tuple(item.strip() for item in value.split(",") if item.strip())

    @overload
    def integer(self, name: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int: ...
    @overload
    def integer(self, name: str, default: None, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None: ...

    def integer(self, name: str, default: int | None, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        """A whole number, checked against the inclusive bounds when it is set (the default is not checked)."""
        value = self.value(name)
        if value is None:
            return default
        try:
            parsed = int(value)
        except ValueError:
            raise InvalidArgument(name, f"must be an integer, got {value!r}") from None
        _check_bounds(name, parsed, value, minimum=minimum, above=None, maximum=maximum)
        return parsed

    def number(self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None,
               above: float | None = None) -> float:
        """A real number; `minimum` and `maximum` are inclusive bounds, `above` an exclusive lower one.

        NaN is refused: it would pass every comparison-based check downstream.
        """
        value = self.value(name)
        if value is None:
            return default
        try:
            parsed = float(value)
        except ValueError:
            raise InvalidArgument(name, f"must be a number, got {value!r}") from None
        if math.isnan(parsed):
            raise InvalidArgument(name, f"must be a number, got {value!r}")
        _check_bounds(name, parsed, value, minimum=minimum, above=above, maximum=maximum)
        return parsed

    def flag(self, name: str, default: bool) -> bool:
        """A boolean: 1/0, true/false, yes/no, on/off, in any case."""
        value = self.value(name)
        if value is None:
            return default
        word = value.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise InvalidArgument(name, f"must be one of {', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)}, got {value!r}")


def _check_bounds(name: str, value: Bound, written: str, *, minimum: Bound | None, above: Bound | None,
                  maximum: Bound | None) -> None:
    """Raise naming the variable when `value` (as `written`) is outside the bounds."""
    if minimum is not None and above is not None:
        raise ValueError("give at most one of minimum and above")
    low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
    high_ok = maximum is None or value <= maximum
    if low_ok and high_ok:
        return
    if minimum is not None and maximum is not None:
        rule = f"in [{_shown(minimum)}, {_shown(maximum)}]"
    elif above is not None and maximum is not None:
        rule = f"in ({_shown(above)}, {_shown(maximum)}]"
    elif minimum is not None:
        rule = f">= {_shown(minimum)}"
    elif above is not None:
        rule = f"> {_shown(above)}"
    else:
        rule = f"<= {_shown(maximum)}"
    raise InvalidArgument(name, f"must be {rule}, got {written}")


def _shown(bound: Bound | None) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
