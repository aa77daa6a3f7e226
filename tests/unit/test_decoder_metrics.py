"""The decoder's per-policy skip counters after the warm-up, from real engine results."""

from __future__ import annotations

from ffnskip.config import DENSE, Policy, SamplingParams, SkipParams
from ffnskip.engine import Engine
from services.decoder.metrics import DecoderMetrics


def test_decode_skips_are_counted_per_served_policy(tiny_engine):
    metrics = DecoderMetrics("tiny", running=lambda: 0, waiting=lambda: 0, profile_version=lambda: 0)
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    static = SkipParams(policy=Policy.STATIC, static_layers=(2, 3), cold_start=1, cold_end=5, warm_up=4)
    for skip in (static, SkipParams(policy=Policy.DENSE, warm_up=0)):
        metrics.finished(tiny_engine.generate(["hello there"], sampling, skip)[0])
    value = lambda name, policy: metrics.registry.get_sample_value(  # noqa: E731
        f"ffnskip:{name}_total", {"model_name": "tiny", "policy": policy})
    layers = tiny_engine.num_layers
    # tokens 1..4 run dense (warm-up); the 8 after it skip 2 FFNs each
    assert value("decode_ffn_blocks", "static") == 8 * layers
    assert value("decode_ffn_blocks_skipped", "static") == 16
    assert value("decode_ffn_blocks", "dense") == 12 * layers  # no warm-up asked: every token counts
    assert value("decode_ffn_blocks_skipped", "dense") == 0


def test_a_resumed_request_counts_only_the_tokens_generated_here(tiny_engine):
    """The replayed tokens were generated (and their FFNs run) by the decoder that failed."""
    metrics = DecoderMetrics("tiny", running=lambda: 0, waiting=lambda: 0, profile_version=lambda: 0)
    static = SkipParams(policy=Policy.STATIC, static_layers=(2,), cold_start=1, cold_end=5, warm_up=4)
    seq = tiny_engine.add(prompt="hello there", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True),
                          skip=static, resumed=[5] * 6, resumed_skips=[[]] * 4 + [[2]] * 2)
    while not seq.finished:
        tiny_engine.step()
    result = tiny_engine.result(seq)
    metrics.finished(result)
    assert result.skip_stats.generated_tokens == 12 and result.skip_stats.ffn_blocks_skipped == 8  # the whole answer
    assert metrics.registry.get_sample_value("ffnskip:generation_tokens_total", {"model_name": "tiny"}) == 6
    decode = lambda name: metrics.registry.get_sample_value(  # noqa: E731
        f"ffnskip:{name}_total", {"model_name": "tiny", "policy": "static"})
    assert decode("decode_ffn_blocks") == 6 * tiny_engine.num_layers and decode("decode_ffn_blocks_skipped") == 6


def test_the_prompt_cache_counters_are_read_at_each_scrape(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=128, prompt_cache=True)
    metrics = DecoderMetrics("tiny", running=lambda: 0, waiting=lambda: 0, profile_version=lambda: 0)
    metrics.watch_prompt_cache(engine.scheduler.prompt_cache)
    value = lambda name: metrics.registry.get_sample_value(  # noqa: E731
        f"ffnskip:prompt_cache_{name}_total", {"model_name": "tiny"})
    assert (value("hits"), value("misses")) == (0, 0)
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompt = "a question asked twice, long enough to be worth keeping"
    engine.generate([prompt], sampling)
    engine.generate([prompt], sampling)
    assert (value("hits"), value("misses"), value("evictions")) == (1, 1, 0)
    assert value("reused_tokens") == len(engine.tokenizer.encode(prompt)) - 1  # all but the last prompt token


def test_the_ffn_reads_a_skip_saved_are_read_at_each_scrape(tiny_loaded):
    """Two rows that skip layer 2 together save its read; with a dense row beside them they do not."""
    engine = Engine(tiny_loaded, max_batch=3, max_seq_len=64)
    metrics = DecoderMetrics("tiny", running=lambda: 0, waiting=lambda: 0, profile_version=lambda: 0)
    metrics.watch_ffn_reads(engine)
    value = lambda name: metrics.registry.get_sample_value(f"ffnskip:{name}_total", {"model_name": "tiny"})  # noqa: E731
    assert (value("decode_layer_steps"), value("decode_ffn_reads")) == (0, 0)
    static = SkipParams(policy="static", static_layers=(2,), warm_up=0)
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.generate(["one", "two"], sampling, static)  # 4 decode steps after each first token
    layers = engine.num_layers
    assert (value("decode_layer_steps"), value("decode_ffn_reads")) == (4 * layers, 4 * (layers - 1))
    seqs = [engine.add(prompt=p, sampling=sampling, skip=skip) for p, skip in (("one", static), ("two", DENSE))]
    while engine.has_work:
        engine.step()
    assert all(s.finished for s in seqs)
    assert (value("decode_layer_steps"), value("decode_ffn_reads")) == (8 * layers, 4 * (layers - 1) + 4 * layers)
