"""Chunked prefill: a prompt prefilled over several steps caches and predicts what it would
whole, a step prefills at most its chunk of prompt tokens, and the running rows keep
getting a token every step meanwhile."""

from __future__ import annotations

import pytest
import torch

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.errors import InvalidArgument

LONG = "a long prompt that takes several chunks to prefill"
SHORT = "hi"


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)


def whole(loaded, prompt: str, max_new_tokens: int) -> list[int]:
    engine = Engine(loaded, max_batch=1, max_seq_len=128, prefill_chunk=None)
    return engine.generate([prompt], greedy(max_new_tokens))[0].token_ids


def check_rows(engine: Engine) -> None:
    """Rows are a contiguous prefix, decoding sequences first."""
    assert [s.row for s in engine.running] == list(range(len(engine.running)))
    scheduler = engine.scheduler
    assert [s.prefilling for s in engine.running] == [False] * scheduler.decoding + [True] * len(scheduler.prefilling)
    assert engine.cache.in_use == len(engine.running)


def test_chunks_at_different_starts_cache_and_predict_as_the_prompts_whole(tiny_loaded):
    """Two prompts prefilled together in chunks of 5, each at its own offset (one forward
    holds a row's second chunk and another's first): the cached keys and values of every
    layer and the last logits equal those of each prompt prefilled whole."""
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=128)
    runner, cache = engine.runner, engine.cache
    prompts = [engine.tokenizer(text)["input_ids"] for text in (LONG, "seventeen letters")]
    whole_rows = [cache.take_row(), cache.take_row()]
    expected = runner.prefill(cache, whole_rows, prompts)
    rows = [cache.take_row(), cache.take_row()]
    starts = [0, 0]
    runner.prefill(cache, rows[:1], [prompts[0][:5]])  # the first row starts a chunk ahead
    starts[0] = 5
    last: dict[int, torch.Tensor] = {}
    while any(start < len(p) for start, p in zip(starts, prompts)):
        group = [i for i, (start, p) in enumerate(zip(starts, prompts)) if start < len(p)]
        chunks = [prompts[i][starts[i]:starts[i] + 5] for i in group]
        completing = [j for j, i in enumerate(group) if starts[i] + len(chunks[j]) == len(prompts[i])]
        logits = runner.prefill(cache, [rows[i] for i in group], chunks, [starts[i] for i in group], completing)
        for j, index in enumerate(completing):
            last[group[index]] = logits[j]
        for j, i in enumerate(group):
            starts[i] += len(chunks[j])
    for i, prompt in enumerate(prompts):
        assert cache.lengths[rows[i]] == len(prompt)
        torch.testing.assert_close(last[i], expected[i], rtol=1e-4, atol=1e-5)
        for layer in range(engine.num_layers):
            keys, values = cache.layer(layer)
            for table in (keys, values):
                chunked, once = table[rows[i], :, :len(prompt)], table[whole_rows[i], :, :len(prompt)]
                torch.testing.assert_close(chunked, once, rtol=1e-4, atol=1e-5)


def test_a_continuing_chunk_padded_past_the_end_of_the_cache_reads_only_real_positions(tiny_loaded):
    """A row's last 5 tokens in one forward with another prompt's first 12: padded to 12, the
    chunk's positions would run 7 past the end of a cache sized for the prompt."""
    probe = Engine(tiny_loaded, max_batch=1, max_seq_len=128)
    prompts = [probe.tokenizer(text)["input_ids"] for text in (LONG, "twelve chars")]
    first = len(prompts[0]) - 5
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=len(prompts[0]) + 1)
    rows = [engine.cache.take_row(), engine.cache.take_row()]
    engine.runner.prefill(engine.cache, rows[:1], [prompts[0][:first]])
    logits = engine.runner.prefill(engine.cache, rows, [prompts[0][first:], prompts[1][:12]], [first, 0])
    expected = probe.runner.prefill(probe.cache, [probe.cache.take_row()], [prompts[0]])
    torch.testing.assert_close(logits[0], expected[0], rtol=1e-4, atol=1e-5)


