"""Logs carry no user data: tracebacks without frame locals, and a stream closed by its
client finalises its handler without a context-variable error (whose traceback used to
carry the request, prompt included). And every line names the module that wrote it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import structlog

from ffnskip.logs import configure_logging, fingerprint, get_logger, request_id_var
from ffnskip.rpc.server import Server

pytestmark = pytest.mark.timeout(60)
PROMPT = "my secret prompt about the merger"


@contextlib.asynccontextmanager
async def streaming_server(handler) -> AsyncIterator[grpc.aio.Channel]:
    """A real server (our Server, interceptor included) whose /test.Stream/Call is `handler`,
    and a channel to it."""
    server = Server(["test.Stream"])
    handlers = {"Call": grpc.unary_stream_rpc_method_handler(handler)}
    server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Stream", handlers),))
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.grpc.stop(grace=None)


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


def test_every_logger_is_named_after_its_module(log_stream, monkeypatch) -> None:
    import ast
    import importlib.machinery
    import json
    import sys
    import types
    from pathlib import Path

    import ffnskip

    repo = Path(ffnskip.__file__).parents[2]
    calls = {}
    for path in [*(repo / "shared" / "ffnskip").rglob("*.py"), *(repo / "services").rglob("*.py")]:
        if "v1" in path.relative_to(repo).parts or path.name == "logs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) \
                    and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "get_logger":
                calls[f"{path.relative_to(repo)}: {ast.unparse(node)}"] = ast.unparse(node) == "get_logger(__name__)"
    assert len(calls) > 10 and all(calls.values()), [call for call, ok in calls.items() if not ok]
    # a service's main module runs as __main__ (python -m services.decoder.main): its module's name all the same
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("services.decoder.main", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    get_logger("__main__").info("ready")
    get_logger(__name__).info("ready")
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["services.decoder.main", __name__]


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

        async with streaming_server(ticks) as channel:
            for _ in range(3):
                call = channel.unary_stream("/test.Stream/Call")(PROMPT.encode(), timeout=20)
                assert await call.read() == b"tick"
                call.cancel()
                await asyncio.wait_for(closed.wait(), 10)
                closed.clear()
        gc.collect()  # finalisers of abandoned generators run now, not at some later point
        await asyncio.sleep(0)  # let callbacks scheduled by the collection run
        return problems

    problems = asyncio.run(scenario())
    logged = log_stream.getvalue()
    assert problems == []
    assert "different Context" not in logged and "never retrieved" not in logged
    assert PROMPT not in logged


def test_concurrent_streams_keep_their_own_request_ids() -> None:
    """A stream's request id is bound in its RPC's own task: interleaved streams never see
    each other's id, before or after their yields."""

    async def scenario() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        both_started = asyncio.Event()

        async def labels(request: bytes, context):
            mine = seen.setdefault(request.decode(), [])
            for _ in range(3):
                mine.append(request_id_var.get() or "")
                yield b"x"
                if len(seen) == 2:
                    both_started.set()
                await asyncio.wait_for(both_started.wait(), 10)  # the two streams interleave

        async with streaming_server(labels) as channel:
            method = channel.unary_stream("/test.Stream/Call")

            async def drain(name: str) -> None:
                async for _ in method(name.encode(), metadata=(("x-request-id", f"id-{name}"),), timeout=20):
                    pass

            await asyncio.gather(drain("a"), drain("b"))
        return seen

    assert asyncio.run(scenario()) == {"a": ["id-a"] * 3, "b": ["id-b"] * 3}
