"""Reference computations for equivalence tests: the engine's logits step by step,
and the unmodified transformers model decoding incrementally with its own cache."""

from __future__ import annotations

import torch

from ffnskip.engine import Engine


def engine_logits(loaded, prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy-decode `steps` tokens through the engine's model; return ids and logits per token."""
    engine = Engine(loaded, max_batch=1, max_seq_len=128)
    runner, cache = engine.runner, engine.cache
    row = cache.take_row()
    logits = [runner.prefill(cache, [row], [prompt_ids])[0]]
    ids = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        dense = engine.planner.begin_step([], [], [])  # no plans: every FFN runs
        step = runner.decode(cache, [ids[-1]], [len(prompt_ids) + len(ids) - 1], dense)
        logits.append(step[0])
        ids.append(int(step[0].argmax()))
    return ids, torch.stack(logits)


def transformers_logits(loaded, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """The unmodified model, decoding incrementally with its own KV cache, fed the same ids."""
    with torch.no_grad():
        # logits_to_keep=1 as transformers' generate does: the LM head on the last position only
        out = loaded.model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        logits, past = [out.logits[0, -1]], out.past_key_values
        for token in ids[:-1]:
            out = loaded.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits.append(out.logits[0, -1])
            past = out.past_key_values
    return torch.stack(logits)
