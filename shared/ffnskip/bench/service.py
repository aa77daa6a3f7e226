"""`ffnskip bench --target HOST:PORT`: drive a running decoder (or the gateway, which
serves the same streaming call) at several concurrencies, dense vs skip, and print
tokens/s with TTFT, inter-token and end-to-end latency percentiles.

With `--engine-baseline` the same prompts also run on a bare in-process engine at
concurrency 1 (after the service rows, so the two never share the CPU), which is
what the service's overhead is measured against.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ffnskip.datasets import texts
from ffnskip.settings import cache_root


@dataclass
class CallResult:
    ok: bool
    code: str = "OK"
    tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    decode_skip_ratio: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stream_once(stub, request, metadata, timeout_s: float) -> CallResult:
    started = time.perf_counter()
    last = None
    result = CallResult(ok=False)
    try:
        for message in stub.GenerateStream(request, timeout=timeout_s, metadata=metadata):
            now = time.perf_counter()
            if message.HasField("token"):
                if last is None:
                    result.ttft_s = now - started
                else:
                    result.gaps_s.append(now - last)
                last = now
                result.tokens += 1
            else:
                result.decode_skip_ratio = message.summary.skip_stats.decode_skip_ratio
        result.ok = True
    except grpc.RpcError as exc:
        result.code = exc.code().name
    result.e2e_s = time.perf_counter() - started
    return result


def run_level(stub, requests, concurrency: int, metadata, timeout_s: float) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda r: stream_once(stub, r, metadata, timeout_s), requests))
    wall = time.perf_counter() - started
    good = [r for r in results if r.ok]
    gaps = [g for r in good for g in r.gaps_s]
    ms = lambda values, q: round(percentile(values, q) * 1e3, 1)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(good),
        "error_codes": sorted({r.code for r in results if not r.ok}),
        "tokens": sum(r.tokens for r in good), "tokens_per_s": round(sum(r.tokens for r in good) / wall, 2),
        "decode_skip_ratio": round(statistics.fmean([r.decode_skip_ratio for r in good]), 4) if good else None,
        "ttft_ms": {q: ms([r.ttft_s for r in good], p) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))},
        "itl_ms": {q: ms(gaps, p) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))},
        "e2e_ms": {q: ms([r.e2e_s for r in good], p) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))},
    }


def build_requests(model: str, count: int, max_new_tokens: int, policy: str):
    from ffnskip.v1 import generation_pb2 as pb

    prompts = texts("prompts", "prompt")
    skip = pb.SkipOverrides(policy=policy) if policy else pb.SkipOverrides()
    return [pb.GenerateRequest(model=model, messages=[pb.ChatMessage(role="user", content=prompts[i % len(prompts)])],
                               sampling=pb.SamplingOptions(max_new_tokens=max_new_tokens, ignore_eos=True), skip=skip)
            for i in range(count)]


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


def run(args) -> int:
    from ffnskip.rpc.channels import insecure_channel

    levels = [int(c) for c in args.concurrency.split(",")]
    policies = args.service_policies.split(",")
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    rows = []
    with insecure_channel(args.target) as channel:
        stub = generation_stub(channel)
        for concurrency in levels:
            for policy in policies:
                requests = build_requests(args.model, max(args.requests_per_level, concurrency * 2), args.new_tokens,
                                          "" if policy == "profile" else policy)
                row = run_level(stub, requests, concurrency, metadata, args.timeout)
                row["policy"] = policy
                rows.append(row)
                print(f"c={concurrency} {policy}: {row['tokens_per_s']} tok/s, errors {row['errors']}", file=sys.stderr, flush=True)
    report = {"target": args.target, "model": args.model, "new_tokens": args.new_tokens, "rows": rows}
    if args.engine_baseline:
        requests = build_requests(args.model, args.requests_per_level, args.new_tokens, "dense")
        report["engine_dense_tokens_per_s"] = round(engine_baseline(args.model, requests, args.device, args.dtype), 2)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"target {report['target']} model {report['model']}, {report['new_tokens']} new tokens per request")
    header = f"{'conc':>5} {'policy':<10}{'reqs':>5}{'err':>5}{'tok/s':>9}{'dec.skip':>9}   {'TTFT p50/p95/p99 ms':<22}{'ITL p50/p95/p99 ms':<22}{'E2E p50/p95/p99 ms':<22}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        trio = lambda d: f"{d['p50']}/{d['p95']}/{d['p99']}"  # noqa: E731
        print(f"{r['concurrency']:>5} {r['policy']:<10}{r['requests']:>5}{r['errors']:>5}{r['tokens_per_s']:>9.1f}"
              f"{(r['decode_skip_ratio'] or 0):>9.3f}   {trio(r['ttft_ms']):<22}{trio(r['itl_ms']):<22}{trio(r['e2e_ms']):<22}")
    if "engine_dense_tokens_per_s" in report:
        c1 = [r for r in report["rows"] if r["concurrency"] == 1 and r["policy"] == "dense"]
        line = f"bare engine, dense, one request at a time: {report['engine_dense_tokens_per_s']} tok/s"
        if c1:
            line += f"; service at concurrency 1 reaches {c1[0]['tokens_per_s'] / report['engine_dense_tokens_per_s']:.3f} of it"
        print(line)