def test_a_running_row_gets_a_token_every_step_while_a_long_prompt_prefills(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=128, prefill_chunk=8)
    running = engine.add(prompt=SHORT, sampling=greedy(40))
    engine.step()
    long = engine.add(prompt=LONG, sampling=greedy(5))
    prompt_tokens = len(long.prompt_ids)
    steps_to_prefill = -(-prompt_tokens // 8)
    for step in range(1, steps_to_prefill + 1):
        before, tokens_before = long.prefilled, len(running.generated)
        events = engine.step()
        check_rows(engine)
        assert long.prefilled - before == min(8, prompt_tokens - before)  # one chunk a step, no more
        assert len(running.generated) == tokens_before + 1  # the running row was not held back
        assert [e.seq_id for e in events if e.seq_id == long.seq_id] == ([long.seq_id] if step == steps_to_prefill else [])
    while engine.has_work:
        engine.step()
        check_rows(engine)
    assert long.generated == whole(tiny_loaded, LONG, 5)
    assert running.generated == whole(tiny_loaded, SHORT, 40)


def test_an_idle_engine_prefills_a_prompt_longer_than_the_chunk_in_one_step(tiny_loaded):
    """Nothing decodes, so nobody waits for the forward: the prompt's first token comes from
    the first step, and the answer is the one a whole prefill gives."""
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=128, prefill_chunk=8)
    seq = engine.add(prompt=LONG, sampling=greedy(5))
    assert len(seq.prompt_ids) > 8
    events = engine.step()
    assert seq.prefilled == len(seq.prompt_ids) and [e.seq_id for e in events] == [seq.seq_id]
    while engine.has_work:
        engine.step()
    assert seq.generated == whole(tiny_loaded, LONG, 5)


def test_a_burst_prefills_whole_prompts_while_they_fit_in_admission_order(tiny_loaded):
    """Three prompts of 17 tokens with a chunk of 40: the first two prefill at the first step,
    and the third, which would not fit whole, waits for the next step instead of being split."""
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=128, prefill_chunk=40)
    prompts = ["seventeen letters", "seventeen lettera", "seventeen letterb"]
    seqs = [engine.add(prompt=p, sampling=greedy(6)) for p in prompts]
    assert {len(s.prompt_ids) for s in seqs} == {17}
    first_step = {}
    step = 0
    while engine.has_work:
        step += 1
        for event in engine.step():
            first_step.setdefault(event.seq_id, step)
        if step == 1:
            assert seqs[2].prefilled == 0
        check_rows(engine)
    assert [first_step[s.seq_id] for s in seqs] == [1, 1, 2]
    for seq, prompt in zip(seqs, prompts):
        assert seq.generated == whole(tiny_loaded, prompt, 6)


def test_a_prompt_that_prefilled_from_a_moved_row_joins_the_decoding_rows(tiny_loaded):
    """A decoding row leaves while two prompts prefill: the last row (the second prompt's) fills
    its hole, so the first prompt, earlier in line, completes in a later row and changes places
    with the second prompt's half-filled row. Every answer equals the prompt's alone."""
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=128, prefill_chunk=6)
    leaving = engine.add(prompt=SHORT, sampling=greedy(2))
    engine.step()
    first = engine.add(prompt=LONG, sampling=greedy(4))
    second = engine.add(prompt="another prompt that is long", sampling=greedy(4))
    swapped = False
    while engine.has_work:
        engine.step()
        check_rows(engine)
        swapped |= second.prefilling and second.row is not None and first.row is not None and second.row < first.row
    assert swapped  # the case this test is about happened
    assert leaving.generated == whole(tiny_loaded, SHORT, 2)
    assert first.generated == whole(tiny_loaded, LONG, 4)
    assert second.generated == whole(tiny_loaded, "another prompt that is long", 4)


def test_a_cancelled_prompt_leaves_while_prefilling(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=128, prefill_chunk=8)
    running = engine.add(prompt=SHORT, sampling=greedy(12), skip=SkipParams(policy="static", static_layers=(1, 2)))
    engine.step()
    victim = engine.add(prompt=LONG, sampling=greedy(4))
    after = engine.add(prompt="seventeen letters", sampling=greedy(4))
    engine.step()
    assert victim.prefilling and victim.prefilled > 0
    engine.cancel(victim)
    while engine.has_work:
        engine.step()
        check_rows(engine)
    assert victim.finish_reason == "cancelled" and victim.generated == [] and victim.row is None
    assert after.generated == whole(tiny_loaded, "seventeen letters", 4)
    alone = Engine(tiny_loaded, max_batch=1, max_seq_len=128, prefill_chunk=None)
    assert running.generated == alone.generate([SHORT], greedy(12), SkipParams(policy="static", static_layers=(1, 2)))[0].token_ids


def test_a_chunk_below_one_token_is_refused(tiny_loaded):
    with pytest.raises(InvalidArgument, match="prefill_chunk"):
        Engine(tiny_loaded, max_batch=1, max_seq_len=128, prefill_chunk=0)
