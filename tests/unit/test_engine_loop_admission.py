"""The decoder's admission: a burst that arrives before the engine thread admits anything gets
every free row, and only what is left over counts against the queue."""

from __future__ import annotations

import asyncio

import pytest

from ffnskip.config import DENSE, SamplingParams
from ffnskip.engine import Engine
from ffnskip.errors import ResourceExhausted
from services.decoder.engine_loop import EngineLoop, Submission


def submission(request_id: str, loop: asyncio.AbstractEventLoop) -> Submission:
    return Submission(request_id=request_id, prompt="hello", messages=None, sampling=SamplingParams(max_new_tokens=2),
                      skip=DENSE, profile_version=0, deadline=None, loop=loop)


def test_a_burst_fills_the_free_rows_and_then_the_queue(tiny_loaded):
    engine_loop = EngineLoop(Engine(tiny_loaded, max_batch=2, max_seq_len=64), max_queue=1)  # never started
    loop = asyncio.new_event_loop()
    try:
        for index in range(3):  # two rows, one queue slot
            engine_loop.submit(submission(f"r{index}", loop))
        assert engine_loop.waiting == 3
        with pytest.raises(ResourceExhausted, match="queue is full"):
            engine_loop.submit(submission("r3", loop))
    finally:
        loop.close()
