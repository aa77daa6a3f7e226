"""The generation runs calibration needs: observe, dense reference, real skip runs, and the
quality measures' teacher-forced runs."""

from __future__ import annotations

from dataclasses import dataclass

from ffnskip.calibration import quality
from ffnskip.calibration.forced import ForcedForward
from ffnskip.config import DENSE, Policy, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.prompts import encode_prompt
from ffnskip.engine.stats import SkipStats
from ffnskip.engine.substitutes import SubstituteSet


@dataclass(frozen=True)
class SkipRun:
    tokens: list[list[int]]
    stats: SkipStats  # pooled over the prompts


@dataclass(frozen=True)
class Measured:
    """A policy's free-running run on prompts, what it kept of dense, and dense's own answers."""

    run: SkipRun
    kept: quality.Quality
    references: list[quality.Reference]


class CalibrationRunner:
    def __init__(self, loaded, request) -> None:
        self.request = request
        self.tokenizer = loaded.tokenizer
        chat = request.chat and bool(loaded.tokenizer.chat_template)
        self.encoded = {p: encode_prompt(loaded.tokenizer, None, [{"role": "user", "content": p}]) if chat
                        else encode_prompt(loaded.tokenizer, p, None) for p in request.prompts}
        longest = max(len(ids) for ids in self.encoded.values())
        self.engine = Engine(loaded, max_batch=request.batch_size, max_seq_len=longest + request.tokens_per_prompt + 1)
        self.sampling = SamplingParams(max_new_tokens=request.tokens_per_prompt)
        self.num_layers = loaded.num_layers

    def _run(self, prompts: list[str], skip: SkipParams, tracker, phase: str, substitutes: SubstituteSet | None = None):
        """Generate for `prompts` in batches; returns the finished sequences in order."""
        jobs = [quality.Job(self.encoded[p], self.sampling, skip, substitutes=substitutes) for p in prompts]
        return quality.run_jobs(self.engine, jobs, self.request.batch_size, lambda: tracker.advance(phase))

    def references(self, prompts: list[str], tracker) -> list[quality.Reference]:
        """Dense's greedy answers with its log-probabilities, for the teacher-forced measures."""
        return quality.dense_references(self.engine, [self.encoded[p] for p in prompts], self.request.tokens_per_prompt,
                                        self.request.batch_size, lambda: tracker.advance("dense reference"))

    def divergence(self, prompts: list[str], references: list[quality.Reference], skip: SkipParams,
                   tracker, phase: str, substitutes: SubstituteSet | None = None) -> quality.Divergence:
        return quality.divergence(self.engine, [self.encoded[p] for p in prompts], references, skip,
                                  self.request.batch_size, lambda: tracker.advance(phase), substitutes)

    def forced(self, prompts: list[str], warm_up: int, tracker) -> ForcedForward:
        """Dense's greedy answers to `prompts`, ready for one-pass teacher-forced measures."""
        answers = [list(s.generated) for s in self._run(prompts, DENSE, tracker, "dense answers for the search")]
        return ForcedForward(self.engine.runner, [self.encoded[p] for p in prompts], answers, warm_up,
                             self.request.batch_size)

    def dense_nll(self, prompts: list[str], continuations: list[list[int]], tracker) -> list[list[float]]:
        return quality.dense_nll(self.engine, [self.encoded[p] for p in prompts], continuations,
                                 self.request.batch_size, lambda: tracker.advance("dense likelihood"))

    def observe(self, prompts: list[str], tracker) -> list[list[float]]:
        """cos(h, h + ffn(h)) per layer for every decoded token (the prefill token has none)."""
        seqs = self._run(prompts, SkipParams(policy=Policy.OBSERVE, warm_up=0), tracker, "measuring similarity")
        return [row for seq in seqs for row in seq.similarity if row is not None]

    def generate(self, prompts: list[str], skip: SkipParams, tracker, phase: str,
                 substitutes: SubstituteSet | None = None) -> SkipRun:
        seqs = self._run(prompts, skip, tracker, phase, substitutes)
        stats = SkipStats.pooled([self.engine.result(s).skip_stats for s in seqs])
        return SkipRun(tokens=[list(s.generated) for s in seqs], stats=stats)

    def measure(self, prompts: list[str], skip: SkipParams, tracker, substitutes: SubstituteSet | None = None) -> Measured:
        """What `skip` (with `substitutes` for its skipped FFNs) keeps of dense on `prompts`, after its warm-up."""
        references = self.references(prompts, tracker)
        run = self.generate(prompts, skip, tracker, "measuring quality", substitutes)
        nll = self.dense_nll(prompts, run.tokens, tracker)
        scores = self.divergence(prompts, references, skip, tracker, "measuring quality, teacher-forced", substitutes)
        kept = quality.quality(scores, nll, [r.nll for r in references], skip_from=skip.warm_up)
        return Measured(run, kept, references)
