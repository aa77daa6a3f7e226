"""`ffnskip bench --target HOST:PORT`: drive a running decoder (or the gateway, which
serves the same streaming call) at several concurrencies, dense vs skip, and print
tokens/s with TTFT, inter-token and end-to-end latency percentiles.

With `--engine-baseline` the same prompts also run on a bare in-process engine at
concurrency 1 (after the service rows, so the two never share the CPU), which is
what the service's overhead is measured against. With `--peer llama-server` llama.cpp's
server runs the same requests on the same weights after the service rows (the two never
share the CPU) and the table shows both side by side (ffnskip.bench.service_peer).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc

from ffnskip.bench.calls import CallResult, run_level
from ffnskip.bench.llama_server import SERVER_PEER
from ffnskip.bench.service_peer import CHECK_PROMPTS, CHECK_TOKENS, ServerPeer, describe_agreement
from ffnskip.datasets import texts
from ffnskip.errors import FfnSkipError, InvalidArgument
from ffnskip.settings import cache_root


def stream_once(stub, request, metadata, timeout_s: float) -> CallResult:
    started = time.perf_counter()
    result = CallResult(ok=False)
    try:
        for message in stub.GenerateStream(request, timeout=timeout_s, metadata=metadata):
            if message.HasField("token"):
                result.add_tokens(1, time.perf_counter(), started)
            else:
                result.decode_skip_ratio = message.summary.skip_stats.decode_skip_ratio
                result.text = message.summary.text
        result.ok = True
    except grpc.RpcError as exc:
        result.code = exc.code().name
    result.e2e_s = time.perf_counter() - started
    return result


def build_requests(model: str, count: int, max_new_tokens: int, policy: str, ignore_eos: bool = True,
                   prompt_words: int = 0):
    """`count` chat requests cycling over the packaged questions; with `prompt_words`, request i's
    question follows a note of at least that many words: calibration texts from the i-th on
    (every request starts differently, so no prompt cache holds another's start)."""
    from ffnskip.rpc.convert import policy_fields  # local, as the generated modules it imports are here
    from ffnskip.v1 import generation_pb2 as pb

    if prompt_words < 0:
        raise InvalidArgument("prompt_words", f"must be 0 (the questions alone) or more, got {prompt_words}")
    prompts = texts("prompts", "prompt")
    if prompt_words:
        notes = texts("calibration", "text")
        prompts = [_note(notes, i, prompt_words) + "\n\n" + prompts[i % len(prompts)] for i in range(count)]
    skip = pb.SkipOverrides(**policy_fields(policy))
    sampling = pb.SamplingOptions(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    return [pb.GenerateRequest(model=model, messages=[pb.ChatMessage(role="user", content=prompts[i % len(prompts)])],
                               sampling=sampling, skip=skip)
            for i in range(count)]


def _note(notes: list[str], start: int, words: int) -> str:
    taken: list[str] = []
    for i in range(len(notes)):
        if sum(len(t.split()) for t in taken) >= words:
            break
        taken.append(notes[(start + i) % len(notes)])
    return " ".join(taken)


def engine_baseline(model: str, requests, device: str, dtype: str) -> float:
    """Tokens/s of the bare engine on the same prompts, one at a time."""
    from ffnskip.config import SamplingParams
    from ffnskip.engine import Engine, load_model

    loaded = load_model(model, device=device, dtype=dtype, cache_dir=cache_root(os.environ))
    engine = Engine(loaded, max_batch=1, max_seq_len=2048)
    tokens, started = 0, time.perf_counter()
    for request in requests:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        result = engine.generate([messages], SamplingParams(max_new_tokens=request.sampling.max_new_tokens, ignore_eos=True))[0]
        tokens += len(result.token_ids)
    return tokens / (time.perf_counter() - started)


def generation_stub(channel: grpc.Channel):
    """A GenerateStream stub for what serves at the channel: a gateway (what users call) or a
    decoder (the service path without the gateway), told apart by gRPC reflection."""
    # local, like the other generated-module imports here: only a --target run needs them
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from ffnskip.v1 import decoder_pb2_grpc, gateway_pb2_grpc

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    if "ffnskip.v1.Gateway" in services:
        return gateway_pb2_grpc.GatewayStub(channel)
    return decoder_pb2_grpc.DecoderStub(channel)


@dataclass(frozen=True)
class ServiceBenchOptions:
    """What `ffnskip bench --target` runs: its flags, typed (ffnskip.cli.bench reads them)."""

    target: str  # HOST:PORT of a running gateway or decoder
    model: str = "smollm2-135m"
    device: str = "auto"  # the bare engine's (engine_baseline)
    dtype: str = "auto"  # the bare engine's and llama-server's GGUF
    new_tokens: int = 128  # per request, EOS ignored
    concurrency: tuple[int, ...] = (1, 4, 16)
    policies: tuple[str, ...] = ("dense", "adaptive")  # "profile" = the decoder's active profile as is
    requests_per_level: int = 8
    prompt_words: int = 0  # each question after a note of its own of at least this many words (build_requests)
    timeout_s: float = 600.0
    api_key: str | None = None  # bearer key, when the target is a gateway
    llama_server: bool = False  # llama.cpp's server on the same weights after the service rows, side by side
    peer_threads: int | None = None  # llama-server's threads; None: torch's thread count in this process
    peer_gguf: str | None = None  # llama-server's GGUF precision (f32, bf16, q8_0); None: dtype's
    metrics_url: str | None = None  # the decoder's Prometheus endpoint: its resident memory after the rows
    engine_baseline: bool = False  # also the bare engine in-process on the same prompts
    json: bool = False  # print the report as JSON instead of the table


def run(options: ServiceBenchOptions) -> int:
    """Bench the target at each concurrency (and llama-server beside it, when asked), print the
    table (the JSON report with `json`); -> 0."""
    from ffnskip.rpc.channels import insecure_channel

    o = options
    levels = list(o.concurrency)
    policies = list(o.policies)
    metadata = [("authorization", f"Bearer {o.api_key}")] if o.api_key else None
    for name, value in (("peer_threads", o.peer_threads), ("peer_gguf", o.peer_gguf)):
        if value is not None and not o.llama_server:
            raise InvalidArgument(name, f"is llama-server's: only with --peer {SERVER_PEER}")
    # the model is loaded and its GGUF written before anything is timed: both take the CPU
    peer = ServerPeer(o.model, o.dtype, o.peer_threads, o.peer_gguf) if o.llama_server else None
    count = {c: max(o.requests_per_level, c * 2) for c in levels}
    report: dict[str, Any] = {"target": o.target, "model": o.model, "new_tokens": o.new_tokens}
    rows = []
    with insecure_channel(o.target) as channel:
        stub = generation_stub(channel)
        if peer is not None:  # before the timed rows: a peer doing other work fails here, not after them
            # EOS ends these on both sides: the two ignore it differently (llama_server.completion_body)
            check = build_requests(o.model, CHECK_PROMPTS, CHECK_TOKENS, "dense", ignore_eos=False)
            try:
                service_tokens = [list(stub.Generate(r, timeout=o.timeout_s, metadata=metadata).token_ids)
                                  for r in check]
            except grpc.RpcError as err:
                raise FfnSkipError(f"greedy check: {o.target} answered {err.code().name}: {err.details()}") from None
            report["greedy_check"] = peer.greedy_check(check, service_tokens, CHECK_TOKENS, o.timeout_s,
                                                       enforce=o.peer_gguf is None)

        def service_rows(concurrency: int) -> None:
            for policy in policies:
                requests = build_requests(o.model, count[concurrency], o.new_tokens,
                                          "" if policy == "profile" else policy, prompt_words=o.prompt_words)
                row = run_level(lambda r: stream_once(stub, r, metadata, o.timeout_s), requests, concurrency)
                row["policy"] = policy
                rows.append(row)
                print(f"c={concurrency} {policy}: {row['tokens_per_s']} tok/s, errors {row['errors']}", file=sys.stderr, flush=True)

        if peer is None:
            for concurrency in levels:
                service_rows(concurrency)
        else:  # level by level, the service's rows and then llama-server's: one idles while the other runs
            same = {c: build_requests(o.model, count[c], o.new_tokens, "dense", prompt_words=o.prompt_words)
                    for c in levels}
            report["llama_server"] = peer.rows(same, o.new_tokens, o.timeout_s, lambda row: print(
                f"c={row['concurrency']} llama-server: {row['tokens_per_s']} tok/s, errors {row['errors']}",
                file=sys.stderr, flush=True), before_level=service_rows)
    report["rows"] = rows if peer is None else with_ratios(rows, report["llama_server"]["rows"])
    if o.metrics_url:  # after the rows, while nothing else runs
        readings = metric_values(o.metrics_url, ("process_resident_memory_bytes", "ffnskip:prompt_cache_hits",
                                                 "ffnskip:prompt_cache_reused_tokens"))
        report["service_resident_bytes"] = readings.get("process_resident_memory_bytes")
        # a like-for-like run has none: llama-server's requests never reuse a prompt
        report["service_prompt_cache"] = {"hits": readings.get("ffnskip:prompt_cache_hits"),
                                          "reused_tokens": readings.get("ffnskip:prompt_cache_reused_tokens")}
    if o.engine_baseline:
        requests = build_requests(o.model, o.requests_per_level, o.new_tokens, "dense")
        report["engine_dense_tokens_per_s"] = round(engine_baseline(o.model, requests, o.device, o.dtype), 2)
    if o.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


def metric_values(metrics_url: str, names: tuple[str, ...]) -> dict[str, int]:
    """The first sample of each named metric family a Prometheus endpoint exports (those it does
    not export are left out)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as err:
        raise InvalidArgument("metrics_url", f"cannot read {metrics_url}: {err}") from None
    return {family.name: int(family.samples[0].value) for family in text_string_to_metric_families(text)
            if family.name in names and family.samples}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or not theirs or math.isnan(ours) or math.isnan(theirs):
        return None
    return round(ours / theirs, 3)


def with_ratios(rows: list[dict], peer_rows: list[dict]) -> list[dict]:
    """The service rows, each with its ratios to llama-server's row of the same concurrency
    (service / llama-server: tokens/s above 1 = the service is faster; TTFT and ITL p50
    above 1 = the service is slower)."""
    peers = {r["concurrency"]: r for r in peer_rows}
    out = []
    for row in rows:
        peer = peers.get(row["concurrency"])
        out.append({**row, "vs_llama_server": None if peer is None else {
            "tokens_per_s": ratio(row["tokens_per_s"], peer["tokens_per_s"]),
            "ttft_p50": ratio(row["ttft_ms"]["p50"], peer["ttft_ms"]["p50"]),
            "itl_p50": ratio(row["itl_ms"]["p50"], peer["itl_ms"]["p50"])}})
    return out


def table_rows(report: dict) -> list[dict]:
    """The rows in print order: per concurrency level the service's, then llama-server's."""
    peer_rows = report.get("llama_server", {}).get("rows", [])
    rows = []
    for concurrency in dict.fromkeys(r["concurrency"] for r in report["rows"] + peer_rows):
        rows += [r for r in report["rows"] + peer_rows if r["concurrency"] == concurrency]
    return rows


def gigabytes(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1e9:.2f} GB"


def print_table(report: dict) -> None:
    print(f"target {report['target']} model {report['model']}, {report['new_tokens']} new tokens per request")
    peer = report.get("llama_server")
    if "greedy_check" in report:
        print(f"greedy check, service vs llama-server: {describe_agreement(report['greedy_check'])}")
    header = (f"{'conc':>5} {'policy':<13}{'reqs':>5}{'err':>5}{'tok/s':>9}{'dec.skip':>9}   {'TTFT p50/p95/p99 ms':<22}"
              f"{'ITL p50/p95/p99 ms':<22}{'E2E p50/p95/p99 ms':<22}")
    if peer:
        header += f"{'x tok/s':>8}{'x TTFT':>8}{'x ITL':>8}"
    print(header)
    print("-" * len(header))
    for r in table_rows(report):
        trio = lambda d: f"{d['p50']}/{d['p95']}/{d['p99']}"  # noqa: E731
        skip = "-" if r["decode_skip_ratio"] is None else f"{r['decode_skip_ratio']:.3f}"
        line = (f"{r['concurrency']:>5} {r['policy']:<13}{r['requests']:>5}{r['errors']:>5}{r['tokens_per_s']:>9.1f}"
                f"{skip:>9}   {trio(r['ttft_ms']):<22}{trio(r['itl_ms']):<22}{trio(r['e2e_ms']):<22}")
        versus = r.get("vs_llama_server")
        if versus:
            line += "".join(f"{'-' if versus[k] is None else format(versus[k], '.2f'):>8}"
                            for k in ("tokens_per_s", "ttft_p50", "itl_p50"))
        print(line.rstrip())
    if peer:
        print(f"x = service / llama-server at the same concurrency (tok/s above 1: the service is faster; TTFT and "
              f"ITL p50 above 1: it is slower). llama-server: {peer['dtype']} GGUF, {peer['threads']} threads, "
              f"{peer['slots']} slots, --ctx-size {peer['ctx_size']}, peak resident {gigabytes(peer['peak_resident_bytes'])}")
    if "service_resident_bytes" in report:
        print(f"service resident memory after its rows (--metrics-url): {gigabytes(report['service_resident_bytes'])}")
    if "engine_dense_tokens_per_s" in report:
        c1 = [r for r in report["rows"] if r["concurrency"] == 1 and r["policy"] == "dense"]
        line = f"bare engine, dense, one request at a time: {report['engine_dense_tokens_per_s']} tok/s"
        if c1:
            line += f"; service at concurrency 1 reaches {c1[0]['tokens_per_s'] / report['engine_dense_tokens_per_s']:.3f} of it"
        print(line)
