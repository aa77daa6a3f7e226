"""Every request field the OpenAI-compatible HTTP API knows, and what it does with it.

A field is honoured (it changes the answer as the client expects, or is an identifier or
setting with nothing to change), or refused with 400 naming it whenever its value asks
for something this server does not do. A field in neither table is refused as unknown: a
benchmark or eval tool whose option this server would silently drop would measure
something else than it reports. docs/api.md tables the same (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHAT = "chat"
COMPLETION = "completion"
BOTH = (CHAT, COMPLETION)

# name -> (the endpoints that take it, what it does)
HONOURED: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (BOTH, "the model to serve the request"),
    "messages": ((CHAT,), "chat turns; string content or text parts; role developer = system"),
    "prompt": ((COMPLETION,), "a string, a list of one string, token ids, or a list of one list of token ids"),
    "max_tokens": (BOTH, "tokens to generate at most (unset: the decoder's default)"),
    "max_completion_tokens": ((CHAT,), "the same as max_tokens"),
    "temperature": (BOTH, "softmax temperature; 0 = greedy"),
    "top_p": (BOTH, "nucleus sampling mass"),
    "top_k": (BOTH, "keep the k most likely tokens (vLLM, llama-server)"),
    "min_p": (BOTH, "drop tokens below min_p x the top token's probability (vLLM, llama-server)"),
    "seed": (BOTH, "the sampling seed; unset = a fresh one per request, returned as ffnskip.seed"),
    "stop": (BOTH, "a string or up to 16 strings that end the answer (not included)"),
    "stream": (BOTH, "server-sent events"),
    "stream_options": (BOTH, "include_usage: a last chunk with the usage"),
    "n": (BOTH, "1 only"),
    "best_of": ((COMPLETION,), "1 only"),
    "user": (BOTH, "the caller's end-user id; accepted, neither logged nor stored"),
    "ignore_eos": (BOTH, "generate exactly max_tokens tokens (vLLM; benchmark tools)"),
    "min_tokens": (BOTH, "end-of-sequence and stop strings are ignored until this many tokens (vLLM)"),
    "presence_penalty": (BOTH, "OpenAI's presence penalty, [-2, 2]"),
    "frequency_penalty": (BOTH, "OpenAI's frequency penalty, [-2, 2]"),
    "repetition_penalty": (BOTH, "the CTRL repetition penalty over prompt and answer, (0, 10] (vLLM)"),
    "logprobs": (BOTH, "chat: true for each token's log-probability; completions: an integer, alternatives per token"),
    "top_logprobs": ((CHAT,), "alternatives per token, [0, 20], with logprobs"),
    "echo": ((COMPLETION,), "the prompt before the answer, with its log-probabilities when logprobs is set"),
    "ffnskip": (BOTH, "our skip overrides: policy, threshold, max_skip, warm_up, quorum"),
    "parallel_tool_calls": (BOTH, "accepted: there are no tools to call"),
    "cache_prompt": (BOTH, "llama-server's prompt cache switch; accepted, no effect on the answer"),
    "skip_special_tokens": (BOTH, "true only (special tokens never appear in the text)"),
    "spaces_between_special_tokens": (BOTH, "true only"),
    "metadata": (BOTH, "accepted; nothing is stored"),
    "service_tier": (BOTH, "auto or default only"),
    "store": (BOTH, "false only: nothing is stored"),
}


def _unless(*allowed: Any) -> Callable[[Any], bool]:
    """A value is refused unless it is one of `allowed` (None, JSON null, is always allowed)."""
    return lambda value: value is not None and value not in allowed


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


# name -> (refused when, why); checked before anything else is read
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not _empty(v), "tool calls are not served"),
    "tool_choice": (_unless("none", "auto"), "tool calls are not served"),
    "functions": (lambda v: not _empty(v), "function calls are not served"),
    "function_call": (_unless("none", "auto"), "function calls are not served"),
    "response_format": (lambda v: v is not None and v != {"type": "text"}, "only the text response format is served"),
    "logit_bias": (lambda v: not _empty(v), "logit_bias is not served"),
    "suffix": (lambda v: not _empty(v), "suffix (insertion) is not served"),
    "audio": (lambda v: v is not None, "audio output is not served"),
    "modalities": (_unless(["text"]), "only text output is served"),
    "prediction": (lambda v: v is not None, "predicted outputs are not served"),
    "reasoning_effort": (lambda v: v is not None, "this model does not reason"),
    "web_search_options": (lambda v: v is not None, "web search is not served"),
    "guided_json": (lambda v: v is not None, "guided decoding is not served"),
    "guided_regex": (lambda v: v is not None, "guided decoding is not served"),
    "guided_choice": (lambda v: v is not None, "guided decoding is not served"),
    "guided_grammar": (lambda v: v is not None, "guided decoding is not served"),
    "structured_outputs": (lambda v: v is not None, "guided decoding is not served"),
    "grammar": (lambda v: not _empty(v), "grammars are not served"),
    "json_schema": (lambda v: not _empty(v), "JSON schemas are not served"),
    "use_beam_search": (_unless(False), "beam search is not served"),
    "length_penalty": (_unless(1, 1.0), "beam search is not served"),
    "stop_token_ids": (lambda v: not _empty(v), "stop_token_ids is not served; use stop strings"),
    "include_stop_str_in_output": (_unless(False), "stop strings are never included"),
    "truncate_prompt_tokens": (lambda v: v is not None, "prompts are never truncated"),
    "prompt_logprobs": (lambda v: v is not None, "use echo with logprobs on /v1/completions"),
    "return_tokens_as_token_ids": (_unless(False), "tokens are returned as text"),
    "typical_p": (_unless(1, 1.0), "typical sampling is not served"),
    "tfs_z": (_unless(1, 1.0), "tail-free sampling is not served"),
    "mirostat": (_unless(0), "mirostat sampling is not served"),
    "n_probs": (_unless(0), "use logprobs"),
}


def refusal(body: dict, kind: str) -> tuple[str, str] | None:
    """(field, why) of the first field this server refuses in a request body, else None."""
    for name, value in body.items():
        rule = REFUSED.get(name)
        if rule is not None:
            if rule[0](value):
                return name, f"{rule[1]} (see docs/api.md)"
            continue
        endpoints = HONOURED.get(name, ((), ""))[0]
        if kind not in endpoints:
            where = "this endpoint" if endpoints else "this server"
            return name, f"unknown to {where}; refused rather than ignored (see docs/api.md)"
    return None
