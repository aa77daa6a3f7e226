"""Forwarding a generation to a decoder pod, with failover.

One request = at most `max_attempts` attempts, each on a different pod chosen by the
routing policy, each with its own deadline inside the client's. Before any token was
passed on, an attempt is retried elsewhere when its pod
- fails with UNAVAILABLE, or sends nothing within the first-token timeout (the pod is
  quarantined for a few seconds, so the next requests avoid it without each paying a
  failed attempt), or
- is full (RESOURCE_EXHAUSTED): another pod may have room; only when every pod tried is
  full does the client see RESOURCE_EXHAUSTED, with the shortest retry-after.
Any other failure, or any failure after the first token (a pod silent for longer than
the stall timeout included), ends the call with an explicit status: a client never sees
duplicated tokens or a truncated success.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import AsyncGenerator, Awaitable, Callable, Iterator, Optional

import grpc

from ffnskip import errors
from ffnskip.logs import get_logger
from ffnskip.rpc.channels import message_limits
from ffnskip.rpc.status import RETRY_AFTER_HEADER, STATUS_TABLE
from ffnskip.v1 import decoder_pb2_grpc, generation_pb2
from services.gateway.discovery import Discovery
from services.gateway.routing import Endpoint, pick
from services.gateway.telemetry import NO_DECODER, NO_MODEL, Telemetry

log = get_logger("ffnskip.gateway.proxy")


class UpstreamError(Exception):
    """A decoder's error status, passed on to the client as it is (code, message, trailers)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


@dataclass(frozen=True)
class Retry:
    """An attempt that failed before any token was passed on, in a way another pod may not."""

    code: grpc.StatusCode
    details: str
    retry_after_s: int = 0  # RESOURCE_EXHAUSTED: the pod's own hint

    @property
    def pod_suspect(self) -> bool:
        return self.code != grpc.StatusCode.RESOURCE_EXHAUSTED  # a full pod is healthy


@dataclass(frozen=True)
class Timeouts:
    """How long the gateway waits on a pod: per attempt, for the first message, between messages."""

    attempt_s: float = 600.0
    first_token_s: float = 30.0
    stall_s: float = 10.0


