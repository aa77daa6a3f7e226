"""The prompts a skip measurement reads, split the one way every measuring script splits them.

The 48 packaged calibration texts fit and select (two thirds fit substitutes, every third one
measures candidates), and the open-ended prompts judge; a set is never judged on the prompts
that chose it. Each prompt is a one-message chat; its answer is dense's greedy continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

from ffnskip.calibration import quality as Q
from ffnskip.config import SamplingParams
from ffnskip.datasets import texts
from ffnskip.engine import Engine
from ffnskip.engine.loading import LoadedModel
from ffnskip.engine.prompts import encode_prompt


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    """A one-message user chat's prompt ids."""
    return encode_prompt(loaded.tokenizer, None, [{"role": "user", "content": text}])


def calibration_split(loaded: LoadedModel) -> tuple[list[list[int]], list[list[int]]]:
    """(fit prompts, select prompts) of the calibration texts: two thirds and every third one."""
    calibration = [chat_ids(loaded, t) for t in texts("calibration", "text")]
    return [p for i, p in enumerate(calibration) if i % 3 != 2], [p for i, p in enumerate(calibration) if i % 3 == 2]


def judged_prompts(loaded: LoadedModel, count: int) -> list[list[int]]:
    """The first `count` open-ended prompts, which judge."""
    return [chat_ids(loaded, t) for t in texts("prompts", "prompt")[:count]]


def dense_answers(engine: Engine, prompts: Sequence[list[int]], tokens: int) -> list[list[int]]:
    """Dense's greedy answers of exactly `tokens` tokens (EOS ignored, so every answer scores)."""
    jobs = [Q.Job(p, SamplingParams(max_new_tokens=tokens, ignore_eos=True)) for p in prompts]
    return [list(s.generated) for s in Q.run_jobs(engine, jobs, engine.cache.max_batch)]


def ffn_layer_bytes(loaded: LoadedModel) -> int:
    """One FFN's weight bytes (gate, up and down) in the model's precision."""
    config = loaded.model.config
    return 3 * int(config.hidden_size) * int(config.intermediate_size) * loaded.model.lm_head.weight.element_size()
