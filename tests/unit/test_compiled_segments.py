"""Compiled decode segments give the eager engine's results: same greedy tokens, same skips,
logits within float32 rounding, with batches padded to a bucket around live cache rows."""

from __future__ import annotations

import pytest
import torch

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.compiled import CompiledSegments, batch_buckets

PROMPTS = ["the quick brown fox", "a", "hello there world"]
SAMPLING = SamplingParams(max_new_tokens=12, ignore_eos=True)
POLICIES = {
    "dense": DENSE,
    "static": SkipParams(policy="static", static_layers=(1,), warm_up=2),
    "adaptive": SkipParams(policy="adaptive", threshold=1e-6, cold_start=0, cold_end=2, max_skip=1, warm_up=2),
}


def test_batch_buckets_are_powers_of_two_up_to_the_cache_rows():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)


@pytest.fixture(scope="module")
def compiled_engine(tiny_loaded) -> Engine:
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64, compile=True)
    assert engine.warm_up([1, 3]) > 0  # buckets 1 and 4
    return engine


def test_warm_up_compiles_every_segment_of_the_buckets(compiled_engine):
    segments = compiled_engine.model.segments
    assert isinstance(segments, CompiledSegments)
    assert segments.warm_buckets == {1, 4}
    assert set(segments._blocks) == {(i, run) for i in range(compiled_engine.num_layers) for run in (True, False)}


@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_generation_equals_eager(policy, compiled_engine, tiny_loaded):
    eager = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    ours = compiled_engine.generate(PROMPTS, SAMPLING, POLICIES[policy])
    theirs = eager.generate(PROMPTS, SAMPLING, POLICIES[policy])
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    assert [r.skip_records for r in ours] == [r.skip_records for r in theirs]
    if policy != "dense":
        assert any(r.skip_stats.ffn_blocks_skipped for r in ours)  # the skip variants really ran


def test_padding_rows_never_touch_a_sequence_admitted_in_the_same_step(compiled_engine, tiny_loaded):
    """Three rows decode padded to bucket 4 while a fourth sequence is prefilled into row 3."""
    def staggered(engine: Engine) -> list[list[int]]:
        seqs = [engine.add(prompt=p, sampling=SAMPLING) for p in PROMPTS]
        engine.step()
        engine.step()
        seqs.append(engine.add(prompt="zz top", sampling=SAMPLING))
        while engine.has_work:
            engine.step()
        return [s.generated for s in seqs]

    assert staggered(compiled_engine) == staggered(Engine(tiny_loaded, max_batch=4, max_seq_len=64))


def test_compiled_logits_match_eager_within_float32_rounding(compiled_engine, tiny_loaded):
    eager = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    logits = []
    for engine in (compiled_engine, eager):
        model, cache = engine.model, engine.cache
        row = cache.take_row()
        prompt = torch.tensor(tiny_loaded.tokenizer(PROMPTS[0])["input_ids"])
        model.prefill(cache, row, prompt)
        engine.controller.begin_step([], [], [])
        logits.append(model.decode(cache, [5], [len(prompt)], engine.controller))
        cache.release_row(row)
    assert logits[0].shape == logits[1].shape
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
