"""Int8 weights (layers.quantise, ModelRunner(weights="int8")): the rounding is the documented one,
the engine computes exactly the model whose matrices are rounded so (eager, compiled, in a padded
mixed batch, before and after the full-precision copy is let go), and reads a quarter of the bytes.
W8a8 (layers.quantise_rows and int8_product, ModelRunner(weights="w8a8")): the same rounding of the
matrices, each product's rows rounded to int8 as well, a row's result independent of its batch."""

from __future__ import annotations

import pytest
import torch

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine, load_model
from ffnskip.engine.embedding import TiedInt8Embedding
from ffnskip.engine.layers import BLOCK, INT8_REDUCED_ROWS, dequantised, int8_product, project, quantisation_of, quantise, quantise_rows
from ffnskip.engine.loading import resolve_weights
from ffnskip.engine.runner import ModelRunner
from ffnskip.engine.smoothing import ALPHA, LAYER_INPUTS, calibration_tokens, input_maxima, smoothing
from ffnskip.engine.stats import weight_bytes
from ffnskip.engine.substitutes import Int8LowRank, Substitute, SubstituteSet
from ffnskip.errors import InvalidArgument
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




def rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """The reference rounding of a product's activations: per row, step = max |x| / 127."""
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.where(step == 0, 0.0, torch.round(x / step.clamp_min(1e-30)) * step)


def test_int8_product_is_the_rounded_rows_times_the_rounded_matrix():
    generator = torch.Generator().manual_seed(1)
    weight, rows = torch.randn(37, 24, generator=generator), torch.randn(5, 24, generator=generator)
    rows[1, 3] = 40.0  # an outlier coarsens only its own row's steps
    rows[2] = 0.0  # a zero row gives zeros, not NaN
    values, scale = quantise_rows(weight)
    assert values.dtype == torch.int8 and values.shape == (37, 24) and scale.shape == (37,)
    expected = rounded_rows(rows) @ rounded_per_row(weight).T
    torch.testing.assert_close(int8_product(rows, values, scale), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(int8_product(rows, values, scale)[2], torch.zeros(37))


def test_an_int8_low_rank_substitute_is_its_rounded_factors_products():
    """A w8a8 engine applies a low-rank substitute as it applies its matrices: both factors rounded
    per output row, each product's rows per row; a quarter of the bytes, laid out as the kernel reads
    them (rounded from a transposed view, the factors kept its strides and every product copied them)."""
    generator = torch.Generator().manual_seed(3)
    bias, first, second = (torch.randn(*shape, generator=generator) for shape in ((96,), (96, 16), (16, 96)))
    substitute = Substitute(bias, first, second)
    int8 = substitute.int8()
    normed = torch.randn(5, 1, 96, generator=generator)
    mapped = rounded_rows(normed.reshape(5, 96)) @ rounded_per_row(first.t()).T
    expected = bias + rounded_rows(mapped) @ rounded_per_row(second.t()).T
    torch.testing.assert_close(int8(normed), expected.reshape(5, 1, 96), rtol=1e-5, atol=1e-5)
    assert all(factor.is_contiguous() for factor in int8.factors)
    assert int8.nbytes < substitute.nbytes / 3


def test_a_rows_int8_product_does_not_depend_on_the_other_rows_of_its_batch():
    generator = torch.Generator().manual_seed(2)
    values, scale = quantise_rows(torch.randn(40, 32, generator=generator))
    rows = torch.randn(16, 32, generator=generator)
    rows[7] *= 1000  # a loud neighbour
    together = int8_product(rows, values, scale)
    for index in (0, 6, 7, 15):
        assert torch.equal(int8_product(rows[index:index + 1], values, scale)[0], together[index])


def rounded_model(directory, cache, smoothed: bool):
    """The HF model with every matrix rounded per output row and every linear's input rounded per
    row (transformers' own forward, not the engine's); `smoothed`: each input first multiplied by
    its smoothing over the calibration texts, its matrices' columns divided by it (q/k/v share
    one, as gate/up do: their weights together)."""
    loaded = load_model(str(directory), device="cpu", dtype="float32", cache_dir=cache)
    model = loaded.model
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    maxima = input_maxima(model, calibration_tokens(loaded.tokenizer)) if smoothed else {}
    groups = [[model.lm_head]] + [group for layer in model.model.layers for group in (
        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
        [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj])]
    names = {module: name for name, module in model.named_modules()}
    for group in groups:
        together = torch.cat([m.weight.detach() for m in group])
        # the engine's factor to the last bit (test_smoothing_factor checks its formula): a factor
        # an ulp apart moves a few values across a rounding boundary
        factor = smoothing(maxima[names[group[0]]], together) if smoothed else torch.ones(together.shape[1])
        for module in group:
            module.weight = torch.nn.Parameter(rounded_per_row(module.weight.detach() / factor), requires_grad=False)
            module.register_forward_pre_hook(lambda _, args, factor=factor: (rounded_rows(args[0] * factor),))
        if tied and group == [model.lm_head]:  # a tied embedding: the rounded head, its smoothing undone
            model.model.embed_tokens.weight = torch.nn.Parameter(model.lm_head.weight.detach() * factor, requires_grad=False)
    return loaded


@pytest.fixture(scope="module")
def w8a8_eager(int8_dir, engine_cache) -> Engine:
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=engine_cache, weights="w8a8")
    return Engine(loaded, max_batch=4, max_seq_len=64)


