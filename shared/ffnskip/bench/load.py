"""`ffnskip load`: a bounded load through the gateway, on loopback only, over its gRPC API
or (`http=True`) its OpenAI-compatible HTTP API.

N workers (the concurrency) send streaming requests until `count` requests were sent or
`duration_s` passed, whichever comes first; every request has its own deadline. The
report gives tokens/s, end-to-end, TTFT and inter-token latency percentiles as the
client sees them, the errors by status code (gRPC code names, or HTTP statuses) and which
pods served the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field

import aiohttp
import grpc

from ffnskip.client import auth_metadata, build_request, channel_options
from ffnskip.errors import InvalidArgument
from ffnskip.v1 import gateway_pb2_grpc

MAX_COUNT = 100_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 256
DEFAULT_PROMPTS = ("Explain in two sentences why the sky is blue.", "Name three uses of copper.",
                   "Write a haiku about the sea.", "What is the capital of France?")


@dataclass
class LoadReport:
    address: str
    model: str
    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    latency_s: dict[str, float] = field(default_factory=dict)  # end to end, p50/p95/p99
    ttft_s: dict[str, float] = field(default_factory=dict)
    itl_s: dict[str, float] = field(default_factory=dict)
    served_by: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        def row(name: str, values: dict[str, float], scale: float, unit: str) -> str:
            cells = "  ".join(f"{k} {v * scale:8.1f}" for k, v in values.items()) or "n/a"
            return f"  {name:<22}{cells}  {unit}"

        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        served = ", ".join(f"{pod} {n}" for pod, n in sorted(self.served_by.items())) or "none"
        return "\n".join([
            f"load: {self.requests} requests at concurrency {self.concurrency} in {self.wall_s:.1f} s "
            f"through {self.address} (model {self.model})",
            f"  ok {self.ok}, errors {sum(self.errors.values())} ({errors})",
            f"  {self.tokens} tokens, {self.tokens_per_s:.1f} tokens/s, {self.ok / self.wall_s if self.wall_s else 0:.1f} requests/s",
            row("end-to-end latency", self.latency_s, 1e3, "ms"),
            row("time to first token", self.ttft_s, 1e3, "ms"),
            row("inter-token latency", self.itl_s, 1e3, "ms"),
            f"  served by: {served}",
        ])


def check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise InvalidArgument("address", f"cannot resolve {host!r}: {exc}") from None
    if not resolved or not all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in resolved):
        raise InvalidArgument("address", f"load runs against loopback only (127.0.0.1, ::1, localhost), got {host!r}")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 by the nearest-rank method; empty when there are no values."""
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{q}": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 95, 99)}


async def run_load(address: str, model: str, api_key: str | None = None, count: int = 100, concurrency: int = 4,
                   duration_s: float = 60.0, max_new_tokens: int = 32, prompts: Sequence[str] = DEFAULT_PROMPTS,
                   request_timeout_s: float = 60.0, http: bool = False) -> LoadReport:
    """`address`: the gateway's gRPC port, or with `http` its HTTP API's (host:port)."""
    check_loopback(address)
    if not 1 <= count <= MAX_COUNT:
        raise InvalidArgument("count", f"must be in [1, {MAX_COUNT}], got {count}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise InvalidArgument("duration", f"must be in (0, {MAX_DURATION_S:g}] seconds, got {duration_s}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidArgument("concurrency", f"must be in [1, {MAX_CONCURRENCY}], got {concurrency}")
    if not prompts:
        raise InvalidArgument("prompts", "need at least one prompt")
    report = LoadReport(address=address, model=model, concurrency=concurrency)
    e2e: list[float] = []
    ttft: list[float] = []
    itl: list[float] = []
    errors: Counter[str] = Counter()
    served: Counter[str] = Counter()
    tickets = iter(range(count))
    prompt_cycle = itertools.cycle(prompts)
    started = time.monotonic()
    stop_at = started + duration_s

    async with _sender(address, model, api_key, max_new_tokens, request_timeout_s, http) as send:

        async def one(prompt: str) -> None:
            sent = last = time.monotonic()
            try:
                async for tokens, pod in send(prompt):
                    now = time.monotonic()
                    if pod is None:
                        (ttft if last == sent else itl).append(now - last)
                        last = now
                    else:
                        e2e.append(now - sent)
                        report.tokens += tokens
                        served[pod] += 1
                report.ok += 1
            except _Failed as failed:
                errors[failed.code] += 1

        async def worker() -> None:
            for _ in tickets:  # shared iterator: each ticket is taken by exactly one worker
                if time.monotonic() >= stop_at:
                    return
                report.requests += 1
                await one(next(prompt_cycle))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    report.wall_s = time.monotonic() - started
    report.tokens_per_s = report.tokens / report.wall_s if report.wall_s else 0.0
    report.errors, report.served_by = dict(errors), dict(served)
    report.latency_s, report.ttft_s, report.itl_s = percentiles(e2e), percentiles(ttft), percentiles(itl)
    return report


class _Failed(Exception):
    """A request that ended with an error status (`code`: its gRPC code name or HTTP status)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# One streamed request: yields (0, None) per token, then (generated tokens, serving pod) once; raises _Failed.
Send = Callable[[str], AsyncIterator[tuple[int, str | None]]]


@contextlib.asynccontextmanager
async def _sender(address: str, model: str, api_key: str | None, max_new_tokens: int, timeout_s: float,
                  http: bool) -> AsyncIterator[Send]:
    if not http:
        async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            async def send_grpc(prompt: str) -> AsyncIterator[tuple[int, str | None]]:
                request = build_request(model, chat=prompt, max_new_tokens=max_new_tokens)
                call = stub.GenerateStream(request, timeout=timeout_s, metadata=auth_metadata(api_key))
                try:
                    async for message in call:
                        if message.HasField("token"):
                            yield 0, None
                        else:
                            yield message.summary.skip_stats.generated_tokens, message.summary.served_by
                except grpc.aio.AioRpcError as err:
                    raise _Failed(err.code().name) from None

            yield send_grpc
        return
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(f"http://{address}", headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def send_http(prompt: str) -> AsyncIterator[tuple[int, str | None]]:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_new_tokens, "stream": True}
            try:
                async with session.post("/v1/chat/completions", json=body) as response:
                    if response.status != 200:
                        raise _Failed(str(response.status))
                    async for line in response.content:
                        event = _sse_data(line)
                        if event is None:
                            continue
                        if "error" in event:
                            raise _Failed(str(event["error"].get("code")))
                        choice = event["choices"][0] if event.get("choices") else {}
                        if choice.get("delta", {}).get("content"):
                            yield 0, None
                        if choice.get("finish_reason"):
                            stats = event["ffnskip"]
                            yield stats["generated_tokens"], stats["served_by"]
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise _Failed(type(exc).__name__) from None

        yield send_http


def _sse_data(line: bytes) -> dict | None:
    """The JSON of a server-sent `data:` line; None for anything else (blank lines, [DONE])."""
    text = line.decode().strip()
    if not text.startswith("data:") or text == "data: [DONE]":
        return None
    return json.loads(text[len("data:"):])
