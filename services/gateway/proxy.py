"""Forwarding a generation to a decoder pod, with failover and mid-stream resume.

One request = at most `max_attempts` attempts, each on a different pod chosen by the
routing policy, each with its own deadline inside the client's. An attempt is given up for
another pod when its pod
- fails with UNAVAILABLE (a crash, a dropped connection, a draining pod), sends nothing
  within the first-token timeout, or falls silent between tokens for longer than the stall
  timeout (the pod is quarantined for a few seconds, so the next requests avoid it without
  each paying a failed attempt), or
- is full (RESOURCE_EXHAUSTED): another pod may have room; only when every pod tried is
  full does the client see RESOURCE_EXHAUSTED, with the shortest retry-after.
Before any token was passed on, the next attempt sends the same request. After tokens were
passed on, with resume on, the next attempt is a resume: the same request plus `resume`
(the token ids passed on so far and the profile version of the pod that started the
stream), to a pod serving that profile version. That pod replays them and continues with
the same seed (admission pins it), so the client sees one stream, token indexes
continuing, and one summary describing the whole answer (`whole_answer`). With resume off,
or no attempt or pod left, the call ends with an explicit UNAVAILABLE "incomplete": a client
never sees duplicated tokens or a truncated success. Any other failure ends the call with
its status.

What reaches the client names no pod and no address: those go to the log lines only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from ffnskip import errors
from ffnskip.logs import get_logger
from ffnskip.rpc.status import RETRY_AFTER_HEADER, status_code_of
from ffnskip.v1 import generation_pb2
from services.gateway.channels import ChannelPool
from services.gateway.endpoints import Endpoint
from services.gateway.resume import Relayed, resume_request, whole_answer
from services.gateway.routing import Router
from services.gateway.telemetry import NO_DECODER, NO_MODEL, Telemetry

log = get_logger(__name__)


# the start of a plain prompt that names its conversation (a completion client resending a growing prompt)
AFFINITY_PROMPT_CHARS = 256

class UpstreamError(Exception):
    """A decoder's error status, passed on to the client (code, message, trailers)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


