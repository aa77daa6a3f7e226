"""The GGUF writer of the llama.cpp peer, checked by reading its files back with
gguf.GGUFReader; and the peer's greedy loop against a stand-in llama_cpp module.
Nothing here needs llama-cpp-python (an optional extra CI does not install)."""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ffnskip.bench import gguf_export, inprocess_peer
from ffnskip.evaluation.weight_rounding import round_blocks
from tests.helpers.tiny import SPECIALS, byte_tokenizer, tiny_config

LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
NORMS = ("attn_norm", "ffn_norm", "output_norm")


def hf_names(num_layers: int, tied: bool) -> dict[str, str]:
    """GGUF tensor name -> HF state-dict key."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not tied:
        names["output.weight"] = "lm_head.weight"
    for i in range(num_layers):
        for ours, theirs in LAYER_TENSORS.items():
            names[f"blk.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"{key} missing"
    return reader.fields[key].contents()


def bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's weights as saved on disk: independent of the loaded, engine-fused copy."""
    return load_file(str(tiny_dir / "model.safetensors"))


def test_f32_file_holds_the_engine_models_weights(tiny_engine, tiny_loaded, reference, tmp_path):
    # written after Engine fused q/k/v and gate/up: the HF modules must still give the true weights
    model = tiny_loaded.model
    config = model.config
    path = gguf_export.write_gguf(model, tiny_loaded.tokenizer, tmp_path / "tiny.gguf", "f32")
    reader = gguf.GGUFReader(path)
    names = hf_names(config.num_hidden_layers, tied=False)
    assert {t.name for t in reader.tensors} == set(names)
    for tensor in reader.tensors:
        expected = reference[names[tensor.name]].float().numpy()
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        assert list(tensor.shape) == list(reversed(expected.shape)), tensor.name  # ggml lists ne0 (columns) first
        data = np.asarray(tensor.data).reshape(expected.shape)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            heads = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
            assert not np.array_equal(data, expected), f"{tensor.name} was not permuted"
            assert np.array_equal(gguf_export.unpermute_rope_rows(data, heads), expected), tensor.name
        else:
            assert np.array_equal(data, expected), tensor.name


def test_bf16_file_keeps_norms_f32(tiny_loaded, reference, tmp_path):
    model = tiny_loaded.model
    path = gguf_export.write_gguf(model, tiny_loaded.tokenizer, tmp_path / "tiny-bf16.gguf", "bf16")
    reader = gguf.GGUFReader(path)
    names = hf_names(model.config.num_hidden_layers, tied=False)
    assert {t.name for t in reader.tensors} == set(names)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    for tensor in reader.tensors:
        expected = reference[names[tensor.name]].float()
        assert list(tensor.shape) == list(reversed(expected.shape)), tensor.name
        if tensor.name.split(".")[-2] in NORMS:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
            assert np.array_equal(np.asarray(tensor.data), expected.numpy()), tensor.name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16, tensor.name
        bits = np.asarray(tensor.data).view(np.uint16).reshape(expected.shape)  # the reader gives raw bytes
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            heads = model.config.num_attention_heads if ".attn_q." in tensor.name else model.config.num_key_value_heads
            bits = gguf_export.unpermute_rope_rows(bits, heads)
        assert np.array_equal(bits, bf16_bits(expected)), tensor.name