def unsmoothed_w8a8(directory, cache) -> Engine:
    loaded = load_model(str(directory), device="cpu", dtype="float32", cache_dir=cache, weights="w8a8")
    return Engine(loaded, max_batch=4, max_seq_len=64, runner=ModelRunner(loaded.model, weights="w8a8"))


@pytest.mark.parametrize("smoothed", [True, False], ids=["smoothed", "unsmoothed"])
def test_w8a8_engine_is_the_model_with_rounded_weights_and_activations(smoothed, int8_dir, engine_cache, w8a8_eager):
    """Greedy tokens equal the reference model's, and every matrix of the engine, given the input
    the reference's matching linear got, gives that linear's output. (Whole forwards are not
    compared at float tolerance: an activation an ulp from a rounding boundary rounds either way,
    and moves the logits by up to a few hundredths.)"""
    engine = w8a8_eager if smoothed else unsmoothed_w8a8(int8_dir, engine_cache)
    model = rounded_model(int8_dir, engine_cache, smoothed).model
    assert_greedy_tokens_equal(engine, model)
    seen: dict[str, list[torch.Tensor]] = {}  # linear name -> [its input before rounding, its output]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, [args[0]]), prepend=True)
            module.register_forward_hook(lambda _, args, out, name=name: seen[name].append(out))
    with torch.inference_mode():
        model(torch.tensor([engine.tokenizer.encode(PROMPTS[0])]))
        matrices = [(engine.runner.head, "lm_head.weight", "lm_head")] + [
            (layer, name, f"model.layers.{index}.{hf_name}") for index, layer in enumerate(engine.runner.layers)
            for name, hf_name in LAYER_INPUTS.items()]
        for owner, name, hf_name in matrices:
            (x, expected), weight = seen[hf_name], owner.get_parameter(name)
            ours = project(x, weight, None, weight.shape[0], *quantisation_of(owner, name))[..., :expected.shape[-1]]
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def assert_greedy_tokens_equal(engine: Engine, model) -> None:
    """The engine's greedy tokens for PROMPTS are the HF `model`'s."""
    for prompt, result in zip(PROMPTS, engine.generate(PROMPTS, SAMPLING)):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.inference_mode():
            for _ in range(SAMPLING.max_new_tokens):  # greedy, the whole sequence each step (no cache)
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert result.token_ids == ids[0, -SAMPLING.max_new_tokens:].tolist()


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tied"), seed=0, num_layers=3, tie_word_embeddings=True)


def test_a_tied_w8a8_engine_embeds_from_the_int8_head_and_keeps_no_float_table(tied_dir, engine_cache):
    loaded = load_model(str(tied_dir), device="cpu", dtype="float32", cache_dir=engine_cache, weights="w8a8")
    engine = Engine(loaded, max_batch=4, max_seq_len=64)
    assert isinstance(engine.runner.embed, TiedInt8Embedding)
    assert loaded.model.model.embed_tokens.weight.numel() == 0  # the float table is let go
    assert_greedy_tokens_equal(engine, rounded_model(tied_dir, engine_cache, smoothed=True).model)


@pytest.mark.heavy  # AOTInductor compiles
def test_a_tied_w8a8_engine_serves_the_same_tokens_compiled_after_the_raw_weights_go(tied_dir, tmp_path_factory):
    eager = Engine(load_model(str(tied_dir), device="cpu", dtype="float32", cache_dir=tmp_path_factory.mktemp("e"),
                              weights="w8a8"), max_batch=1, max_seq_len=64)
    loaded = load_model(str(tied_dir), device="cpu", dtype="float32", cache_dir=tmp_path_factory.mktemp("c"), weights="w8a8")
    compiled = Engine(loaded, max_batch=1, max_seq_len=64, compile=True)
    compiled.warm_up([1])
    assert compiled.release_raw_weights() > 0
    assert [r.token_ids for r in compiled.generate(PROMPTS, SAMPLING)] == [r.token_ids for r in eager.generate(PROMPTS, SAMPLING)]


