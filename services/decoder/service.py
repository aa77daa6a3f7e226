"""The decoder's request path without transport: validate, snapshot the profile,
submit to the engine loop, and turn engine items into responses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ffnskip.engine import GenerationResult, TokenEvent
from ffnskip.engine.sampling import TokenLogprob
from ffnskip.errors import Cancelled, DeadlineExceeded, FailedPrecondition, FfnSkipError, NotFound
from ffnskip.rpc.convert import policy_fields
from ffnskip.rpc.generation import prompt_of, sampling_of, shown, skip_of, stats_to_proto
from ffnskip.v1 import generation_pb2 as pb
from services.decoder.engine_loop import EngineLoop, Submission
from services.decoder.profiles import ProfileWatcher
from services.decoder.settings import DecoderSettings


class DecoderService:
    def __init__(self, settings: DecoderSettings, loop: EngineLoop, profiles: ProfileWatcher) -> None:
        self.settings = settings
        self.loop = loop
        self.profiles = profiles

    def submission(self, request: pb.GenerateRequest, request_id: str, time_remaining: float | None, aio_loop) -> Submission:
        if request.model != self.settings.model_name:
            raise NotFound(f"model: this decoder serves {self.settings.model_name!r}, not {shown(request.model)}")
        prompt, messages, prompt_ids = prompt_of(request)
        sampling = sampling_of(request.sampling, self.settings.default_max_new_tokens, self.settings.max_new_tokens_cap)
        active = self.profiles.current  # snapshot: a swap never changes this request
        skip = skip_of(request.skip, active.params, self.settings.limits)
        resumed, resumed_skips = self._resumed(request, active.version)
        deadline = time.monotonic() + time_remaining if time_remaining is not None else None
        return Submission(request_id=request_id, prompt=prompt, messages=messages, sampling=sampling, skip=skip,
                          profile_version=active.version, deadline=deadline, loop=aio_loop, prompt_ids=prompt_ids,
                          resumed=resumed, resumed_skips=resumed_skips, substitutes=active.substitutes_for(skip))

    def _resumed(self, request: pb.GenerateRequest, version: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """The tokens another decoder delivered and the layers each skipped, when the gateway
        continues its stream here: only under the profile version the stream started with
        (another would change the answer mid-way). They count against max_new_tokens, the
        request's total; the engine checks them."""
        if not request.HasField("resume"):
            return (), ()
        if request.resume.profile_version != version:
            raise FailedPrecondition(f"resume.profile_version: this decoder serves profile version {version}, "
                                     f"the stream started with {request.resume.profile_version}")
        return tuple(request.resume.token_ids), tuple(tuple(s.layers) for s in request.resume.skipped_layers)

    async def run(self, submission: Submission) -> AsyncIterator[TokenEvent | pb.GenerateResponse]:
        """Yield token events, then the final response; raise the taxonomy on failure.
        Leaving early (client gone) cancels the sequence within one decode step."""
        self.loop.submit(submission)
        finished = False
        try:
            while True:
                item = await submission.items.get()
                if isinstance(item, FfnSkipError):
                    finished = True
                    raise item
                if isinstance(item, GenerationResult):
                    finished = True
                    if item.finish_reason == "deadline":
                        raise DeadlineExceeded(f"deadline passed after {len(item.token_ids)} tokens")
                    if item.finish_reason == "cancelled":
                        raise Cancelled("request cancelled")
                    yield self.response(submission, item)
                    return
                yield item
        finally:
            if not finished:
                self.loop.cancel(submission)

    def response(self, submission: Submission, result: GenerationResult) -> pb.GenerateResponse:
        total_s = time.perf_counter() - submission.received_at
        ttft_s = (submission.first_token_at or time.perf_counter()) - submission.received_at
        tokens = len(result.token_ids)
        return pb.GenerateResponse(
            text=result.text, finish_reason=result.finish_reason, skip_stats=stats_to_proto(result.skip_stats),
            latency=pb.Latency(ttft_ms=ttft_s * 1e3, total_ms=total_s * 1e3,
                               tokens_per_s=tokens / total_s if total_s > 0 else 0.0,
                               queue_ms=max(0.0, ttft_s - result.ttft_s) * 1e3),
            profile_version=submission.profile_version, served_by=self.settings.decoder_id,
            token_ids=result.token_ids, request_id=submission.request_id, **policy_fields(submission.skip.policy),
            prompt_tokens=result.prompt_tokens, seed=result.seed,
            logprobs=[self._logprob(entry) for entry in result.logprobs],
            prompt_logprobs=[self._logprob(entry) for entry in result.prompt_logprobs],
        )

    def chunk(self, submission: Submission, event: TokenEvent) -> pb.GenerateStreamResponse:
        return pb.GenerateStreamResponse(token=pb.TokenChunk(
            index=event.index, token_id=event.token_id, text=event.text, skipped_layers=event.skipped_layers,
            elapsed_ms=(time.perf_counter() - submission.received_at) * 1e3,
            logprob=self._logprob(event.logprob) if event.logprob is not None else None))

    def _logprob(self, entry: TokenLogprob) -> pb.TokenLogprob:
        """A token's log-probability on the wire, each token with its text."""
        tokenizer = self.loop.engine.tokenizer

        def text(token_id: int) -> str:
            return str(tokenizer.decode([token_id]))

        return pb.TokenLogprob(
            token_id=entry.token_id, token=text(entry.token_id), logprob=entry.logprob,
            top=[pb.TopLogprob(token_id=token_id, token=text(token_id), logprob=value) for token_id, value in entry.top])
