"""The gateway's OpenAI-compatible HTTP API (aiohttp, in the gateway's own event loop):
POST /v1/chat/completions and /v1/completions (whole or as server-sent events), GET
/v1/models and GET /health.

A generation takes the gRPC API's path, not a copy of it: the body becomes a
GenerateRequest, which goes through the same admission (admission.admit: validation,
request id, prompt sampling), the same key check (auth.authorize) and Proxy.stream
(routing, failover, telemetry). An error becomes its gRPC status through the one status
table and then its HTTP status through ffnskip.rpc.status.HTTP_STATUS. A client that
disconnects cancels its handler's task, and with it the upstream call, as a gRPC cancel does.

A slow client holds nothing for long: a connection idle (or with its headers unfinished) for the
keep-alive timeout is closed, and a body not received whole within the body timeout is a 408.
With the gateway's TLS settings the port serves HTTPS (main.http_ssl_context).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from ffnskip.errors import FfnSkipError, InvalidArgument, NotFound
from ffnskip.logs import bind_request_id, get_logger, request_id_from_metadata
from ffnskip.rpc.status import HTTP_STATUS, RETRY_AFTER_HEADER, status_for
from ffnskip.v1 import generation_pb2
from services.gateway.admission import admit
from services.gateway.auth import API, KeyRing, authorize
from services.gateway.openai_fields import CHAT, COMPLETION
from services.gateway.openai_mapping import ParsedRequest, client_error, error_body, error_type, parse
from services.gateway.openai_responses import chunk, whole_response
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy, UpstreamError
from services.gateway.servicer import SERVED_BY_HEADER
from services.gateway.telemetry import NO_DECODER, NO_MODEL

log = get_logger(__name__)
TIMEOUT_HEADER = "x-ffnskip-timeout"  # the call's deadline in seconds (gRPC clients set a deadline instead)
MAX_TIMEOUT_S = 86_400.0
CLIENT_GONE = "client_gone"  # request key: the client disconnected mid-stream
LINGER_S = 10.0  # aiohttp's default lingering_time, capped by the body timeout
_MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)()  # the interpreter's limit (3.10.7+)
_ERROR_CODES = {grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key", grpc.StatusCode.NOT_FOUND: "model_not_found"}


class OpenAIApi:
    """The HTTP front end of one gateway process."""

    def __init__(self, proxy: Proxy, sampler: PromptSampler, max_new_tokens: int, keys: KeyRing | None,
                 max_body_bytes: int, drain_timeout_s: float, *, keepalive_s: float, body_timeout_s: float) -> None:
        self.proxy = proxy
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.keys = keys  # None: authentication is off
        self.max_body_bytes = max_body_bytes
        self.drain_timeout_s = drain_timeout_s
        self.keepalive_s = keepalive_s  # idle between requests, or the request line and headers unfinished
        self.body_timeout_s = body_timeout_s  # the whole body, from the end of the headers
        self.ready = False  # /health: true between start and the drain
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve on host:port (0 = any free port), over TLS with `ssl_context`; returns the bound port."""
        # handler_cancellation: a client that goes away cancels its handler (and so its decode).
        # keepalive_timeout: aiohttp's timer runs from the connection's start and from each response
        # and is not reset by bytes that do not complete a request, so it also bounds the request line
        # and headers (aiohttp has no header timeout of its own; max_line_size / max_field_size keep
        # their 8 KiB defaults). lingering_time: a body left unread (refused before reading it, or a
        # 408) is drained at most this long before the connection closes.
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.drain_timeout_s, keepalive_timeout=self.keepalive_s,
                                     lingering_time=min(LINGER_S, self.body_timeout_s))
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        self.ready = True
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; requests in flight get the drain timeout to finish."""
        self.ready = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes ---------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.ready else "draining"}, status=200 if self.ready else 503)

    async def _models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        served = sorted({e.model_id for e in self.proxy.router.live() if not e.draining})
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "ffnskip"} for model in served]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        self._authorize(request)
        created = int(time.time())
        try:
            time_remaining = _time_remaining(request)
            parsed = parse(await self._body(request), kind, self.max_new_tokens)
        except FfnSkipError as exc:  # counted as admit() counts its refusals
            self.proxy.telemetry.error(NO_MODEL, NO_DECODER, status_for(exc).code.name)
            raise
        request["parsed"] = parsed  # errors from here on rename proto fields to the client's
        parsed.request.request_id = request["request_id"]
        admit(parsed.request, self.proxy.telemetry, self.sampler, self.max_new_tokens)
        if parsed.stream:
            return await self._stream(request, parsed, created, time_remaining)
        summary: generation_pb2.GenerateResponse | None = None
        async with contextlib.aclosing(self.proxy.stream(parsed.request, time_remaining)) as messages:
            async for message in messages:
                if message.HasField("summary"):
                    summary = message.summary
        assert summary is not None  # Proxy.stream ends with a summary or raises
        return web.json_response(whole_response(parsed, summary, created),
                                 headers={SERVED_BY_HEADER: summary.served_by})

    async def _stream(self, request: web.Request, parsed: ParsedRequest, created: int,
                      time_remaining: Callable[[], float | None]) -> web.StreamResponse:
        """Server-sent events. Until the first token the response is not started, so an error
        is still a plain error response; after it, an error is an `error` event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        async def commit(decoder_id: str) -> None:  # names the pod before the first token goes out
            response.headers[SERVED_BY_HEADER] = decoder_id
            response.headers["x-request-id"] = parsed.request.request_id
            await response.prepare(request)
            if parsed.kind == CHAT:
                await _send(response, chunk(parsed, created, role=True))

        streamed = ""
        try:
            async with contextlib.aclosing(self.proxy.stream(parsed.request, time_remaining, commit)) as messages:
                async for message in messages:
                    if message.HasField("token"):
                        token = message.token
                        if token.HasField("logprob"):  # a chunk per token, its text possibly empty
                            await _send(response, chunk(parsed, created, text=token.text, logprob=token.logprob,
                                                        text_offset=len(streamed)))
                        elif token.text:
                            await _send(response, chunk(parsed, created, text=token.text))
                        streamed += token.text
                        continue
                    summary = message.summary
                    if summary.text.startswith(streamed) and len(summary.text) > len(streamed):
                        await _send(response, chunk(parsed, created, text=summary.text[len(streamed):]))  # a held-back tail
                    await _send(response, chunk(parsed, created, summary=summary))
                    if parsed.include_usage:
                        await _send(response, chunk(parsed, created, summary=summary, with_usage=True))
        except ConnectionError:  # the client went away (aclosing has cancelled the decode): nobody to tell
            request[CLIENT_GONE] = True
            return response
        except Exception as exc:
            if not response.prepared:
                raise
            status, body, _ = self._error(request, exc)
            log.warning("http stream ended with an error", status=status, message=body["error"]["message"])
            await _send(response, body)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- helpers --------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if self.keys is None:
            return
        try:
            authorize(self.keys, request.headers.items(), API)
        except FfnSkipError as exc:
            self.proxy.telemetry.error(NO_MODEL, NO_DECODER, status_for(exc).code.name)
            raise

    async def _body(self, request: web.Request) -> object:
        try:  # over client_max_size: aiohttp's 413; both answered by _errors
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:  # a client trickling or stalling its body must not hold a handler
            raise web.HTTPRequestTimeout() from None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidArgument("body", f"not valid JSON ({type(exc).__name__})") from None
        except ValueError:  # int() of a literal over sys.get_int_max_str_digits(): the input is not echoed
            raise InvalidArgument("body", f"not valid JSON (a number of more than {_MAX_DIGITS} digits)") from None

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Per request: a request id (x-request-id or new) bound for its log lines, every error
        answered as an OpenAI error body, and one access line (no user data)."""
        request["request_id"] = request_id_from_metadata(request.headers.items())
        bind_request_id(request["request_id"])
        started = time.perf_counter()
        try:
            response = await handler(request)
            status = HTTP_STATUS[grpc.StatusCode.CANCELLED] if request.get(CLIENT_GONE) else response.status
        except asyncio.CancelledError:  # the client went away (handler_cancellation; the decode is cancelled with it)
            log.info("http", method=request.method, path=request.path, status=HTTP_STATUS[grpc.StatusCode.CANCELLED],
                     duration_ms=round((time.perf_counter() - started) * 1000, 2))
            raise
        except web.HTTPException as exc:  # aiohttp's own (unknown route, wrong method, body too large), _body's 408
            status = exc.status
            code = {408: "request_timeout", 413: "request_too_large"}.get(status)
            reason = {408: f"request body not received within {self.body_timeout_s:g} s",
                      413: f"request body larger than {self.max_body_bytes} bytes"}.get(status, exc.reason)
            param = "body" if status in (408, 413) else None
            response = web.json_response(error_body(reason, error_type(status), param, code), status=status)
            if status == 408:  # RFC 9110: a 408 closes the connection (Connection: close)
                response.force_close()
        except (FfnSkipError, UpstreamError) as exc:
            status, body, headers = self._error(request, exc)
            response = web.json_response(body, status=status, headers=headers)
        except Exception as exc:  # a bug: a generic message, the traceback to the log (status_for)
            status, body, headers = self._error(request, exc)
            response = web.json_response(body, status=status, headers=headers)
        response.headers["x-request-id"] = request["request_id"]
        log.info("http", method=request.method, path=request.path, status=status,
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))
        return response

    def _error(self, request: web.Request, exc: BaseException) -> tuple[int, dict, dict[str, str]]:
        """(HTTP status, OpenAI error body, headers) of an error, through the gRPC status table."""
        if isinstance(exc, UpstreamError):
            code, message, trailers = exc.code, exc.message, exc.trailers
        else:
            rpc = status_for(exc)
            code, message, trailers = rpc.code, rpc.message, rpc.trailing_metadata
        param, message = client_error(message, request.get("parsed"))
        if isinstance(exc, InvalidArgument) and param is None:
            param = exc.field
        if isinstance(exc, NotFound) and param is None:
            param = "model"
        status = HTTP_STATUS.get(code, 500)
        retry_after = [str(v) for k, v in trailers if k == RETRY_AFTER_HEADER]
        headers = {"Retry-After": retry_after[-1]} if retry_after else {}
        return status, error_body(message, error_type(status), param, _ERROR_CODES.get(code, code.name.lower())), headers


def _time_remaining(request: web.Request) -> Callable[[], float | None]:
    """The call's remaining time from the optional timeout header (None: no deadline of its
    own, as a gRPC call without one; each attempt still has the gateway's attempt timeout)."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return lambda: None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= MAX_TIMEOUT_S):
        raise InvalidArgument(TIMEOUT_HEADER, f"must be seconds in (0, {MAX_TIMEOUT_S:g}], got {value[:32]!r}")
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


async def _send(response: web.StreamResponse, event: dict) -> None:
    await response.write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
