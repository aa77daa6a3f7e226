"""Faults the way users cause them, on real processes over loopback: concurrent callers
sharing a request id, a frozen (SIGSTOPped) decoder under load, a Redis outage longer
than the gateway's staleness window, a gateway that knows no decoder yet; and, after
all of it, no prompt or generated text in any log (the services log at debug level).

The tests of this module share one fleet and run in order: the outage comes last.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import pytest

from ffnskip.client import GatewayClient, served_by
from tests.helpers.fleet import API_KEY, Fleet, decoders_listed, request, two_decoder_fleet, wait_for
from tests.redis_server import running_redis

STALL_S = 3.0  # the gateway's first-token and stall timeouts in this module
STALE_S = 2.0  # how long the gateway routes on its last snapshot while Redis is down
MARK = "fault-suite-prompt"  # in every prompt: grep-able in the logs
SENT_PROMPTS: list[str] = []
GENERATED_TEXTS: list[str] = []


def long_request(n: int, **kwargs):
    """150 tokens, EOS ignored: a stream that is surely still running when a fault hits it."""
    req = request(150, prompt(n), **kwargs)
    req.sampling.ignore_eos = True
    return req


def prompt(n: int) -> str:
    text = f"{MARK} sheep {n}"
    SENT_PROMPTS.append(text)
    return text


@pytest.fixture(scope="module")
def fault_fleet(tmp_path_factory):
    debug = {"FFNSKIP_LOG_LEVEL": "debug"}
    timeouts = {"FFNSKIP_FIRST_TOKEN_TIMEOUT_S": str(STALL_S), "FFNSKIP_STALL_TIMEOUT_S": str(STALL_S),
                "FFNSKIP_DISCOVERY_STALE_S": str(STALE_S), "FFNSKIP_QUARANTINE_S": "30"}
    with two_decoder_fleet(tmp_path_factory.mktemp("faults"), debug, {**timeouts, **debug}) as (fleet, redis_server):
        fleet.redis_server = redis_server  # type: ignore[attr-defined]
        yield fleet


def stream_outcome(client: GatewayClient, req, timeout_s: float = 60.0,
                   on_token: Callable[[dict], None] = lambda outcome: None) -> dict:
    """One streamed call: its tokens, text, pod, status, and the longest silence it saw
    (`on_token(outcome)` after each token)."""
    outcome = {"tokens": [], "text": "", "pod": "", "code": grpc.StatusCode.OK, "details": "", "summary": None,
               "longest_wait_s": 0.0}
    last = time.monotonic()
    call = client.stream(req, timeout_s=timeout_s)
    try:
        for message in call:
            now = time.monotonic()
            outcome["longest_wait_s"] = max(outcome["longest_wait_s"], now - last)
            last = now
            if message.HasField("token"):
                outcome["tokens"].append(message.token.token_id)
                outcome["text"] += message.token.text
                outcome["pod"] = outcome["pod"] or served_by(call)
                on_token(outcome)
            else:
                outcome["summary"] = message.summary
    except grpc.RpcError as err:
        outcome["code"], outcome["details"] = err.code(), err.details()
    outcome["longest_wait_s"] = max(outcome["longest_wait_s"], time.monotonic() - last)
    if outcome["summary"] is not None:
        GENERATED_TEXTS.append(outcome["summary"].text)
    return outcome


def test_callers_sharing_a_request_id_each_get_their_own_answer(fault_fleet):
    prompts = [prompt(n) for n in range(8)]
    with fault_fleet.client() as client:
        alone = {p: client.generate(request(24, p)).token_ids for p in prompts}  # one at a time, fresh ids
        assert len({tuple(t) for t in alone.values()}) == len(prompts)  # the answers tell the callers apart
        with ThreadPoolExecutor(len(prompts)) as pool:
            outcomes = list(pool.map(lambda p: stream_outcome(client, request(24, p, request_id="shared-id")), prompts))
    for p, outcome in zip(prompts, outcomes):
        assert outcome["code"] == grpc.StatusCode.OK, outcome["details"]
        assert outcome["tokens"] == alone[p] == list(outcome["summary"].token_ids)
        assert outcome["summary"].text == outcome["text"]
        assert outcome["summary"].request_id == "shared-id"  # the label comes back as sent


def test_a_cancel_stops_only_the_callers_own_request(fault_fleet):
    with fault_fleet.client() as client:
        expected = [client.generate(long_request(n)).token_ids for n in (101, 102)]
        # one running call with the label on each pod, so the victim shares a pod with one of them
        calls = [client.stream(long_request(n, request_id="twin")) for n in (101, 102)]
        messages = [[next(call)] for call in calls]
        assert {served_by(call) for call in calls} == {"d1", "d2"}
        victim = client.stream(long_request(100, request_id="twin"))
        next(victim)  # all three are running
        victim.cancel()
        for call, received in zip(calls, messages):
            received += list(call)
    for received, tokens in zip(messages, expected):
        assert [m.token.token_id for m in received if m.HasField("token")] == tokens
        assert received[-1].summary.finish_reason == "length"


def test_a_frozen_decoder_delays_no_call_beyond_the_stall_timeout(fault_fleet):
    frozen = fault_fleet.decoders["d2"]
    outcomes: list[dict] = []
    d2_streaming = threading.Event()

    def d2_tokens(outcome: dict) -> None:
        if outcome["pod"] == "d2" and len(outcome["tokens"]) >= 2:
            d2_streaming.set()

    def one(n: int) -> None:
        with fault_fleet.client() as client:
            outcomes.append(stream_outcome(client, long_request(200 + n), on_token=d2_tokens))

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(12)]
    for thread in threads:
        thread.start()
    assert d2_streaming.wait(30), "d2 never streamed"
    frozen.signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a call hangs behind the frozen decoder"
        for outcome in outcomes:
            assert outcome["longest_wait_s"] < STALL_S + 2.0, outcome  # bounded by the stall timeout, plus margin
            if outcome["code"] == grpc.StatusCode.OK:
                assert outcome["summary"].skip_stats.generated_tokens == len(outcome["tokens"])
            else:  # only a call that had tokens from the frozen pod, with an explicit status
                assert (outcome["code"], outcome["pod"]) == (grpc.StatusCode.UNAVAILABLE, "d2"), outcome
                assert "incomplete" in outcome["details"]
        assert any(o["code"] != grpc.StatusCode.OK for o in outcomes)  # the freeze did hit streams
        with fault_fleet.client() as client:
            for n in range(4):  # new calls: served by the healthy pod, none waits on the frozen one
                started = time.monotonic()
                outcome = stream_outcome(client, request(8, prompt(300 + n)))
                assert outcome["code"] == grpc.StatusCode.OK, outcome["details"]
                assert outcome["summary"].served_by == "d1" and time.monotonic() - started < STALL_S + 2.0
        assert time.monotonic() - frozen_at < 60
    finally:
        frozen.signal(signal.SIGCONT)
    with fault_fleet.client() as client:  # thawed, it heart-beats again and rejoins
        wait_for(lambda: "d2" in decoders_listed(client), 15, "d2 to rejoin after SIGCONT")


def test_a_redis_outage_longer_than_the_staleness_window_is_unavailable_never_not_found(fault_fleet):
    redis_server = fault_fleet.redis_server
    codes: list[grpc.StatusCode] = []

    def attempt(client: GatewayClient) -> grpc.StatusCode:
        try:
            client.generate(request(4, prompt(400 + len(codes))), timeout_s=STALL_S + 5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        codes.append(code)
        return code

    with fault_fleet.client() as client:
        assert attempt(client) == grpc.StatusCode.OK
        redis_server.kill()
        outage_started = time.monotonic()
        # the decoders keep serving; the gateway routes on its last snapshot, then says it cannot know
        wait_for(lambda: attempt(client) == grpc.StatusCode.UNAVAILABLE, STALE_S + 20, "UNAVAILABLE once the snapshot is stale")
        assert time.monotonic() - outage_started >= STALE_S * 0.9  # not before the staleness window ran out
        for _ in range(3):
            assert attempt(client) == grpc.StatusCode.UNAVAILABLE
        redis_server.start()  # same port, empty: the decoders register again with their next heartbeat
        back = time.monotonic()
        wait_for(lambda: attempt(client) == grpc.StatusCode.OK, 10, "service within 10 s of Redis' return")
        recovered_s = time.monotonic() - back
    assert grpc.StatusCode.NOT_FOUND not in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert recovered_s < 10


def test_a_gateway_that_knows_no_decoder_answers_unavailable(fault_fleet):
    with running_redis() as empty_redis:
        lonely = Fleet(fault_fleet.tmp / "lonely", empty_redis.url, fault_fleet.model_dir)
        gateway = lonely.gateway("gw-lonely")
        try:
            gateway.wait_serving(60)
            with GatewayClient(gateway.address, api_key=API_KEY, timeout_s=10) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.generate(request(4, prompt(500)))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in err.value.details()
        finally:
            lonely.stop()


def test_no_prompt_or_generated_text_in_any_log(fault_fleet):
    """Runs last: every log of the module's processes, after the load and the faults."""
    logs = sorted(Path(fault_fleet.tmp).rglob("*.log"))
    assert {p.stem for p in logs} >= {"d1", "d2", "gw-a"}
    texts = [t for t in GENERATED_TEXTS if len(t.strip()) >= 16]  # long enough not to occur by chance
    assert SENT_PROMPTS and texts
    for path in logs:
        content = path.read_text(errors="replace")
        assert MARK not in content, f"a prompt is in {path.name}"
        leaked = [t for t in texts if t in content]
        assert not leaked, f"generated text in {path.name}: {leaked[0][:40]!r}"
