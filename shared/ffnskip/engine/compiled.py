"""Decode segments compiled ahead of time by AOTInductor, one package per segment and batch bucket.

Why this shape (measured on SmolLM2-135M, 2 CPU threads, docs/performance.md):
- `freezing`: the weights become constants, so Inductor prepacks them once.
- `max_autotune` (float32 only, see __init__): Inductor benchmarks its C++ micro-GEMM
  over the prepacked weights against the library call per shape and keeps the faster;
  at M=1 the micro-GEMM read fp32 weights about twice as fast as MKL's GEMV.
- AOTInductor, not `torch.compile`: a package is called through its C++ runner with a
  plain list of tensors (about 5 us), where a Dynamo-compiled segment went through
  frame evaluation and AOTAutograd's wrappers (50-100 us, 31 calls per step); and a
  package is a file, so a process loads in seconds what took minutes to compile.
- Static shapes except the attention span and the cache's size: each batch bucket
  (1, 2, 4, ... up to the cache's rows) is its own package; a batch runs padded to
  the next bucket.

Packages live under $FFNSKIP_CACHE/compiled/<key>/, the key hashing everything a
package depends on: the model's fingerprint, dtype, torch version, the CPU's capability
(or the GPU's name), autotuning, the package format, and the source of the code traced into it.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence as Seq

import torch
from torch import nn
from torch.export import Dim

from ffnskip.engine import model as model_module, segments as segments_module
from ffnskip.engine.segments import block_step

# Bump when a change here alters what a package computes or expects (the traced wrappers, the
# example shapes, the options); the source of segments.py and model.py is hashed as it is.
PACKAGE_FORMAT = 1
COMPILE_OPTIONS = {"freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch itself."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_batch,)


def package_key(fingerprint: str, dtype: torch.dtype, device: torch.device, autotune: bool) -> str:
    """Everything a compiled package depends on besides its segment and bucket."""
    digest = hashlib.sha256()
    target = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    for part in (fingerprint, str(dtype), torch.__version__, target, str(autotune), str(PACKAGE_FORMAT)):
        digest.update(part.encode() + b"\0")
    for module in (segments_module, model_module):  # the code traced into a package
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:20]


class _Block(nn.Module):
    def __init__(self, layer: nn.Module, following: nn.Module, is_last: bool, run_ffn: bool) -> None:
        super().__init__()
        self.layer, self.following, self.is_last, self.run_ffn = layer, following, is_last, run_ffn

    def forward(self, x, q, k, v, keys, values, write_positions, mask, row_mask, cos, sin):
        return block_step(self.layer, self.following, self.is_last, self.run_ffn, True,
                          x, q, k, v, keys, values, write_positions, mask, row_mask, cos, sin)


class _FirstQkv(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, cos, sin):
        return self.layer.qkv(x, cos, sin)


class CompiledSegments:
    """The EagerSegments interface over AOTInductor packages; the cosine is computed in the graph."""

    def __init__(self, layers: list[nn.Module], head: nn.Module, max_batch: int, cache_dir: Path,
                 fingerprint: str) -> None:
        self.layers, self.head = layers, head
        self.buckets = batch_buckets(max_batch)
        weight = head.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        # Autotuning (the micro-GEMM) in float32 only: its bfloat16 kernels produced wrong tokens
        # on an AVX2 CPU without native bf16 (greedy text diverged at token 2); freezing alone is
        # exact there.
        self.autotune = self.dtype == torch.float32
        self.directory = Path(cache_dir) / package_key(fingerprint, self.dtype, self.device, self.autotune)
        with torch.inference_mode():  # like every decode input
            self._all_rows = {b: torch.ones(b, 1, 1, dtype=torch.bool, device=self.device) for b in self.buckets}
        self._runners: dict[tuple[int, str], Callable] = {}
        self._padded = self.buckets[0]
        self.warm_buckets: set[int] = set()  # every segment loaded for these batch buckets
        self.compile_seconds = 0.0  # spent compiling packages that were not on disk
        self.compiled = 0  # packages compiled by this process (the others were loaded)

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch of {batch} rows exceeds the largest bucket {self.buckets[-1]}")

    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> torch.Tensor:
        if rows is None:
            return self._all_rows[padded]
        mask = torch.zeros(padded, 1, 1, dtype=torch.bool)
        mask[list(rows)] = True
        return mask.to(self.device)

    @contextmanager
    def running(self, padded: int) -> Iterator[None]:
        """Segments asked for inside run on batch bucket `padded`."""
        self._padded = padded
        yield

    def first_qkv(self) -> Callable:
        return self._runner(self._padded, "first")

    def block(self, index: int, run_ffn: bool) -> Callable:
        return self._runner(self._padded, _block_name(index, run_ffn))

    def warm_up(self, buckets: Seq[int]) -> float:
        """Load (compiling where missing) every segment of these buckets; returns seconds."""
        started = time.perf_counter()
        for size in buckets:
            self._runner(size, "first")
            for index in range(len(self.layers)):
                for run_ffn in (True, False):
                    self._runner(size, _block_name(index, run_ffn))
            self.warm_buckets.add(size)
        return time.perf_counter() - started

    def _runner(self, padded: int, name: str) -> Callable:
        key = (padded, name)
        if key not in self._runners:
            self._runners[key] = self._load(padded, name)
        return self._runners[key]

    def _load(self, padded: int, name: str) -> Callable:
        path = self.directory / f"b{padded}" / f"{name}.pt2"
        if not path.exists():
            started = time.perf_counter()
            self._compile(padded, name, path)
            self.compile_seconds += time.perf_counter() - started
            self.compiled += 1
        loader = torch._inductor.aoti_load_package(str(path)).loader
        if name == "first":
            return lambda x, cos, sin: tuple(loader.boxed_run([x, cos, sin]))
        return _block_runner(loader, is_last=name.startswith(f"block_{len(self.layers) - 1}_"))

    def _compile(self, padded: int, name: str, path: Path) -> None:
        module, args, dynamic = self._traceable(padded, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.pt2")  # another process may compile it too
        with torch.no_grad():
            program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(partial),
                inductor_configs={**COMPILE_OPTIONS, "max_autotune": self.autotune})
        os.replace(partial, path)

    def _traceable(self, padded: int, name: str) -> tuple[nn.Module, tuple, Optional[tuple]]:
        """The module of a segment, example inputs of bucket `padded`, and their dynamic dims."""
        first = self.layers[0]
        like = dict(dtype=self.dtype, device=self.device)
        x = torch.zeros(padded, 1, first.o_proj.weight.shape[0], **like)
        cos = torch.ones(padded, 1, first.head_dim, **like)
        sin = torch.zeros_like(cos)
        if name == "first":
            return _FirstQkv(first), (x, cos, sin), None
        index, run_ffn = _parse_block_name(name)
        last = index + 1 == len(self.layers)
        q = torch.zeros(padded, first.num_heads, 1, first.head_dim, **like)
        k = torch.zeros(padded, first.num_kv_heads, 1, first.head_dim, **like)
        cache_rows, positions, span = padded + 1, 8, 4  # example sizes only: these three are dynamic
        keys = torch.zeros(cache_rows, first.num_kv_heads, positions, first.head_dim, **like)
        write_positions = torch.zeros(padded, dtype=torch.long, device=self.device)
        mask = torch.zeros(padded, 1, 1, span, **like)
        args = (x, q, k, torch.zeros_like(k), keys, torch.zeros_like(keys), write_positions, mask,
                self._all_rows[padded].clone(), cos, sin)
        cache = {0: Dim(f"cache_rows_{padded}", min=padded), 2: Dim("cache_positions", min=3)}
        dynamic = (None, None, None, None, cache, cache, None, {3: Dim("span", min=2)}, None, None, None)
        following = self.head if last else self.layers[index + 1]
        return _Block(self.layers[index], following, last, run_ffn), args, dynamic


def _block_name(index: int, run_ffn: bool) -> str:
    return f"block_{index}_{'ffn' if run_ffn else 'skip'}"


def _parse_block_name(name: str) -> tuple[int, bool]:
    _, index, kind = name.split("_")
    return int(index), kind == "ffn"


def _block_runner(loader, is_last: bool) -> Callable:
    """Rebuild block_step's (h, out, similarity, following) from the package's flat outputs
    (a skipped FFN has no similarity output: None is not a tensor)."""
    def run(*args):
        flat = loader.boxed_run(list(args))
        similarity = flat[2] if len(flat) in (4, 6) else None
        return flat[0], flat[1], similarity, flat[-1] if is_last else tuple(flat[-3:])
    return run
