"""Optional prompt sampling into a Redis stream (off by default: a privacy choice).

With FFNSKIP_PROMPT_SAMPLE_RATE > 0, that share of requests has its prompt (or its chat
messages, as JSON) appended to the stream FFNSKIP_PROMPT_SAMPLE_STREAM, capped near
FFNSKIP_PROMPT_SAMPLE_MAXLEN entries. Entries hold the model, the input and a UTC time;
never the API key, the client address or the request id. Ops can read the stream
(XRANGE) and submit its prompts as a recalibration job's prompt set, so calibration
follows real traffic. Sampling never delays or fails a request.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import datetime, timezone

import redis
from redis.typing import EncodableT, FieldT

from ffnskip.errors import FfnSkipError
from ffnskip.logs import get_logger
from ffnskip.store.connection import redis_errors
from ffnskip.v1 import generation_pb2

log = get_logger(__name__)


def sample_fields(request: generation_pb2.GenerateRequest) -> dict[FieldT, EncodableT]:  # str -> str, typed for xadd
    if request.messages:
        kind, text = "messages", json.dumps([{"role": m.role, "content": m.content} for m in request.messages])
    else:
        kind, text = "prompt", request.prompt
    return {"model": request.model, "kind": kind, "input": text,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class PromptSampler:
    def __init__(self, redis_client: redis.Redis | None, rate: float, stream: str, maxlen: int,
                 draw: Callable[[], float] = random.random) -> None:
        self._redis = redis_client
        self.rate = rate
        self.stream = stream
        self._maxlen = maxlen
        self._draw = draw
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self._redis is not None

    def offer(self, request: generation_pb2.GenerateRequest) -> None:
        """Sample `request` with probability `rate`, in the background."""
        if not self.enabled or self._draw() >= self.rate:
            return
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, sample_fields(request)))
        self._tasks.add(task)  # keep a reference until done (the loop holds tasks only weakly)
        task.add_done_callback(self._tasks.discard)

    def _write(self, fields: dict[FieldT, EncodableT]) -> None:
        assert self._redis is not None
        try:
            with redis_errors(self._redis):
                self._redis.xadd(self.stream, fields, maxlen=self._maxlen, approximate=True)
        except FfnSkipError as exc:
            log.warning("prompt sample not stored", error=exc.message)
