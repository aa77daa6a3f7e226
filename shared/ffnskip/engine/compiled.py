"""Decode segments compiled by TorchInductor, one graph per segment and batch bucket.

Why these settings (measured on SmolLM2-135M, 2 CPU threads, docs/performance.md):
- `freezing`: the weights become constants, so Inductor prepacks them once.
- `max_autotune` (float32 only, see __init__): Inductor benchmarks its C++ micro-GEMM
  over the prepacked weights against the library call per shape and keeps the faster
  (results cached on disk); at M=1 the micro-GEMM read fp32 weights about twice as
  fast as MKL's GEMV.
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
from typing import Callable, ContextManager, Optional, Sequence as Seq

import torch
from torch import nn

from ffnskip.engine.segments import block_step



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
    return torch.compile(_with_own_code(fn, name), dynamic=False, fullgraph=True)


class CompiledSegments:
    """The EagerSegments interface over compiled graphs; the cosine is computed in the graph."""

    def __init__(self, layers: list[nn.Module], head: nn.Module, max_batch: int) -> None:
        # Global config, not torch.compile(options=): freezing is read when a graph is captured,
        # before options apply, and options wrap every call in a config patch (about 15 us
        # of a 40 us call). Nothing else in a process compiles.
        torch._inductor.config.freezing = True
        torch._inductor.config.autotune_num_choices_displayed = 0  # the choices go to stderr otherwise
        torch._inductor.config.max_autotune_report_choices_stats = False
        # Autotuning (the micro-GEMM) in float32 only: its bfloat16 kernels produced wrong tokens
        # on an AVX2 CPU without native bf16 (greedy text diverged at token 2); freezing alone is
        # exact there. Set per compile, since one process may compile both precisions.
        self.autotune = head.lm_head.weight.dtype == torch.float32
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * len(layers) * len(batch_buckets(max_batch)))
        self.layers, self.head = layers, head
        self.buckets = batch_buckets(max_batch)
        self.device = head.lm_head.weight.device
        with torch.inference_mode():  # like every decode input: inference tensors are a different guard
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
        mask = torch.zeros(padded, 1, 1, dtype=torch.bool)  # the layout of _all_rows: one guard set
        mask[list(rows)] = True
        return mask.to(self.device)

    def first_qkv(self) -> Callable:
        return self._first

    def running(self, padded: int) -> ContextManager:
        """Dynamo's guards cost about 50 us per segment call; once every segment of a bucket is
        compiled, only the guards that tell the buckets apart need to run."""
        if padded in self.warm_buckets:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return self._compiling()

    def _compiling(self) -> ContextManager:
        return torch._inductor.config.patch(max_autotune=self.autotune)

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
        with self._compiling():
            for size in buckets:
                self._compile_bucket(size)
        elapsed = time.perf_counter() - started
        self.compile_seconds += elapsed
        return elapsed

    def _compile_bucket(self, size: int) -> None:
        first = self.layers[0]
        weight = first.o_proj.weight
        x = torch.zeros(size, 1, weight.shape[0], dtype=weight.dtype, device=self.device)
        attn = torch.zeros(size, 1, first.q_size, dtype=weight.dtype, device=self.device)
        cos = torch.ones(size, 1, first.head_dim, dtype=weight.dtype, device=self.device)
        sin = torch.zeros_like(cos)
        self._first(x, cos, sin)
        for index in range(len(self.layers)):
            for run_ffn in (True, False):
                self.block(index, run_ffn)(x, attn, self._all_rows[size], cos, sin)
        self.warm_buckets.add(size)
