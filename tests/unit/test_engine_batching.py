"""Batch bookkeeping: joining, leaving, row compaction, cancellation, streaming, stops."""

from __future__ import annotations

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine

PROMPTS = ["one", "two two", "three three three", "four", "five five"]


def alone(engine: Engine, prompt: str, sampling: SamplingParams) -> list[int]:
    return engine.generate([prompt], sampling)[0].token_ids


def test_more_requests_than_rows_wait_then_join(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=64)
    lengths = [3, 9, 5, 7, 2]
    seqs = [engine.add(prompt=p, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, lengths)]
    peak = 0
    while engine.has_work:
        engine.step()
        peak = max(peak, len(engine.running))
        assert [s.row for s in engine.running] == list(range(len(engine.running)))  # contiguous rows
        assert engine.cache.in_use == len(engine.running)
    assert peak == 2
    for seq, prompt, n in zip(seqs, PROMPTS, lengths):
        assert seq.finish_reason == "length" and len(seq.generated) == n
        assert seq.generated == alone(engine, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))


def test_leaving_row_is_filled_by_the_last_row_and_results_are_unchanged(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=64)
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    long = SamplingParams(max_new_tokens=10, ignore_eos=True)
    seqs = [engine.add(prompt=PROMPTS[0], sampling=long), engine.add(prompt=PROMPTS[1], sampling=short),
            engine.add(prompt=PROMPTS[2], sampling=long)]
    while engine.has_work:
        engine.step()
    assert seqs[2].generated == alone(engine, PROMPTS[2], long)  # it moved from row 2 to row 1 mid-way
    assert seqs[0].generated == alone(engine, PROMPTS[0], long)


def test_cancel_stops_a_running_sequence_within_one_step(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=64)
    sampling = SamplingParams(max_new_tokens=30, ignore_eos=True)
    victim = engine.add(prompt=PROMPTS[0], sampling=sampling, request_id="victim")
    other = engine.add(prompt=PROMPTS[1], sampling=sampling)
    engine.step()
    engine.step()
    produced = len(victim.generated)
    engine.cancel(victim)
    events = engine.step()
    assert all(e.seq_id != victim.seq_id for e in events)
    assert len(victim.generated) == produced and victim.finish_reason == "cancelled"
    assert victim.row is None and engine.cache.in_use == 1
    while engine.has_work:
        engine.step()
    assert other.generated == alone(engine, PROMPTS[1], sampling)


def test_cancel_waiting_and_finished(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=1, max_seq_len=64)
    first = engine.add(prompt="a", sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
    queued = engine.add(prompt="b", sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.cancel(queued)
    while engine.has_work:
        engine.step()
    assert queued.generated == [] and queued.finish_reason == "cancelled"
    engine.cancel(first)  # already finished: it keeps its own reason
    assert first.finish_reason == "length"


def test_sequences_sharing_a_request_id_stay_apart(tiny_loaded):
    """The request id is the caller's label: two sequences with the same one get their own
    tokens, and cancelling one leaves the other running."""
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=64)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    twins = [engine.add(prompt=p, sampling=sampling, request_id="same") for p in PROMPTS[:3]]
    assert len({s.seq_id for s in twins}) == 3
    engine.step()
    engine.cancel(twins[0])
    while engine.has_work:
        engine.step()
    assert twins[0].finish_reason == "cancelled"
    for seq, prompt in zip(twins[1:], PROMPTS[1:3]):
        assert seq.finish_reason == "length" and seq.generated == alone(engine, prompt, sampling)


def test_stream_pieces_concatenate_to_the_text(tiny_engine):
    sampling = SamplingParams(max_new_tokens=24, ignore_eos=True)
    events = list(tiny_engine.stream("hello", sampling, SkipParams(policy="random", probability=0.2, warm_up=1)))
    result = tiny_engine.generate(["hello"], sampling, SkipParams(policy="random", probability=0.2, warm_up=1))[0]
    assert [e.index for e in events] == list(range(1, 25))
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_stop_string_truncates_and_is_never_streamed(tiny_engine):
    sampling = SamplingParams(max_new_tokens=40, ignore_eos=True)
    text = tiny_engine.generate(["hello"], sampling)[0].text
    stop = text[10:13]
    assert len(stop) == 3 and stop not in text[:12]
    events = list(tiny_engine.stream("hello", SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,))))
    streamed = "".join(e.text for e in events)
    assert streamed == text[:text.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_eos_ends_the_sequence(tiny_engine, tiny_loaded):
    greedy = tiny_engine.generate(["hello"], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].token_ids
    engine = Engine(tiny_loaded, max_batch=1, max_seq_len=64)
    engine.eos_ids = frozenset({greedy[4]})  # pretend the 5th token is the model's EOS
    result = engine.generate(["hello"], SamplingParams(max_new_tokens=40))[0]
    assert result.finish_reason == "eos"
    assert result.token_ids == greedy[:greedy.index(greedy[4]) + 1]


def test_chat_messages_use_the_template(tiny_engine):
    messages = [{"role": "user", "content": "hi"}]
    result = tiny_engine.generate([messages], SamplingParams(max_new_tokens=4, ignore_eos=True), DENSE)[0]
    templated = tiny_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert result.token_ids == tiny_engine.generate([templated], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids


def test_prompts_admitted_together_prefill_in_one_forward_as_they_would_alone(tiny_loaded):
    """Right-padded prompts of different lengths: each row's logits and cached keys and values
    equal those of its prompt prefilled alone."""
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=64)
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("a", "three three three", "two two")]
    rows = [engine.cache.take_row() for _ in prompts]
    together = engine.runner.prefill(engine.cache, rows, prompts)
    keys = [engine.cache.layer(1)[0][row, :, :len(p)].clone() for row, p in zip(rows, prompts)]
    for i, prompt in enumerate(prompts):
        alone_row = rows[0]
        single = engine.runner.prefill(engine.cache, [alone_row], [prompt])[0]
        assert (single - together[i]).abs().max().item() <= 1e-5
        assert (engine.cache.layer(1)[0][alone_row, :, :len(prompt)] - keys[i]).abs().max().item() <= 1e-5
        assert engine.cache.lengths[alone_row] == len(prompt)


def test_prefill_groups_keep_the_padding_small():
    from ffnskip.engine.scheduler import PrefillChunk, prefill_groups

    chunks = [PrefillChunk(None, 0, n) for n in (40, 10, 12, 11, 38)]  # type: ignore[arg-type]
    groups = prefill_groups(chunks)
    assert [[c.length for c in group] for group in groups] == [[10, 11, 12], [38, 40]]
