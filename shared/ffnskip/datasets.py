"""The data sets shipped with the package (copies of the project's evaluation data)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from ffnskip.errors import InvalidArgument, NotFound

NAMED = {"calibration": "calibration.jsonl", "prompts": "prompts.jsonl", "factoid_qa": "factoid_qa.jsonl"}


def read_jsonl(name_or_path: str) -> list[dict]:
    """Rows of a named data set or of any JSONL file."""
    if name_or_path in NAMED:
        text = resources.files("ffnskip.data").joinpath(NAMED[name_or_path]).read_text()
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise NotFound(f"data: no data set named {name_or_path!r} and no such file (named: {', '.join(NAMED)})")
        text, source = path.read_text(), str(path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InvalidArgument("data", f"{source} line {number} is not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise InvalidArgument("data", f"{source} line {number} is not a JSON object")
        rows.append(row)
    return rows


def texts(name_or_path: str, field: str, limit: int | None = None) -> list[str]:
    values: list[str] = []
    for row in read_jsonl(name_or_path):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument("data", f"every row of {name_or_path} needs a non-empty string {field!r}")
        values.append(value)
    return values[:limit] if limit else values


def digest(items: list[str]) -> str:
    """sha256 of a prompt set, independent of how it was stored."""
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
