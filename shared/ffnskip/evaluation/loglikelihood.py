"""Log-likelihood of a continuation given a context, in-process and dense: what
lm-evaluation-harness asks of a model for its multiple-choice (`loglikelihood`) tasks, for
token-id inputs, computed with one plain forward of the transformers model `load_model` loads
(every FFN runs). It is the reference the HTTP API's scores are checked against
(tests/e2e/test_lm_eval.py): lm-eval's `local-completions` model sends context + continuation
as token ids with `echo` and `logprobs: 1`, sums the returned prompt-token log-probabilities
over the continuation and calls it greedy when each continuation token's log-probability is
the top one at its position; `score` computes the same two numbers here.

`greedy_margin` says how safely `is_greedy` (and the argmax behind it) is decided: the
smallest log-probability gap, over the continuation's positions, between the token and the
best other token (the runner-up where the token is the argmax). Two fp32 computations of the
same logits that differ in their summation order (a batch-1 forward here, the decoder's
batched and chunked prefill there) agree to about 1e-5 in a log-probability; a gap larger
than the comparison's tolerance cannot flip between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ffnskip.errors import InvalidArgument


@dataclass(frozen=True)
class Scored:
    """One (context, continuation) pair's result."""

    logprob: float  # log P(continuation | context): the sum of token_logprobs
    is_greedy: bool  # every continuation token is the most likely one at its position
    token_logprobs: list[float]  # log P(token | everything before it), one per continuation token
    greedy_margin: float  # the smallest gap between a continuation token and the best other token


def score(model: Any, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> Scored:
    """Score `continuation_ids` after `context_ids` with a causal LM (a transformers
    *ForCausalLM, e.g. LoadedModel.model) in one forward over context + continuation; the
    log-softmax is taken in float32 whatever the model's dtype."""
    if not context_ids:
        raise InvalidArgument("context_ids", "must not be empty (lm-eval puts a prefix token before an empty context)")
    if not continuation_ids:
        raise InvalidArgument("continuation_ids", "must not be empty")
    ids = [*context_ids, *continuation_ids]
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0]
    # position p predicts token p + 1: the continuation's predictions start at the context's last token
    start = len(context_ids) - 1
    logprobs = torch.log_softmax(logits[start:len(ids) - 1].float(), dim=-1)
    targets = torch.tensor(continuation_ids, device=logprobs.device)
    token_logprobs = logprobs.gather(1, targets[:, None])[:, 0]
    top2 = logprobs.topk(2, dim=-1).values
    greedy = logprobs.argmax(dim=-1) == targets
    # the token's gap to the best other token: to the runner-up where it is the argmax, else to the argmax
    margins = torch.where(greedy, top2[:, 0] - top2[:, 1], top2[:, 0] - token_logprobs)
    values = token_logprobs.double().tolist()
    return Scored(logprob=float(sum(values)), is_greedy=bool(greedy.all()), token_logprobs=values,
                  greedy_margin=float(margins.min()))


def score_all(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
    """`score` for each (context_ids, continuation_ids) pair, one forward each (batch 1: no
    padding, so nothing but the pair itself enters its numbers)."""
    return [score(model, context, continuation) for context, continuation in pairs]
