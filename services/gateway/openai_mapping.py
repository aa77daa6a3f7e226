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
from typing import Any, Optional

from ffnskip.errors import InvalidArgument
from ffnskip.rpc.generation import shown
from ffnskip.v1 import generation_pb2

CHAT = "chat"
COMPLETION = "completion"
SKIP_FIELDS = ("policy", "threshold", "max_skip", "warm_up", "quorum")  # the `ffnskip` extension object
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
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


def parse(body: Any, kind: str, max_new_tokens: int) -> ParsedRequest:
    """The GenerateRequest of an OpenAI request body; unknown fields are ignored, a bad value
    is InvalidArgument naming the client's field. `max_new_tokens` is the gateway's cap (a
    larger limit would not fit the proto's field either)."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    request = generation_pb2.GenerateRequest(model=_string(body, "model", required=True) or "")
    if kind == CHAT:
        request.messages.extend(_messages(body))
    else:
        request.prompt = _prompt(body)
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise InvalidArgument("n", f"only n=1 is served, got {n}")
    for name in ("logprobs", "top_logprobs", "echo"):  # results we cannot give: refused, not silently dropped
        if body.get(name) not in (None, False, 0):
            raise InvalidArgument(name, "is not supported by this server")
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != 1:
        raise InvalidArgument("best_of", f"only best_of=1 is served, got {best_of}")

    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = _integer(body, limit_field)
    sampling = request.sampling
    if limit is not None:  # unset: the server's default, as for a gRPC request
        if limit < 1:
            raise InvalidArgument(limit_field, f"must be >= 1, got {limit}")
        if limit > max_new_tokens:
            raise InvalidArgument(limit_field, f"must be <= {max_new_tokens}, got {limit}")
        sampling.max_new_tokens = limit
    temperature = _number(body, "temperature")
    if temperature is not None:
        sampling.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        sampling.top_p = top_p
    seed = _integer(body, "seed")
    if seed is not None:
        if not 0 <= seed < 2 ** 64:
            raise InvalidArgument("seed", f"must be in [0, 2^64), got {seed}")
        sampling.seed = seed
    sampling.stop.extend(_stop(body))
    _skip_overrides(body, request.skip)

    stream = _boolean(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidArgument("stream_options", "must be an object")
    include_usage = bool(options and _boolean(options, "include_usage", "stream_options.include_usage"))
    return ParsedRequest(kind, request, stream, include_usage, limit_field)


def client_field(proto_field: str, parsed: Optional[ParsedRequest]) -> str:
    """The client's name of a GenerateRequest field path ("sampling.stop[2]" -> "stop[2]")."""
    head, _, rest = proto_field.partition(".")
    if head == "sampling" and rest:
        name, bracket, index = rest.partition("[")
        if name == "max_new_tokens":
            name = parsed.max_tokens_field if parsed else "max_tokens"
        return name + bracket + index
    if head == "skip" and rest:
        return f"ffnskip.{rest}"
    if head == "prompt" and parsed is not None and parsed.kind == CHAT:
        return "messages"
    if head == "request_id":
        return "x-request-id"
    return proto_field


def client_error(message: str, parsed: Optional[ParsedRequest]) -> tuple[Optional[str], str]:
    """(param, message) of an error message worded "field: problem", the field renamed to the
    client's; (None, message) for one that names no field."""
    match = _FIELD_PREFIX.match(message)
    if match is None:
        return None, message
    param = client_field(match["field"], parsed)
    return param, f"{param}: {match['problem']}"


def error_body(message: str, kind: str, param: Optional[str], code: Optional[str]) -> dict:
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


# -- responses ------------------------------------------------------------------------------

def completion_id(parsed: ParsedRequest) -> str:
    return f"{'chatcmpl' if parsed.kind == CHAT else 'cmpl'}-{parsed.request.request_id}"


def finish_reason(summary: generation_pb2.GenerateResponse) -> str:
    return _FINISH_REASONS.get(summary.finish_reason, summary.finish_reason)


def usage(summary: generation_pb2.GenerateResponse) -> dict:
    completion = summary.skip_stats.generated_tokens
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": completion,
            "total_tokens": summary.prompt_tokens + completion}


def skip_extension(summary: generation_pb2.GenerateResponse) -> dict:
    """Our statistics of the request, the `ffnskip` field of a response (or final chunk)."""
    stats, latency = summary.skip_stats, summary.latency
    return {
        "policy": summary.policy, "profile_version": summary.profile_version, "served_by": summary.served_by,
        "skip_ratio": stats.skip_ratio, "decode_skip_ratio": stats.decode_skip_ratio,
        "ffn_blocks_total": stats.ffn_blocks_total, "ffn_blocks_skipped": stats.ffn_blocks_skipped,
        "per_layer_skips": list(stats.per_layer_skips), "generated_tokens": stats.generated_tokens,
        "ttft_ms": latency.ttft_ms, "total_ms": latency.total_ms, "tokens_per_s": latency.tokens_per_s,
        "queue_ms": latency.queue_ms,
    }


