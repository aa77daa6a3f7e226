"""Logs carry no user data: tracebacks without frame locals, and a stream closed by its
client finalises its handler without a context-variable error (whose traceback used to
carry the request, prompt included)."""

from __future__ import annotations

import asyncio
import gc
import io
import logging

import grpc
import pytest
import structlog

from ffnskip.logs import configure_logging, fingerprint, get_logger
from ffnskip.rpc.server import Server

pytestmark = pytest.mark.timeout(60)
PROMPT = "my secret prompt about the merger"


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    configure_logging("debug", stream=stream, cache_loggers=False)
    yield stream
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()  # later tests capture logs with structlog's own testing tools


def test_tracebacks_carry_no_frame_locals(log_stream) -> None:
    def handle(prompt: str) -> None:
        raise RuntimeError("boom")

    try:
        handle(PROMPT)
    except RuntimeError:
        get_logger("test").exception("handler failed")
    logged = log_stream.getvalue()
    assert "boom" in logged and "handle" in logged  # the traceback is there
    assert PROMPT not in logged


def test_fingerprint_gives_size_and_hash_only() -> None:
    described = fingerprint(PROMPT)
    assert described.startswith(f"{len(PROMPT)} chars") and "secret" not in described
    assert fingerprint(PROMPT) == described != fingerprint(PROMPT + "!")


def test_a_stream_closed_by_its_client_finalises_cleanly(log_stream) -> None:
    """The client cancels after the first message; the server finalises the handler in
    another task. Nothing may reach the loop's exception handler or the log as an error."""

    async def scenario() -> list[dict]:
        problems: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
        closed = asyncio.Event()

        async def ticks(request: bytes, context):
            prompt = request.decode()  # noqa: F841 - a local a traceback would show
            try:
                while True:
                    yield b"tick"
                    await asyncio.sleep(0)
            finally:
                closed.set()

        server = Server(["test.Ticks"])
        handlers = {"Ticks": grpc.unary_stream_rpc_method_handler(ticks)}
        server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Ticks", handlers),))
        port = await server.start("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(3):
                    call = channel.unary_stream("/test.Ticks/Ticks")(PROMPT.encode(), timeout=20)
                    assert await call.read() == b"tick"
                    call.cancel()
                    await asyncio.wait_for(closed.wait(), 10)
                    closed.clear()
            gc.collect()  # finalisers of abandoned generators run now, not at some later point
        finally:
            await server.grpc.stop(grace=None)
        await asyncio.sleep(0)  # let callbacks scheduled by the collection run
        return problems

    problems = asyncio.run(scenario())
    logged = log_stream.getvalue()
    assert problems == []
    assert "different Context" not in logged and "never retrieved" not in logged
    assert PROMPT not in logged
