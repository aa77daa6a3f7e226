"""The gateway for real: a redis-server, decoder processes serving a tiny random Llama,
gateway processes, all on loopback over gRPC sockets. Processes are shared by the
module (started once, in parallel); readiness is awaited on gRPC health with deadlines.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from ffnskip import cli
from ffnskip.bench.load import run_load
from ffnskip.client import served_by
from services.gateway.endpoints import Endpoint
from services.gateway.proxy import conversation_affinity
from services.gateway.routing import pick
from tests.helpers.fleet import API_KEY, LONG_PROMPT, MODEL, OPS_KEY, decoders_listed, request, two_decoder_fleet, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with two_decoder_fleet(tmp_path_factory.mktemp("gateway")) as (fleet, _):
        yield fleet


def test_two_decoders_share_the_load(fleet):
    with fleet.client() as client, ThreadPoolExecutor(8) as pool:
        # ready gateway = one decoder discovered: the burst must see both (a loaded machine registers d1 late)
        wait_for(lambda: set(decoders_listed(client)) == {"d1", "d2"}, 30, "the gateway to discover both decoders")
        replies = list(pool.map(lambda _: client.generate(request()), range(8)))
        # the burst's load reaches the gateway with the decoders' heartbeats: idle means reported idle
        wait_for(lambda: [d.load for d in decoders_listed(client).values()] == [0.0, 0.0], 30,
                 "both decoders to report no load after the burst")
        # conversations, one request after another: each returns to its pod (conversation affinity),
        # and two whose keys hash to different pods use both (an idle fleet is not one pod plus a spare)
        homes = {prompt: home_of(prompt) for prompt in ("hello there", *(f"question {i}" for i in range(20)))}
        first = next(p for p, home in homes.items() if home == "d1")
        second = next(p for p, home in homes.items() if home == "d2")
        sequential = [(p, client.generate(request(prompt=p)).served_by) for p in (first, second, first, second)]
    assert {r.served_by for r in replies} == {"d1", "d2"}
    assert sequential == [(first, "d1"), (second, "d2"), (first, "d1"), (second, "d2")]
    assert all(r.finish_reason in ("length", "eos") and r.skip_stats.generated_tokens >= 1 for r in replies)


def home_of(prompt: str, pods: tuple[str, ...] = ("d1", "d2")) -> str:
    """The pod of idle ones that routing gives a one-message chat."""
    endpoints = [Endpoint(decoder_id=d, address="", model_id=MODEL) for d in pods]
    chosen = pick(endpoints, {}, MODEL, 0.0, affinity=conversation_affinity(request(prompt=prompt)))
    assert chosen is not None
    return chosen.decoder_id


def test_auth_accepted_and_refused(fleet):
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong-key", grpc.StatusCode.UNAUTHENTICATED)):
        with fleet.client(key=key) as client, pytest.raises(grpc.RpcError) as err:
            client.generate(request())
        assert err.value.code() == code
    with fleet.client() as client:
        assert client.generate(request()).text is not None
        with pytest.raises(grpc.RpcError) as err:
            client.telemetry()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with fleet.client(key=OPS_KEY) as ops:
        assert ops.telemetry().gateways >= 1
    assert API_KEY not in fleet.gateways["gw-a"].log_tail(1_000_000)  # keys are never logged


@pytest.mark.parametrize("change, code, field", [
    (lambda r: setattr(r, "model", "no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
    (lambda r: (r.ClearField("messages"), setattr(r, "prompt", "")), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (lambda r: setattr(r.messages[0], "content", "  "), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
    (lambda r: setattr(r.sampling, "temperature", -0.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (lambda r: setattr(r.sampling, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (lambda r: setattr(r.sampling, "top_k", -1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
    (lambda r: setattr(r.sampling, "max_new_tokens", 100_000), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
    (lambda r: setattr(r.skip, "policy", "sometimes"), grpc.StatusCode.INVALID_ARGUMENT, "skip.policy"),
    (lambda r: setattr(r.skip, "threshold", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "skip.threshold"),
    (lambda r: setattr(r.skip, "max_skip", -7), grpc.StatusCode.INVALID_ARGUMENT, "skip.max_skip"),
    (lambda r: setattr(r.skip, "warm_up", -1), grpc.StatusCode.INVALID_ARGUMENT, "skip.warm_up"),
    # bounds on hostile input: refused by size, named, never echoed whole
    (lambda r: setattr(r, "model", "m" * 10_000), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (lambda r: r.messages.extend([r.messages[0]] * 300), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (lambda r: [r.messages.add(role="user", content="x" * 60_000) for _ in range(4)], grpc.StatusCode.INVALID_ARGUMENT,
     "messages[4].content"),
    (lambda r: r.sampling.stop.append("s" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[0]"),
    (lambda r: setattr(r.messages[0], "role", "r" * 10_000), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
])
def test_bad_input_at_the_gateway(fleet, change, code, field):
    bad = request()
    change(bad)
    with fleet.client() as client:
        for call in (client.generate, lambda r: list(client.stream(r))):
            with pytest.raises(grpc.RpcError) as err:
                call(bad)
            assert err.value.code() == code
            assert err.value.details().startswith(f"{field}:"), err.value.details()
            assert len(err.value.details()) < 300  # no unbounded echo of the input


def test_200_requests_at_concurrency_16(fleet):
    report = asyncio.run(run_load(fleet.gateways["gw-a"].address, MODEL, api_key=API_KEY, count=200,
                                  concurrency=16, duration_s=120, max_new_tokens=4))
    print("\n" + report.text())
    assert report.errors == {} and report.ok == report.requests == 200
    assert set(report.served_by) == {"d1", "d2"}
    assert report.tokens_per_s > 0 and set(report.latency_s) == {"p50", "p95", "p99"}


def test_telemetry_per_pod_and_across_gateway_replicas(fleet):
    with fleet.client(key=OPS_KEY) as ops:
        before = ops.telemetry(MODEL)
    groups = {g.decoder: g for g in before.groups}
    for pod in ("d1", "d2"):
        assert groups[pod].requests > 0 and groups[pod].generated_tokens > 0
        assert groups[pod].time_to_first_token_seconds.count > 0 and groups[pod].e2e_request_latency_seconds.p95 > 0
        assert len(groups[pod].layer_skip_frequency) == 6
    assert groups[""].requests == groups["d1"].requests + groups["d2"].requests
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{fleet.metrics_ports['gw-a']}/metrics", timeout=10).read().decode()
    assert 'ffnskip:request_success_total{decoder="d1",finished_reason="length",model_name="tiny"}' in metrics
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "generation_tokens_total",
                 "e2e_request_latency_seconds_bucket", "ffn_blocks_total", "ffn_blocks_skipped_total"):
        assert f"ffnskip:{name}{{" in metrics, name
    assert 'ffnskip:ffn_layer_skipped_total{decoder="d2",layer="5",model_name="tiny"}' in metrics
    assert "request_id" not in metrics

    second = fleet.gateway("gw-b")
    fleet.ready(second)
    try:
        with fleet.client(gateway="gw-b") as client:
            for _ in range(3):
                client.generate(request())
        with fleet.client(key=OPS_KEY, gateway="gw-b") as ops_b, fleet.client(key=OPS_KEY) as ops_a:
            ops_b.telemetry()  # gw-b writes its own numbers before answering
            after = ops_a.telemetry(MODEL)
    finally:
        second.signal()
        assert second.wait(timeout_s=30) == 0
    total = {g.decoder: g for g in after.groups}[""]
    assert after.gateways == 2 and total.requests == groups[""].requests + 3


def test_gateway_restart(fleet):
    gateway = fleet.gateways["gw-a"]
    with fleet.client(key=OPS_KEY) as ops:
        before = {g.decoder: g for g in ops.telemetry(MODEL).groups if g.model == MODEL}[""].requests
    gateway.signal()
    assert gateway.wait(timeout_s=30) == 0  # a clean drain and exit
    with fleet.client() as client, pytest.raises(grpc.RpcError) as err:
        client.generate(request(), timeout_s=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    restarted = fleet.gateway("gw-a", port=gateway.port)  # same port, same replica id
    fleet.ready(restarted)
    with fleet.client() as client:
        assert client.generate(request()).served_by in ("d1", "d2")
    with fleet.client(key=OPS_KEY) as ops:
        after = {g.decoder: g for g in ops.telemetry(MODEL).groups if g.model == MODEL}[""].requests
    assert after >= before + 1  # the replica's counters continue across the restart


def test_killing_a_decoder_mid_traffic(fleet):
    doomed = fleet.decoder("d3", FFNSKIP_MAX_BATCH="1")  # one row: its other requests wait without tokens
    # nine conversations, three of whose first messages hash to d3 (conversation affinity)
    prompts = [f"{n}: {LONG_PROMPT}" for n in range(40)]
    pods = ("d1", "d2", "d3")
    prompts = ([p for p in prompts if home_of(p, pods) == "d3"][:3]
               + [p for p in prompts if home_of(p, pods) != "d3"][:6])
    fleet.ready(doomed)
    with fleet.client() as client:
        wait_for(lambda: "d3" in decoders_listed(client), 10, "the gateway to discover d3")
    outcomes: list[dict] = []
    d3_token = threading.Event()

    def stream(n: int) -> None:
        outcome = {"tokens": 0, "pod": "", "code": grpc.StatusCode.OK, "details": "", "summary": None}
        outcomes.append(outcome)
        with fleet.client() as client:
            call = client.stream(request(max_new_tokens=180, prompt=prompts[n]), timeout_s=90)
            try:
                for message in call:
                    if message.HasField("token"):
                        outcome["tokens"] += 1
                        outcome["pod"] = outcome["pod"] or served_by(call)
                        if outcome["pod"] == "d3":
                            d3_token.set()
                    else:
                        outcome["summary"] = message.summary
            except grpc.RpcError as err:
                outcome["code"], outcome["details"] = err.code(), err.details()

    threads = [threading.Thread(target=stream, args=(n,), daemon=True) for n in range(9)]
    for thread in threads:
        thread.start()
    with fleet.client() as client:
        wait_for(lambda: d3_token.is_set() and decoders_listed(client)["d3"].in_flight >= 2, 30,
                 "d3 streaming one request with more waiting")
        doomed.signal(9)  # SIGKILL: no drain, no withdrawal from the registry
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads), "a client call hangs"

        for outcome in outcomes:  # the stream d3 was serving continues on another pod (resume is on)
            assert outcome["code"] == grpc.StatusCode.OK, outcome
            assert outcome["summary"] is not None  # a whole response
            assert outcome["summary"].skip_stats.generated_tokens == outcome["tokens"]
        assert any(o["pod"] == "d3" and o["summary"].resumes == 1 for o in outcomes)
        with fleet.client(key=OPS_KEY) as ops:
            d3 = {g.decoder: g for g in ops.telemetry(MODEL).groups}["d3"]
        assert d3.failovers >= 1  # requests waiting on d3 went to another pod

        for _ in range(6):  # d3 is still in the registry for its TTL: no new request fails
            assert client.generate(request()).served_by in ("d1", "d2")
        wait_for(lambda: "d3" not in decoders_listed(client), 10, "d3 to leave rotation after its TTL")
        wait_for(lambda: all(d.in_flight == 0 for d in decoders_listed(client).values()), 10, "no leaked in-flight counts")


def test_client_cli(fleet, capsys):
    address = fleet.gateways["gw-a"].address
    assert cli.main(["client", "models", "--address", address, "--api-key", API_KEY]) == 0
    assert cli.main(["client", "generate", "--address", address, "--api-key", API_KEY, "--model", MODEL,
                     "--max-new-tokens", "4", "--policy", "dense", "hi"]) == 0
    assert cli.main(["client", "telemetry", "--address", address, "--api-key", OPS_KEY]) == 0
    assert cli.main(["client", "telemetry", "--address", address, "--api-key", API_KEY]) == 2
    out, err = capsys.readouterr()
    assert "d1" in out and "served by" in out and "gateway replicas reporting" in out
    assert "PERMISSION_DENIED" in err
