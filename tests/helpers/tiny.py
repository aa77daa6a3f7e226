"""Tiny random Llama models with a byte-level tokenizer, saved to disk and loaded
through the real loading path; seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def tiny_config(num_layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(SPECIALS) + 256, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        **{"tie_word_embeddings": False, **extra},
    )


def save_tiny_model(directory: Path, seed: int = 0, **config_kwargs) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_kwargs))
    with torch.no_grad():  # larger weights than the init default so logits are not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def plant_ffn(directory: Path, neutral_layers: list[int], loud_layers: list[int], gain: float = 100.0) -> None:
    """Rewrite a saved tiny model: FFNs of `neutral_layers` output exactly zero
    (cos(h, h + ffn(h)) == 1), FFNs of `loud_layers` dominate the residual (cos near 0)."""
    model = LlamaForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for i in neutral_layers:
            model.model.layers[i].mlp.down_proj.weight.zero_()
        for i in loud_layers:
            model.model.layers[i].mlp.down_proj.weight.mul_(gain)
    model.save_pretrained(directory)
