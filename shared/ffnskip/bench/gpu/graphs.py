"""How the GPU benchmark (`ffnskip bench --gpu`) runs the device step (device_step.DeviceStep): eagerly,
as one CUDA graph with a conditional IF node per gated FFN, or as graph segments with a host read
per gated layer.

`--mechanism auto` (default on CUDA) first probes CUDA-graph conditional nodes: torch 2.13
exposes `torch.cuda.CUDAGraph.begin_capture_to_if_node(pred)` /
`end_capture_to_conditional_node()` (the primitive under `torch.cond` in CUDA graphs). `pred` is
a 0-dim bool CUDA tensor that a kernel inside the graph writes into the conditional handle at
replay, so the FFN body of each gated layer is an IF node whose predicate is computed on the
device. A whole decode step, all layers, is one graph with no host sync: any sync during capture
would have raised. It needs torch built with CUDA >= 12.4 and a driver with conditional nodes; the
probe captures a matmul in an IF node and checks it with the predicate true and false.
  mechanism "conditional": one graph per (pattern, batch), IF nodes for the gated FFNs.
  mechanism "segmented" (fallback when the probe fails, or by flag): the step is captured
  as a chain of graphs cut at every gated FFN; the host reads the predicate (one device->host
  sync per gated layer) and replays the FFN graph only when it is true. The JSON then reports
  `sync_us_per_layer`: the same chain replayed with and without those reads, divided by the
  gated layers.
  mechanism "eager" (CPU, or by flag): the same step run op by op; the branch reads the
  predicate on the host (free on CPU, a sync on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ffnskip.bench.gpu.device_step import DeviceStep, HostBranch

# --------------------------------------------------------------------------- branches


class IfNodeBranch:
    """Captures the body into a CUDA-graph IF node of `graph`, predicated on the device."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph
        self.keep: list[torch.Tensor] = []  # predicates stay allocated for the graph's lifetime
        self.nodes = 0

    def cond(self, pred: torch.Tensor, body: Callable[[], None]) -> None:
        self.keep.append(pred)
        self.graph.begin_capture_to_if_node(pred)
        try:
            body()
        finally:
            self.graph.end_capture_to_conditional_node()
        self.nodes += 1


class SegmentedBranch:
    """Captures a step as a chain of graphs cut at every conditional body (the fallback).
    Replay reads each predicate on the host: one sync per gated layer."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.items: list[tuple] = []  # ("plain", graph) | ("cond", pred, graph)
        self.keep: list[torch.Tensor] = []
        self.current: torch.cuda.CUDAGraph | None = None

    def _begin(self) -> None:
        self.current = torch.cuda.CUDAGraph()
        self.current.capture_begin(pool=self.pool)

    def _end(self) -> None:
        assert self.current is not None
        self.current.capture_end()
        self.items.append(("plain", self.current))
        self.current = None

    def cond(self, pred: torch.Tensor, body: Callable[[], None]) -> None:
        self.keep.append(pred)
        self._end()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        body()
        graph.capture_end()
        self.items.append(("cond", pred, graph))
        self._begin()

    def capture(self, step: Callable[[SegmentedBranch], None]) -> None:
        self._begin()
        step(self)
        self._end()

    def replay(self, read: bool = True) -> None:
        for item in self.items:
            if item[0] == "plain":
                item[1].replay()
            elif not read or bool(item[1]):
                item[2].replay()

    @property
    def conditional_segments(self) -> int:
        return sum(1 for item in self.items if item[0] == "cond")


# --------------------------------------------------------------------------- runners


class EagerRunner:
    """The step op by op; the predicate is read on the host (free on cpu, a sync on CUDA)."""

    def __init__(self, step: DeviceStep, options: dict) -> None:
        self.device_step, self.options = step, options

    def step(self) -> None:
        self.device_step.run(HostBranch(), **self.options)


class GraphRunner:
    def __init__(self, graph: torch.cuda.CUDAGraph, branch: IfNodeBranch) -> None:
        self.graph, self.branch = graph, branch

    def step(self) -> None:
        self.graph.replay()


class SegmentedRunner:
    def __init__(self, branch: SegmentedBranch) -> None:
        self.branch = branch
        self.read = True  # False: replay every FFN graph without reading (sync-cost baseline)

    def step(self) -> None:
        self.branch.replay(read=self.read)


def build_runner(step: DeviceStep, options: dict, mechanism: str, pool: Any = None, warmup_steps: int = 2):
    """A runner of `step.run(branch, **options)`. The graphs read the step's static tensors and the
    runner's weights in place; `pool` (torch.cuda.graph_pool_handle()) lets the graphs of a bucket
    share their intermediate memory (they are replayed one at a time)."""
    if mechanism == "eager":
        return EagerRunner(step, options)
    saved = [t.clone() for t in (step.tokens, step.positions, step.write_positions)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up runs every body: all kernels and cuBLAS handles initialised
        for _ in range(warmup_steps):
            step.run(HostBranch(force=True), **options)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    runner: GraphRunner | SegmentedRunner
    if mechanism == "conditional":
        graph = torch.cuda.CUDAGraph()
        branch = IfNodeBranch(graph)
        with torch.cuda.graph(graph, pool=pool):
            step.run(branch, **options)
        runner = GraphRunner(graph, branch)
    elif mechanism == "segmented":
        segments = SegmentedBranch(pool if pool is not None else torch.cuda.graph_pool_handle())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            segments.capture(lambda br: step.run(br, **options))
        torch.cuda.current_stream().wait_stream(stream)
        runner = SegmentedRunner(segments)
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    torch.cuda.synchronize()
    with torch.inference_mode():  # the step's tensors are inference tensors
        for tensor, value in zip((step.tokens, step.positions, step.write_positions), saved):
            tensor.copy_(value)
    step.zero_counters()
    return runner


def probe_conditional_nodes(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Capture a matmul inside a CUDA-graph IF node and check it with the predicate false and true."""
    try:
        gen = torch.Generator(device=device)
        gen.manual_seed(1)
        x = torch.randn(8, 256, device=device, dtype=dtype, generator=gen)
        w = torch.randn(256, 256, device=device, dtype=dtype, generator=gen)
        out = torch.zeros(8, 256, device=device, dtype=dtype)
        pred = torch.zeros((), dtype=torch.bool, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up of the exact body outside capture
            out.copy_(F.linear(x, w) + 1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph.begin_capture_to_if_node(pred)
            out.copy_(F.linear(x, w) + 1)
            graph.end_capture_to_conditional_node()
        out.zero_()
        pred.fill_(False)
        graph.replay()
        torch.cuda.synchronize()
        if out.abs().max().item() != 0:
            return False, "IF node body ran with a false predicate"
        pred.fill_(True)
        graph.replay()
        torch.cuda.synchronize()
        expect = F.linear(x, w) + 1
        if not torch.allclose(out.float(), expect.float(), rtol=2e-2, atol=2e-2):
            return False, "IF node body gave a wrong result with a true predicate"
        return True, "conditional IF nodes captured and replayed correctly (probe)"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        return False, f"conditional nodes unavailable: {type(exc).__name__}: {exc}"
