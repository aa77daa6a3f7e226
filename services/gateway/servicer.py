"""The Gateway service's RPCs: validate, hand to the proxy, convert back. The routing,
failover and telemetry live in proxy.py, routing.py and telemetry.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc

from ffnskip.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from services.gateway.admission import admit
from services.gateway.fleet import FleetTelemetry, Flusher, summarise
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy, UpstreamError

SERVED_BY_HEADER = "x-served-by"


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, proxy: Proxy, sampler: PromptSampler, max_new_tokens: int,
                 fleet: FleetTelemetry | None = None, flusher: Flusher | None = None) -> None:
        self.proxy = proxy
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.fleet = fleet
        self.flusher = flusher

    def _prepare(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
        return admit(request, self.proxy.telemetry, self.sampler, self.max_new_tokens)

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        request = self._prepare(request)
        summary = generation_pb2.GenerateResponse()
        try:
            async for message in self.proxy.stream(request, context.time_remaining):
                if message.HasField("summary"):
                    summary = message.summary
        except UpstreamError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=_trailers(request, exc))
        return summary

    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        request = self._prepare(request)

        async def commit(decoder_id: str) -> None:  # names the pod before the first token goes out
            await context.send_initial_metadata(((SERVED_BY_HEADER, decoder_id),))

        try:
            async for message in self.proxy.stream(request, context.time_remaining, commit):
                yield message
        except UpstreamError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=_trailers(request, exc))

    async def ListModels(self, request: gateway_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.ListModelsResponse:
        router = self.proxy.router
        by_model: dict[str, list] = defaultdict(list)
        for endpoint in sorted(router.live(), key=lambda e: e.decoder_id):
            by_model[endpoint.model_id].append(gateway_pb2.DecoderStatus(
                decoder_id=endpoint.decoder_id, profile_version=endpoint.profile_version or 0,
                capacity=endpoint.capacity, load=endpoint.load, in_flight=router.in_flight.get(endpoint.decoder_id, 0),
                draining=endpoint.draining))
        return gateway_pb2.ListModelsResponse(models=[
            gateway_pb2.ModelStatus(model=model, decoders=decoders,
                                    ready_decoders=sum(not d.draining for d in decoders))
            for model, decoders in sorted(by_model.items())])

    async def GetTelemetry(self, request: gateway_pb2.GetTelemetryRequest,
                           context: grpc.aio.ServicerContext) -> gateway_pb2.GetTelemetryResponse:
        if self.fleet is None or self.flusher is None:  # no Redis: this replica alone
            return summarise(1, self.proxy.telemetry.snapshot(), request.model)
        await self.flusher.flush()  # this replica's numbers up to this moment
        gateways, counters = await asyncio.to_thread(self.fleet.read_all)
        return summarise(gateways, counters, request.model)


def method_roles(api: str, ops: str) -> dict[str, str]:
    """The key each Gateway method needs (full method paths, as interceptors see them)."""
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    needs = {"Generate": api, "GenerateStream": api, "ListModels": api, "GetTelemetry": ops}
    return {f"/{service}/{name}": role for name, role in needs.items()}


def _trailers(request: generation_pb2.GenerateRequest, exc: UpstreamError) -> tuple:
    return (("x-request-id", request.request_id), *exc.trailers)
