"""How much of dense's answer a skip policy keeps, measured against dense on the same prompts.

Three measures, each resolving differences that token agreement cannot:

- teacher-forced KL(dense || policy) per token and the same-top-token rate: the policy
  decodes dense's own continuation (every step sees the same prefix whatever it would
  have picked), so one early slip does not decide the whole score (llama.cpp's
  `--kl-divergence` reports the same pair);
- relative NLL: dense's negative log-likelihood per token of the policy's free-running
  output, over dense's NLL of its own output; invented words ("lightbrome") are tokens
  dense finds unlikely, so garbled text scores high even where no reference exists;
- QA flips (evaluation.scoring.paired_counts): questions lost and gained against dense.

Per-token values are pooled over prompts; their 95% intervals treat each prompt as one
cluster (tokens of one answer are not independent draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.sequence import Sequence, Teacher
from ffnskip.engine.substitutes import SubstituteSet

Z95 = 1.959964


@dataclass(frozen=True)
class Job:
    """One prompt to decode: its ids, how long, under which policy, with which teacher."""

    prompt_ids: list[int]
    sampling: SamplingParams
    skip: SkipParams = DENSE
    teacher: Teacher | None = None
    substitutes: SubstituteSet | None = None  # what the skipped FFNs are replaced with


def run_jobs(engine: Engine, jobs: Seq[Job], batch_size: int,
             after_batch: Callable[[], None] | None = None) -> list[Sequence]:
    """Decode the jobs `batch_size` at a time (a batch runs to its end before the next starts,
    so every row of a batch shares it for its whole life); the finished sequences in order."""
    done: list[Sequence] = []
    for start in range(0, len(jobs), batch_size):
        seqs = [engine.add(prompt_ids=j.prompt_ids, sampling=j.sampling, skip=j.skip, teacher=j.teacher,
                           substitutes=j.substitutes)
                for j in jobs[start:start + batch_size]]
        while engine.has_work:
            engine.step()
        done += seqs
        if after_batch is not None:
            after_batch()
    return done


@dataclass(frozen=True)
class Reference:
    """Dense's greedy continuation of one prompt, with its log-probabilities at every position."""

    tokens: list[int]
    logprobs: torch.Tensor  # [T, V] float16: dense's log-softmax at each generated position

    @property
    def nll(self) -> list[float]:
        """Dense's NLL of each of its own tokens."""
        index = torch.tensor(self.tokens)[:, None]
        return (-self.logprobs.float().gather(1, index)[:, 0]).tolist()


class _Recorder:
    """Keeps dense's log-probabilities while it decodes freely (half precision: 100 KB a token
    for a 49k vocabulary; the KL's error from the rounding is far below the differences measured)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def choose(self, index: int, logits: torch.Tensor, predicted: int) -> int:
        self.rows.append(torch.log_softmax(logits.float(), dim=-1).half().cpu())
        return predicted


class _Divergence:
    """Forces the reference's tokens and scores each position's KL(dense || policy) and top token."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.kl: list[float] = []
        self.top: list[bool] = []

    def choose(self, index: int, logits: torch.Tensor, predicted: int) -> int:
        # rounded as the reference was, so equal logits give a KL of exactly 0
        log_q = torch.log_softmax(logits.float(), dim=-1).half().float().cpu()
        log_p = self.reference.logprobs[index].float()
        self.kl.append(max(0.0, float((log_p.exp() * (log_p - log_q)).sum())))
        self.top.append(int(logits.argmax()) == self.reference.tokens[index])  # dense's greedy token
        return self.reference.tokens[index]


class _Likelihood:
    """Forces given tokens and scores dense's NLL of each."""

    def __init__(self, tokens: Seq[int]) -> None:
        self.tokens = list(tokens)
        self.nll: list[float] = []

    def choose(self, index: int, logits: torch.Tensor, predicted: int) -> int:
        token = self.tokens[index]
        self.nll.append(-float(torch.log_softmax(logits.float(), dim=-1)[token]))
        return token


def forced(length: int) -> SamplingParams:
    """Exactly `length` tokens: a forced continuation may contain EOS before its end."""
    return SamplingParams(max_new_tokens=length, ignore_eos=True)


def dense_references(engine: Engine, prompts: Seq[list[int]], max_new_tokens: int, batch_size: int,
                     after_batch: Callable[[], None] | None = None) -> list[Reference]:
    recorders = [_Recorder() for _ in prompts]
    jobs = [Job(p, SamplingParams(max_new_tokens=max_new_tokens), DENSE, r) for p, r in zip(prompts, recorders)]
    seqs = run_jobs(engine, jobs, batch_size, after_batch)
    return [Reference(list(s.generated), torch.stack(r.rows)) for s, r in zip(seqs, recorders)]


