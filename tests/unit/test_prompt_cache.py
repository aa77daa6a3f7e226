"""The prompt cache (engine/prompt_cache.py): a request that starts as an earlier or a running one
did is prefilled from where they part, and answers exactly as a fresh engine does; only keys and
values a dense prefill would compute are reused; the least recently used kept row goes first."""

from __future__ import annotations

import pytest

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine, load_model
from ffnskip.engine.prompt_cache import PromptCacheStats

SAMPLING = SamplingParams(max_new_tokens=8, ignore_eos=True)
SYSTEM = "You are a terse assistant who answers in one short line. " * 3
STATIC = SkipParams(policy="static", static_layers=(1,), warm_up=2)


@pytest.fixture(scope="module")
def loaded(tiny_dir, engine_cache):
    return load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=engine_cache)


def engine(loaded, prompt_cache: bool, max_batch: int = 4) -> Engine:
    return Engine(loaded, max_batch=max_batch, max_seq_len=256, prompt_cache=prompt_cache)


def run(engine: Engine, prompt_ids: list[int], sampling: SamplingParams = SAMPLING, skip: SkipParams = DENSE):
    seq = engine.add(prompt_ids=prompt_ids, sampling=sampling, skip=skip)
    while engine.has_work:
        engine.step()
    return seq


def stats(engine: Engine) -> PromptCacheStats:
    assert engine.scheduler.prompt_cache is not None
    return engine.scheduler.prompt_cache.stats


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_a_chat_turn_resent_whole_is_prefilled_from_where_it_differs(loaded):
    cached, fresh = engine(loaded, True), engine(loaded, False)
    first = ids(cached, SYSTEM + "What is two and two?")
    answer = run(cached, first).generated
    second = first + answer + ids(cached, " And three and three?")
    seq = run(cached, second)
    counts = stats(cached)
    assert (counts.hits, counts.misses) == (1, 1)
    # the whole first turn was reused: its prompt and its answer but the last token (never fed back)
    assert counts.reused_tokens == len(first) + len(answer) - 1
    assert seq.generated == run(fresh, second).generated


def test_two_users_sharing_a_system_prompt_share_its_keys_while_both_run(loaded):
    cached, fresh = engine(loaded, True), engine(loaded, False)
    first = cached.add(prompt_ids=ids(cached, SYSTEM + "Name a colour."), sampling=SAMPLING)
    cached.step()  # the first prompt is prefilled and decoding
    second_ids = ids(cached, SYSTEM + "Name a fruit.")
    second = cached.add(prompt_ids=second_ids, sampling=SAMPLING)
    while cached.has_work:
        cached.step()
    shared = len(ids(cached, SYSTEM + "Name a "))
    assert stats(cached).hits == 1
    assert shared - 1 <= stats(cached).reused_tokens <= shared + 1  # token boundaries may merge
    assert second.generated == run(fresh, second_ids).generated
    assert first.generated == run(fresh, ids(fresh, SYSTEM + "Name a colour.")).generated


def test_keys_computed_with_a_skipped_ffn_are_never_reused(loaded):
    """A static skip from the third token on: the kept row holds the prompt and the warm-up tokens,
    not the positions whose forward skipped layer 1 (a dense request resending them prefills them)."""
    cached, fresh = engine(loaded, True), engine(loaded, False)
    first = ids(cached, SYSTEM + "Count to five.")
    skipping = run(cached, first, skip=STATIC)
    assert any(skipping.skip_records) and not any(skipping.skip_records[:2])
    second = first + skipping.generated + ids(cached, " Again.")
    seq = run(cached, second)
    # positions up to the first forward that skipped: the prompt and generated[0:2] (records 1 and 2 are empty)
    first_skip = next(i for i, record in enumerate(skipping.skip_records) if record)
    assert stats(cached).reused_tokens == len(first) + first_skip - 1
    assert seq.generated == run(fresh, second).generated


def test_the_least_recently_used_kept_row_is_overwritten_first(loaded):
    """Three rows, five conversations one after another, none sharing a start: a, b and c are
    kept; a is continued (so b is now the oldest); d needs a row and overwrites b's."""
    cached = engine(loaded, True, max_batch=3)
    prompts = {name: ids(cached, f"{name * 3} " * 12) for name in ("ant", "bee", "cat", "dog")}
    for name in ("ant", "bee", "cat"):
        run(cached, prompts[name])
    run(cached, prompts["ant"] + ids(cached, " again"))
    assert (stats(cached).hits, stats(cached).evictions) == (1, 0)
    run(cached, prompts["dog"])
    assert stats(cached).evictions == 1
    run(cached, prompts["cat"] + ids(cached, " more"))  # kept
    assert stats(cached).hits == 2
    run(cached, prompts["bee"] + ids(cached, " more"))  # overwritten: prefilled anew
    assert stats(cached).hits == 2


def test_a_request_for_prompt_logprobs_prefills_its_whole_prompt(loaded):
    cached, fresh = engine(loaded, True), engine(loaded, False)
    prompt = ids(cached, SYSTEM + "Spell cat.")
    run(cached, prompt)
    asking = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=True)
    ours, theirs = run(cached, prompt, asking), run(fresh, prompt, asking)
    assert len(ours.prompt_logprobs) == len(prompt)
    assert [p.token_id for p in ours.prompt_logprobs] == [p.token_id for p in theirs.prompt_logprobs]
    assert ours.generated == theirs.generated
