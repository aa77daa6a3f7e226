"""The OpenAI-compatible HTTP API's response objects, without I/O: the gateway's summary
and tokens as chat or text completions, whole or as stream chunks, with log-probabilities
in OpenAI's two shapes (chat's `content` entries; legacy completions' parallel lists)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ffnskip.rpc.convert import policy_of
from ffnskip.v1 import generation_pb2
from services.gateway.openai_fields import CHAT
from services.gateway.openai_mapping import ParsedRequest

_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


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
        "policy": str(policy_of(summary) or ""), "profile_version": summary.profile_version,
        "served_by": summary.served_by, "seed": summary.seed, "resumes": summary.resumes,
        "skip_ratio": stats.skip_ratio, "decode_skip_ratio": stats.decode_skip_ratio,
        "ffn_blocks_total": stats.ffn_blocks_total, "ffn_blocks_skipped": stats.ffn_blocks_skipped,
        "per_layer_skips": list(stats.per_layer_skips), "generated_tokens": stats.generated_tokens,
        "ttft_ms": latency.ttft_ms, "total_ms": latency.total_ms, "tokens_per_s": latency.tokens_per_s,
        "queue_ms": latency.queue_ms,
    }


def whole_response(parsed: ParsedRequest, summary: generation_pb2.GenerateResponse, created: int) -> dict:
    """The non-streaming response object."""
    asked = parsed.request.sampling.logprobs
    if parsed.kind == CHAT:
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": summary.text},
                        "logprobs": chat_logprobs(summary.logprobs) if asked else None,
                        "finish_reason": finish_reason(summary)}
        obj = "chat.completion"
    else:
        prefix = _echoed_prompt(parsed, summary) if parsed.echo else ""
        entries = list(summary.prompt_logprobs) + list(summary.logprobs)
        choice = {"index": 0, "text": prefix + summary.text,
                  "logprobs": completion_logprobs(entries, 0) if asked else None,
                  "finish_reason": finish_reason(summary)}
        obj = "text_completion"
    return {"id": completion_id(parsed), "object": obj, "created": created, "model": parsed.request.model,
            "system_fingerprint": None, "choices": [choice], "usage": usage(summary),
            "ffnskip": skip_extension(summary)}


def chunk(parsed: ParsedRequest, created: int, text: str | None = None, role: bool = False,
          summary: generation_pb2.GenerateResponse | None = None, with_usage: bool = False,
          logprob: generation_pb2.TokenLogprob | None = None, text_offset: int = 0) -> dict:
    """One streamed chunk: a text piece (with its token's log-probability when asked for), the
    assistant role (a chat's first chunk), the finish (`summary`: finish_reason and our
    statistics), or, with `with_usage` alone, the usage chunk (no choices), as OpenAI sends them."""
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
        logprobs = chat_logprobs([logprob]) if logprob is not None else None
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
    else:
        logprobs = completion_logprobs([logprob], text_offset) if logprob is not None else None
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]
    if parsed.include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the usage chunk
    if summary is not None:
        out["ffnskip"] = skip_extension(summary)
    return out


def chat_logprobs(entries: Iterable[generation_pb2.TokenLogprob]) -> dict:
    """Chat's shape: one content entry per token, each with its top alternatives."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                                          for t in e.top]} for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[generation_pb2.TokenLogprob], text_offset: int) -> dict:
    """Legacy completions' shape: parallel lists of tokens, their log-probabilities (null for
    a first prompt token), their alternatives as {token: logprob} and their offsets in the text."""
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob if e.HasField("logprob") else None for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} if e.HasField("logprob") else None for e in entries],
            "text_offset": offsets}


def _echoed_prompt(parsed: ParsedRequest, summary: generation_pb2.GenerateResponse) -> str:
    """The prompt echoed before the answer: its text, or for a token-id prompt its tokens' texts
    (the decoder sends them with prompt log-probabilities)."""
    if parsed.echo_text:
        return parsed.echo_text
    return "".join(e.token for e in summary.prompt_logprobs)
