"""Checks on a GenerateRequest at the gateway, so bad input is refused before it costs a
decoder anything. The field rules are the decoder's own (ffnskip.rpc.generation), so the
two can never disagree on what is well-formed; the decoder then applies what needs the
model and its configured limits (context window, override limits).
Every failure is InvalidArgument naming the proto field path, e.g. "sampling.top_p".
"""

from __future__ import annotations

import re

from ffnskip.errors import InvalidArgument
from ffnskip.rpc.generation import validate_request
from ffnskip.v1 import generation_pb2

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # logged and echoed: no spaces or control characters


def validate(request: generation_pb2.GenerateRequest, max_new_tokens_cap: int) -> None:
    validate_request(request, max_new_tokens_cap)
    if request.request_id and not _REQUEST_ID.match(request.request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : / + = -")
