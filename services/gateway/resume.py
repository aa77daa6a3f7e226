"""Mid-stream resume: what a call has passed on to its client over all its attempts, the
request that continues it on another pod, and the summary that describes the whole answer.

A resumed pod gets the tokens passed on so far with the layers each skipped
(`GenerateRequest.resume`), replays them (ffnskip.engine.sequence.Sequence.resume) and
continues with the same seed, so its summary covers the whole answer's tokens, text and
skip statistics. What it cannot know, the gateway adds: the earlier tokens' log-probabilities,
the latency as the client saw it, and the number of resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ffnskip.v1 import generation_pb2


@dataclass
class Relayed:
    """What one call has passed on to its client, over all its attempts."""

    started: float
    chunks: list[generation_pb2.TokenChunk] = field(default_factory=list)
    first_at: float | None = None  # when the first message went out
    last_at: float = 0.0  # when the last one did
    profile_version: int | None = None  # of the pod that passed on the first token: resumes keep it
    resumes: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [chunk.token_id for chunk in self.chunks]


def resume_request(request: generation_pb2.GenerateRequest, relayed: Relayed) -> generation_pb2.GenerateRequest:
    """The request an attempt sends: as received, or with `resume` once tokens were passed on."""
    if not relayed.chunks:
        return request
    resumed = generation_pb2.GenerateRequest()
    resumed.CopyFrom(request)
    resumed.resume.token_ids[:] = relayed.token_ids
    resumed.resume.profile_version = relayed.profile_version or 0
    resumed.resume.skipped_layers.extend(generation_pb2.SkippedLayers(layers=c.skipped_layers) for c in relayed.chunks)
    return resumed


def whole_answer(last: generation_pb2.GenerateResponse, relayed: Relayed, resumed: int,
                 now: float) -> generation_pb2.GenerateResponse:
    """The summary of a resumed stream: the last pod's (it covers every token, the `resumed`
    passed on before its attempt included), with the earlier tokens' log-probabilities in
    front of its own, the gateway's latency (the first pod's own numbers died with it) and
    the number of resumes; served_by is the last pod."""
    whole = generation_pb2.GenerateResponse()
    whole.CopyFrom(last)
    whole.resumes = relayed.resumes
    earlier_logprobs = [c.logprob for c in relayed.chunks[:resumed] if c.HasField("logprob")]
    if earlier_logprobs:
        del whole.logprobs[:]
        whole.logprobs.extend([*earlier_logprobs, *last.logprobs])
    total_s = now - relayed.started
    first_at = relayed.first_at if relayed.first_at is not None else now
    whole.latency.ttft_ms = (first_at - relayed.started) * 1e3
    whole.latency.total_ms = total_s * 1e3
    tokens = len(whole.token_ids)
    whole.latency.tokens_per_s = tokens / total_s if total_s > 0 else 0.0  # queue_ms stays the last pod's wait
    return whole
