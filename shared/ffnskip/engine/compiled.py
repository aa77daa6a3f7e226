"""Decode segments compiled by TorchInductor, one graph per segment and batch bucket.

Why these settings (measured on SmolLM2-135M, 2 CPU threads, docs/performance.md):
- `freezing`: the weights become constants, so Inductor prepacks them and picks its
  C++ micro-GEMM, which reads fp32 weights at M=1 about twice as fast as MKL's GEMV.
- `max_autotune`: Inductor benchmarks the micro-GEMM against the library call per
  shape and keeps the faster one (results cached on disk under its cache dir).
- One code object per segment: Dynamo keeps compiled entries per code object and
  checks their guards in turn, so 60 segments sharing one function would scan
  dozens of guard sets on every call (about 0.2 ms each, a third of a step).
- `dynamic=False` and batch buckets (1, 2, 4, ... up to the cache's rows): each
  bucket is its own static graph; a batch runs padded to the next bucket.

Compilation happens on first use of a (segment, bucket) or all at once in
`warm_up`; a process compiles once (frozen graphs hold the weights, so Inductor's
FX graph cache does not keep them across processes; its compiled kernels and
autotuning results are kept).
"""

from __future__ import annotations

import time
import types
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence as Seq

import torch
from torch import nn

from ffnskip.engine.segments import block_step

COMPILE_OPTIONS = {"max_autotune": True}


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below max_batch, and max_batch itself."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_batch,)


def _with_own_code(fn: Callable, name: str) -> Callable:
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compile(fn: Callable, name: str) -> Callable:
    return torch.compile(_with_own_code(fn, name), dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)


class CompiledSegments:
    """The EagerSegments interface over compiled graphs; the cosine is computed in the graph."""

    def __init__(self, layers: list[nn.Module], head: nn.Module, max_batch: int) -> None:
        # Freezing is read from the global config when a graph is captured (torch.compile's
        # options reach Inductor too late for it); nothing else in a process compiles.
        torch._inductor.config.freezing = True
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * len(layers) * len(batch_buckets(max_batch)))
        self.layers, self.head = layers, head
        self.buckets = batch_buckets(max_batch)
        self.device = head.lm_head.weight.device
        self._all_rows = {b: torch.ones(b, 1, 1, dtype=torch.bool, device=self.device) for b in self.buckets}
        self._first = _compile(self._first_qkv_fn(), "ffnskip_qkv_0")
        self._blocks: dict[tuple[int, bool], Callable] = {}
        self.warm_buckets: set[int] = set()  # every segment compiled for these batch buckets
        self.compile_seconds = 0.0

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch of {batch} rows exceeds the largest bucket {self.buckets[-1]}")

    def row_mask(self, padded: int, rows: Optional[Seq[int]]) -> torch.Tensor:
        if rows is None:
            return self._all_rows[padded]
        mask = torch.zeros(padded, dtype=torch.bool)
        mask[list(rows)] = True
        return mask.to(self.device)[:, None, None]

    def first_qkv(self) -> Callable:
        return self._first

    def running(self, padded: int) -> ContextManager:
        """Dynamo's guards cost about 50 us per segment call; once every segment of a bucket is
        compiled, only the guards that tell the buckets apart need to run."""
        if padded in self.warm_buckets:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return nullcontext()

    def block(self, index: int, run_ffn: bool) -> Callable:
        key = (index, run_ffn)
        if key not in self._blocks:
            self._blocks[key] = _compile(self._block_fn(index, run_ffn), f"ffnskip_block_{index}_{'ffn' if run_ffn else 'skip'}")
        return self._blocks[key]

    def _first_qkv_fn(self) -> Callable:
        first = self.layers[0]

        def run(x, cos, sin):
            return first.qkv(x, cos, sin)
        return run

    def _block_fn(self, index: int, run_ffn: bool) -> Callable:
        layer = self.layers[index]
        last = index + 1 == len(self.layers)
        following = self.head if last else self.layers[index + 1]

        def run(x, attn, row_mask, cos, sin):
            return block_step(layer, following, last, run_ffn, True, x, attn, row_mask, cos, sin)
        return run

    @torch.inference_mode()  # as decode: grad mode is part of the guards
    def warm_up(self, buckets: Seq[int]) -> float:
        """Compile every segment (both variants of every layer) for these buckets; returns seconds."""
        started = time.perf_counter()
        first = self.layers[0]
        hidden = first.o_proj.weight.shape[0]
        dtype = first.o_proj.weight.dtype
        every_layer = range(len(self.layers))
        variants = [(i, True) for i in every_layer] + [(i, False) for i in every_layer]
        for size in buckets:
            x = torch.zeros(size, 1, hidden, dtype=dtype, device=self.device)
            attn = torch.zeros(size, 1, first.q_size, dtype=dtype, device=self.device)
            cos = torch.ones(size, 1, first.head_dim, dtype=dtype, device=self.device)
            sin = torch.zeros_like(cos)
            self._first(x, cos, sin)
            for index, run_ffn in variants:
                self.block(index, run_ffn)(x, attn, self._all_rows[size], cos, sin)
            self.warm_buckets.add(size)
        elapsed = time.perf_counter() - started
        self.compile_seconds += elapsed
        return elapsed
