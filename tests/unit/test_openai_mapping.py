"""The HTTP API's request mapping and its one status table (the e2e suite,
tests/e2e/test_openai_api.py, drives both through the real `openai` client)."""

from __future__ import annotations

import grpc
import pytest

from ffnskip.errors import InvalidArgument
from ffnskip.rpc.status import HTTP_STATUS, STATUS_TABLE
from ffnskip.v1 import generation_pb2
from services.gateway.openai_mapping import CHAT, COMPLETION, chunk, client_error, parse, whole_response


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
    assert parsed.stream and parsed.include_usage and parsed.max_tokens_field == "max_completion_tokens"


def test_unset_fields_keep_the_server_defaults():
    request = parse({"model": "m", "prompt": ["once"]}, COMPLETION, 256).request
    assert request.prompt == "once" and request.sampling.max_new_tokens == 0  # the decoder's default
    assert not request.sampling.HasField("top_p") and not request.skip.HasField("threshold")


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
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
