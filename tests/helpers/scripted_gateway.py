"""A gateway over scripted fake decoders, for the proxy's unit tests: real grpc.aio servers
in-process on loopback, no model, deterministic. A fake decoder stands in for a fault that a
real one cannot be made to produce on cue (dying after its n-th token, stalling, refusing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from ffnskip.rpc.server import Server
from ffnskip.v1 import decoder_pb2_grpc, gateway_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from services.gateway.channels import ChannelPool
from services.gateway.discovery import StaticDiscovery
from services.gateway.endpoints import Endpoint
from services.gateway.fleet import summarise
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy, Timeouts
from services.gateway.routing import Router
from services.gateway.servicer import GatewayServicer
from services.gateway.telemetry import Telemetry

MODEL = "m"


class FakeDecoder(decoder_pb2_grpc.DecoderServicer):
    """Token i (0-based) is id i with text "t{i} ", skipping `skip_layer` once past `warm_up`;
    a resumed call continues after the delivered tokens, and its summary covers them with the
    layers the request says they skipped, as the engine's does."""

    def __init__(self, name: str, mode: str = "ok", tokens: int = 3, version: int | None = None,
                 warm_up: int = 0, skip_layer: int = 1, die_after: int = 0) -> None:
        self.name, self.mode, self.tokens, self.version = name, mode, tokens, version
        self.warm_up, self.skip_layer = warm_up, skip_layer
        self.die_after = die_after or (1 if mode in ("dies_after_token", "stalls_after_token") else 0)
        self.calls = 0
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = asyncio.Event()

    async def GenerateStream(self, request, context):
        self.calls += 1
        self.requests.append(request)
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.mode == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "skip.threshold: must be in [0.5, 1], got 0.1")
        if self.mode == "exhausted":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", trailing_metadata=(("retry-after", "2"),))
        if self.mode == "transport":  # what grpc itself says of a pod it cannot reach: an address
            await context.abort(grpc.StatusCode.INTERNAL, "ipv4:10.1.2.3:50052: connection reset")
        if self.mode == "refuses_resume" and request.HasField("resume"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "resume.profile_version: this decoder serves 9")
        if self.mode == "hang":
            await self._hang()
        resumed = len(request.resume.token_ids)
        for sent, i in enumerate(range(resumed, self.tokens), start=1):
            yield pb.GenerateStreamResponse(token=pb.TokenChunk(index=i + 1, token_id=i, text=f"t{i} ",
                                                                skipped_layers=self._skips(i), elapsed_ms=1.0))
            if sent == self.die_after:
                if self.mode == "stalls_after_token":  # a frozen pod: the connection stays up, nothing comes
                    await self._hang()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "socket closed")
        records = [list(request.resume.skipped_layers[i].layers) if i < resumed else self._skips(i)
                   for i in range(self.tokens)]
        skipped = sum(len(r) for r in records)
        decode_tokens = max(0, self.tokens - self.warm_up)
        stats = pb.SkipStats(skip_ratio=skipped / (4 * self.tokens),
                             decode_skip_ratio=skipped / (4 * decode_tokens) if decode_tokens else 0.0,
                             ffn_blocks_total=4 * self.tokens, ffn_blocks_skipped=skipped,
                             per_layer_skips=[sum(layer in r for r in records) for layer in range(4)],
                             generated_tokens=self.tokens)
        yield pb.GenerateStreamResponse(summary=pb.GenerateResponse(
            text="".join(f"t{i} " for i in range(self.tokens)), finish_reason="length", served_by=self.name,
            skip_stats=stats, request_id=request.request_id, token_ids=list(range(self.tokens)),
            profile_version=self.version or 0, seed=request.sampling.seed,
            latency=pb.Latency(ttft_ms=1.0, total_ms=2.0, queue_ms=0.5)))

    def _skips(self, i: int) -> list[int]:
        return [self.skip_layer] if i + 1 > self.warm_up else []

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@contextlib.asynccontextmanager
async def gateway(*fakes: FakeDecoder, max_attempts: int = 3, timeouts: Timeouts = Timeouts(attempt_s=30),
                  resume: bool = True, affinity: bool = False) -> AsyncIterator[tuple]:
    """A gateway over the fakes, in the fakes' order (`affinity` off: the scenarios name which fake
    a request reaches first by the routing's rotation, lowest id first)."""
    servers, endpoints = [], []
    for fake in fakes:
        server = grpc.aio.server()
        decoder_pb2_grpc.add_DecoderServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        endpoints.append(Endpoint(fake.name, f"127.0.0.1:{port}", MODEL, capacity=4, profile_version=fake.version))
    telemetry = Telemetry()
    router = Router(StaticDiscovery(endpoints), quarantine_s=60)
    pool = ChannelPool(4 << 20, keepalive_s=20)
    proxy = Proxy(router, pool, telemetry, max_attempts=max_attempts, timeouts=timeouts, resume=resume,
                  affinity=affinity)
    front = Server(["ffnskip.v1.Gateway"])
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(proxy, PromptSampler(None, 0, "s", 1), 256), front.grpc)
    port = await front.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield gateway_pb2_grpc.GatewayStub(channel), telemetry, router
    finally:
        await front.grpc.stop(None)
        await pool.close()
        for server in servers:
            await server.stop(None)


def request() -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt="hi", sampling=pb.SamplingOptions(max_new_tokens=3))


async def drain(call) -> tuple[list, grpc.StatusCode, str]:
    messages = []
    try:
        async for message in call:
            messages.append(message)
        return messages, grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        return messages, err.code(), err.details() or ""


def counters(telemetry: Telemetry) -> dict:
    response = summarise(1, telemetry.snapshot())
    return {(g.model, g.decoder): g for g in response.groups}
