"""The decode step's rotary table holds exactly the rotary module's values, past its first size too."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ffnskip.engine.runner import RotaryTable
from tests.helpers.tiny import tiny_config


def test_table_values_are_the_modules_own_and_it_grows_past_its_first_size():
    rotary = LlamaRotaryEmbedding(tiny_config())
    table = RotaryTable(rotary)
    x = torch.zeros(1, 1, dtype=torch.float32)
    for positions in ([[5]], [[0], [200]], [[300]], [[1000], [3]], [list(range(40))]):
        index = torch.tensor(positions)
        cos, sin = table(x, index)
        expected_cos, expected_sin = rotary(x, index)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin), positions
    assert table.cos.shape[0] >= 1001


def test_llama3_scaling_is_tabled_and_length_dependent_rope_asks_the_module_every_time():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    rotary = LlamaRotaryEmbedding(tiny_config(rope_scaling=llama3))
    table = RotaryTable(rotary)
    x, index = torch.zeros(1, 1), torch.tensor([[70], [3]])
    assert torch.equal(table(x, index)[0], rotary(x, index)[0])
    dynamic = RotaryTable(LlamaRotaryEmbedding(tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    assert dynamic.per_call
    dynamic(x, index)
    assert dynamic.cos is None  # nothing tabled: the module's frequencies change with the length
