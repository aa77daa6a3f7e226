"""Bad input raises InvalidArgument / NotFound naming the field; the CLI exits 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from ffnskip.cli import main
from ffnskip.config import EngineConfig, SamplingParams, SkipParams
from ffnskip.engine import load_model
from ffnskip.errors import InvalidArgument, NotFound
from ffnskip.rpc.generation import OverrideLimits, skip_of, validate_request
from ffnskip.v1 import generation_pb2 as pb


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(cold_start=5, cold_end=5), "cold_end"),
        (dict(cold_start=-1), "cold_start"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(max_skip=-1), "max_skip"),
        (dict(warm_up=-2), "warm_up"),
        (dict(policy="sometimes"), "policy"),
        (dict(probability=1.5), "probability"),
        (dict(static_layers=(-1,)), "static_layers"),
    ],
)
def test_skip_params(kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        SkipParams(**kwargs)
    assert caught.value.field == field and field in str(caught.value)


OVERRIDE_LIMITS = OverrideLimits(min_threshold=0.5, max_skip=8, min_warm_up=2, min_quorum=0.25)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (pb.SkipOverrides(threshold=0.0), "threshold"),
        (pb.SkipOverrides(threshold=1.5), "threshold"),
        (pb.SkipOverrides(threshold=float("nan")), "threshold"),
        (pb.SkipOverrides(quorum=0.0), "quorum"),
        (pb.SkipOverrides(quorum=1.5), "quorum"),
        (pb.SkipOverrides(warm_up=-1), "warm_up"),
        (pb.SkipOverrides(max_skip=-2), "max_skip"),
        (pb.SkipOverrides(policy="observe"), "policy"),
        (pb.SkipOverrides(policy="x" * 1000), "policy"),
    ],
)
def test_skip_overrides_out_of_range_are_refused_with_or_without_limits(overrides, field):
    """A range is SkipParams's (one statement of it): the gateway's pass (no limits) and the
    decoder's (its limits) refuse the same values, in the same words."""
    problems = set()
    for limits in (None, OVERRIDE_LIMITS):
        with pytest.raises(InvalidArgument) as caught:
            skip_of(overrides, SkipParams(), limits)
        assert caught.value.field == f"skip.{field}" and len(caught.value.message) < 200
        problems.add(caught.value.problem)
    assert len(problems) == 1
    with pytest.raises(InvalidArgument) as caught:
        validate_request(pb.GenerateRequest(model="m", prompt="hi", skip=overrides))
    assert caught.value.field == f"skip.{field}"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (pb.SkipOverrides(threshold=0.25), "threshold"),
        (pb.SkipOverrides(max_skip=9), "max_skip"),
        (pb.SkipOverrides(warm_up=1), "warm_up"),
        (pb.SkipOverrides(quorum=0.125), "quorum"),
    ],
)
def test_the_decoders_limits_narrow_what_a_request_may_change(overrides, field):
    skip_of(overrides, SkipParams())  # in range: the gateway passes it on
    validate_request(pb.GenerateRequest(model="m", prompt="hi", skip=overrides))
    with pytest.raises(InvalidArgument) as caught:
        skip_of(overrides, SkipParams(), OVERRIDE_LIMITS)
    assert caught.value.field == f"skip.{field}"


def test_skip_overrides_inside_the_limits_apply():
    base = SkipParams(threshold=0.9, max_skip=4, warm_up=16)
    assert skip_of(pb.SkipOverrides(), base, OVERRIDE_LIMITS) == base
    params = skip_of(pb.SkipOverrides(threshold=0.5, max_skip=-1, warm_up=2, quorum=0.25), base, OVERRIDE_LIMITS)
    assert (params.threshold, params.max_skip, params.warm_up, params.quorum) == (0.5, None, 2, 0.25)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_sampling_params(kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field


def test_engine_config():
    with pytest.raises(InvalidArgument, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(InvalidArgument, match="max_batch"):
        EngineConfig(max_batch=0)


def test_params_checked_against_the_model(tiny_engine):
    with pytest.raises(InvalidArgument) as caught:
        tiny_engine.add(prompt="x", skip=SkipParams(cold_end=7))  # tiny model has 6 layers
    assert caught.value.field == "cold_end"
    with pytest.raises(InvalidArgument) as caught:
        tiny_engine.add(prompt="x", skip=SkipParams(policy="static", static_layers=(9,)))
    assert caught.value.field == "static_layers"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(tiny_engine, prompt):
    with pytest.raises(InvalidArgument, match="prompt"):
        tiny_engine.add(prompt=prompt)


def test_prompt_longer_than_context_window(tiny_engine):
    with pytest.raises(InvalidArgument) as caught:
        tiny_engine.add(prompt="x" * 400)  # 256-position model
    assert caught.value.field == "prompt" and "context window" in caught.value.message


def test_prompt_plus_new_tokens_over_sequence_length(tiny_engine):
    with pytest.raises(InvalidArgument) as caught:
        tiny_engine.add(prompt="x" * 100, sampling=SamplingParams(max_new_tokens=100))
    assert caught.value.field == "max_new_tokens"


def test_bad_messages(tiny_engine):
    with pytest.raises(InvalidArgument, match=r"messages\[0\].role"):
        tiny_engine.add(messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(InvalidArgument, match=r"messages\[1\].content"):
        tiny_engine.add(messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": ""}])
    with pytest.raises(InvalidArgument, match="messages"):
        tiny_engine.add(messages=[])


def test_unknown_model_and_path(tmp_path):
    with pytest.raises(NotFound, match="unknown model"):
        load_model("no-such-model", cache_dir=tmp_path)
    with pytest.raises(NotFound, match="config.json"):
        load_model(str(tmp_path), cache_dir=tmp_path)


def test_non_llama_architecture_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        load_model(str(tmp_path), cache_dir=tmp_path)
    assert caught.value.field == "model" and "gpt2" in caught.value.message


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffnskip.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_process_exits_2_with_one_line(tiny_dir):
    proc = run_cli("generate", "--prompt", "hi", "--model", str(tiny_dir), "--threshold", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: threshold: must be in (0, 1], got 2.0"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--threshold", "2"], "threshold"),
        (["--cold-start", "4", "--cold-end", "2"], "cold_end"),
        (["--warm-up", "-1"], "warm_up"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--model", "no-such-model"], "unknown model"),
    ],
)
def test_cli_reports_errors_without_traceback(tiny_dir, args, needle, capsys):
    code = main(["generate", "--prompt", "hi", "--model", str(tiny_dir), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_cli_generate_json_with_profile_file(tiny_dir, tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"policy": "static", "static_layers": [1, 2], "warm_up": 2}))
    code = main(["generate", "--prompt", "hi", "--model", str(tiny_dir), "--profile", str(params),
                 "--max-new-tokens", "6", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tokens"]) <= 6
    assert data["skip_params"]["static_layers"] == [1, 2]
    expected_skipped = 2 * max(0, len(data["tokens"]) - 2)
    assert data["skip_stats"]["ffn_blocks_skipped"] == expected_skipped


def test_cli_rejects_unknown_profile_field(tiny_dir, tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"policy": "static", "layers_to_skip": [1]}))
    code = main(["generate", "--prompt", "hi", "--model", str(tiny_dir), "--profile", str(params)])
    assert code == 2 and "layers_to_skip" in capsys.readouterr().err
