"""Evaluation items from JSONL data sets, validated up front so a bad file fails in one line
before any model is loaded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ffnskip import datasets
from ffnskip.errors import InvalidArgument

PROMPT_FIELDS = ("prompt", "question", "text")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str  # sent as one chat user message
    answers: tuple[str, ...] = ()  # accepted aliases (QA only)


def load_qa_items(source: str, limit: int | None = None) -> list[Item]:
    """Rows {id, question, answers[]} (the format of factoid_qa.jsonl)."""
    rows = _rows(source)
    items = []
    for number, row in enumerate(rows, start=1):
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgument("data", f"{source} row {number}: needs a non-empty string 'question'")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise InvalidArgument("data", f"{source} row {number}: 'answers' must be a non-empty list of non-empty strings")
        items.append(Item(_item_id(row, number, source), question, tuple(a.strip() for a in answers)))
    return _checked(items, source, limit)


def load_prompt_items(source: str, limit: int | None = None) -> list[Item]:
    """Rows with a prompt (or question, or text) string, e.g. prompts.jsonl."""
    rows = _rows(source)
    items = []
    for number, row in enumerate(rows, start=1):
        prompt = next((row[f] for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
        if prompt is None:
            raise InvalidArgument("data", f"{source} row {number}: needs a non-empty string 'prompt', 'question' or 'text'")
        items.append(Item(_item_id(row, number, source), prompt))
    return _checked(items, source, limit)


def items_digest(items: list[Item]) -> str:
    payload = json.dumps([[i.id, i.prompt, list(i.answers)] for i in items], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _rows(source: str) -> list[dict]:
    rows = datasets.read_jsonl(source)  # NotFound / InvalidArgument("data", ...) name the problem
    if not rows:
        raise InvalidArgument("data", f"{source} has no rows")
    return rows


def _item_id(row: dict, number: int, source: str) -> str:
    value = row.get("id", f"row{number}")  # ids key the cache; a file without them still works
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise InvalidArgument("data", f"{source} row {number}: 'id' must be a non-empty string or integer")
    return str(value)


def _checked(items: list[Item], source: str, limit: int | None) -> list[Item]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InvalidArgument("data", f"{source}: duplicate id {item.id!r}")
        seen.add(item.id)
    if limit is not None:
        if limit < 1:
            raise InvalidArgument("limit", f"must be >= 1, got {limit}")
        items = items[:limit]
    return items