def test_q8_0_file_rounds_as_llama_cpp_blocks(tiny_loaded, reference, tmp_path):
    """Matrices go as Q8_0 (blocks of 32 inputs, one scale each) and read back as the project's own
    Q8_0 rounding of the same weights (up to the scale's half precision in the file); norms stay f32."""
    model = tiny_loaded.model
    path = gguf_export.write_gguf(model, tiny_loaded.tokenizer, tmp_path / "tiny-q8.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    names = hf_names(model.config.num_hidden_layers, tied=False)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for tensor in reader.tensors:
        expected = reference[names[tensor.name]].float()
        if tensor.name.split(".")[-2] in NORMS:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(expected.shape)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            heads = model.config.num_attention_heads if ".attn_q." in tensor.name else model.config.num_key_value_heads
            values = gguf_export.unpermute_rope_rows(values, heads)
        rounded = round_blocks(expected, "q8_0").numpy()
        assert not np.array_equal(rounded, expected.numpy()), tensor.name  # the rounding is not the identity
        assert np.allclose(values, rounded, rtol=2e-3, atol=1e-7), tensor.name


def test_hyperparameters_and_vocabulary(tiny_loaded, tmp_path):
    config = tiny_loaded.model.config
    reader = gguf.GGUFReader(gguf_export.write_gguf(tiny_loaded.model, tiny_loaded.tokenizer, tmp_path / "t.gguf",
                                                    "f32"))
    head_dim = config.hidden_size // config.num_attention_heads
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "llama.context_length") == config.max_position_embeddings == 256
    assert field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.block_count") == config.num_hidden_layers
    assert field(reader, "llama.feed_forward_length") == config.intermediate_size
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == head_dim == 16
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size == len(SPECIALS) + 256
    assert tokens[: len(SPECIALS)] == SPECIALS
    assert tokens[len(SPECIALS):] == sorted(pre_tokenizers.ByteLevel.alphabet())
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[: len(SPECIALS)] == [gguf.TokenType.CONTROL] * len(SPECIALS)
    assert set(token_types[len(SPECIALS):]) == {gguf.TokenType.NORMAL}
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the byte tokenizer adds no BOS
    assert "tokenizer.ggml.merges" not in reader.fields  # the byte tokenizer has no merges


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with one merge and one added (non-special) token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet + ["Ġt"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens(["<tool>"])
    return tokenizer


def test_tied_model_padding_and_merges(tmp_path):
    tokenizer = merging_tokenizer()
    assert len(tokenizer) == len(SPECIALS) + 256 + 2
    config = tiny_config(num_layers=2)
    config.vocab_size = len(tokenizer) + 3  # embedding rows without a token
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reader = gguf.GGUFReader(gguf_export.write_gguf(model, tokenizer, tmp_path / "tied.gguf", "f32"))
    assert {t.name for t in reader.tensors} == set(hf_names(2, tied=True))
    assert field(reader, "tokenizer.ggml.merges") == ["Ġ t"]
    tokens = field(reader, "tokenizer.ggml.tokens")
    token_types = field(reader, "tokenizer.ggml.token_type")
    n = len(tokenizer)
    assert len(tokens) == len(token_types) == n + 3
    assert tokens[n - 2:] == ["Ġt", "<tool>", f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert token_types[n - 2:] == [gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED] + [gguf.TokenType.UNUSED] * 3


def test_too_small_vocabulary_is_refused(tmp_path):
    config = tiny_config(num_layers=1)
    config.vocab_size = 100  # fewer rows than the byte tokenizer has tokens
    with pytest.raises(ValueError, match="embedding rows"):
        gguf_export.write_gguf(LlamaForCausalLM(config), byte_tokenizer(), tmp_path / "x.gguf", "f32")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_permute_pairs_rows_for_interleaved_rope():
    # one head of 4 rows: HF rotates (0, 2) and (1, 3), llama.cpp (0, 1) and (2, 3)
    w = torch.arange(8.0).reshape(4, 2)
    assert gguf_export.permute_rope_rows(w, 1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    two_heads = torch.randn(16, 3)
    assert torch.equal(gguf_export.unpermute_rope_rows(gguf_export.permute_rope_rows(two_heads, 2), 2), two_heads)
    assert not torch.equal(gguf_export.permute_rope_rows(two_heads, 2), gguf_export.permute_rope_rows(two_heads, 1))


def test_gguf_path_for_and_ensure_writes_once(tiny_loaded, tmp_path, monkeypatch):
    a = gguf_export.gguf_path_for(tmp_path, "abc", "f32")
    assert a.parent == tmp_path and a.suffix == ".gguf"
    assert len({a, gguf_export.gguf_path_for(tmp_path, "abc", "bf16"),
                gguf_export.gguf_path_for(tmp_path, "abd", "f32")}) == 3
    assert a == gguf_export.gguf_path_for(tmp_path, "abc", "f32")
    with pytest.raises(ValueError):
        gguf_export.gguf_path_for(tmp_path, "abc", "f16")
    writes = []
    real_write = gguf_export.write_gguf
    monkeypatch.setattr(gguf_export, "write_gguf", lambda *args: writes.append(args) or real_write(*args))
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    assert gguf_export.ensure_gguf(model, tokenizer, "abc", tmp_path, "f32") == a
    assert gguf_export.ensure_gguf(model, tokenizer, "abc", tmp_path, "f32") == a
    assert len(writes) == 1 and a.is_file()


class FakeLlama:
    """Stands in for llama_cpp.Llama: after n tokens ending in t the argmax is (3t + n) % 13, so the
    output depends on the whole context (as a stale KV cache would), and it passes EOS (2)."""

    vocab = 13
    instances: list[FakeLlama] = []

    def __init__(self, model_path: str, n_ctx: int, n_threads: int, **kwargs) -> None:
        self.kwargs = dict(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, **kwargs)
        self.logits = np.zeros(self.vocab, dtype=np.float32)  # the last output row, as llama.cpp keeps it
        self.n_tokens = 0
        self.fed: list[list[int]] = []
        FakeLlama.instances.append(self)

    @property
    def ctx(self) -> FakeLlama:
        return self

    def n_vocab(self) -> int:
        return self.vocab

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: list[int]) -> None:
        self.fed.append(list(tokens))
        self.n_tokens += len(tokens)
        self.logits[:] = 0.0
        self.logits[(3 * tokens[-1] + self.n_tokens) % self.vocab] = 1.0


def fake_get_logits_ith(ctx: FakeLlama, i: int):
    assert i == -1
    return ctx.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


FAKE_LLAMA_CPP = types.SimpleNamespace(Llama=FakeLlama, llama_get_logits_ith=fake_get_logits_ith)


def test_greedy_feeds_prompt_ignores_eos_and_counts_exactly(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", FAKE_LLAMA_CPP)
    FakeLlama.instances.clear()
    p = inprocess_peer.LlamaCppPeer(Path("m.gguf"), n_ctx=64)
    llm = FakeLlama.instances[0]
    assert llm.kwargs["n_threads"] == torch.get_num_threads() and llm.kwargs["n_ctx"] == 64
    tokens, seconds, decode_seconds = p.greedy([5, 7], 4)
    assert tokens == [10, 7, 12, 2]  # 2 is EOS: the run ends by count only
    assert llm.fed == [[5, 7], [10], [7], [12]]  # whole prompt first; the last token is not fed back
    assert 0 < decode_seconds < seconds  # the decode steps are a part of the call
    tokens, _, _ = p.greedy([5, 7], 6)  # a second call starts from scratch, not after the first
    assert tokens == [10, 7, 12, 2, 12, 4]
    assert llm.fed[4] == [5, 7]
    with pytest.raises(ValueError):
        p.greedy([1] * 60, 5)  # over n_ctx


def test_peer_available_reflects_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace())
    assert inprocess_peer.peer_available() is True
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # a None entry makes the import fail
    assert inprocess_peer.peer_available() is False
