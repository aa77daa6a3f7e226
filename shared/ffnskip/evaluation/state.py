"""The resumable state: a JSONL file of (key, digest, value) records, last one wins.

A record is reused only while its digest (everything that determines the result:
model, parameters, chunk composition, prompt text) still matches. Lines are appended
and flushed chunk by chunk, so a killed run loses at most the chunk in flight; a torn
last line is ignored on load and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def digest_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class StateFile:
    """In memory only when `path` is None (nothing survives the process)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        self._needs_newline = False
        if path is not None and path.exists():
            text = path.read_text()
            self._needs_newline = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill: its chunk is simply computed again
                if isinstance(record, dict) and {"key", "digest", "value"} <= set(record):
                    self.entries[record["key"]] = record

    def get(self, key: str, digest: str) -> Any | None:
        record = self.entries.get(key)
        return record["value"] if record is not None and record["digest"] == digest else None

    def put_many(self, records: list[tuple[str, str, Any]]) -> None:
        lines = []
        for key, digest, value in records:
            record = {"key": key, "digest": digest, "value": value}
            self.entries[key] = record
            lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
        if self.path is None or not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            if self._needs_newline:
                handle.write("\n")
                self._needs_newline = False
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def put(self, key: str, digest: str, value: Any) -> None:
        self.put_many([(key, digest, value)])
