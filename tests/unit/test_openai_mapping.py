"""The HTTP API's request mapping and its one status table (the e2e suite,
tests/e2e/test_openai_api.py, drives both through the real `openai` client)."""

from __future__ import annotations

import json

import grpc
import pytest

from ffnskip.errors import InvalidArgument
from ffnskip.rpc.status import HTTP_STATUS, STATUS_TABLE
from ffnskip.v1 import common_pb2, generation_pb2
from services.gateway.openai_fields import CHAT, COMPLETION, REFUSED
from services.gateway.openai_mapping import client_error, parse
from services.gateway.openai_responses import chunk, whole_response
from tests.helpers.refused_fields import REFUSING


def test_every_status_has_one_http_status():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert {HTTP_STATUS[code] for code in STATUS_TABLE.values()} >= {400, 401, 403, 404, 429, 503, 504}


def test_a_chat_body_maps_field_by_field():
    parsed = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                                 {"type": "text", "text": "brief"}]},
                                               {"role": "user", "content": "hi"}],
                    "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "END",
                    "stream": True, "stream_options": {"include_usage": True}, "user": "ignored", "n": 1,
                    "ffnskip": {"policy": "adaptive", "threshold": 0.9, "max_skip": -1, "warm_up": 2, "quorum": 0.5}},
                   CHAT, 256)
    request = parsed.request
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]
    assert (request.sampling.max_new_tokens, request.sampling.seed, list(request.sampling.stop)) == (5, 7, ["END"])
    assert request.sampling.temperature == pytest.approx(0.5) and request.sampling.top_p == pytest.approx(0.9)
    assert (request.skip.policy, request.skip.max_skip, request.skip.warm_up) == ("adaptive", -1, 2)
    assert request.skip.policy_value == common_pb2.SKIP_POLICY_ADAPTIVE  # the encoding; the name for older decoders
    assert parsed.stream and parsed.include_usage and parsed.max_tokens_field == "max_completion_tokens"


def test_unset_fields_keep_the_server_defaults():
    request = parse({"model": "m", "prompt": ["once"]}, COMPLETION, 256).request
    assert request.prompt == "once" and request.sampling.max_new_tokens == 0  # the decoder's default
    assert not request.sampling.HasField("top_p") and not request.skip.HasField("threshold")


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "made_up_option": 1}, "made_up_option"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 257}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 17}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "min_tokens": -1}, "min_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": True}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", 3]}, "stop[1]"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "ffnskip": {"warm_up": 1.5}}, "ffnskip.warm_up"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "ffnskip": {"policy": 3}}, "ffnskip.policy"),
])
def test_bad_values_name_the_clients_field(body, field):
    with pytest.raises(InvalidArgument) as caught:
        parse(body, CHAT, 256)
    assert caught.value.field == field


def test_errors_of_the_shared_validation_are_renamed():
    parsed = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3}, CHAT, 9)
    assert client_error("sampling.max_new_tokens: must be <= 9", parsed) == ("max_completion_tokens",
                                                                             "max_completion_tokens: must be <= 9")
    assert client_error("skip.quorum: must be in [0.25, 1]", parsed)[0] == "ffnskip.quorum"
    assert client_error("sampling.stop[2]: at most 256 characters", parsed)[0] == "stop[2]"
    assert client_error("every decoder of model 'm' tried (2) is full; retry after 1 s", parsed)[0] is None


