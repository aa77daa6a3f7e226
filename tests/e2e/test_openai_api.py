"""The gateway's OpenAI-compatible HTTP API for real, through the official `openai` client:
a redis-server, a decoder process serving a tiny random Llama and gateway processes with
their HTTP listener, all on loopback. The same requests over the gRPC API are the reference.

The decoder has two batch rows and no queue, so two long streams fill it (the 429 test).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import urllib.error
import urllib.request

import openai
import pytest

from ffnskip.bench.load import run_load
from ffnskip.client import build_request
from ffnskip.stack.procs import free_port
from tests.helpers.fleet import API_KEY, LONG_PROMPT, MODEL, decoders_listed, wait_for
from tests.helpers.http_fleet import PROMPT, chat, decoder_idle

CANCELLED = 'ffnskip:request_success_total{finished_reason="cancelled",model_name="tiny"}'
GENERATED = 'ffnskip:generation_tokens_total{model_name="tiny"}'
AFTER_CANCEL = "ffnskip:request_tokens_after_cancel"  # a histogram: tokens generated once the cancel arrived


def test_streamed_chat_equals_the_grpc_answer(http):
    """The done-when: same request and seed, same text; usage and our skip statistics at the end."""
    overrides = {"policy": "adaptive", "threshold": 0.5, "max_skip": 2, "warm_up": 1}
    with http.fleet.client() as client:
        reference = client.generate(build_request(MODEL, chat=PROMPT, max_new_tokens=24, temperature=0.8, top_p=0.9,
                                                  seed=1234, **overrides))
    chunks = list(http.openai().chat.completions.create(
        model=MODEL, messages=chat(), max_tokens=24, temperature=0.8, top_p=0.9, seed=1234, stream=True,
        stream_options={"include_usage": True}, extra_body={"ffnskip": overrides}))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text and text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == {"eos": "stop"}.get(reference.finish_reason,
                                                                                        reference.finish_reason)
    stats = finish[0].model_extra["ffnskip"]
    assert stats["skip_ratio"] == pytest.approx(reference.skip_stats.skip_ratio)
    assert stats["per_layer_skips"] == list(reference.skip_stats.per_layer_skips)
    assert stats["policy"] == reference.policy == "adaptive" and stats["served_by"] == "d1"
    usage = chunks[-1].usage  # the last chunk: usage, no choices
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == reference.prompt_tokens > 0
    assert usage.completion_tokens == reference.skip_stats.generated_tokens == len(reference.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_whole_chat_and_completions_equal_the_grpc_answers(http):
    with http.fleet.client() as client:
        chat_ref = client.generate(build_request(MODEL, chat=PROMPT, max_new_tokens=12, stop=["zzz"]))
        prompt_ref = client.generate(build_request(MODEL, prompt="Once upon a time", max_new_tokens=12, seed=5,
                                                   temperature=1.0))
    api = http.openai()
    whole = api.chat.completions.create(model=MODEL, messages=chat(), max_completion_tokens=12, stop="zzz",
                                        extra_headers={"x-request-id": "my-trace-1"})
    assert whole.choices[0].message.content == chat_ref.text
    assert whole.id == "chatcmpl-my-trace-1" and whole.object == "chat.completion"
    assert whole.usage.prompt_tokens == chat_ref.prompt_tokens
    assert whole.usage.completion_tokens == chat_ref.skip_stats.generated_tokens
    assert whole.model_extra["ffnskip"]["ffn_blocks_total"] == chat_ref.skip_stats.ffn_blocks_total

    completion = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=5, temperature=1.0)
    assert completion.choices[0].text == prompt_ref.text and completion.object == "text_completion"
    assert completion.usage.prompt_tokens == prompt_ref.prompt_tokens
    streamed = list(api.completions.create(model=MODEL, prompt=["Once upon a time"], max_tokens=12, seed=5,
                                           temperature=1.0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt_ref.text
    assert streamed[-1].model_extra["ffnskip"]["generated_tokens"] == prompt_ref.skip_stats.generated_tokens
    assert all(c.usage is None for c in streamed)  # no include_usage: no usage chunk


def test_models_and_health(http):
    assert [m.id for m in http.openai().models.list()] == [MODEL]
    with urllib.request.urlopen(f"http://127.0.0.1:{http.http_port}/health", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=2), "n"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(seed=-1), "seed"),
    (dict(messages=chat("   ")), "messages[0].content"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    (dict(stop=["s" * 1000]), "stop[0]"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
    (dict(stream_options={"include_usage": "yes"}, stream=True), "stream_options.include_usage"),
    (dict(extra_body={"ffnskip": {"threshold": 1.5}}), "ffnskip.threshold"),
    (dict(extra_body={"ffnskip": {"policy": "sometimes"}}), "ffnskip.policy"),
    (dict(extra_body={"ffnskip": {"warm_up": -1}}), "ffnskip.warm_up"),
    (dict(extra_body={"ffnskip": {"max_skip": 100}}), "ffnskip.max_skip"),  # the decoder's limit (64), renamed
    (dict(extra_headers={"x-ffnskip-timeout": "soon"}), "x-ffnskip-timeout"),
    (dict(model="m" * 10_000), "model"),
])
def test_bad_input_is_400_naming_the_field(http, kwargs, param):
    request = {"model": MODEL, "messages": chat(), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        http.openai().chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert error.body["message"].startswith(f"{param}: ") and len(error.body["message"]) < 300, error.body


@pytest.mark.parametrize("prompt, param", [("  ", "prompt"), (["one", "two"], "prompt"), ([1, 2, 10**6], "prompt")])
def test_bad_completion_prompt(http, prompt, param):
    with pytest.raises(openai.BadRequestError) as caught:
        http.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert caught.value.param == param and caught.value.body["message"].startswith("prompt: ")


@pytest.mark.parametrize("body", [b"{not json", b"[" * 100_000, b'"a string"'])
def test_a_body_that_is_no_json_object_is_400(http, body):
    request = urllib.request.Request(f"http://127.0.0.1:{http.http_port}/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=10)
    error = json.loads(raw.value.read())["error"]
    assert raw.value.code == 400 and error["param"] == "body" and error["type"] == "invalid_request_error", error


def test_unknown_model_is_404(http):
    with pytest.raises(openai.NotFoundError) as caught:
        http.openai().chat.completions.create(model="no-such-model", messages=chat(), max_tokens=4)
    assert caught.value.status_code == 404 and caught.value.param == "model" and caught.value.code == "model_not_found"
    assert "no-such-model" in caught.value.body["message"]


def test_missing_or_unknown_key_is_401(http):
    with pytest.raises(openai.AuthenticationError) as caught:
        http.openai(key="wrong-key").chat.completions.create(model=MODEL, messages=chat(), max_tokens=4)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert caught.value.body["message"] == "unknown API key"
    unauthenticated = urllib.request.Request(f"http://127.0.0.1:{http.http_port}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(unauthenticated, timeout=10)
    assert raw.value.code == 401 and "missing API key" in json.loads(raw.value.read())["error"]["message"]
    assert API_KEY not in http.fleet.gateways["gw-a"].log_tail(1_000_000)  # keys are never logged


def test_a_body_over_the_limit_is_413(http):
    with pytest.raises(openai.APIStatusError) as caught:
        http.openai().chat.completions.create(model=MODEL, messages=chat("x" * 5_000_000), max_tokens=4)
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"


def test_deadline_is_504_or_an_error_event(http):
    api = http.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model=MODEL, messages=chat(LONG_PROMPT), max_tokens=200,
                                    extra_headers={"x-ffnskip-timeout": "0.05"})
    assert caught.value.status_code == 504 and caught.value.code == "deadline_exceeded"
    with pytest.raises(openai.APIError) as streamed:  # after the first token: an error event ends the stream
        for _ in api.chat.completions.create(model=MODEL, messages=chat(LONG_PROMPT), max_tokens=200, stream=True,
                                             extra_headers={"x-ffnskip-timeout": "0.3"}):
            pass
    assert streamed.value.code == "deadline_exceeded"


def test_full_decoders_are_429_with_retry_after(http):
    wait_for(lambda: decoder_idle(http), 30, "the decoder's rows to be free")
    with http.fleet.client() as client:
        calls = []
        try:
            for _ in range(2):  # both batch rows, and the decoder has no queue
                req = build_request(MODEL, chat=LONG_PROMPT, max_new_tokens=200)
                req.sampling.ignore_eos = True
                call = client.stream(req, timeout_s=120)
                next(call)  # running
                calls.append(call)
            with pytest.raises(openai.RateLimitError) as caught:
                http.openai().chat.completions.create(model=MODEL, messages=chat(), max_tokens=4)
        finally:
            for call in calls:
                call.cancel()
    assert caught.value.status_code == 429 and caught.value.code == "resource_exhausted"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_no_decoder_known_is_503(http):
    fleet = http.fleet
    port = free_port()
    empty = fleet.gateway("gw-empty", FFNSKIP_REDIS_URL=http.redis_url.rsplit("/", 1)[0] + "/1",
                          FFNSKIP_HTTP_HOST="127.0.0.1", FFNSKIP_HTTP_PORT=str(port))
    try:
        empty.wait_serving(60.0)
        with pytest.raises(openai.APIStatusError) as caught:
            http.openai(port=port).chat.completions.create(model=MODEL, messages=chat(), max_tokens=4)
        assert caught.value.status_code == 503 and caught.value.code == "unavailable"
        assert "none registered" in caught.value.body["message"]
    finally:
        empty.signal()
        assert empty.wait(timeout_s=30) == 0  # HTTP and gRPC drain and exit cleanly


def test_a_disconnected_client_stops_its_decode(http):
    """The decoder is frozen while the client goes away, so the decode cannot race to its
    end: after the thaw its sequence ends as cancelled, short of max_tokens, having generated
    at most one token (the step in progress) after the cancel reached it."""
    decoder = http.fleet.decoders["d1"]
    wait_for(lambda: decoder_idle(http), 30, "the decoder's rows to be free")
    before = http.decoder_metrics()
    running = 'ffnskip:num_requests_running{decoder="d1",model_name="tiny"}'
    stream = http.openai().chat.completions.create(model=MODEL, messages=chat(LONG_PROMPT), max_tokens=200,
                                                   stream=True, extra_body={"ffnskip": {"policy": "dense"}})
    received = 0
    for event in stream:
        received += bool(event.choices and event.choices[0].delta.content)
        if received >= 2:
            break
    decoder.signal(signal.SIGSTOP)
    try:
        stream.close()  # the client goes away mid-decode
        wait_for(lambda: http.gateway_metrics().get(running) == 0.0, 30, "the gateway to cancel its upstream call")
    finally:
        decoder.signal(signal.SIGCONT)
    after = wait_for(lambda: (m := http.decoder_metrics()).get(CANCELLED, 0.0) == before.get(CANCELLED, 0.0) + 1 and m,
                     30, "the decoder to end the sequence as cancelled")
    generated = after[GENERATED] - before.get(GENERATED, 0.0)
    assert received <= generated < 200
    labels = '{model_name="tiny"}'
    count = after[f"{AFTER_CANCEL}_count{labels}"] - before.get(f"{AFTER_CANCEL}_count{labels}", 0.0)
    within_one_step = after[f'{AFTER_CANCEL}_bucket{{le="1.0",model_name="tiny"}}'] - before.get(
        f'{AFTER_CANCEL}_bucket{{le="1.0",model_name="tiny"}}', 0.0)
    assert count == 1 and within_one_step == 1, (count, within_one_step)
    assert decoder_idle(http)
    with http.fleet.client() as client:  # back in rotation for whatever runs next
        wait_for(lambda: "d1" in decoders_listed(client), 30, "d1 to heartbeat again")


def test_a_disconnect_before_the_answer_stops_its_decode(http):
    """A non-streaming call: the client goes away while its decode runs (the decoder frozen
    meanwhile, as above); the gateway cancels the handler and with it the upstream call."""
    decoder = http.fleet.decoders["d1"]
    wait_for(lambda: decoder_idle(http), 30, "the decoder's rows to be free")
    before = http.decoder_metrics()
    body = json.dumps({"model": MODEL, "messages": chat(LONG_PROMPT), "max_tokens": 200}).encode()
    client = socket.create_connection(("127.0.0.1", http.http_port), timeout=30)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                   b"\r\n\r\n" + body)
    wait_for(lambda: not decoder_idle(http), 30, "the decode to run")
    decoder.signal(signal.SIGSTOP)
    try:
        client.close()  # the client goes away before its answer
        running = 'ffnskip:num_requests_running{decoder="d1",model_name="tiny"}'
        wait_for(lambda: http.gateway_metrics().get(running) == 0.0, 30, "the gateway to cancel its upstream call")
    finally:
        decoder.signal(signal.SIGCONT)
    after = wait_for(lambda: (m := http.decoder_metrics()).get(CANCELLED, 0.0) == before.get(CANCELLED, 0.0) + 1 and m,
                     30, "the decoder to end the sequence as cancelled")
    assert after[GENERATED] - before.get(GENERATED, 0.0) < 200
    labels = '{model_name="tiny"}'
    assert after[f'{AFTER_CANCEL}_bucket{{le="1.0",model_name="tiny"}}'] - before.get(
        f'{AFTER_CANCEL}_bucket{{le="1.0",model_name="tiny"}}', 0.0) == 1 == after[f"{AFTER_CANCEL}_count{labels}"] - \
        before.get(f"{AFTER_CANCEL}_count{labels}", 0.0)
    with http.fleet.client() as grpc_client:
        wait_for(lambda: "d1" in decoders_listed(grpc_client), 30, "d1 to heartbeat again")


def test_load_over_http(http):
    report = asyncio.run(run_load(f"127.0.0.1:{http.http_port}", MODEL, api_key=API_KEY, count=8, concurrency=2,
                                  duration_s=120, max_new_tokens=4, http=True))
    assert report.errors == {} and report.ok == report.requests == 8
    assert report.served_by == {"d1": 8} and report.tokens > 0 and set(report.ttft_s) == {"p50", "p95", "p99"}


def test_no_prompt_or_key_in_the_gateway_log(http):
    """Runs last: everything above went through this gateway."""
    log = http.fleet.gateways["gw-a"].log_tail(10_000_000)
    assert '"path": "/v1/chat/completions"' in log or "/v1/chat/completions" in log  # the access lines are there
    for secret in (PROMPT, LONG_PROMPT, "Once upon a time", API_KEY):
        assert secret not in log, secret
    assert '"status": 499' in log  # the disconnected client, logged as such
    assert "Error handling request" not in log and "Traceback" not in log  # a disconnect is no server error
