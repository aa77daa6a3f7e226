"""DecoderSettings.from_env for the serving policy, and how it applies to a profile."""

from __future__ import annotations

import pytest

from ffnskip.config import SkipParams
from ffnskip.errors import InvalidArgument
from services.decoder.profiles import serving_params
from services.decoder.settings import DecoderSettings, ServingMode


def test_serving_policy_defaults_to_aligned_and_is_validated():
    settings = DecoderSettings.from_env({})
    assert settings.skip_policy == "aligned" and settings.aligned_quorum == 0.5  # docs/batching.md
    configured = DecoderSettings.from_env({"FFNSKIP_SKIP_POLICY": "profile", "FFNSKIP_ALIGNED_QUORUM": "0.75"})
    assert configured.skip_policy == "profile" and configured.aligned_quorum == 0.75
    with pytest.raises(InvalidArgument, match="FFNSKIP_SKIP_POLICY"):
        DecoderSettings.from_env({"FFNSKIP_SKIP_POLICY": "random"})
    for bad in ("0", "1.5", "half"):
        with pytest.raises(InvalidArgument, match="FFNSKIP_ALIGNED_QUORUM"):
            DecoderSettings.from_env({"FFNSKIP_ALIGNED_QUORUM": bad})


def test_aligned_serving_applies_to_adaptive_profiles_only():
    adaptive = SkipParams(policy="adaptive", cold_start=1, cold_end=29, threshold=0.98, max_skip=10, warm_up=16)
    served = serving_params(adaptive, ServingMode.ALIGNED, 0.75)
    assert (served.policy, served.quorum, served.threshold, served.max_skip) == ("aligned", 0.75, 0.98, 10)
    assert serving_params(adaptive, ServingMode.PROFILE, 0.75).policy == "adaptive"
    static = SkipParams(policy="static", static_layers=(3, 4), warm_up=16)
    assert serving_params(static, ServingMode.ALIGNED, 0.75).policy == "static"  # batch-friendly already


def test_compile_is_on_by_default_and_validated():
    assert DecoderSettings.from_env({}).compile is True  # in the background: the decoder serves eagerly meanwhile
    assert DecoderSettings.from_env({"FFNSKIP_COMPILE": "0"}).compile is False
    assert DecoderSettings.from_env({"FFNSKIP_COMPILE": "false"}).compile is False
    with pytest.raises(InvalidArgument, match="FFNSKIP_COMPILE"):
        DecoderSettings.from_env({"FFNSKIP_COMPILE": "yes please"})


def test_threads_default_to_torchs_choice_and_are_validated():
    assert DecoderSettings.from_env({}).threads == 0
    assert DecoderSettings.from_env({"FFNSKIP_THREADS": "3"}).threads == 3
    for bad in ("-1", "two"):
        with pytest.raises(InvalidArgument, match="FFNSKIP_THREADS"):
            DecoderSettings.from_env({"FFNSKIP_THREADS": bad})


def test_prefill_chunk_reaches_the_engine_and_zero_means_whole_prompts(tiny_dir, engine_cache):
    from services.decoder.main import build_engine

    assert DecoderSettings.from_env({}).prefill_chunk == 128  # docs/performance.md
    for bad in ("-1", "many"):
        with pytest.raises(InvalidArgument, match="FFNSKIP_PREFILL_CHUNK"):
            DecoderSettings.from_env({"FFNSKIP_PREFILL_CHUNK": bad})
    environ = {"FFNSKIP_MODEL": str(tiny_dir), "FFNSKIP_CACHE": str(engine_cache), "FFNSKIP_COMPILE": "0",
               "FFNSKIP_DEVICE": "cpu", "FFNSKIP_DTYPE": "float32", "FFNSKIP_MAX_BATCH": "2", "FFNSKIP_MAX_SEQ_LEN": "64"}
    assert build_engine(DecoderSettings.from_env({**environ, "FFNSKIP_PREFILL_CHUNK": "7"})).prefill_chunk == 7
    assert build_engine(DecoderSettings.from_env({**environ, "FFNSKIP_PREFILL_CHUNK": "0"})).prefill_chunk is None


def test_the_prompt_cache_is_on_unless_turned_off(tiny_dir, engine_cache):
    from services.decoder.main import build_engine

    environ = {"FFNSKIP_MODEL": str(tiny_dir), "FFNSKIP_CACHE": str(engine_cache), "FFNSKIP_COMPILE": "0",
               "FFNSKIP_DEVICE": "cpu", "FFNSKIP_DTYPE": "float32", "FFNSKIP_MAX_BATCH": "2", "FFNSKIP_MAX_SEQ_LEN": "64"}
    assert build_engine(DecoderSettings.from_env(environ)).scheduler.prompt_cache is not None
    assert build_engine(DecoderSettings.from_env({**environ, "FFNSKIP_PROMPT_CACHE": "off"})).scheduler.prompt_cache is None
    with pytest.raises(InvalidArgument, match="FFNSKIP_PROMPT_CACHE"):
        DecoderSettings.from_env({"FFNSKIP_PROMPT_CACHE": "sometimes"})


def test_the_weight_format_setting_is_one_of_the_formats():
    assert DecoderSettings.from_env({}).weights == "auto"
    assert DecoderSettings.from_env({"FFNSKIP_WEIGHTS": "w8a8"}).weights == "w8a8"
    with pytest.raises(InvalidArgument, match="FFNSKIP_WEIGHTS"):
        DecoderSettings.from_env({"FFNSKIP_WEIGHTS": "int4"})
