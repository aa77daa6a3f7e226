"""Waiting on observable state in tests: poll with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout_s: float = 30.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy (returned); fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)  # polling cadence, bounded by the deadline
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def process_state(pid: int) -> str:
    """The process state letter ("R", "S", "T" stopped, "Z"...), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""