def whole_response(parsed: ParsedRequest, summary: generation_pb2.GenerateResponse, created: int) -> dict:
    """The non-streaming response object."""
    if parsed.kind == CHAT:
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": summary.text},
                        "logprobs": None, "finish_reason": finish_reason(summary)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": summary.text, "logprobs": None, "finish_reason": finish_reason(summary)}
        obj = "text_completion"
    return {"id": completion_id(parsed), "object": obj, "created": created, "model": parsed.request.model,
            "system_fingerprint": None, "choices": [choice], "usage": usage(summary),
            "ffnskip": skip_extension(summary)}


def chunk(parsed: ParsedRequest, created: int, text: Optional[str] = None, role: bool = False,
          summary: Optional[generation_pb2.GenerateResponse] = None, with_usage: bool = False) -> dict:
    """One streamed chunk: a text piece, the assistant role (a chat's first chunk), the finish
    (`summary`: finish_reason and our statistics), or, with `with_usage` alone, the usage chunk
    (no choices), as OpenAI sends them."""
    obj = "chat.completion.chunk" if parsed.kind == CHAT else "text_completion"
    out: dict = {"id": completion_id(parsed), "object": obj, "created": created, "model": parsed.request.model,
                 "system_fingerprint": None}
    if with_usage and summary is not None and text is None and not role:
        out["choices"] = []
        out["usage"] = usage(summary)
        return out
    reason = finish_reason(summary) if summary is not None else None
    if parsed.kind == CHAT:
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
    if parsed.include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the usage chunk
    if summary is not None:
        out["ffnskip"] = skip_extension(summary)
    return out


# -- field readers: JSON null means "not given" ---------------------------------------------

def _string(body: dict, name: str, required: bool = False) -> Optional[str]:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidArgument(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {_type(value)}")
    return value


def _number(body: dict, name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a number, got {_type(value)}")
    return float(value)


def _integer(body: dict, name: str, field: Optional[str] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field or name, f"must be an integer, got {_type(value)}")
    return value


def _boolean(body: dict, name: str, field: Optional[str] = None) -> Optional[bool]:
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
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = _string(message, "role") if "role" in message else None
        if role is None:
            raise InvalidArgument(f"messages[{i}].role", "is required")
        out.append(generation_pb2.ChatMessage(role=_ROLE_ALIASES.get(role, role), content=_content(message, i)))
    return out


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or an array of text parts (joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise InvalidArgument(f"messages[{i}].content[{j}]", "only text parts are served" +
                                      (f", got type {shown(kind)}" if isinstance(kind, str) else ""))
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument(f"messages[{i}].content", f"must be a string or an array of text parts, got {_type(content)}")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]  # a batch of one
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise InvalidArgument("prompt", f"one prompt per request is served, got {len(prompt)}")
    if prompt is None:
        raise InvalidArgument("prompt", "is required")
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "must be a string (token arrays are not served)")
    return prompt


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        for i, item in enumerate(stop):
            if not isinstance(item, str):
                raise InvalidArgument(f"stop[{i}]", f"must be a string, got {_type(item)}")
        return list(stop)
    raise InvalidArgument("stop", f"must be a string or an array of strings, got {_type(stop)}")


def _skip_overrides(body: dict, skip: generation_pb2.SkipOverrides) -> None:
    """The `ffnskip` extension object: our per-request skip overrides."""
    overrides = body.get("ffnskip")
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise InvalidArgument("ffnskip", f"must be an object with any of {', '.join(SKIP_FIELDS)}")
    policy = overrides.get("policy")
    if policy is not None:
        if not isinstance(policy, str):
            raise InvalidArgument("ffnskip.policy", f"must be a string, got {_type(policy)}")
        skip.policy = policy
    for name in ("threshold", "quorum"):
        value = overrides.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"ffnskip.{name}", f"must be a number, got {_type(value)}")
            setattr(skip, name, float(value))
    for name in ("max_skip", "warm_up"):
        number = _integer(overrides, name, f"ffnskip.{name}")
        if number is not None:
            if not -2 ** 31 <= number < 2 ** 31:
                raise InvalidArgument(f"ffnskip.{name}", f"out of range, got {number}")
            setattr(skip, name, number)
