"""Int8 weights (layers.quantise, ModelRunner(weights="int8")): the rounding is the documented one,
the engine computes exactly the model whose matrices are rounded so (eager, compiled, in a padded
mixed batch, before and after the full-precision copy is let go), and reads a quarter of the bytes."""

from __future__ import annotations

import pytest
import torch

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine, load_model
from ffnskip.engine.layers import BLOCK, INT8_REDUCED_ROWS, dequantised, quantise
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.stats import weight_bytes
from tests.helpers.tiny import save_tiny_model

PROMPTS = ["the quick brown fox", "a", "hello there world"]
SAMPLING = SamplingParams(max_new_tokens=10, ignore_eos=True)
STATIC = SkipParams(policy="static", static_layers=(1,), warm_up=2)
ADAPTIVE = SkipParams(policy="adaptive", threshold=1e-6, cold_start=0, cold_end=2, max_skip=1, warm_up=2)


def unblocked(values: torch.Tensor, n: int) -> torch.Tensor:
    """[N / BLOCK, K, BLOCK] -> [N, K]."""
    return values.transpose(1, 2).reshape(-1, values.shape[1])[:n]


def rounded_per_row(weight: torch.Tensor) -> torch.Tensor:
    """The reference rounding, written independently: per output row, scale = max |w| / 127."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.where(scale == 0, 0.0, torch.round(weight / scale.clamp_min(1e-30)).clamp(-127, 127) * scale)


def test_quantise_rounds_each_row_to_127_steps_of_its_largest_magnitude():
    weight = torch.randn(37, 24, generator=torch.Generator().manual_seed(0))  # 37 rows: the last block is padded
    weight[5] = 0.0  # a zero row quantises to zeros, not NaN
    values, scale = quantise(weight)
    assert values.dtype == torch.int8 and values.shape == (3, 24, BLOCK) and scale.shape == (3, 1, BLOCK)
    assert values.abs().max() == 127
    restored = unblocked(values.float() * scale, 37)
    torch.testing.assert_close(restored, rounded_per_row(weight), rtol=0, atol=1e-7)
    assert torch.equal(dequantised(weight), restored)
    assert (restored - weight).abs().max() <= weight.abs().max() / 254 + 1e-7  # within half a step
    assert not torch.equal(restored, weight)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-int8"), seed=0, num_layers=3)


def fake_quantised(directory, cache) -> Engine:
    """An engine over full-precision weights that were rounded as int8 would round them."""
    loaded = load_model(str(directory), device="cpu", dtype="float32", cache_dir=cache)
    for module in loaded.model.modules():  # new tensors: a tied embedding stays float32, as in the engine
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(rounded_per_row(module.weight.detach()), requires_grad=False)
    return Engine(loaded, max_batch=4, max_seq_len=64)


@pytest.fixture(scope="module")
def reference(int8_dir, engine_cache) -> Engine:
    return fake_quantised(int8_dir, engine_cache)


@pytest.fixture(scope="module")
def int8_eager(int8_dir, engine_cache) -> Engine:
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=engine_cache, weights="int8")
    return Engine(loaded, max_batch=4, max_seq_len=64)


@pytest.mark.parametrize("skip", [DENSE, STATIC, ADAPTIVE], ids=["dense", "static", "adaptive"])
def test_int8_engine_is_the_model_with_rounded_weights(skip, int8_eager, reference):
    ours = int8_eager.generate(PROMPTS, SAMPLING, skip)
    theirs = reference.generate(PROMPTS, SAMPLING, skip)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    assert [r.skip_records for r in ours] == [r.skip_records for r in theirs]
    ids = [int8_eager.tokenizer.encode(p) for p in PROMPTS]
    torch.testing.assert_close(int8_eager.runner.prefill(int8_eager.cache, [0, 1, 2], ids),
                               reference.runner.prefill(reference.cache, [0, 1, 2], ids), rtol=1e-4, atol=1e-4)


def test_int8_slices_converted_one_at_a_time_give_the_same_product(int8_eager, reference, monkeypatch):
    """Over many rows an int8 matrix is converted a slice of blocks at a time: one block a slice
    gives what the whole matrix at once gives."""
    import ffnskip.engine.layers as layers

    ids = [int8_eager.tokenizer.encode(p) for p in PROMPTS]
    whole = int8_eager.runner.prefill(int8_eager.cache, [0, 1, 2], ids)
    monkeypatch.setattr(layers, "CONVERTED_SLICE_BYTES", 1)  # one block a slice
    torch.testing.assert_close(int8_eager.runner.prefill(int8_eager.cache, [0, 1, 2], ids), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, reference.runner.prefill(reference.cache, [0, 1, 2], ids), rtol=1e-4, atol=1e-4)


def test_int8_runner_reads_a_quarter_of_the_matrix_bytes(int8_dir, engine_cache, int8_eager):
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=engine_cache)
    full = ModelRunner(loaded.model).weight_bytes()
    hf = weight_bytes(loaded.model)  # as the HF model counts them, whose FFN leaves out its norm
    norms = sum(layer.post_attention_layernorm.weight.numel() * 4 for layer in loaded.model.model.layers)
    assert (full.total, full.ffn) == (hf.total, hf.ffn + norms)
    int8 = int8_eager.runner.weight_bytes()
    # matrices at one byte a value plus a float scale per output; norms stay float32
    assert 0.25 * full.total < int8.total < 0.35 * full.total
    assert 0.25 * full.ffn < int8.ffn < 0.35 * full.ffn


def test_unknown_weight_format_is_refused(int8_dir, engine_cache):
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=engine_cache)
    with pytest.raises(ValueError, match="weights must be one of"):
        ModelRunner(loaded.model, weights="int4")


@pytest.mark.heavy  # AOTInductor compiles: minutes
def test_compiled_int8_equals_eager_in_every_kind_of_bucket(int8_dir, tmp_path_factory, reference):
    """Buckets 1 and 4 multiply-and-reduce over the int8 blocks, bucket 8 converts them for the
    batched matmul: each gives the eager int8 engine's tokens, in a padded mixed batch too, and
    keeps them once the model's own copy of the weights is let go."""
    assert INT8_REDUCED_ROWS == 4  # the buckets below straddle the switch
    cache = tmp_path_factory.mktemp("int8-packages")
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=cache, weights="int8")
    engine = Engine(loaded, max_batch=8, max_seq_len=64, compile=True)
    engine.warm_up([1, 4, 8])

    def mixed(engine: Engine, prompts: list[str]) -> list[list[int]]:
        policies = (STATIC, DENSE, ADAPTIVE) * 3
        seqs = [engine.add(prompt=p, sampling=SAMPLING, skip=skip) for p, skip in zip(prompts, policies)]
        while engine.has_work:
            engine.step()
        return [list(s.generated) for s in seqs]

    for prompts in (PROMPTS[:1], PROMPTS, PROMPTS * 2):  # buckets 1, 4 (3 rows padded) and 8 (6 rows padded)
        expected = mixed(reference, prompts) if len(prompts) <= 4 else mixed(reference, prompts[:3]) * 2
        assert mixed(engine, prompts) == expected
    engine.release_raw_weights()
    assert mixed(engine, PROMPTS) == mixed(reference, PROMPTS)
    assert mixed(engine, PROMPTS * 2) == mixed(reference, PROMPTS) * 2


