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


def test_rows_that_disagree_share_a_batch(compiled_engine, tiny_loaded):
    """A layer that some rows skip and others run: the FFN segment with a row mask."""
    def mixed(engine: Engine):
        seqs = [engine.add(prompt=p, sampling=SAMPLING, skip=skip)
                for p, skip in zip(PROMPTS, (POLICIES["static"], DENSE, POLICIES["adaptive"]))]
        while engine.has_work:
            engine.step()
        return [(s.generated, s.skip_records) for s in seqs]

    ours = mixed(compiled_engine)
    assert ours == mixed(Engine(tiny_loaded, max_batch=4, max_seq_len=64))
    assert any(records for _, records in ours) and not any(ours[1][1])  # some rows skipped, dense did not


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


def _first_decode_logits(engine: Engine, prompt: str) -> torch.Tensor:
    model, cache = engine.model, engine.cache
    row = cache.take_row()
    ids = torch.tensor(engine.tokenizer(prompt)["input_ids"])
    model.prefill(cache, row, ids)
    engine.controller.begin_step([], [], [])
    logits = model.decode(cache, [5], [len(ids)], engine.controller)
    cache.release_row(row)
    return logits.float()


def test_compiled_logits_match_eager_within_float32_rounding(compiled_engine, tiny_loaded):
    ours = _first_decode_logits(compiled_engine, PROMPTS[0])
    theirs = _first_decode_logits(Engine(tiny_loaded, max_batch=4, max_seq_len=64), PROMPTS[0])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_compiled_bfloat16_logits_match_eager_within_bfloat16_rounding(tiny_dir):
    """bf16 compiles without autotuning: its micro-GEMM gave wrong tokens on an AVX2 CPU. Fused
    kernels round differently from eager ops, so the bound is bf16's, not exact equality."""
    from ffnskip.engine import load_model

    loaded = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    compiled = Engine(loaded, max_batch=1, max_seq_len=64, compile=True)
    assert compiled.model.segments.autotune is False
    ours = _first_decode_logits(compiled, PROMPTS[0])
    theirs = _first_decode_logits(Engine(loaded, max_batch=1, max_seq_len=64), PROMPTS[0])
    assert (ours - theirs).abs().max().item() <= 0.02 * theirs.abs().max().item()
    assert ours.argmax() == theirs.argmax()
