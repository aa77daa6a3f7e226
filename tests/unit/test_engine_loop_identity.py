"""The decoder's engine loop keys requests by their own sequence, never by the caller's
request id: concurrent callers sharing one id each get exactly their own tokens, a
cancel stops only the caller's sequence, and a stuck engine thread fails liveness."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ffnskip.config import DENSE, SamplingParams
from ffnskip.engine import Engine, GenerationResult, TokenEvent
from ffnskip.errors import FfnSkipError
from ffnskip.rpc.server import Server
from services.decoder.engine_loop import EngineLoop, Submission
from services.decoder.main import watch_engine

pytestmark = pytest.mark.timeout(120)
PROMPTS = ["one", "two two", "three three three", "four four four four"]
SAMPLING = SamplingParams(max_new_tokens=12, ignore_eos=True)


def submission(prompt: str, loop: asyncio.AbstractEventLoop, request_id: str = "same") -> Submission:
    return Submission(request_id=request_id, prompt=prompt, messages=None, sampling=SAMPLING, skip=DENSE,
                      profile_version=0, deadline=None, loop=loop)


async def collect(item_source: Submission) -> tuple[list[int], GenerationResult]:
    tokens: list[int] = []
    while True:
        item = await item_source.items.get()
        if isinstance(item, FfnSkipError):
            raise item
        if isinstance(item, GenerationResult):
            return tokens, item
        assert isinstance(item, TokenEvent)
        tokens.append(item.token_id)


def test_callers_sharing_a_request_id_get_their_own_tokens(tiny_loaded):
    alone = {p: Engine(tiny_loaded, max_batch=1, max_seq_len=64).generate([p], SAMPLING)[0].token_ids for p in PROMPTS}
    assert len({tuple(t) for t in alone.values()}) == len(PROMPTS)  # the prompts are told apart by their tokens
    engine_loop = EngineLoop(Engine(tiny_loaded, max_batch=4, max_seq_len=64), max_queue=8)
    engine_loop.start()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        subs = [submission(p, loop) for p in PROMPTS]
        for sub in subs:
            engine_loop.submit(sub)
        results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in subs)), 60)
        for prompt, (tokens, result) in zip(PROMPTS, results):
            assert tokens == alone[prompt] == result.token_ids
            assert result.request_id == "same"

        # a cancel follows the caller's submission: the other sequences with the same label run on
        victim, *others = [submission(p, loop) for p in PROMPTS]
        for sub in (victim, *others):
            engine_loop.submit(sub)
        engine_loop.cancel(victim)
        victim_tokens, victim_result = await asyncio.wait_for(collect(victim), 60)
        assert victim_result.finish_reason == "cancelled" and len(victim_tokens) < SAMPLING.max_new_tokens
        for prompt, sub in zip(PROMPTS[1:], others):
            tokens, result = await asyncio.wait_for(collect(sub), 60)
            assert result.finish_reason == "length" and tokens == alone[prompt]

    try:
        asyncio.run(scenario())
    finally:
        engine_loop.stop()


def test_a_stuck_engine_thread_fails_liveness(tiny_loaded):
    """A step that never returns cannot be produced on demand with a real model: the
    engine's step is replaced by one that blocks until released."""
    engine = Engine(tiny_loaded, max_batch=1, max_seq_len=64)
    release = threading.Event()
    engine.step = lambda: release.wait() and []  # type: ignore[method-assign]
    engine_loop = EngineLoop(engine, max_queue=8)
    engine_loop.start()

    async def scenario() -> None:
        server = Server(["test.Nothing"])
        port = await server.start("127.0.0.1:0")
        await server.set_ready(True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                liveness = health.Watch(health_pb2.HealthCheckRequest(service="liveness"))
                assert (await liveness.read()).status == health_pb2.HealthCheckResponse.SERVING
                assert engine_loop.stalled_s() == 0.0  # idle is not stuck
                watchdog = asyncio.create_task(watch_engine(server, engine_loop, stuck_after_s=0.4))
                engine_loop.submit(submission("one", asyncio.get_running_loop()))
                status = await asyncio.wait_for(liveness.read(), 20)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert engine_loop.stalled_s() > 0.4
                await asyncio.wait_for(watchdog, 5)
        finally:
            release.set()
            await server.grpc.stop(None)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        engine_loop.stop()
