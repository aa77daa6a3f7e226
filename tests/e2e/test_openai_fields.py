"""The HTTP API's request fields for real (docs/api.md): fresh and replayed seeds, ignore_eos as
load tools send it, every refused field, malformed bodies, the body limit, and log-probabilities
with echo and token-id prompts as lm-evaluation-harness asks for them; over the `http` fleet
(tests/e2e/conftest.py), with the gRPC API as the reference."""

from __future__ import annotations

import json

import pytest

from ffnskip.client import build_request
from services.gateway.openai_fields import REFUSED
from tests.helpers.fleet import API_KEY, MODEL
from tests.helpers.http_fleet import PROMPT, chat, post
from tests.helpers.refused_fields import REFUSING


def test_the_body_limit_is_sized_to_the_largest_valid_request(http):
    """Under the 4 MiB message limit, a body larger than any valid request can be is refused
    unread; the longest prompt with every character escaped still gets through to validation."""
    status, body = post(http, "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * 2_000_000 + b'"}')
    assert status == 413 and body["error"]["param"] == "body", body
    escaped = json.dumps({"model": MODEL, "prompt": "\u00e9" * 200_000}).encode()  # 6 bytes a character
    status, body = post(http, "/v1/completions", escaped)
    assert status == 400 and body["error"]["param"] == "prompt", body  # too many tokens for the tiny model


def test_unseeded_sampled_answers_differ_and_a_seed_replays_one(http):
    client = http.openai()
    request = dict(model=MODEL, messages=chat(), max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    first, second = (client.chat.completions.create(**request) for _ in range(2))
    assert first.choices[0].message.content != second.choices[0].message.content
    seed = first.model_extra["ffnskip"]["seed"]
    assert seed != second.model_extra["ffnskip"]["seed"]
    replay = client.chat.completions.create(**request, seed=seed)
    assert replay.choices[0].message.content == first.choices[0].message.content
    grpc_reply = http.fleet.client().generate(build_request(MODEL, chat=PROMPT, max_new_tokens=16, temperature=1.0,
                                                            seed=seed))
    assert grpc_reply.seed == seed


def test_ignore_eos_gives_exactly_max_tokens(http):
    """As load tools send it (guidellm, `vllm bench serve`): ignore_eos with stop null."""
    for path, prompt in (("/v1/completions", {"prompt": "Once upon a time"}), ("/v1/chat/completions", {"messages": chat()})):
        status, body = post(http, path, {"model": MODEL, **prompt, "max_tokens": 24, "ignore_eos": True, "stop": None,
                                          "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 24, body


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_refused_field_is_400_naming_it(http, name):
    status, body = post(http, "/v1/chat/completions", {"model": MODEL, "messages": chat(), name: REFUSING[name]})
    assert status == 400 and body["error"]["param"] == name, body


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"1" * 5000 + b"}", "body"),
    (b'{"model": "tiny", "prompt": "x \\ud800"}', "prompt"),
    (b'{"model": "tiny\\udc00", "prompt": "x"}', "model"),
    (b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
    (b'{"model": "tiny", "prompt": "x", "frobnicate": true}', "frobnicate"),
])
def test_malformed_bodies_are_400_without_a_server_error(http, raw, param):
    status, body = post(http, "/v1/completions", raw)
    assert status == 400 and body["error"]["param"] == param, body
    log = http.fleet.gateways["gw-a"].log_tail(200_000)
    assert '"level": "error"' not in log and "Traceback" not in log


def test_echo_and_logprobs_score_a_token_id_prompt(http):
    """What lm-evaluation-harness asks for its log-likelihood tasks, against the decoder's own
    prompt log-probabilities over gRPC."""
    ids = [40, 71, 72, 73, 84, 85]
    status, body = post(http, "/v1/completions", {"model": MODEL, "prompt": [ids], "echo": True, "logprobs": 1,
                                                   "max_tokens": 1, "temperature": 0})
    assert status == 200, body
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in logprobs["token_logprobs"][1:])
    assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    request = build_request(MODEL, max_new_tokens=1)
    request.prompt_token_ids.extend(ids)
    request.sampling.prompt_logprobs = True
    reply = http.fleet.client().generate(request)
    assert [e.logprob for e in reply.prompt_logprobs[1:]] == pytest.approx(logprobs["token_logprobs"][1:len(ids)])
    assert body["choices"][0]["text"].startswith("".join(logprobs["tokens"][:len(ids)]))


def test_chat_logprobs_follow_the_streamed_tokens(http):
    stream = http.openai().chat.completions.create(model=MODEL, messages=chat(), max_tokens=8, logprobs=True,
                                                   top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    entries = [entry for part in stream if part.choices and part.choices[0].logprobs
               for entry in part.choices[0].logprobs.content]
    assert len(entries) == 8 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)  # greedy: the top token


def test_no_prompt_or_key_in_the_gateway_log(http):
    """Runs last: everything above went through this module's gateway."""
    log = http.fleet.gateways["gw-a"].log_tail(10_000_000)
    assert "/v1/completions" in log  # the access lines are there
    for secret in (PROMPT, "Once upon a time", API_KEY):
        assert secret not in log, secret
