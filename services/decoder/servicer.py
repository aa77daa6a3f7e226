"""gRPC edge of the decoder: thin conversions around DecoderService."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

import grpc

from ffnskip.logs import new_request_id, request_id_var
from ffnskip.rpc.convert import skip_params_to_proto
from ffnskip.v1 import decoder_pb2, decoder_pb2_grpc
from ffnskip.v1 import generation_pb2 as pb
from services.decoder.service import DecoderService


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, service: DecoderService, info: dict) -> None:
        self.service = service
        self.info = info  # static facts: fingerprint, device, dtype, num_layers

    def _submission(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or request_id_var.get() or new_request_id()
        return self.service.submission(request, request_id, context.time_remaining(), asyncio.get_running_loop())

    async def Generate(self, request, context):
        submission = self._submission(request, context)
        async for item in self.service.run(submission):
            if isinstance(item, pb.GenerateResponse):
                return item
        raise AssertionError("engine ended a request without a result")  # pragma: no cover

    async def GenerateStream(self, request, context):
        submission = self._submission(request, context)
        async for item in self.service.run(submission):
            if isinstance(item, pb.GenerateResponse):
                yield pb.GenerateStreamResponse(summary=item)
            else:
                yield self.service.chunk(submission, item)

    async def Info(self, request, context):
        settings, loop = self.service.settings, self.service.loop
        active = self.service.profiles.current
        params = asdict(active.params)  # default_skip_json, deprecated: for readers older than default_skip
        params["static_layers"] = list(params["static_layers"])
        return decoder_pb2.InfoResponse(
            decoder_id=settings.decoder_id, model_id=settings.model_name, fingerprint=self.info["fingerprint"],
            profile_version=active.version, device=self.info["device"], dtype=self.info["dtype"],
            max_batch=settings.max_batch, max_queue=settings.max_queue, running=loop.running, waiting=loop.waiting,
            num_layers=self.info["num_layers"], draining=loop.draining, default_skip_json=json.dumps(params),
            default_skip=skip_params_to_proto(active.params),
        )