def code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, UpstreamError):
        return exc.code
    if isinstance(exc, errors.FfnSkipError):
        return next(STATUS_TABLE[c] for c in type(exc).__mro__ if c in STATUS_TABLE)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ConnectionError)):  # the client went away
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class ChannelPool:
    """One long-lived channel per decoder address, with keepalive (a silently dead pod
    is detected mid-stream) and explicit message-size limits."""

    def __init__(self, max_message_bytes: int, keepalive_s: float) -> None:
        self._options = [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),  # ping only while calls run: idle pods are not pestered
            ("grpc.http2.max_pings_without_data", 0),
            *message_limits(max_message_bytes),
            ("grpc.enable_retries", 0),  # retries are ours, with the first-token rule
            ("grpc.initial_reconnect_backoff_ms", 200),  # a restarted pod is found again quickly
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._busy: dict[str, int] = {}  # calls running per address

    @contextlib.contextmanager
    def stub(self, address: str) -> Iterator[decoder_pb2_grpc.DecoderStub]:
        """A stub on the address's channel, marked busy while the block runs."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        self._busy[address] = self._busy.get(address, 0) + 1
        try:
            yield decoder_pb2_grpc.DecoderStub(channel)
        finally:
            self._busy[address] -= 1
            if not self._busy[address]:
                del self._busy[address]

    async def retain(self, addresses: set[str]) -> None:
        """Close the channels of pods that left the registry (not while calls run on them:
        a registry hiccup must not cut streams that are fine)."""
        for address in [a for a in self._channels if a not in addresses and a not in self._busy]:
            await self._channels.pop(address).close(grace=None)

    async def close(self) -> None:
        await self.retain(set())


class Router:
    """The routing policy plus the state it needs: in-flight counts and quarantine."""

    def __init__(self, discovery: Discovery, quarantine_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.discovery = discovery
        self.in_flight: dict[str, int] = {}
        self._quarantine_s = quarantine_s
        self._quarantined: dict[str, float] = {}
        self._clock = clock
        self._rotation = itertools.count()

    def live(self, model: Optional[str] = None) -> list[Endpoint]:
        now = self._clock()
        return [e for e in self.discovery.endpoints() if e.live(now) and (model is None or e.model_id == model)]

    def serves(self, model: str) -> bool:
        return bool(self.live(model))

    def choose(self, model: str, tried: set[str]) -> Endpoint:
        now = self._clock()
        endpoints = self.discovery.endpoints()
        if not self.serves(model):
            served = sorted({e.model_id for e in self.live()})
            if not served or not self.discovery.current():  # it cannot know: clients should retry
                raise errors.Unavailable(f"no decoder of model {model!r} is known right now "
                                         f"({'decoder registry unreachable' if not self.discovery.current() else 'none registered'}); retry")
            raise errors.NotFound(f"model: no decoder serves {model!r}; served now: {', '.join(served)}")
        suspect = {d for d, until in self._quarantined.items() if until > now}
        rotation = next(self._rotation)
        chosen = pick(endpoints, self.in_flight, model, now, tried | suspect, rotation)
        if chosen is None and suspect - tried:  # a suspect pod is better than none
            chosen = pick(endpoints, self.in_flight, model, now, tried, rotation)
        if chosen is None:
            raise errors.Unavailable(f"no healthy decoder for model {model!r} right now (tried {len(tried)}); retry")
        return chosen

    def quarantine(self, decoder_id: str) -> None:
        self._quarantined[decoder_id] = self._clock() + self._quarantine_s

    def acquire(self, decoder_id: str) -> None:
        self.in_flight[decoder_id] = self.in_flight.get(decoder_id, 0) + 1

    def release(self, decoder_id: str) -> None:
        left = self.in_flight.get(decoder_id, 0) - 1
        if left > 0:
            self.in_flight[decoder_id] = left
        else:
            self.in_flight.pop(decoder_id, None)


Commit = Callable[[str], Awaitable[None]]


class Proxy:
    def __init__(self, router: Router, pool: ChannelPool, telemetry: Telemetry, max_attempts: int,
                 timeouts: Timeouts = Timeouts(), clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.pool = pool
        self.telemetry = telemetry
        self.max_attempts = max_attempts
        self.timeouts = timeouts
        self._clock = clock

    async def stream(
        self, request: generation_pb2.GenerateRequest, time_remaining: Callable[[], Optional[float]],
        on_commit: Optional[Commit] = None,
    ) -> AsyncGenerator[generation_pb2.GenerateStreamResponse, None]:
        """The decoder's messages for `request`: tokens, then the summary (whose served_by
        names the pod). `on_commit(decoder_id)` runs before the first message is passed on."""
        started = self._clock()
        model = request.model
        label_model = model if self.router.serves(model) else NO_MODEL  # no unbounded labels from client input
        decoder = NO_DECODER
        tried: set[str] = set()
        failures: list[Retry] = []
        try:
            for attempt in range(1, self.max_attempts + 1):
                endpoint = self._choose(model, tried, failures)
                decoder = endpoint.decoder_id
                tried.add(decoder)
                retry: Optional[Retry] = None
                attempt_messages = self._attempt(request, endpoint, started, time_remaining, on_commit)
                async with contextlib.aclosing(attempt_messages):  # its cleanup runs now, not at GC
                    async for message in attempt_messages:
                        if isinstance(message, Retry):
                            retry = message  # the attempt's last item: it has cleaned up after it
                        else:
                            yield message
                if retry is None:
                    return
                failures.append(retry)
                if retry.pod_suspect:
                    self.router.quarantine(decoder)
                if attempt == self.max_attempts:
                    raise _gave_up(model, failures, decoder)
                self.telemetry.failover(model, decoder)
                log.warning("decoder failed before the first token; trying another", decoder=decoder,
                            attempt=attempt, code=retry.code.name, error=retry.details)
                decoder = NO_DECODER
        except BaseException as exc:
            self.telemetry.error(label_model, decoder, code_of(exc).name)
            raise

    def _choose(self, model: str, tried: set[str], failures: list[Retry]) -> Endpoint:
        try:
            return self.router.choose(model, tried)
        except errors.Unavailable:
            if failures:
                raise _gave_up(model, failures, None) from None
            raise

    async def _attempt(self, request, endpoint: Endpoint, started: float,
                       time_remaining: Callable[[], Optional[float]], on_commit: Optional[Commit]):
        """Yields the decoder's messages; yields a Retry as its last item when the attempt
        failed before any message was passed on in a way another pod may not; raises otherwise."""
        decoder, model = endpoint.decoder_id, request.model
        remaining = time_remaining()
        timeout = self.timeouts.attempt_s if remaining is None else min(self.timeouts.attempt_s, remaining)
        if timeout <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before a decoder could take it")
        passed = 0  # messages passed on to the client
        with self.pool.stub(endpoint.address) as stub:
            call = stub.GenerateStream(request, timeout=timeout, metadata=(("x-request-id", request.request_id),))
            self.router.acquire(decoder)
            self.telemetry.started(model, decoder)
            last = started
            try:
                while True:
                    silence_s = self.timeouts.first_token_s if passed == 0 else self.timeouts.stall_s
                    try:
                        message = await asyncio.wait_for(call.read(), silence_s)
                    except asyncio.TimeoutError:
                        if passed == 0:  # stream() quarantines the pod and tries another
                            yield Retry(grpc.StatusCode.UNAVAILABLE, f"no first token within {silence_s:g} s")
                            return
                        self.router.quarantine(decoder)
                        raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                            f"decoder {decoder} stalled: no token for {silence_s:g} s after {passed} "
                                            f"tokens, the response is incomplete; retry") from None
                    if message is grpc.aio.EOF:
                        break
                    now = self._clock()
                    if passed == 0 and on_commit is not None:
                        await on_commit(decoder)
                    if message.HasField("summary"):
                        self._record_success(model, decoder, message.summary, now - started)
                    elif passed == 0:
                        self.telemetry.first_token(model, decoder, now - started)
                    else:
                        self.telemetry.next_token(model, decoder, now - last)
                    passed, last = passed + 1, now
                    yield message
                    if message.HasField("summary"):
                        return
                raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                    f"decoder {decoder} ended the stream without a summary after {passed} messages; retry")
            except grpc.aio.AioRpcError as err:
                if passed == 0 and err.code() in _RETRYABLE:
                    yield Retry(err.code(), err.details() or err.code().name, _retry_after(err))
                    return
                raise _upstream(err, decoder, passed) from None
            finally:
                call.cancel()  # a no-op when finished; stops the pod's work when the client went away
                self.router.release(decoder)
                self.telemetry.ended(model, decoder)

    def _record_success(self, model: str, decoder: str, summary: generation_pb2.GenerateResponse, e2e_s: float) -> None:
        stats = summary.skip_stats
        self.telemetry.success(
            model, decoder, summary.finish_reason or "unknown", e2e_s, stats.generated_tokens,
            stats.ffn_blocks_total, stats.ffn_blocks_skipped, list(stats.per_layer_skips),
            stats.skip_ratio, stats.decode_skip_ratio)


_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _retry_after(err: grpc.aio.AioRpcError) -> int:
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_HEADER and str(value).isdigit():
            return int(value)
    return 1


def _gave_up(model: str, failures: list[Retry], decoder: Optional[str]) -> Exception:
    """The status after every attempt failed before its first token: RESOURCE_EXHAUSTED
    (with the shortest retry-after) when every pod tried was full, else UNAVAILABLE."""
    if all(f.code == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures):
        after = min(f.retry_after_s for f in failures)
        return UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"every decoder of model {model!r} tried ({len(failures)}) is full; retry after {after} s",
                             ((RETRY_AFTER_HEADER, str(after)),))
    last = f"last, {decoder}: {failures[-1].details}" if decoder else f"last: {failures[-1].details}"
    return errors.Unavailable(f"no decoder of model {model!r} answered in {len(failures)} attempts ({last}); retry")


def _upstream(err: grpc.aio.AioRpcError, decoder: str, tokens: int) -> UpstreamError:
    trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER_HEADER)
    details = err.details() or err.code().name
    if tokens:
        details = f"decoder {decoder} failed after {tokens} tokens, the response is incomplete: {details}"
    return UpstreamError(err.code(), details, trailers)
