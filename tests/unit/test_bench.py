"""`ffnskip bench` in one process: precisions side by side, realised fraction per interleaved pair."""

from __future__ import annotations

import json

from ffnskip.cli import main


def test_precisions_are_rows_side_by_side_with_their_agreement(tiny_dir, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--dtypes", "float32,bfloat16", "--batches", "1",
                 "--new-tokens", "20", "--reps", "3", "--policies", "dense,static_8", "--no-compile", "--no-peer",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["policy"], r["dtype"]): r for r in report["rows"]}
    assert set(rows) == {(p, d) for p in ("dense", "static_8") for d in ("float32", "bfloat16")}
    assert report["compiled"] is False
    # bf16's dense greedy tokens are compared with fp32's; fp32 is the reference itself
    assert 0.0 <= rows[("dense", "bfloat16")]["agreement_with_float32"] <= 1.0
    assert rows[("dense", "float32")]["agreement_with_float32"] is None
    static = rows[("static_8", "float32")]
    assert static["skip_ratio"] > 0  # layer 4 of 6 skipped after the 16-token warm-up
    assert len(static["realised_fraction_pairs"]) == 3  # one per interleaved dense/static pair
    assert sorted(static["realised_fraction_pairs"])[1] == static["realised_fraction"]  # the median
    assert rows[("dense", "float32")]["realised_fraction_pairs"] == []  # no skip, no fraction
    # decode steps are timed apart from the prefill: a step is shorter than a request's time per token
    dense = rows[("dense", "float32")]
    assert 0 < dense["prefill_share"] < 1
    assert dense["step_ms"] < 1000 * 20 / dense["tokens_per_s"]
    assert len(static["realised_fraction_request_pairs"]) == 3


def test_asking_for_peer_rows_in_an_unsupported_precision_is_a_clear_error(tiny_dir, capsys):
    code = main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--dtypes", "float16", "--batches", "1",
                 "--new-tokens", "4", "--reps", "1", "--no-compile", "--peer"])
    assert code == 2
    assert "peer" in capsys.readouterr().err


def test_a_run_without_decode_steps_is_a_clear_error(tiny_dir, capsys):
    code = main(["bench", "--model", str(tiny_dir), "--device", "cpu", "--batches", "1", "--new-tokens", "1",
                 "--reps", "1", "--no-compile", "--no-peer"])
    assert code == 2
    assert "new_tokens" in capsys.readouterr().err


def test_profile_step_times_every_segment_call_and_restores_the_segments(tiny_engine):
    from ffnskip.bench.step_profile import profile_decode_step

    ids = tiny_engine.tokenizer("profile me")["input_ids"]
    profile = profile_decode_step(tiny_engine, ids, steps=3)
    segments = profile["segments_ms"]
    assert segments["attention (q/k/v, cache write, attention, o_proj)"]["calls_per_step"] == tiny_engine.num_layers
    assert segments["ffn"]["calls_per_step"] == tiny_engine.num_layers  # dense
    assert segments["lm head"]["calls_per_step"] == 1
    assert not {"attention", "ffn", "head"} & set(vars(tiny_engine.runner.segments))  # the timing wrappers are gone
    assert not tiny_engine.has_work


def test_engine_rows_step_side_by_side_on_one_shared_model(tiny_loaded):
    from ffnskip.bench.inprocess import BenchConfig, BenchRunner, run_groups
    from ffnskip.config import DENSE, SamplingParams, SkipParams
    from ffnskip.engine import Engine

    prompts = [tiny_loaded.tokenizer(text)["input_ids"] for text in ("side by side", "two rows")]
    static = SkipParams(policy="static", static_layers=(2, 3), warm_up=2)
    configs = [BenchConfig("hf_generate", 2, None), BenchConfig("dense", 2, DENSE), BenchConfig("static", 2, static),
               BenchConfig("dense", 2, DENSE, "bfloat16")]
    groups = run_groups(configs)
    assert [[c.key for c in g] for g in groups] == [
        [("hf_generate", 2, "float32")], [("dense", 2, "float32"), ("static", 2, "float32")], [("dense", 2, "bfloat16")]]
    runner = BenchRunner(Engine(tiny_loaded, max_batch=2, max_seq_len=64), prompts, new_tokens=12, precision="float32")
    dense, skipping = runner.run(groups[1])
    assert runner.engines["dense"] is runner.engine
    assert runner.engines["static"].runner is runner.engine.runner  # shared weights, its own cache
    assert runner.engines["static"].cache is not runner.engine.cache
    # stepping in turn changes nothing in what each row generates
    alone = Engine(tiny_loaded, max_batch=2, max_seq_len=64).generate(
        ["side by side", "two rows"], SamplingParams(max_new_tokens=12, ignore_eos=True), DENSE)
    assert runner.dense_tokens[2] == [r.token_ids for r in alone]
    assert dense.skip_ratio == 0 and skipping.skip_ratio == 2 * 10 / (6 * 12)  # layers 2, 3 after 2 warm-up tokens
    assert all(0 < r.decode_seconds < r.seconds for r in (dense, skipping))