def test_smoothing_factor_balances_the_input_and_weight_ranges():
    """m = 1 / s with s = max|x| ** ALPHA / max|w| ** (1 - ALPHA) per input channel: at ALPHA 0.5
    the smoothed input and the divided weight columns have equal maxima."""
    assert ALPHA == 0.5
    generator = torch.Generator().manual_seed(4)
    weight, maxima = torch.randn(12, 8, generator=generator), torch.rand(8, generator=generator) * 30
    factor = smoothing(maxima, weight)
    torch.testing.assert_close(maxima * factor, (weight / factor).abs().amax(dim=0))


def test_smoothing_an_outlier_channel_makes_the_int8_product_closer():
    """A channel 50 times louder than the rest sets every row's step; moved into the weights
    (smoothing), the rounded product comes closer to the exact one."""
    generator = torch.Generator().manual_seed(3)
    weight, rows = torch.randn(64, 48, generator=generator), torch.randn(32, 48, generator=generator)
    rows[:, 5] *= 50
    exact = rows @ weight.T
    plain = int8_product(rows, *quantise_rows(weight))
    factor = smoothing(rows.abs().amax(dim=0), weight)
    smoothed = int8_product(rows, *quantise_rows(weight / factor), factor)
    assert (smoothed - exact).norm() < 0.5 * (plain - exact).norm()


def test_w8a8_runner_reads_a_quarter_of_the_matrix_bytes(int8_dir, engine_cache, w8a8_eager):
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=engine_cache)
    full, w8a8 = ModelRunner(loaded.model).weight_bytes(), w8a8_eager.runner.weight_bytes()
    # one byte a value, a float scale per output and a float smoothing per input; norms stay float32
    assert 0.25 * full.total < w8a8.total < 0.35 * full.total
    assert 0.25 * full.ffn < w8a8.ffn < 0.35 * full.ffn


def test_an_unknown_weight_format_setting_names_the_field():
    with pytest.raises(InvalidArgument, match="weights.*int4"):
        resolve_weights("int4", torch.device("cpu"))
    assert resolve_weights("w8a8", torch.device("cpu")) == "w8a8"


@pytest.mark.heavy  # AOTInductor compiles: minutes
def test_compiled_w8a8_equals_eager_in_a_padded_mixed_batch(int8_dir, tmp_path_factory, w8a8_eager, monkeypatch):
    """Buckets 1, 4 and 8 of int8 products give the eager w8a8 engine's tokens and skips, the
    static rows' low-rank substitute applied with int8 factors by its package (never eagerly)."""
    cache = tmp_path_factory.mktemp("w8a8-packages")
    loaded = load_model(str(int8_dir), device="cpu", dtype="float32", cache_dir=cache, weights="w8a8")
    engine = Engine(loaded, max_batch=8, max_seq_len=64, compile=True)
    engine.warm_up([1, 4, 8])
    policies = (STATIC, DENSE, ADAPTIVE) * 3
    width, generator = int(loaded.model.config.hidden_size), torch.Generator().manual_seed(4)
    substitutes = SubstituteSet({1: Substitute(*(torch.randn(*shape, generator=generator)
                                                 for shape in ((width,), (width, 3), (3, width))))})

    def mixed(engine: Engine, prompts: list[str]) -> list[tuple[list[int], list]]:
        seqs = [engine.add(prompt=p, sampling=SAMPLING, skip=skip, substitutes=substitutes if skip is STATIC else None)
                for p, skip in zip(prompts, policies)]
        while engine.has_work:
            engine.step()
        return [(list(s.generated), engine.result(s).skip_records) for s in seqs]

    expected = {n: mixed(w8a8_eager, PROMPTS[:n]) for n in (1, 3)}
    eager_calls: list[int] = []
    original = Int8LowRank.__call__
    monkeypatch.setattr(Int8LowRank, "__call__", lambda self, normed: eager_calls.append(1) or original(self, normed))
    for prompts in (PROMPTS[:1], PROMPTS, PROMPTS * 2):
        assert mixed(engine, prompts) == (expected[len(prompts)] if len(prompts) <= 4 else expected[3] * 2)
    engine.release_raw_weights()
    assert mixed(engine, PROMPTS * 2) == expected[3] * 2
    assert eager_calls == []
    assert w8a8_eager.generate(PROMPTS[:1], SAMPLING, STATIC)[0].token_ids != expected[1][0][0]  # it acted
