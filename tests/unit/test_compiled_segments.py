"""Compiled decode segments give the eager engine's results: same greedy tokens, same skips,
logits within float32 rounding, with batches padded to a bucket around live cache rows; a
second process loads the packages from disk instead of compiling them.

A 3-layer tiny model keeps the packages few (each costs a C++ build of a few seconds)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from ffnskip.config import DENSE, SamplingParams, SkipParams
from ffnskip.engine import Engine, load_model
from ffnskip.engine.compiled import CompiledSegments, batch_buckets
from ffnskip.engine.precompile import compile_in_child
from ffnskip.engine.substitutes import Substitute, SubstituteSet
from tests.helpers.tiny import save_tiny_model

pytestmark = pytest.mark.heavy  # AOTInductor compiles: minutes

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
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny3"), seed=0, num_layers=3)


@pytest.fixture(scope="module")
def package_cache(tmp_path_factory):
    """Packages compile into a fresh cache, never the user's."""
    return tmp_path_factory.mktemp("ffnskip-cache")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir, package_cache):
    return load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=package_cache)


@pytest.fixture(scope="module")
def compiled_engine(tiny_loaded) -> Engine:
    engine = Engine(tiny_loaded, max_batch=4, max_seq_len=64, compile=True)
    compiled = []
    assert engine.warm_up([1, 3], on_compiled=lambda: compiled.append(1)) > 0  # buckets 1 and 4
    assert len(compiled) == engine.runner.segments.compiled
    return engine


def test_warm_up_compiles_every_segment_of_the_buckets(compiled_engine, package_cache):
    segments = compiled_engine.runner.segments
    assert isinstance(segments, CompiledSegments)
    assert segments.warm_buckets == {1, 4}
    assert segments.compiled == 2 * 4  # per bucket: attention, ffn, substitute and head packages for every layer
    assert len(list(package_cache.glob("compiled/*/b*/*.pt2"))) == segments.compiled


def test_a_second_engine_loads_the_packages_without_compiling(compiled_engine, tiny_loaded):
    again = Engine(tiny_loaded, max_batch=4, max_seq_len=64, compile=True)
    assert again.packages_to_compile([1, 3]) == 0
    assert again.packages_to_compile([2]) == 4  # bucket 2 was never compiled
    again.warm_up([1, 3], on_compiled=lambda: pytest.fail("a package on disk was compiled again"))
    assert again.runner.segments.compiled == 0
    ours = again.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])
    theirs = compiled_engine.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]


def test_loading_packages_leaves_nothing_in_the_temp_directory(compiled_engine, tiny_loaded, tmp_path, monkeypatch):
    """AOTInductor's loader unpacks each package under TMPDIR and removes it only when destroyed,
    which a killed process never is: a decoder's loads must leave nothing there."""
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()  # Inductor's own cache directory stays where it is
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    again = Engine(tiny_loaded, max_batch=4, max_seq_len=64, compile=True)
    again.warm_up([1, 3], on_compiled=lambda: pytest.fail("a package on disk was compiled again"))
    assert list(tmp_path.iterdir()) == []
    ours = again.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])  # the packages run without their files
    assert [r.token_ids for r in ours] == [r.token_ids for r in compiled_engine.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])]


def test_released_raw_weights_keep_the_results_and_free_the_models_copy(tiny_dir, package_cache, compiled_engine):
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=package_cache)  # its own model: changed here
    engine = Engine(loaded, max_batch=4, max_seq_len=64, compile=True)
    engine.warm_up([1, 3], on_compiled=lambda: pytest.fail("a package on disk was compiled again"))
    runner = engine.runner
    assert not loaded.model.config.tie_word_embeddings  # so the LM head's matrix goes too
    # the layers' and the head's parameters: the segments hold their own copies of every one
    own = sum(p.numel() * p.element_size() for m in (*runner.layers, runner.head) for p in m.parameters())
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    prefill = runner.prefill(engine.cache, [0, 1, 2], ids)
    before = engine.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])

    assert engine.release_raw_weights() == own
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # the HF views are gone too
    assert all(p.dim() == 3 for m in (*runner.layers, runner.head) for p in m.parameters() if p.dim() > 1)
    torch.testing.assert_close(runner.prefill(engine.cache, [0, 1, 2], ids), prefill, rtol=1e-5, atol=1e-5)
    after = engine.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])
    assert [r.token_ids for r in after] == [r.token_ids for r in before]
    assert [r.token_ids for r in after] == [r.token_ids for r in compiled_engine.generate(PROMPTS, SAMPLING, POLICIES["adaptive"])]


def test_an_eager_engine_has_no_second_copy_to_release(tiny_loaded):
    with pytest.raises(ValueError, match="not compiled"):
        Engine(tiny_loaded, max_batch=1, max_seq_len=16).release_raw_weights()


