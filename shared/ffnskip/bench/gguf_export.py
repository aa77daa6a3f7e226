"""Our weights as a GGUF file, for the llama.cpp peers of both benches.

`write_gguf` exports the very tensors of a loaded Hugging Face Llama model to a GGUF
file (arch "llama"), so llama.cpp runs the same weights as our engine and its greedy
tokens can be compared id for id: in process through llama-cpp-python
(ffnskip.bench.inprocess_peer, the rows of `ffnskip bench`) and as llama.cpp's server beside
a running service (ffnskip.bench.service_peer, `ffnskip bench --target ... --peer
llama-server`). `ensure_gguf` caches one file per (weights, precision, writer version).
Nothing here needs llama.cpp itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import gguf
import numpy as np
import torch

PRECISIONS = ("f32", "bf16", "q8_0")

# Bumped when write_gguf's output changes, so cached files from an older writer are
# not reused (the weights fingerprint alone cannot tell).
FORMAT_VERSION = 1

# llama.cpp picks its pre-tokenizer (the regex splitting text before BPE) by this name.
# SmolLM2 shares SmolLM's tokenizer: its convert_hf_to_gguf.py check hash is the one
# llama.cpp maps to "smollm" (855059...6249). The peer is fed token ids, so the name
# only matters for llama.cpp's own text tokenization.
DEFAULT_TOKENIZER_PRE = "smollm"

_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

Rows = TypeVar("Rows", torch.Tensor, np.ndarray)


def permute_rope_rows(weight: Rows, n_heads: int) -> Rows:
    """Reorder each head's output rows of a q/k projection from HF's rope layout to llama.cpp's.

    HF's Llama rotates the pairs (i, i + d/2) of a head (rotate_half); llama.cpp's
    llama arch rotates adjacent pairs (2i, 2i + 1). Row 2i becomes HF row i and row
    2i + 1 becomes HF row i + d/2, which makes both compute the same attention scores.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_rope_rows(weight: Rows, n_heads: int) -> Rows:
    """The inverse of permute_rope_rows: llama.cpp's row order back to HF's."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _array(tensor: torch.Tensor, precision: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as numpy data plus its GGML type; numpy has no bfloat16, so bf16 goes as raw bits;
    q8_0 goes as gguf's own quantised bytes (blocks of 32 inputs, one scale each: what llama.cpp's
    converter writes for `--outtype q8_0`)."""
    tensor = tensor.detach().to("cpu")
    if precision == "q8_0":
        quantised = gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        return quantised, gguf.GGMLQuantizationType.Q8_0
    if precision == "bf16":
        # torch rounds to nearest even, like our engine's own bf16 cast of the same weights
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits, gguf.GGMLQuantizationType.BF16
    return tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.F32


def _rope_theta(config: Any) -> float:
    """Rope base frequency; refuses rope scaling, which llama.cpp would need extra tensors for."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported by write_gguf (only plain rope)")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _first_id(*candidates: Any) -> int | None:
    for value in candidates:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any, tokenizer_pre: str) -> None:
    """A gpt2-style (byte-level BPE) vocabulary from the tokenizer's tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer model {spec['model']['type']!r} is not BPE; write_gguf only writes gpt2-style vocabularies")
    id_to_token: dict[int, str] = {i: tok for tok, i in spec["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    n_vocab = int(config.vocab_size)
    if max(id_to_token) >= n_vocab:
        raise ValueError(f"tokenizer has id {max(id_to_token)} but the model has only {n_vocab} embedding rows")
    # llama.cpp wants one entry per embedding row; rows without a token are padding
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [
        types.get(i, gguf.TokenType.NORMAL) if i in id_to_token else gguf.TokenType.UNUSED for i in range(n_vocab)
    ]
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older ones as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)  # an empty list is skipped by the writer

    bos = _first_id(tokenizer.bos_token_id, getattr(config, "bos_token_id", None))
    eos = _first_id(tokenizer.eos_token_id, getattr(config, "eos_token_id", None))
    pad = _first_id(tokenizer.pad_token_id, getattr(config, "pad_token_id", None))
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                       (pad, writer.add_pad_token_id), (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if value is not None:
            add(int(value))
    # Whether llama.cpp's tokenizer should add BOS/EOS: whatever the HF tokenizer does.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bos is not None and len(full) > len(plain) and full[0] == bos)
    writer.add_add_eos_token(eos is not None and len(full) > len(plain) and full[-1] == eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def write_gguf(model: Any, tokenizer: Any, path: Path, precision: str, *,
               tokenizer_pre: str = DEFAULT_TOKENIZER_PRE) -> Path:
    """Write a Hugging Face Llama causal LM (weights read from the model in memory) as a
    GGUF file for llama.cpp's "llama" arch, in f32, bf16 or q8_0; norm weights stay f32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"write_gguf writes Llama models only, got model_type {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("write_gguf does not write projection biases")
    n_head = int(config.num_attention_heads)
    n_kv = int(config.num_key_value_heads or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")  # never leave a half file under the real name

    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)  # explicit: llama.cpp would otherwise assume hidden / heads
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_FILE_TYPES[precision])
    _add_tokenizer(writer, tokenizer, config, tokenizer_pre)

    def add(name: str, tensor: torch.Tensor, tensor_precision: str = precision) -> None:
        data, ggml_type = _array(tensor, tensor_precision)
        writer.add_tensor(name, data, raw_dtype=ggml_type)

    inner = model.model
    add("token_embd.weight", inner.embed_tokens.weight)
    add("output_norm.weight", inner.norm.weight, "f32")  # llama.cpp keeps 1-d tensors in f32
    tied = bool(getattr(config, "tie_word_embeddings", False)) or (
        model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr())
    if not tied:  # a tied head is read from token_embd by llama.cpp
        add("output.weight", model.lm_head.weight)
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, "f32")
        add(f"blk.{i}.attn_q.weight", permute_rope_rows(attn.q_proj.weight.detach(), n_head))
        add(f"blk.{i}.attn_k.weight", permute_rope_rows(attn.k_proj.weight.detach(), n_kv))
        add(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, "f32")
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def gguf_path_for(cache_dir: Path, fingerprint: str, precision: str) -> Path:
    """Where the GGUF of given weights lives: one file per (weights, precision, writer version)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return Path(cache_dir) / f"{fingerprint}.v{FORMAT_VERSION}.{precision}.gguf"


def ensure_gguf(model: Any, tokenizer: Any, fingerprint: str, cache_dir: Path, precision: str) -> Path:
    """The cached GGUF for these weights, written first if it is not there yet."""
    path = gguf_path_for(cache_dir, fingerprint, precision)
    if not path.exists():
        write_gguf(model, tokenizer, path, precision)
    return path
