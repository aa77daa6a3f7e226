"""Where the measuring scripts (scripts/*.py) leave their raw numbers."""

from __future__ import annotations

import json
import time
from typing import Any


def write_results(path: str | None, results: dict[str, Any], started: float | None = None) -> None:
    """Write `results` as indented JSON to `path` (nothing when None), with `seconds` since
    `started` (a perf_counter reading) when given. Called after each step of a long run, so a
    stopped run keeps what it measured."""
    if path is None:
        return
    if started is not None:
        results = {**results, "seconds": round(time.perf_counter() - started, 1)}
    with open(path, "w") as out:
        json.dump(results, out, indent=2)