def test_packages_of_another_precision_or_model_do_not_collide(tiny_loaded, tiny_dir, tmp_path, package_cache):
    from ffnskip.engine.compiled import package_key

    cpu = torch.device("cpu")
    fp32 = package_key(tiny_loaded.fingerprint, torch.float32, "full", cpu, True)
    assert fp32 == package_key(tiny_loaded.fingerprint, torch.float32, "full", cpu, True)
    assert fp32 != package_key(tiny_loaded.fingerprint, torch.bfloat16, "full", cpu, False)
    assert fp32 != package_key(tiny_loaded.fingerprint, torch.float32, "int8", cpu, True)
    other = load_model(str(save_tiny_model(tmp_path / "other", seed=1, num_layers=3)), device="cpu", dtype="float32",
                       cache_dir=package_cache)
    assert fp32 != package_key(other.fingerprint, torch.float32, "full", cpu, True)


def test_cpus_of_one_capability_with_other_instructions_do_not_share_packages(tmp_path):
    """Inductor compiles with -march=native: a package built on a CPU with more instructions than
    another of the same torch capability must not be loaded there from the shared compile cache."""
    from ffnskip.engine.cpu_target import cpu_target

    def target(flags: str) -> str:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
                           f"processor\t: 1\nflags\t\t: {flags}\n")
        return cpu_target.__wrapped__(cpuinfo)

    zen4 = target("fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16")
    assert zen4.startswith(torch.backends.cpu.get_cpu_capability() + "-")
    assert zen4 == target("avx512_bf16 avx512_vnni avx512vl avx512bw avx512f avx2 sse2 fpu")  # the same set
    assert zen4 != target("fpu sse2 avx2 avx512f avx512bw avx512vl")  # no VNNI, no BF16
    assert cpu_target() == cpu_target.__wrapped__(Path("/proc/cpuinfo"))  # this host's, read once


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


