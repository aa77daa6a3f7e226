"""Resolve a model spec to loaded weights, a tokenizer, a device and a fingerprint.

A spec is one of: the embedded default `smollm2-135m`; a local Hugging Face
directory; a `.gguf` file; a model id present in the local HF cache. Nothing here
reaches a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ffnskip.config import WEIGHT_FORMATS
from ffnskip.engine.prepare import EMBEDDED_MODELS, prepare_embedded
from ffnskip.errors import InvalidArgument, NotFound

# Llama-family decoder layers expose exactly these submodules; the skip loop needs them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class LoadedModel:
    model_id: str
    model: Any  # a transformers *ForCausalLM in eval mode (its submodules are read by name)
    tokenizer: PreTrainedTokenizerBase
    path: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    cache_dir: Path  # prepared models, weight-file digests and compiled decode segments live under it
    weights: str = "full"  # the matrices' format in an engine (WEIGHT_FORMATS): full (dtype) or int8

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("device", f"{device} requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_weights(weights: str, device: torch.device) -> str:
    """"auto": w8a8 on a CPU, the dtype's on a GPU. On a CPU a step reads a quarter of float32's
    bytes in int8, and int8 activations let the library's int8 GEMM reuse each weight across a
    batch (served: 1.8x llama-server's Q8_0 tokens/s at 16 streams, weight-only int8 0.92x; equal
    at one; teacher-forced KL from float32 dense 0.013, weight-only 0.0036: docs/performance.md)."""
    if weights == "auto":
        return "w8a8" if device.type == "cpu" else "full"
    if weights not in WEIGHT_FORMATS:
        raise InvalidArgument("weights", f"must be auto or one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    return weights


def resolve_path(spec: str, cache_dir: Path) -> tuple[str, str | None]:
    """Return (directory, gguf file name or None) for a model spec."""
    if spec in EMBEDDED_MODELS:
        return str(prepare_embedded(spec, cache_dir)), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise NotFound(f"model: directory {spec} has no config.json")
        return str(path), None
    if path.exists():
        raise InvalidArgument("model", f"{spec} is neither a model directory nor a .gguf file")
    cached = _hf_cache_snapshot(spec)
    if cached is None:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise NotFound(f"model: unknown model {spec!r} (not a path, not in the local HF cache; embedded: {known})")
    return cached, None


def _hf_cache_snapshot(model_id: str) -> str | None:
    if "/" not in model_id:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"))
    snapshots = hub / ("models--" + model_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted((p for p in snapshots.iterdir() if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    return str(candidates[-1]) if candidates else None


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            "model",
            f"architecture {model_type!r} is not supported; FFN skipping needs a Llama-family decoder "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})",
        )


def load_model(spec: str, device: str = "auto", dtype: str = "auto", *, cache_dir: Path,
               weights: str = "full") -> LoadedModel:
    """Load a Llama-family causal LM for the skip engine; `cache_dir` (ffnskip.settings.cache_root)
    holds prepared embedded models, weight-file digests and compiled decode segments. `weights`:
    the format an engine holds the matrices in (resolve_weights); the model itself loads in `dtype`."""
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # a per-tensor bar on every load is noise in service logs
    directory, gguf_file = resolve_path(spec, cache_dir)
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(directory)
    check_architecture(config)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    weights = resolve_weights(weights, torch_device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kwargs)
    model.to(torch_device).eval()
    for layer in model.model.layers:
        missing = [part for part in LAYER_PARTS if not hasattr(layer, part)]
        if missing:
            raise InvalidArgument("model", f"decoder layer lacks {missing}; not a Llama-family layer")
    fingerprint = model_fingerprint(directory, gguf_file, config, cache_dir)
    return LoadedModel(
        model_id=spec,
        model=model,
        tokenizer=tokenizer,
        path=str(Path(directory) / gguf_file) if gguf_file else directory,
        fingerprint=fingerprint,
        device=torch_device,
        dtype=torch_dtype,
        load_seconds=time.perf_counter() - started,
        cache_dir=cache_dir,
        weights=weights,
    )


def model_fingerprint(directory: str, gguf_file: str | None, config: Any, cache_dir: Path) -> str:
    """A stable hash of the architecture and the weight files.

    Hashing files (not tensors in memory) keeps the fingerprint independent of the
    device and dtype the model runs in; results are cached by (path, size, mtime).
    """
    arch = config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict()
    arch = {k: v for k, v in arch.items()
            if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "quantization_config")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    root = Path(directory)
    files = [root / gguf_file] if gguf_file else sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(_file_digest(path, cache_dir / "fingerprints.json").encode())
    return digest.hexdigest()[:32]


def _file_digest(path: Path, memo: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            sha.update(block)
    known[key] = sha.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return known[key]

