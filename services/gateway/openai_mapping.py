"""The OpenAI-compatible HTTP API's mapping, without I/O: a JSON body of /v1/chat/completions
or /v1/completions to a GenerateRequest, the gateway's summary and tokens back to OpenAI
objects, and errors to OpenAI error bodies.

Field names in errors are the client's: a refusal of the shared validation, which names
proto fields ("sampling.temperature", "skip.threshold"), is renamed to the JSON field the
client sent ("temperature", "ffnskip.threshold").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ffnskip.config import MAX_TOP_LOGPROBS
from ffnskip.errors import InvalidArgument
from ffnskip.rpc.convert import policy_fields
from ffnskip.rpc.generation import MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_STOP_STRINGS, shown
from ffnskip.v1 import generation_pb2
from services.gateway.openai_fields import CHAT, refusal

SKIP_FIELDS = ("policy", "threshold", "max_skip", "warm_up", "quorum")  # the `ffnskip` extension object
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
MAX_CONTENT_PARTS = 1024  # of one message, checked before they are joined
# "field: problem", as every InvalidArgument (and the decoder's refusals) words it
_FIELD_PREFIX = re.compile(r"^(?P<field>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?(?:\[\d+\])?): (?P<problem>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ParsedRequest:
    """An OpenAI request as the gateway runs it."""

    kind: str  # CHAT or COMPLETION
    request: generation_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    max_tokens_field: str  # the name the client gave the token limit (errors name it)
    echo: bool = False  # completions: the prompt goes before the answer
    echo_text: str = ""  # the prompt as text (a token-id prompt: empty, its tokens' texts are used)


# The largest body a valid request can need: the longest prompt with every character a JSON
# escape (6 bytes) or a token-id prompt at its longest (11 bytes an id), plus its other fields.
_LARGEST_VALID_BODY = max(MAX_PROMPT_CHARS * 6, MAX_PROMPT_TOKENS * 11) + (64 << 10)


def http_body_limit(max_message_bytes: int) -> int:
    """The HTTP API's body limit: the gRPC message limit, or the largest body a valid request
    can need when that is smaller (a larger body is refused before it is read, not parsed)."""
    return min(max_message_bytes, _LARGEST_VALID_BODY)


def parse(body: Any, kind: str, max_new_tokens: int) -> ParsedRequest:
    """The GenerateRequest of an OpenAI request body; a field this server does not serve, or
    a bad value, is InvalidArgument naming the client's field (openai_fields tables them).
    `max_new_tokens` is the gateway's cap (a larger limit would not fit the proto's field)."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    refused = refusal(body, kind)
    if refused is not None:
        raise InvalidArgument(*refused)
    request = generation_pb2.GenerateRequest(model=_string(body, "model", required=True) or "")
    echo = False
    if kind == CHAT:
        request.messages.extend(_messages(body))
    else:
        prompt = _prompt(body)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        echo = _boolean(body, "echo") or False
    for name in ("n", "best_of"):
        count = _integer(body, name)
        if count is not None and count != 1:
            raise InvalidArgument(name, f"only {name}=1 is served, got {count}")
    for name, default in (("skip_special_tokens", True), ("spaces_between_special_tokens", True), ("store", False)):
        if _boolean(body, name) not in (None, default):
            raise InvalidArgument(name, f"only {str(default).lower()} is served")
    tier = _string(body, "service_tier")
    if tier not in (None, "auto", "default"):
        raise InvalidArgument("service_tier", f"only auto or default is served, got {shown(tier or '')}")
    _string(body, "user")

    sampling = request.sampling
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = _integer(body, limit_field)
    if limit is not None:  # unset: the server's default, as for a gRPC request
        if limit < 1:
            raise InvalidArgument(limit_field, f"must be >= 1, got {limit}")
        if limit > max_new_tokens:
            raise InvalidArgument(limit_field, f"must be <= {max_new_tokens}, got {limit}")
        sampling.max_new_tokens = limit
    for name in ("temperature", "presence_penalty", "frequency_penalty"):
        number = _number(body, name)
        if number is not None:
            setattr(sampling, name, number)
    for name in ("top_p", "min_p", "repetition_penalty"):  # optional fields: unset keeps "off"
        number = _number(body, name)
        if number is not None:
            setattr(sampling, name, number)
    for name in ("top_k", "min_tokens"):
        count = _integer(body, name)
        if count is not None:
            if not 0 <= count < 2 ** 31:
                raise InvalidArgument(name, f"must be in [0, 2^31), got {count}")
            setattr(sampling, name, count)
    seed = _integer(body, "seed")
    if seed is not None:
        if not 0 <= seed < 2 ** 64:
            raise InvalidArgument("seed", f"must be in [0, 2^64), got {seed}")
        sampling.seed = seed
    sampling.ignore_eos = _boolean(body, "ignore_eos") or False
    sampling.stop.extend(_stop(body))
    _logprobs(body, kind, echo, sampling)
    if echo and request.prompt_token_ids:  # the echoed text is the prompt tokens' texts, sent with their logprobs
        sampling.prompt_logprobs = True
    _skip_overrides(body, request.skip)

    stream = _boolean(body, "stream") or False
    if stream and echo:
        raise InvalidArgument("echo", "is not served with stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidArgument("stream_options", "must be an object")
    if options and set(options) - {"include_usage"}:
        raise InvalidArgument("stream_options", f"only include_usage is served, got {sorted(options)}")
    include_usage = bool(options and _boolean(options, "include_usage", "stream_options.include_usage"))
    return ParsedRequest(kind, request, stream, include_usage, limit_field, echo, request.prompt if echo else "")


def _logprobs(body: dict, kind: str, echo: bool, sampling: generation_pb2.SamplingOptions) -> None:
    """Chat: `logprobs` true and `top_logprobs` alternatives. Completions: `logprobs` N = each
    token's log-probability with N alternatives (the prompt's too with `echo`)."""
    if kind == CHAT:
        sampling.logprobs = _boolean(body, "logprobs") or False
        top = _integer(body, "top_logprobs")
        if top is not None:
            if not sampling.logprobs:
                raise InvalidArgument("top_logprobs", "needs logprobs: true")
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
            sampling.top_logprobs = top
        return
    value = body.get("logprobs")
    if value is None or value is False:
        return
    top = _integer(body, "logprobs")
    if top is None or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r:.32}")
    sampling.logprobs = True
    sampling.top_logprobs = top
    sampling.prompt_logprobs = echo


