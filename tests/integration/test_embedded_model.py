"""The engine on the real embedded model (SmolLM2-135M-Instruct) against plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine
from ffnskip.engine.prompts import encode_prompt
from tests.helpers.reference import engine_logits, transformers_logits

QUESTION = "Name three primary colors and say one thing about each."


def test_model_shape_and_weight_bytes(smollm):
    engine = Engine(smollm, max_batch=1, max_seq_len=64)
    assert smollm.num_layers == 30
    # W and F of this model in fp32 (F: what a skipped FFN does not read, its norm's 576 floats included)
    assert (engine.weight_bytes.total, engine.weight_bytes.ffn) == (538_060_032, 318_504_960 + 30 * 576 * 4)


def test_dense_logits_equal_transformers(smollm):
    prompt_ids = encode_prompt(smollm.tokenizer, None, [{"role": "user", "content": QUESTION}])
    ids, ours = engine_logits(smollm, prompt_ids, steps=24)
    reference = transformers_logits(smollm, prompt_ids, ids)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_cli_dense_json_equals_transformers_generate(smollm):
    proc = subprocess.run(
        [sys.executable, "-m", "ffnskip.cli", "generate", "--chat", QUESTION, "--policy", "dense",
         "--max-new-tokens", "48", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["tokens"]
    prompt_ids = encode_prompt(smollm.tokenizer, None, [{"role": "user", "content": QUESTION}])
    with torch.inference_mode():
        out = smollm.model.generate(torch.tensor([prompt_ids]), max_new_tokens=48, do_sample=False)
    assert ours == out[0, len(prompt_ids):].tolist()


def test_adaptive_skips_after_warm_up_and_keeps_the_answer(smollm):
    engine = Engine(smollm, max_batch=2, max_seq_len=512)
    messages = [{"role": "user", "content": "Write a short paragraph about the ocean."}]
    sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
    skip = SkipParams(policy="adaptive", cold_start=1, threshold=0.97, max_skip=4, warm_up=16)
    result = engine.generate([messages], sampling, skip)[0]
    dense = engine.generate([messages], sampling)[0]
    assert all(not layers for layers in result.skip_records[:16])
    assert 0.0 < result.skip_stats.decode_skip_ratio < 0.5
    assert all(0 not in layers and 29 not in layers for layers in result.skip_records)
    assert result.token_ids[:16] == dense.token_ids[:16]  # warm-up tokens are the dense ones