@dataclass(frozen=True)
class Retry:
    """An attempt that failed in a way another pod may not."""

    code: grpc.StatusCode
    reason: str  # the failure's kind, for the client: no pod id, no address
    details: str  # what the pod or the transport said: for the log only
    retry_after_s: int = 0  # RESOURCE_EXHAUSTED: the pod's own hint
    stalled: bool = False  # silent between tokens

    @property
    def pod_suspect(self) -> bool:
        # a full pod, or one serving another profile version, is healthy
        return self.code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class Timeouts:
    """How long the gateway waits on a pod: per attempt, for the first message, between messages."""

    attempt_s: float = 600.0
    first_token_s: float = 30.0
    stall_s: float = 10.0


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a failed call ends with, for telemetry (without logging it)."""
    return exc.code if isinstance(exc, UpstreamError) else status_code_of(exc)


Commit = Callable[[str], Awaitable[None]]


class Proxy:
    def __init__(self, router: Router, pool: ChannelPool, telemetry: Telemetry, max_attempts: int,
                 timeouts: Timeouts = Timeouts(), clock: Callable[[], float] = time.monotonic,
                 resume: bool = True, affinity: bool = True) -> None:
        self.router = router
        self.pool = pool
        self.telemetry = telemetry
        self.max_attempts = max_attempts
        self.timeouts = timeouts
        self.resume = resume  # continue a stream that failed mid-way on another pod (FFNSKIP_STREAM_RESUME)
        self.affinity = affinity  # a conversation to the pod that served it (FFNSKIP_CONVERSATION_AFFINITY)
        self._clock = clock

    async def stream(
        self, request: generation_pb2.GenerateRequest, time_remaining: Callable[[], float | None],
        on_commit: Commit | None = None,
    ) -> AsyncGenerator[generation_pb2.GenerateStreamResponse, None]:
        """The messages for `request`: tokens, then the summary (whose served_by names the
        last pod). `on_commit(decoder_id)` runs once, before the first message is passed on."""
        started = self._clock()
        model = request.model
        label_model = model if self.router.serves(model) else NO_MODEL  # no unbounded labels from client input
        decoder = NO_DECODER
        tried: set[str] = set()
        failures: list[Retry] = []
        relayed = Relayed(started=started, last_at=started)
        failed_mid_stream: str | None = None  # the pod a resume takes over from
        try:
            for attempt in range(1, self.max_attempts + 1):
                endpoint = self._choose(model, tried, failures, relayed,
                                        conversation_affinity(request) if self.affinity else None)
                decoder = endpoint.decoder_id
                tried.add(decoder)
                if not relayed.chunks:  # pinned by the pod that will pass on the first token
                    relayed.profile_version = endpoint.profile_version
                if failed_mid_stream is not None:
                    relayed.resumes += 1
                    self.telemetry.resume(model, failed_mid_stream)
                    failed_mid_stream = None
                retry: Retry | None = None
                attempt_messages = self._attempt(resume_request(request, relayed), endpoint, relayed, time_remaining,
                                                 on_commit)
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
                fields = dict(decoder=decoder, address=endpoint.address, attempt=attempt, code=retry.code.name,
                              error=retry.details)
                if relayed.chunks:
                    if not self.resume:
                        log.warning("decoder failed mid-stream; resume is off", tokens=len(relayed.chunks), **fields)
                        raise _incomplete(relayed, [retry], resumable=False)
                    if attempt == self.max_attempts:
                        log.warning("decoder failed mid-stream; no attempt left", tokens=len(relayed.chunks), **fields)
                        raise _incomplete(relayed, failures, resumable=True)
                    log.warning("decoder failed mid-stream; resuming on another", tokens=len(relayed.chunks), **fields)
                    failed_mid_stream = decoder  # and the error label, should no pod take over
                else:
                    if attempt == self.max_attempts:
                        log.warning("decoder failed before the first token; no attempt left", **fields)
                        raise _gave_up(model, failures)
                    self.telemetry.failover(model, decoder)
                    log.warning("decoder failed before the first token; trying another", **fields)
                    decoder = NO_DECODER
        except BaseException as exc:
            self.telemetry.error(label_model, decoder, code_of(exc).name)
            raise

    def _choose(self, model: str, tried: set[str], failures: list[Retry], relayed: Relayed,
                affinity: str | None) -> Endpoint:
        if relayed.chunks:  # a resume: a pod serving the profile version the stream started with
            try:
                return self.router.choose(model, tried, relayed.profile_version)
            except errors.FfnSkipError as exc:
                log.warning("no decoder to resume the stream on", tried=sorted(tried), error=exc.message,
                            profile_version=relayed.profile_version)
                raise _incomplete(relayed, failures, resumable=True) from None
        try:
            return self.router.choose(model, tried, affinity=affinity)
        except errors.Unavailable:
            if failures:
                raise _gave_up(model, failures) from None
            raise

    async def _attempt(self, request: generation_pb2.GenerateRequest, endpoint: Endpoint, relayed: Relayed,
                       time_remaining: Callable[[], float | None], on_commit: Commit | None):
        """Yields the pod's messages (recorded in `relayed`); yields a Retry as its last item
        when the attempt failed in a way another pod may not; raises otherwise."""
        decoder, model = endpoint.decoder_id, request.model
        resuming = request.HasField("resume")
        remaining = time_remaining()
        timeout = self.timeouts.attempt_s if remaining is None else min(self.timeouts.attempt_s, remaining)
        if timeout <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before a decoder could take it")
        resumed = len(relayed.chunks)  # tokens passed on before this attempt
        # a resumed pod counts its elapsed_ms from its own start: the client's count goes on from ours
        offset_ms = (self._clock() - relayed.started) * 1e3 if resuming else 0.0
        passed = 0  # messages of this attempt passed on
        with self.pool.stub(endpoint.address) as stub:
            call = stub.GenerateStream(request, timeout=timeout, metadata=(("x-request-id", request.request_id),))
            self.router.acquire(decoder)
            self.telemetry.started(model, decoder)
            try:
                while True:
                    # a resume starts with a prefill, as a first attempt does
                    silence_s = self.timeouts.first_token_s if passed == 0 else self.timeouts.stall_s
                    try:
                        message = await asyncio.wait_for(call.read(), silence_s)
                    except asyncio.TimeoutError:
                        if passed == 0:
                            yield Retry(grpc.StatusCode.UNAVAILABLE, f"no first token within {silence_s:g} s",
                                        f"silent for {silence_s:g} s before its first message")
                        else:
                            yield Retry(grpc.StatusCode.UNAVAILABLE, f"no token for {silence_s:g} s",
                                        f"stalled for {silence_s:g} s after {passed} messages", stalled=True)
                        return
                    if message is grpc.aio.EOF:
                        yield Retry(grpc.StatusCode.UNAVAILABLE, "the stream ended without a summary",
                                    f"ended the stream without a summary after {passed} messages")
                        return
                    now = self._clock()
                    if relayed.first_at is None and on_commit is not None:
                        await on_commit(decoder)
                    if message.HasField("summary"):
                        if relayed.resumes:
                            message.summary.CopyFrom(whole_answer(message.summary, relayed, resumed, now))
                        self._record_success(model, decoder, message.summary, now - relayed.started)
                    else:
                        if relayed.first_at is None:
                            self.telemetry.first_token(model, decoder, now - relayed.started)
                        else:  # a resume's first token included: the client waited that long
                            self.telemetry.next_token(model, decoder, now - relayed.last_at)
                        message.token.index = len(relayed.chunks) + 1  # the call's count, whatever the pod
                        message.token.elapsed_ms += offset_ms
                        relayed.chunks.append(message.token)
                    if relayed.first_at is None:
                        relayed.first_at = now
                    relayed.last_at = now
                    passed += 1
                    yield message
                    if message.HasField("summary"):
                        return
            except grpc.aio.AioRpcError as err:
                retry = _retry_for(err, refusal_of_resume=resuming and passed == 0)
                if retry is not None:
                    yield retry
                    return
                log.warning("decoder call failed", decoder=decoder, address=endpoint.address, code=err.code().name,
                            error=err.details() or "", tokens=len(relayed.chunks), resuming=resuming)
                raise _upstream(err, len(relayed.chunks), refusal_of_resume=resuming and passed == 0) from None
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


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.RESOURCE_EXHAUSTED: "full"}
# Codes whose message the decoder writes for the caller (it names a field or a limit). Others
# (UNAVAILABLE, INTERNAL, UNKNOWN, ...) may carry transport details, addresses included: the
# client gets a plain message and the log the details.
_CALLER_FACING = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


def conversation_affinity(request: generation_pb2.GenerateRequest) -> str | None:
    """What keeps a conversation on one pod (routing.pick): its first chat message (a system prompt
    or the first question: a chat resends it every turn), else the start of a plain prompt or of
    its token ids."""
    if request.messages:
        return f"{request.messages[0].role}\0{request.messages[0].content}"
    if request.prompt:
        return request.prompt[:AFFINITY_PROMPT_CHARS]
    if request.prompt_token_ids:
        return ",".join(map(str, request.prompt_token_ids[:AFFINITY_PROMPT_CHARS // 4]))
    return None


def _retry_for(err: grpc.aio.AioRpcError, refusal_of_resume: bool) -> Retry | None:
    code = err.code()
    details = err.details() or code.name
    if code in _RETRYABLE:
        return Retry(code, _RETRYABLE[code], details,
                     _retry_after(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 0)
    if refusal_of_resume and code == grpc.StatusCode.FAILED_PRECONDITION:  # its profile changed since it registered
        return Retry(code, "no decoder serves the stream's profile version", details)
    return None


def _retry_after(err: grpc.aio.AioRpcError) -> int:
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_HEADER and str(value).isdigit():
            return int(value)
    return 1


def _reasons(failures: list[Retry]) -> str:
    return ", ".join(dict.fromkeys(f.reason for f in failures))  # each kind once, in order


def _gave_up(model: str, failures: list[Retry]) -> Exception:
    """The status after every attempt failed before its first token: RESOURCE_EXHAUSTED
    (with the shortest retry-after) when every pod tried was full, else UNAVAILABLE."""
    if all(f.code == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures):
        after = min(f.retry_after_s for f in failures)
        return UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"every decoder of model {model!r} tried ({len(failures)}) is full; retry after {after} s",
                             ((RETRY_AFTER_HEADER, str(after)),))
    return errors.Unavailable(f"no decoder could serve the request: {_reasons(failures)} "
                              f"({len(failures)} attempts); retry")


def _incomplete(relayed: Relayed, failures: list[Retry], resumable: bool) -> UpstreamError:
    """UNAVAILABLE for a stream that failed after tokens were passed on and was not completed."""
    tokens = len(relayed.chunks)
    if not resumable:
        last = failures[-1]
        return UpstreamError(grpc.StatusCode.UNAVAILABLE,
                             f"the decoder {'stalled' if last.stalled else 'failed'} after {tokens} tokens "
                             f"({last.reason}), the response is incomplete; retry")
    return UpstreamError(grpc.StatusCode.UNAVAILABLE,
                         f"the stream failed after {tokens} tokens and no decoder could continue it "
                         f"({_reasons(failures)}; {len(failures)} attempts), the response is incomplete; retry")


def _upstream(err: grpc.aio.AioRpcError, tokens: int, refusal_of_resume: bool) -> UpstreamError:
    code = err.code()
    if refusal_of_resume and code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        # about the resume, not the caller's request (which a pod accepted): the stream is cut short
        return UpstreamError(grpc.StatusCode.UNAVAILABLE,
                             f"the stream failed after {tokens} tokens and could not be continued "
                             f"(refused: {code.name}), the response is incomplete; retry")
    trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER_HEADER)
    details = (err.details() or code.name) if code in _CALLER_FACING else f"the decoder failed ({code.name})"
    if tokens:
        details = f"the response is incomplete after {tokens} tokens: {details}"
    return UpstreamError(code, details, trailers)
