"""The one table from the error taxonomy (ffnskip.errors) to gRPC status codes, and the
server interceptor that applies it to every handler.

A taxonomy error becomes its code with its own message (the message is written for the
user and names the field). Anything else is a bug: the client gets INTERNAL with a
generic message and the request id, the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ffnskip import errors
from ffnskip.logs import bind_request_id, bound_request_id, get_logger, request_id_from_metadata, request_id_var

log = get_logger(__name__)

STATUS_TABLE: dict[type[errors.FfnSkipError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    # The base class: a deliberate, user-facing message that fits no finer code.
    errors.FfnSkipError: grpc.StatusCode.UNKNOWN,
}
# The one mapping from a gRPC status to an HTTP status, for the gateway's HTTP API: an error
# reaches an HTTP client through STATUS_TABLE and then this table, never by a second route.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's code; nobody reads it)
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
RETRY_AFTER_HEADER = "retry-after"  # whole seconds, as in HTTP
_QUIET_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes: log at debug


@dataclass(frozen=True)
class RpcStatus:
    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()


def status_code_of(exc: BaseException) -> grpc.StatusCode:
    """The code an exception stands for: its taxonomy's, CANCELLED for a caller that went
    away, INTERNAL for anything else (a bug)."""
    if isinstance(exc, errors.FfnSkipError):
        return next(STATUS_TABLE[cls] for cls in type(exc).__mro__ if cls in STATUS_TABLE)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ConnectionError)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException) -> RpcStatus:
    """The status a handler's exception is answered with (logging the unexpected ones)."""
    if isinstance(exc, errors.FfnSkipError):
        code = status_code_of(exc)
        metadata: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, errors.ResourceExhausted):
            metadata = ((RETRY_AFTER_HEADER, str(max(1, math.ceil(exc.retry_after_s)))),)
        return RpcStatus(code, exc.message, metadata)
    request_id = request_id_var.get() or "-"
    log.error("unhandled exception in handler", exc_info=exc)
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Per RPC: bind a request id (from x-request-id or new), map exceptions through
    STATUS_TABLE, and log one access line with the outcome and duration."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        request_id = request_id_from_metadata(details.invocation_metadata)
        method = details.method
        wrap = _Wrapper(method, request_id)
        for kind, factory in _FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            wrapped = wrap.stream(behavior) if inspect.isasyncgenfunction(behavior) else wrap.unary(behavior)
            if wrapped is None:
                return handler  # a synchronous behavior: leave it as it is
            return factory(wrapped, request_deserializer=_tolerant(handler.request_deserializer),
                           response_serializer=handler.response_serializer)
        return handler


@dataclass(frozen=True)
class MalformedRequest:
    """What a request that could not be parsed becomes, so that the handler refuses it with
    INVALID_ARGUMENT (gRPC itself would answer UNKNOWN and log the parse error as a failure)."""

    problem: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:  # bad UTF-8 in a string field, a truncated or garbled message
            return MalformedRequest(str(exc).rpartition(": ")[2] or "not a valid message")

    return parse


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise errors.InvalidArgument("request", f"could not be parsed ({request.problem})")


_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class _Wrapper:
    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id

    def unary(self, behavior: Callable[..., Any]) -> Callable[..., Any] | None:
        """Coroutine handlers: unary responses, and streams written with context.write."""
        if not inspect.iscoroutinefunction(behavior):
            return None

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with bound_request_id(self.request_id):
                started = time.perf_counter()
                context.set_trailing_metadata((("x-request-id", self.request_id),))
                try:
                    _refuse_malformed(request)
                    response = await behavior(request, context)
                except Exception as exc:  # CancelledError is a BaseException and passes through
                    await self._abort(context, exc, started)
                self._access(context, started, None)
                return response

        return handle

    def stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """Streaming handlers. The request id is bound for the RPC's own task and never
        reset: when a client goes away, gRPC finalises this generator from another task,
        where resetting a binding made here would raise."""

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            bind_request_id(self.request_id)
            started = time.perf_counter()
            context.set_trailing_metadata((("x-request-id", self.request_id),))
            try:
                _refuse_malformed(request)
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                await self._abort(context, exc, started)
            self._access(context, started, None)

        return handle

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, started: float) -> None:
        if isinstance(exc, grpc.aio.AbortError):  # the handler aborted itself: already a status
            self._access(context, started, None)
            raise exc
        status = status_for(exc)
        self._access(context, started, status)
        metadata = (("x-request-id", self.request_id), *status.trailing_metadata)
        await context.abort(status.code, status.message, trailing_metadata=metadata)

    def _access(self, context: grpc.aio.ServicerContext, started: float, status: RpcStatus | None) -> None:
        code = status.code if status else (_context_code(context) or grpc.StatusCode.OK)
        fields = {"method": self.method, "code": code.name, "duration_ms": round((time.perf_counter() - started) * 1000, 2)}
        if status is not None and code != grpc.StatusCode.INTERNAL:
            fields["message"] = status.message
        quiet = self.method.startswith(_QUIET_SERVICES) and code == grpc.StatusCode.OK
        (log.debug if quiet else log.info)("rpc", **fields)


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # not available on every grpc version / context kind
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)
