"""Prompt encoding (plain text or chat messages through the model's template) and EOS ids."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ffnskip.config import CHAT_ROLES
from ffnskip.errors import InvalidArgument


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | None, messages: list[dict] | None) -> list[int]:
    if (prompt is None) == (messages is None):
        raise InvalidArgument("prompt", "give exactly one of prompt or messages")
    if messages is not None:
        return _encode_messages(tokenizer, messages)
    if not prompt or not prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    if not messages:
        raise InvalidArgument("messages", "must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise InvalidArgument(f"messages[{i}].content", "must be a non-empty string")
    if not tokenizer.chat_template:
        raise InvalidArgument("messages", "this model has no chat template; send a plain prompt")
    encoded: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


def eos_ids(loaded) -> frozenset[int]:
    ids = set()
    for source in (loaded.model.generation_config, loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
