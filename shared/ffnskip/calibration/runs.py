"""The generation runs calibration needs: observe, dense reference, and real skip runs."""

from __future__ import annotations

from dataclasses import dataclass

from ffnskip.config import Policy, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.prompts import encode_prompt
from ffnskip.engine.stats import SkipStats


@dataclass(frozen=True)
class SkipRun:
    tokens: list[list[int]]
    stats: SkipStats  # pooled over the prompts


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

    def _run(self, prompts: list[str], skip: SkipParams, tracker, phase: str):
        """Generate for `prompts` in batches; returns the finished sequences in order."""
        done = []
        size = self.request.batch_size
        for start in range(0, len(prompts), size):
            seqs = [self.engine.add(prompt_ids=self.encoded[p], sampling=self.sampling, skip=skip)
                    for p in prompts[start:start + size]]
            while self.engine.has_work:
                self.engine.step()
            done += seqs
            tracker.advance(phase)
        return done

    def observe(self, prompts: list[str], tracker) -> list[list[float]]:
        """cos(h, h + ffn(h)) per layer for every decoded token (the prefill token has none)."""
        seqs = self._run(prompts, SkipParams(policy=Policy.OBSERVE, warm_up=0), tracker, "measuring similarity")
        return [row for seq in seqs for row in seq.similarity if row is not None]

    def generate(self, prompts: list[str], skip: SkipParams, tracker, phase: str) -> SkipRun:
        seqs = self._run(prompts, skip, tracker, phase)
        stats = [SkipStats.from_records(s.skip_records, self.num_layers, s.skip.warm_up) for s in seqs]
        pooled = stats[0]
        for more in stats[1:]:
            pooled = pooled.merged(more)
        return SkipRun(tokens=[list(s.generated) for s in seqs], stats=pooled)
