"""What every generation request goes through before routing, whichever front end (the gRPC
API or the HTTP API) received it: the gateway's input checks (a refusal is counted in the
telemetry), the request id its log lines carry, the sampling seed, and the prompt sampler."""

from __future__ import annotations

import secrets

from ffnskip.errors import FfnSkipError
from ffnskip.logs import bind_request_id, new_request_id, request_id_var
from ffnskip.v1 import generation_pb2
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import code_of
from services.gateway.telemetry import NO_DECODER, NO_MODEL, Telemetry
from services.gateway.validation import validate


def admit(request: generation_pb2.GenerateRequest, telemetry: Telemetry, sampler: PromptSampler,
          max_new_tokens: int) -> generation_pb2.GenerateRequest:
    """`request`, checked and labelled, ready for Proxy.stream; raises the taxonomy error of a bad field."""
    try:
        validate(request, max_new_tokens)
    except FfnSkipError as exc:
        telemetry.error(NO_MODEL, NO_DECODER, code_of(exc).name)
        raise
    if request.request_id:  # the caller's id: this request's remaining log lines carry it too
        bind_request_id(request.request_id)
    else:
        request.request_id = request_id_var.get() or new_request_id()  # the id the logs carry
    if not request.sampling.HasField("seed"):
        # pinned here, not drawn by each decoder: every attempt of the request (a resume on
        # another pod above all) samples with the same seed, so a resumed answer is the one
        # the first pod would have given; the summary reports it
        request.sampling.seed = secrets.randbits(63)
    sampler.offer(request)
    return request