def client_field(proto_field: str, parsed: ParsedRequest | None) -> str:
    """The client's name of a GenerateRequest field path ("sampling.stop[2]" -> "stop[2]")."""
    head, _, rest = proto_field.partition(".")
    if head == "sampling" and rest:
        name, bracket, index = rest.partition("[")
        if name == "max_new_tokens":
            name = parsed.max_tokens_field if parsed else "max_tokens"
        return name + bracket + index
    if head == "skip" and rest:
        return f"ffnskip.{rest}"
    if head in ("prompt_ids", "prompt_token_ids"):  # the engine's and the proto's names of a token-id prompt
        return "prompt"
    if head == "prompt" and parsed is not None and parsed.kind == CHAT:
        return "messages"
    if head == "request_id":
        return "x-request-id"
    return proto_field


def client_error(message: str, parsed: ParsedRequest | None) -> tuple[str | None, str]:
    """(param, message) of an error message worded "field: problem", the field renamed to the
    client's; (None, message) for one that names no field."""
    match = _FIELD_PREFIX.match(message)
    if match is None:
        return None, message
    param = client_field(match["field"], parsed)
    return param, f"{param}: {match['problem']}"


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_type(http_status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    if http_status == 401:
        return "authentication_error"
    if http_status == 403:
        return "permission_error"
    if http_status == 429:
        return "rate_limit_error"
    if http_status >= 500:
        return "server_error"
    return "invalid_request_error"


# -- field readers: JSON null means "not given" ---------------------------------------------

def _string(body: dict, name: str, required: bool = False, field: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidArgument(field or name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidArgument(field or name, f"must be a string, got {_type(value)}")
    return _text(value, field or name)


def _text(value: str, field: str) -> str:
    """A JSON string that is valid Unicode text: JSON may escape a lone surrogate (\\ud800),
    which no UTF-8 text (and so no protobuf string) can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not valid Unicode text (a lone surrogate escape)") from None
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a number, got {_type(value)}")
    return float(value)


def _integer(body: dict, name: str, field: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field or name, f"must be an integer, got {_type(value)}")
    return value


def _boolean(body: dict, name: str, field: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidArgument(field or name, f"must be true or false, got {_type(value)}")
    return value


def _type(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(type(value), "a number") \
        if value is not None else "null"


def _messages(body: dict) -> list[generation_pb2.ChatMessage]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidArgument("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty array of {role, content} objects")
    if len(messages) > MAX_MESSAGES:  # before any message is built
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = _string(message, "role", field=f"messages[{i}].role") if "role" in message else None
        if role is None:
            raise InvalidArgument(f"messages[{i}].role", "is required")
        out.append(generation_pb2.ChatMessage(role=_ROLE_ALIASES.get(role, role), content=_content(message, i)))
    return out


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list):
        if len(content) > MAX_CONTENT_PARTS:
            raise InvalidArgument(f"messages[{i}].content", f"at most {MAX_CONTENT_PARTS} parts, got {len(content)}")
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise InvalidArgument(f"messages[{i}].content[{j}]", "only text parts are served" +
                                      (f", got type {shown(kind)}" if isinstance(kind, str) else ""))
            texts.append(_text(part["text"], f"messages[{i}].content[{j}].text"))
        return "".join(texts)
    raise InvalidArgument(f"messages[{i}].content", f"must be a string or an array of text parts, got {_type(content)}")


def _prompt(body: dict) -> str | list[int]:
    """A string, or token ids; either may come as a batch of one."""
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidArgument("prompt", "is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise InvalidArgument("prompt", f"one prompt per request is served, got {len(prompt)}")
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return _text(prompt, "prompt")
    if isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_PROMPT_TOKENS:
            raise InvalidArgument("prompt", f"at most {MAX_PROMPT_TOKENS} tokens, got {len(prompt)}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2 ** 31 for t in prompt):
            raise InvalidArgument("prompt", "token ids must be integers >= 0")
        return prompt
    raise InvalidArgument("prompt", "must be a string or a non-empty array of token ids")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [_text(stop, "stop")]
    if isinstance(stop, list):
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for i, item in enumerate(stop):
            if not isinstance(item, str):
                raise InvalidArgument(f"stop[{i}]", f"must be a string, got {_type(item)}")
            _text(item, f"stop[{i}]")
        return list(stop)
    raise InvalidArgument("stop", f"must be a string or an array of strings, got {_type(stop)}")


def _skip_overrides(body: dict, skip: generation_pb2.SkipOverrides) -> None:
    """The `ffnskip` extension object: our per-request skip overrides. Only the JSON types are
    checked here; the values' ranges are ffnskip.rpc.generation.skip_of's, as for a gRPC request."""
    overrides = body.get("ffnskip")
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise InvalidArgument("ffnskip", f"must be an object with any of {', '.join(SKIP_FIELDS)}")
    policy = overrides.get("policy")
    if policy is not None:
        if not isinstance(policy, str):
            raise InvalidArgument("ffnskip.policy", f"must be a string, got {_type(policy)}")
        skip.MergeFrom(generation_pb2.SkipOverrides(**policy_fields(_text(policy, "ffnskip.policy"))))
    for name in ("threshold", "quorum"):
        value = overrides.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"ffnskip.{name}", f"must be a number, got {_type(value)}")
            setattr(skip, name, float(value))
    for name in ("max_skip", "warm_up"):
        number = _integer(overrides, name, f"ffnskip.{name}")
        if number is not None:
            if not -2 ** 31 <= number < 2 ** 31:  # what the int32 field can hold
                raise InvalidArgument(f"ffnskip.{name}", f"out of range, got {number}")
            setattr(skip, name, number)
