"""Sampling that clients can trust: fresh seeds, replayable seeds, resumed generations,
the logit adjustments (penalties, min_tokens, min_p) and log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from ffnskip.config import DENSE, Policy, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.sampling import adjusted, sample
from ffnskip.errors import InvalidArgument

PROMPT = "the quick brown fox"
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)


def _run(engine: Engine, sampling: SamplingParams, **add) -> tuple[list[int], object]:
    seq = engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, **add)
    while not seq.finished:
        engine.step()
    return list(seq.generated), engine.result(seq)


def test_unseeded_sampled_requests_differ_and_report_their_seed(tiny_engine):
    first, first_result = _run(tiny_engine, SAMPLED)
    second, second_result = _run(tiny_engine, SAMPLED)
    assert first != second  # 12 draws over 259 tokens at temperature 1: equal only by a fluke
    assert first_result.seed != second_result.seed
    replayed, _ = _run(tiny_engine, SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True,
                                                   seed=first_result.seed))
    assert replayed == first


def test_the_same_seed_gives_the_same_tokens_alone_or_in_a_batch(tiny_engine):
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, seed=7)
    alone, _ = _run(tiny_engine, seeded)
    seqs = [tiny_engine.add(prompt=p, sampling=seeded, skip=DENSE) for p in ("another prompt", PROMPT, "x")]
    while not all(s.finished for s in seqs):
        tiny_engine.step()
    assert seqs[1].generated == alone


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_resumed_generation_continues_as_the_uninterrupted_one(tiny_engine, temperature):
    sampling = SamplingParams(max_new_tokens=16, temperature=temperature, ignore_eos=True, seed=11,
                              stop=("zz",))
    whole, whole_result = _run(tiny_engine, sampling)
    resumed_seq = tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=whole[:6])
    events = []
    while not resumed_seq.finished:
        events += [e for e in tiny_engine.step() if e.seq_id == resumed_seq.seq_id]
    assert resumed_seq.generated == whole
    assert [e.index for e in events] == list(range(7, 17))  # numbering continues after the delivered tokens
    text_before = tiny_engine.tokenizer.decode(whole[:6])
    assert "".join(e.text for e in events) == whole_result.text[len(text_before):]


def test_a_generation_resumed_after_its_last_token_is_finished_at_once(tiny_engine):
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    seq = tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=[5, 6, 7, 8])
    assert seq.finished and seq.finish_reason == "length" and not tiny_engine.waiting
    assert tiny_engine.result(seq).token_ids == [5, 6, 7, 8]
    with pytest.raises(InvalidArgument, match="resume.token_ids"):  # tokens past the end
        tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=[5, 6, 7, 8, 9])


def test_resumed_tokens_keep_their_skips_in_the_statistics(tiny_engine):
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    seq = tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=[5, 6, 7],
                          resumed_skips=[[], [2], [1, 3]])
    while not seq.finished:
        tiny_engine.step()
    result = tiny_engine.result(seq)
    assert result.skip_stats.ffn_blocks_skipped == 3 and result.skip_stats.per_layer_skips[1:4] == [1, 1, 1]
    assert result.resumed == 3 and result.own_stats.generated_tokens == 3 and result.own_stats.ffn_blocks_skipped == 0
    for bad, field_name in (([[]], "resume.skipped_layers"), ([[], [], [99]], "resume.skipped_layers")):
        with pytest.raises(InvalidArgument, match=field_name):
            tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=[5, 6, 7], resumed_skips=bad)
    with pytest.raises(InvalidArgument, match="resume.token_ids"):
        tiny_engine.add(prompt=PROMPT, sampling=sampling, skip=DENSE, resumed=[5, 10_000])


@dataclass
class Row:
    """What sample() reads of a sequence."""

    sampling: SamplingParams
    generated: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    eos_ids: frozenset[int] = frozenset({2})
    seed: int = 0


def test_min_tokens_masks_end_of_sequence_until_reached():
    logits = torch.zeros(1, 8)
    logits[0, 2] = 10.0  # EOS is by far the most likely
    row = Row(SamplingParams(min_tokens=2), generated=[4])
    assert sample(logits, [row]) != [2]
    row.generated = [4, 5]
    assert sample(logits, [row]) == [2]


def test_penalties_follow_their_definitions():
    scores = torch.tensor([2.0, -2.0, 1.0, 0.5])
    row = Row(SamplingParams(repetition_penalty=2.0), prompt_ids=[0], generated=[1])
    assert adjusted(scores, row).tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied
    row = Row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), generated=[2, 2, 3])
    assert adjusted(scores, row).tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]
    assert not SamplingParams().penalised


def test_min_p_leaves_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(logits, [Row(SamplingParams(temperature=1.0, min_p=0.5), seed=s)])[0] for s in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("field_name,value", [("min_tokens", -1), ("min_tokens", 200), ("min_p", 1.5),
                                              ("presence_penalty", 3.0), ("frequency_penalty", float("nan")),
                                              ("repetition_penalty", 0.0), ("top_logprobs", 21), ("seed", -1)])
def test_bad_sampling_values_name_their_field(field_name, value):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**{field_name: value})
    assert caught.value.field == field_name


def test_logprobs_are_the_models_own_distribution(tiny_engine):
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3, prompt_logprobs=True)
    tokens, result = _run(tiny_engine, sampling)
    prompt_ids = tiny_engine.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = tiny_engine.loaded.model(torch.tensor([prompt_ids + tokens])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    generated = [logp[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(tokens)]
    assert [e.token_id for e in result.logprobs] == tokens
    torch.testing.assert_close(torch.tensor([e.logprob for e in result.logprobs]), torch.tensor(generated),
                               rtol=1e-4, atol=1e-4)
    assert all(e.top[0][0] == token for e, token in zip(result.logprobs, tokens))  # greedy: the top one
    assert all(len(e.top) == 3 for e in result.logprobs)
    assert [e.token_id for e in result.prompt_logprobs] == prompt_ids
    assert result.prompt_logprobs[0].logprob is None
    expected = [logp[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
    torch.testing.assert_close(torch.tensor([e.logprob for e in result.prompt_logprobs[1:]]), torch.tensor(expected),
                               rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_are_the_same_in_chunks(tiny_loaded):
    sampling = SamplingParams(max_new_tokens=2, prompt_logprobs=True, top_logprobs=2)
    prompt = "a longer prompt, prefilled in several chunks of five tokens"
    whole = Engine(tiny_loaded, max_batch=2, max_seq_len=128)
    chunked = Engine(tiny_loaded, max_batch=2, max_seq_len=128, prefill_chunk=5)
    results = []
    for engine in (whole, chunked):
        engine.add(prompt="hi", sampling=SamplingParams(max_new_tokens=40, ignore_eos=True), skip=DENSE)
        engine.step()  # a decoding row: from here on the chunked engine splits prompts
        seq = engine.add(prompt=prompt, sampling=sampling, skip=DENSE)
        engine.step()
        assert seq.prefilled == (len(seq.prompt_ids) if engine is whole else 5)
        while not seq.finished:
            engine.step()
        results.append(engine.result(seq).prompt_logprobs)
    assert len(results[0]) == len(results[1]) == len(tiny_loaded.tokenizer(prompt)["input_ids"])
    assert [e.token_id for e in results[0]] == [e.token_id for e in results[1]]
    torch.testing.assert_close(torch.tensor([e.logprob for e in results[0][1:]]),
                               torch.tensor([e.logprob for e in results[1][1:]]), rtol=1e-4, atol=1e-4)


def test_a_token_id_outside_the_vocabulary_is_refused(tiny_engine):
    with pytest.raises(InvalidArgument, match="prompt_ids"):
        tiny_engine.add(prompt_ids=[1, 10_000], sampling=SamplingParams(), skip=DENSE)


@pytest.mark.parametrize("skip", [
    SkipParams(policy=Policy.STATIC, static_layers=(2, 3), cold_start=1, cold_end=5, warm_up=2),
    SkipParams(policy=Policy.ADAPTIVE, threshold=0.5, max_skip=2, cold_start=1, cold_end=5, warm_up=2),
], ids=["static", "adaptive"])
@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_a_resumed_skipping_generation_continues_exactly(tiny_loaded, skip, prefill_chunk):
    """The delivered tokens are prefilled skipping what their decode steps skipped, and the last
    one is decoded as it was: the cache, the skip decisions and the tokens are the same."""
    sampling = SamplingParams(max_new_tokens=14, ignore_eos=True)
    whole_engine = Engine(tiny_loaded, max_batch=2, max_seq_len=128)
    seq = whole_engine.add(prompt=PROMPT, sampling=sampling, skip=skip)
    while not seq.finished:
        whole_engine.step()
    assert any(seq.skip_records), "the policy must skip for this test to mean anything"
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=128, prefill_chunk=prefill_chunk)
    resumed = engine.add(prompt=PROMPT, sampling=sampling, skip=skip, resumed=seq.generated[:7],
                         resumed_skips=seq.skip_records[:7])
    while not resumed.finished:
        engine.step()
    assert resumed.generated == seq.generated
    assert resumed.skip_records == seq.skip_records