def test_compensated_rows_decode_as_eager_in_a_padded_mixed_batch(compiled_engine, tiny_loaded):
    """Substitutes apply around the compiled FFN segment as in the eager path: three rows padded
    to bucket 4, one compensated, one plainly skipping, one dense."""
    width = int(tiny_loaded.model.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    subs = SubstituteSet({1: Substitute(torch.randn(width, generator=generator),
                                        torch.randn(width, 4, generator=generator), torch.randn(4, width, generator=generator))})

    def mixed(engine: Engine):
        rows = ((POLICIES["static"], subs), (POLICIES["static"], None), (DENSE, subs))
        seqs = [engine.add(prompt=p, sampling=SAMPLING, skip=skip, substitutes=chosen)
                for p, (skip, chosen) in zip(PROMPTS, rows)]
        while engine.has_work:
            engine.step()
        return [list(s.generated) for s in seqs]

    ours = mixed(compiled_engine)
    assert ours == mixed(Engine(tiny_loaded, max_batch=4, max_seq_len=64))
    alone = Engine(tiny_loaded, max_batch=1, max_seq_len=64)
    assert ours[0] == alone.generate(PROMPTS[:1], SAMPLING, POLICIES["static"], subs)[0].token_ids
    assert ours[0] != alone.generate(PROMPTS[:1], SAMPLING, POLICIES["static"])[0].token_ids  # they did act


def test_a_low_rank_substitute_runs_in_its_package_and_a_bias_eagerly(compiled_engine, tiny_loaded, monkeypatch):
    """The compiled engine applies a low-rank substitute with the "substitute" package (its
    eager operations never run) and gives the eager engine's tokens; a bias, which no package
    applies, runs eagerly."""
    width = int(tiny_loaded.model.config.hidden_size)
    generator = torch.Generator().manual_seed(1)
    bias = torch.randn(width, generator=generator)
    lowrank = SubstituteSet({1: Substitute(bias, torch.randn(width, 3, generator=generator),
                                           torch.randn(3, width, generator=generator))})
    bias_only = SubstituteSet({1: Substitute(bias)})
    eager = Engine(tiny_loaded, max_batch=4, max_seq_len=64)
    expected = {name: [r.token_ids for r in eager.generate(PROMPTS, SAMPLING, POLICIES["static"], subs)]
                for name, subs in (("lowrank", lowrank), ("bias", bias_only))}
    eager_calls: list[str] = []
    original = Substitute.__call__
    monkeypatch.setattr(Substitute, "__call__", lambda self, normed: eager_calls.append(self.kind) or original(self, normed))

    ours = compiled_engine.generate(PROMPTS, SAMPLING, POLICIES["static"], lowrank)
    assert [r.token_ids for r in ours] == expected["lowrank"]
    assert eager_calls == []
    ours = compiled_engine.generate(PROMPTS, SAMPLING, POLICIES["static"], bias_only)
    assert [r.token_ids for r in ours] == expected["bias"]
    assert eager_calls and set(eager_calls) == {"bias"}


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
    runner, cache = engine.runner, engine.cache
    row = cache.take_row()
    ids = engine.tokenizer(prompt)["input_ids"]
    runner.prefill(cache, [row], [ids])
    logits = runner.decode(cache, [5], [len(ids)], engine.planner.begin_step([], [], []))
    cache.release_row(row)
    return logits.float()


def test_compiled_logits_match_eager_within_float32_rounding(compiled_engine, tiny_loaded):
    ours = _first_decode_logits(compiled_engine, PROMPTS[0])
    theirs = _first_decode_logits(Engine(tiny_loaded, max_batch=4, max_seq_len=64), PROMPTS[0])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_compiled_bfloat16_logits_are_as_close_to_float32_as_eager_bfloat16(tiny_loaded, tiny_dir, package_cache):
    """bf16 compiles without autotuning: its micro-GEMM gave wrong tokens on an AVX2 CPU. Fused
    kernels (the attention among them) round differently from eager ops, so compiled and eager
    bf16 differ from each other by bf16 rounding; both must stay as close to float32."""
    loaded = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", cache_dir=package_cache)
    compiled = Engine(loaded, max_batch=1, max_seq_len=64, compile=True)
    assert compiled.runner.segments.autotune is False
    ours = _first_decode_logits(compiled, PROMPTS[0])
    eager = _first_decode_logits(Engine(loaded, max_batch=1, max_seq_len=64), PROMPTS[0])
    exact = _first_decode_logits(Engine(tiny_loaded, max_batch=1, max_seq_len=64), PROMPTS[0])
    assert (ours - exact).abs().max().item() <= 1.5 * (eager - exact).abs().max().item()
    assert ours.argmax() == exact.argmax()


def test_bench_compiles_only_the_missing_packages_with_a_progress_bar(compiled_engine, tiny_dir, capsys, monkeypatch,
                                                                      package_cache):
    from ffnskip.cli import main

    monkeypatch.setenv("FFNSKIP_CACHE", str(package_cache))  # the command reads its cache root from the environment

    assert main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--dtypes", "float32", "--batches", "1,2",
                 "--new-tokens", "4", "--reps", "1", "--policies", "dense", "--no-peer", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["compiled"] is True
    assert report["packages_compiled"] == {"float32": 4}  # bucket 2; bucket 1 was on disk
    assert "compiling float32 decode packages" in captured.err


def test_a_bucket_runs_eagerly_until_warm_up_loads_it(compiled_engine, tiny_dir, tmp_path):
    """A serving decoder's engine: nothing compiles on a request's path, and a bucket's packages are
    used once warm_up has loaded them."""
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=tmp_path)  # an empty compile cache
    serving = Engine(loaded, max_batch=4, max_seq_len=64, compile=True, eager_until_warm=True)
    segments = serving.runner.segments
    assert isinstance(segments, CompiledSegments)
    eager = Engine(loaded, max_batch=4, max_seq_len=64)
    two = PROMPTS[:2]
    assert [r.token_ids for r in serving.generate(two, SAMPLING)] == [r.token_ids for r in eager.generate(two, SAMPLING)]
    assert segments.compiled == 0 and serving.packages_to_compile([1, 2]) == 8 and segments.warm_buckets == set()
    serving.warm_up([1])
    assert segments.warm_buckets == {1} and segments.compiled == 4
    ours = serving.generate(PROMPTS[:1], SAMPLING, POLICIES["adaptive"])
    theirs = compiled_engine.generate(PROMPTS[:1], SAMPLING, POLICIES["adaptive"])
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]


def test_requests_served_while_a_child_process_compiles_are_right(tiny_dir, tmp_path):
    """PyTorch's compiler is not thread-safe: with the packages traced in a thread of the serving
    process, eager requests served meanwhile failed (their sampled tokens came back symbolic).
    The child process compiles; this process only loads each bucket it reports complete."""
    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=tmp_path)  # an empty compile cache
    serving = Engine(loaded, max_batch=2, max_seq_len=64, compile=True, eager_until_warm=True)
    reference = [r.token_ids for r in Engine(loaded, max_batch=2, max_seq_len=64).generate(PROMPTS[:2], SAMPLING)]
    events: list[dict] = []

    def compile_and_load() -> None:
        for event in compile_in_child(loaded, 2):
            events.append(event)
            if "bucket" in event:
                serving.warm_up([event["bucket"]])

    thread = threading.Thread(target=compile_and_load)
    thread.start()
    served = 0
    while thread.is_alive() or not served:
        assert [r.token_ids for r in serving.generate(PROMPTS[:2], SAMPLING)] == reference
        served += 1
    thread.join()
    assert events == [{"package": 1}, {"package": 2}, {"package": 3}, {"package": 4}, {"bucket": 1},
                      {"package": 5}, {"package": 6}, {"package": 7}, {"package": 8}, {"bucket": 2}]
    segments = serving.runner.segments
    assert isinstance(segments, CompiledSegments)
    assert segments.compiled == 0 and segments.warm_buckets == {1, 2} and serving.packages_to_compile([1, 2]) == 0
