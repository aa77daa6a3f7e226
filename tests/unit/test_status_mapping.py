"""The error taxonomy -> gRPC status table, through a real grpc.aio server on loopback:
every taxonomy error arrives as its code with its message; anything else arrives as
INTERNAL without its message, and the traceback goes to the log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from ffnskip import errors
from ffnskip.rpc.status import STATUS_TABLE, StatusInterceptor, status_for

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cret-connection-string"

CASES: dict[str, tuple[Callable[[], Exception], grpc.StatusCode, str]] = {
    "invalid_argument": (lambda: errors.InvalidArgument("prompts[3]", "too long"), grpc.StatusCode.INVALID_ARGUMENT,
                         "prompts[3]: too long"),
    "not_found": (lambda: errors.NotFound("model 'x' is unknown"), grpc.StatusCode.NOT_FOUND, "model 'x' is unknown"),
    "already_exists": (lambda: errors.AlreadyExists("profile v3 exists"), grpc.StatusCode.ALREADY_EXISTS, "profile v3 exists"),
    "failed_precondition": (lambda: errors.FailedPrecondition("nothing to roll back"), grpc.StatusCode.FAILED_PRECONDITION,
                            "nothing to roll back"),
    "resource_exhausted": (lambda: errors.ResourceExhausted("queue full", retry_after_s=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "queue full"),
    "unavailable": (lambda: errors.Unavailable("redis down"), grpc.StatusCode.UNAVAILABLE, "redis down"),
    "deadline_exceeded": (lambda: errors.DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED, "too slow"),
    "cancelled": (lambda: errors.Cancelled("client went away"), grpc.StatusCode.CANCELLED, "client went away"),
    "unauthenticated": (lambda: errors.Unauthenticated("no api key"), grpc.StatusCode.UNAUTHENTICATED, "no api key"),
    "permission_denied": (lambda: errors.PermissionDenied("read-only key"), grpc.StatusCode.PERMISSION_DENIED, "read-only key"),
}


def test_every_taxonomy_error_has_its_own_code() -> None:
    leaves = {cls for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.FfnSkipError) and cls is not errors.FfnSkipError}
    assert leaves <= set(STATUS_TABLE)
    assert len({STATUS_TABLE[cls] for cls in leaves}) == len(leaves)  # no two errors share a code
    assert grpc.StatusCode.INTERNAL not in STATUS_TABLE.values()
    for make, code, message in CASES.values():
        status = status_for(make())
        assert (status.code, status.message) == (code, message)


def test_subclasses_map_like_their_parent() -> None:
    class QueueFull(errors.ResourceExhausted):
        pass

    status = status_for(QueueFull("decoder queue full", retry_after_s=0.2))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(status.trailing_metadata)["retry-after"] == "1"  # whole seconds, at least 1


# --- through a real server -----------------------------------------------------------------

async def _raise(request: bytes, context: Any) -> bytes:
    name = request.decode()
    if name in CASES:
        raise CASES[name][0]()
    if name == "ok":
        return b"fine"
    raise RuntimeError(f"bug while talking to {SECRET}")


async def _stream(request: bytes, context: Any):
    yield b"first"
    await _raise(request, context)


async def _call(method: str, payload: bytes, metadata: tuple = ()) -> tuple[Any, grpc.StatusCode, str, dict]:
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_raise),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Errors", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if method == "Unary":
                call = channel.unary_unary("/test.Errors/Unary")(payload, metadata=metadata, timeout=10)
                try:
                    result = await call
                except grpc.aio.AioRpcError as err:
                    return None, err.code(), err.details(), dict(err.trailing_metadata() or ())
                return result, await call.code(), await call.details(), dict(await call.trailing_metadata() or ())
            call = channel.unary_stream("/test.Errors/Stream")(payload, metadata=metadata, timeout=10)
            items = []
            try:
                async for item in call:
                    items.append(item)
            except grpc.aio.AioRpcError as err:
                return items, err.code(), err.details(), dict(err.trailing_metadata() or ())
            return items, await call.code(), await call.details(), dict(await call.trailing_metadata() or ())
    finally:
        await server.stop(None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unary_error_arrives_as_its_status(name: str) -> None:
    _, code, message, trailing = asyncio.run(_call("Unary", name.encode()))
    assert (code, message) == CASES[name][1:]
    if name == "resource_exhausted":
        assert trailing["retry-after"] == "3"
    else:
        assert "retry-after" not in trailing


@pytest.mark.parametrize("name", ["invalid_argument", "unavailable", "not_found"])
def test_streaming_error_after_a_message_arrives_as_its_status(name: str) -> None:
    items, code, message, _ = asyncio.run(_call("Stream", name.encode()))
    assert items == [b"first"]
    assert (code, message) == CASES[name][1:]


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_unknown_exception_is_internal_without_leaking_it(method: str) -> None:
    with capture_logs() as logs:
        _, code, message, trailing = asyncio.run(_call(method, b"bug", metadata=(("x-request-id", "req-42"),)))
    assert code == grpc.StatusCode.INTERNAL
    assert SECRET not in message and "RuntimeError" not in message
    assert "req-42" in message and trailing["x-request-id"] == "req-42"  # so ops can find the log line
    logged = [entry for entry in logs if entry["event"] == "unhandled exception in handler"]
    assert len(logged) == 1 and isinstance(logged[0]["exc_info"], RuntimeError)
    assert logged[0]["log_level"] == "error"


def test_success_echoes_the_request_id_or_makes_one() -> None:
    result, code, _, trailing = asyncio.run(_call("Unary", b"ok", metadata=(("x-request-id", "abc-1"),)))
    assert (result, code, trailing["x-request-id"]) == (b"fine", grpc.StatusCode.OK, "abc-1")
    for unsafe in ("has spaces \"and quotes\"", "x" * 200):  # not echoed into logs: replaced
        _, _, _, trailing = asyncio.run(_call("Unary", b"ok", metadata=(("x-request-id", unsafe),)))
        assert trailing["x-request-id"] != unsafe and len(trailing["x-request-id"]) == 32