def test_responses_carry_usage_and_skip_statistics():
    parsed = parse({"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}},
                   COMPLETION, 9)
    parsed.request.request_id = "r1"
    summary = generation_pb2.GenerateResponse(text="abc", finish_reason="eos", prompt_tokens=4, served_by="d1",
                                              skip_stats=generation_pb2.SkipStats(generated_tokens=3, skip_ratio=0.25))
    whole = whole_response(parsed, summary, 0)
    assert whole["id"] == "cmpl-r1" and whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert whole["ffnskip"]["skip_ratio"] == 0.25 and whole["ffnskip"]["served_by"] == "d1"
    final = chunk(parsed, 0, summary=summary)
    assert final["choices"][0]["finish_reason"] == "stop" and final["usage"] is None and "ffnskip" in final
    assert chunk(parsed, 0, summary=summary, with_usage=True) == {
        "id": "cmpl-r1", "object": "text_completion", "created": 0, "model": "m", "system_fingerprint": None,
        "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}


@pytest.mark.parametrize("fields", [
    {"policy_value": common_pb2.SKIP_POLICY_STATIC},  # a decoder that sends the encoding alone
    {"policy": "static"},  # a decoder older than it: the deprecated name alone
    {"policy": "static", "policy_value": common_pb2.SKIP_POLICY_STATIC},  # today's decoders: both
])
def test_the_response_names_the_policy_from_either_field(fields):
    parsed = parse({"model": "m", "prompt": "p"}, COMPLETION, 9)
    summary = generation_pb2.GenerateResponse(text="abc", finish_reason="eos", **fields)
    assert whole_response(parsed, summary, 0)["ffnskip"]["policy"] == "static"


def test_every_refused_field_has_a_refusing_value_here():
    assert set(REFUSING) == set(REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("kind", [CHAT, COMPLETION])
def test_each_refused_field_is_refused_by_name(name, kind):
    body = {"model": "m", name: REFUSING[name]}
    body.update({"messages": [{"role": "user", "content": "x"}]} if kind == CHAT else {"prompt": "x"})
    with pytest.raises(InvalidArgument) as caught:
        parse(body, kind, 256)
    assert caught.value.field == name


def test_harmless_values_of_refusable_fields_pass():
    parse({"model": "m", "prompt": "x", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
           "logit_bias": {}, "suffix": "", "modalities": ["text"], "use_beam_search": False, "store": False,
           "service_tier": "auto", "parallel_tool_calls": False, "user": "u-1", "metadata": {"k": "v"}},
          COMPLETION, 256)


@pytest.mark.parametrize("body, field", [
    ({"model": "m\ud800", "prompt": "x"}, "model"),
    ({"model": "m", "prompt": "a\udfffb"}, "prompt"),
    ({"model": "m", "prompt": "x", "stop": ["ok", "\ud800"]}, "stop[1]"),
    ({"model": "m", "prompt": "x", "stop": "\ud800"}, "stop"),
    ({"model": "m", "prompt": [1, 2, -3]}, "prompt"),
    ({"model": "m", "prompt": [[1, 2], [3]]}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": True, "stream": True}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
])
def test_malformed_completion_input_names_its_field(body, field):
    body = json.loads(json.dumps(body))  # "\\ud800" on the wire, as a client escapes it
    with pytest.raises(InvalidArgument) as caught:
        parse(body, COMPLETION, 256)
    assert caught.value.field == field


def test_a_lone_surrogate_in_chat_content_is_refused():
    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}')
    with pytest.raises(InvalidArgument) as caught:
        parse(body, CHAT, 256)
    assert caught.value.field == "messages[0].content"


def test_token_id_prompts_echo_and_logprobs_map_to_the_request():
    parsed = parse({"model": "m", "prompt": [[5, 6, 7]], "echo": True, "logprobs": 2, "max_tokens": 1,
                    "ignore_eos": True, "min_tokens": 1, "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2,
                    "presence_penalty": 0.5, "frequency_penalty": -0.5}, COMPLETION, 256)
    request, sampling = parsed.request, parsed.request.sampling
    assert list(request.prompt_token_ids) == [5, 6, 7] and not request.prompt and parsed.echo
    assert (sampling.logprobs, sampling.top_logprobs, sampling.prompt_logprobs) == (True, 2, True)
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.top_k) == (True, 1, 4)
    assert sampling.min_p == pytest.approx(0.1) and sampling.repetition_penalty == pytest.approx(1.2)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert not sampling.HasField("seed")  # unset: the decoder draws a fresh one


def test_echoed_logprobs_have_openai_s_legacy_shape():
    parsed = parse({"model": "m", "prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 1}, COMPLETION, 9)
    pb = generation_pb2
    summary = pb.GenerateResponse(
        text="c", finish_reason="length", seed=42,
        prompt_logprobs=[pb.TokenLogprob(token_id=1, token="a"),
                         pb.TokenLogprob(token_id=2, token="b", logprob=-1.5, top=[pb.TopLogprob(token="x", logprob=-0.5)])],
        logprobs=[pb.TokenLogprob(token_id=3, token="c", logprob=-0.25, top=[pb.TopLogprob(token="c", logprob=-0.25)])])
    choice = whole_response(parsed, summary, 0)["choices"][0]
    assert choice["text"] == "abc"
    assert choice["logprobs"] == {"tokens": ["a", "b", "c"], "token_logprobs": [None, -1.5, -0.25],
                                  "top_logprobs": [None, {"x": -0.5}, {"c": -0.25}], "text_offset": [0, 1, 2]}
    assert whole_response(parsed, summary, 0)["ffnskip"]["seed"] == 42
    chat = parse({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1},
                 CHAT, 9)
    content = whole_response(chat, summary, 0)["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "c", "logprob": -0.25, "bytes": [99],
                        "top_logprobs": [{"token": "c", "logprob": -0.25, "bytes": [99]}]}]