@dataclass(frozen=True)
class Divergence:
    """Per prompt, teacher-forced KL(dense || policy) and same-top-token of every position."""

    kl: list[list[float]]
    top: list[list[bool]]

    def summary(self, after: int) -> dict:
        """Pooled KL and same-top-token over the positions after the first `after`, with intervals."""
        return {"kl": pooled([row[after:] for row in self.kl]).to_dict(5),
                "top_match": pooled([[float(t) for t in row[after:]] for row in self.top]).to_dict()}


def divergence(engine: Engine, prompts: Seq[list[int]], references: Seq[Reference], skip: SkipParams,
               batch_size: int, after_batch: Callable[[], None] | None = None,
               substitutes: SubstituteSet | None = None) -> Divergence:
    scorers = [_Divergence(r) for r in references]
    jobs = [Job(p, forced(len(r.tokens)), skip, s, substitutes) for p, r, s in zip(prompts, references, scorers)]
    run_jobs(engine, jobs, batch_size, after_batch)
    return Divergence([s.kl for s in scorers], [s.top for s in scorers])


def dense_nll(engine: Engine, prompts: Seq[list[int]], continuations: Seq[Seq[int]], batch_size: int,
              after_batch: Callable[[], None] | None = None) -> list[list[float]]:
    """Dense's NLL of each token of each continuation (an empty continuation scores nothing)."""
    scored = [(p, c) for p, c in zip(prompts, continuations) if c]
    scorers = [_Likelihood(c) for _, c in scored]
    run_jobs(engine, [Job(p, forced(len(c)), DENSE, s) for (p, c), s in zip(scored, scorers)], batch_size, after_batch)
    by_prompt = iter(s.nll for s in scorers)
    return [next(by_prompt) if c else [] for c in continuations]


@dataclass(frozen=True)
class Estimate:
    """A per-token mean pooled over prompts, with its 95% interval (prompts as clusters)."""

    mean: float
    low: float
    high: float

    def to_dict(self, digits: int = 4) -> dict:
        return {"mean": round(self.mean, digits), "low": round(self.low, digits), "high": round(self.high, digits)}


def pooled(values: Seq[Seq[float]]) -> Estimate:
    """The pooled mean of per-token values and a cluster-robust interval: the standard error of a
    ratio of sums, with each prompt's tokens one cluster."""
    sums = [float(sum(v)) for v in values if len(v)]
    counts = [len(v) for v in values if len(v)]
    total = sum(counts)
    if not total:
        return Estimate(math.nan, math.nan, math.nan)
    mean = sum(sums) / total
    n = len(counts)
    if n < 2:
        return Estimate(mean, mean, mean)
    residual = sum((s - mean * c) ** 2 for s, c in zip(sums, counts))
    half = Z95 * math.sqrt(n / (n - 1) * residual) / total
    return Estimate(mean, mean - half, mean + half)


def relative_nll(policy_nll: Seq[Seq[float]], dense_own_nll: Seq[Seq[float]]) -> float:
    """Dense's mean NLL per token of the policy's output over its NLL of its own output."""
    ours, theirs = pooled(policy_nll).mean, pooled(dense_own_nll).mean
    return ours / theirs if theirs > 0 else math.inf


@dataclass(frozen=True)
class Quality:
    """What a policy keeps of dense on a prompt set."""

    kl: Estimate  # teacher-forced KL(dense || policy), nats per token
    top_match: Estimate  # teacher-forced share of positions with dense's top token
    relative_nll: float  # dense's NLL of the policy's free-running output / of its own
    nll: Estimate  # dense's NLL per token of the policy's free-running output

    def to_dict(self) -> dict:
        return {"kl": self.kl.to_dict(), "top_match": self.top_match.to_dict(),
                "relative_nll": round(self.relative_nll, 4), "nll": self.nll.to_dict()}


def quality(scores: Divergence, policy_nll: Seq[Seq[float]], dense_own_nll: Seq[Seq[float]],
            skip_from: int = 0) -> Quality:
    """The measures over the positions from `skip_from` on (a policy's warm-up runs dense, and
    counting it would dilute the measures of every answer longer than the warm-up)."""
    after = lambda rows: [list(row[skip_from:]) for row in rows]  # noqa: E731
    policy_nll, dense_own_nll = after(policy_nll), after(dense_own_nll)
    if not any(after(scores.kl)):  # every answer ended within the warm-up: nothing could skip
        return Quality(kl=Estimate(0.0, 0.0, 0.0), top_match=Estimate(1.0, 1.0, 1.0), relative_nll=1.0,
                       nll=pooled(dense_own_nll))
    return Quality(kl=pooled(after(scores.kl)), top_match=pooled([[float(t) for t in row] for row in after(scores.top)]),
                   relative_nll=relative_nll(policy_nll, dense_own_nll), nll=pooled(policy_nll))
