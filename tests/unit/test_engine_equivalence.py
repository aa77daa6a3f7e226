"""With skipping off the engine is the unmodified model: logits and greedy ids."""

from __future__ import annotations

from ffnskip.config import DENSE, SamplingParams, SkipParams
from tests.helpers.reference import engine_logits, transformers_logits

PROMPT = "the quick brown fox"


def test_dense_logits_equal_transformers(tiny_loaded):
    prompt_ids = tiny_loaded.tokenizer(PROMPT)["input_ids"]
    ids, ours = engine_logits(tiny_loaded, prompt_ids, steps=12)
    reference = transformers_logits(tiny_loaded, prompt_ids, ids)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_greedy_ids_equal_transformers_generate(tiny_engine, tiny_loaded):
    sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ours = tiny_engine.generate([PROMPT], sampling, DENSE)[0].token_ids
    prompt_ids = tiny_loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    theirs = tiny_loaded.model.generate(prompt_ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours == theirs[0, prompt_ids.shape[1]:].tolist()


def test_threshold_above_every_similarity_is_dense(tiny_engine):
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
    never = SkipParams(policy="adaptive", threshold=1.0, cold_start=0, warm_up=0, max_skip=None)
    dense = tiny_engine.generate([PROMPT], sampling, DENSE)[0]
    adaptive = tiny_engine.generate([PROMPT], sampling, never)[0]
    assert adaptive.skip_stats.ffn_blocks_skipped == 0
    assert adaptive.token_ids == dense.token_ids


def test_batched_equals_unbatched(tiny_engine):
    prompts = ["a", "hello there world", "zz top", "the quick brown fox jumps"]
    cases = [
        (SamplingParams(max_new_tokens=10, ignore_eos=True), DENSE),
        (SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.9, top_k=50, seed=7),
         SkipParams(policy="random", probability=0.3, warm_up=2, seed=3)),
        (SamplingParams(max_new_tokens=10, ignore_eos=True),
         SkipParams(policy="adaptive", threshold=0.2, cold_start=1, max_skip=2, warm_up=1)),
    ]
    for sampling, skip in cases:
        batched = tiny_engine.generate(prompts, sampling, skip)
        for prompt, together in zip(prompts, batched):
            alone = tiny_engine.generate([prompt], sampling, skip)[0]
            assert together.token_ids == alone.token_ids, (skip.policy, prompt)
            assert together.skip_records == alone.skip_records, (skip.policy, prompt)


def test_sampling_is_seeded_per_request(tiny_engine):
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=11)
    first = tiny_engine.generate([PROMPT], sampling)[0].token_ids
    again = tiny_engine.generate([PROMPT], sampling)[0].token_ids
    other = tiny_engine.generate([PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=12))[0].token_ids
    assert first == again
    assert first != other
