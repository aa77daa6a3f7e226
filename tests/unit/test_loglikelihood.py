"""ffnskip.evaluation.loglikelihood on a tiny random Llama: the one-forward score equals the
model's own incremental decoding, step by step, and is-greedy / the margin mean what they say."""

from __future__ import annotations

import pytest
import torch

from ffnskip.engine import load_model
from ffnskip.errors import InvalidArgument
from ffnskip.evaluation.loglikelihood import score, score_all
from tests.helpers.tiny import save_tiny_model

CONTEXT = [1, 40, 77, 120, 9, 33]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loglikelihood")
    return load_model(str(save_tiny_model(tmp / "tiny")), device="cpu", dtype="float32", cache_dir=tmp / "cache")


def incremental(model, context: list[int], continuation: list[int]) -> tuple[list[float], list[int], float]:
    """Each continuation token's log-probability, the argmax at each position and the smallest
    gap between a token and the best other one, decoding one token at a time with the model's
    own KV cache (another summation order than one forward)."""
    logprobs, argmaxes, gaps = [], [], []
    with torch.no_grad():
        out = model(torch.tensor([context]), use_cache=True)
        for token in continuation:
            step = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            first, second = step.topk(2).values.tolist()
            logprobs.append(float(step[token]))
            argmaxes.append(int(step.argmax()))
            gaps.append(first - second if argmaxes[-1] == token else first - logprobs[-1])
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return logprobs, argmaxes, min(gaps)


def greedy(model, context: list[int], steps: int) -> list[int]:
    ids: list[int] = []
    for _ in range(steps):
        _, argmaxes, _ = incremental(model, context + ids, [0])
        ids.append(argmaxes[0])
    return ids


def test_a_greedy_continuation_is_greedy_and_scored_as_decoded(tiny):
    continuation = greedy(tiny.model, CONTEXT, 5)
    result = score(tiny.model, CONTEXT, continuation)
    logprobs, argmaxes, margin = incremental(tiny.model, CONTEXT, continuation)
    assert argmaxes == continuation
    assert result.is_greedy and result.greedy_margin == pytest.approx(margin, abs=1e-5) and margin > 0
    assert result.token_logprobs == pytest.approx(logprobs, abs=1e-5)
    assert result.logprob == pytest.approx(sum(logprobs), abs=1e-5)
    assert all(lp <= 0 for lp in result.token_logprobs)


def test_one_token_off_the_argmax_is_not_greedy(tiny):
    continuation = greedy(tiny.model, CONTEXT, 4)
    continuation[2] = (continuation[2] + 1) % tiny.model.config.vocab_size  # another token at position 2
    result = score(tiny.model, CONTEXT, continuation)
    logprobs, argmaxes, margin = incremental(tiny.model, CONTEXT, continuation)
    assert argmaxes[2] != continuation[2] and not result.is_greedy
    assert result.logprob == pytest.approx(sum(logprobs), abs=1e-5)
    assert result.greedy_margin == pytest.approx(margin, abs=1e-5) and margin > 0


def test_scores_chain_over_a_split_continuation(tiny):
    """log P(a b | c) = log P(a | c) + log P(b | c a)."""
    a, b = [5, 6, 7], [8, 9]
    whole = score(tiny.model, CONTEXT, a + b)
    assert whole.logprob == pytest.approx(score(tiny.model, CONTEXT, a).logprob
                                          + score(tiny.model, CONTEXT + a, b).logprob, abs=1e-5)
    assert [r.logprob for r in score_all(tiny.model, [(CONTEXT, a), (CONTEXT + a, b)])] == \
        [score(tiny.model, CONTEXT, a).logprob, score(tiny.model, CONTEXT + a, b).logprob]


@pytest.mark.parametrize("context, continuation, field", [([], [5], "context_ids"), ([5], [], "continuation_ids")])
def test_empty_inputs_are_refused(tiny, context, continuation, field):
    with pytest.raises(InvalidArgument) as caught:
        score(tiny.model, context, continuation)
    assert str(caught.value).startswith(field)
