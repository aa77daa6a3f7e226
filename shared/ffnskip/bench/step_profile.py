"""Where the time of one decode step goes: matmuls by role, attention, the rest.

torch.profiler records every op with its input shapes; matmuls are assigned to a
role by the weight they multiply (FFN gate/up and down, attention q/k/v and o,
the LM head). A compiled engine's segments run inside AOTInductor packages, which
the profiler does not see (except the ops they call, like the int8 kernel): their time is
the step's wall time less every op it recorded, and a second pass times each segment call by kind (`segments_ms`).
Profiled on a warm engine, median over a few steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.profiler import ProfilerActivity, profile

from ffnskip.config import DENSE, SamplingParams
from ffnskip.engine.runner import ModelRunner

UNSEEN = "compiled segments, Python (not seen by the profiler)"
# the int8 kernel (x [M, K], w [N, K]) is seen even inside a package: the package calls it as an op
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm", "ffnskip::int8_matmul"}


def profile_decode_step(engine, prompt_ids: list[int], steps: int = 8) -> dict:
    config = engine.runner.config
    hidden, inter = config.hidden_size, config.intermediate_size
    roles = {
        (2 * inter, hidden): "ffn gate_up matmul", (hidden, inter): "ffn down matmul",
        (engine.runner.q_size + 2 * engine.runner.kv_size, hidden): "attention qkv matmul",
        (hidden, engine.runner.q_size): "attention o matmul", (config.vocab_size, hidden): "lm_head matmul",
    }
    seq = engine.add(prompt_ids=prompt_ids, sampling=SamplingParams(max_new_tokens=2 * steps + 4, ignore_eos=True), skip=DENSE)
    engine.step()  # prefill
    engine.step()  # one warm decode step
    totals: dict[str, list[float]] = {}
    step_ms = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            engine.step()
            wall_ms = (time.perf_counter() - started) * 1000.0
        parts: dict[str, float] = {}
        for event in prof.events():
            if event.cpu_parent is not None and event.cpu_parent.name not in ("ProfilerStep*",):
                continue  # count top-level ops only, so nothing is counted twice
            part = _classify(event, roles)
            parts[part] = parts.get(part, 0.0) + event.cpu_time_total / 1000.0
        parts[UNSEEN] = max(wall_ms - sum(parts.values()), 0.0)
        for part, ms in parts.items():
            totals.setdefault(part, []).append(ms)
        step_ms.append(wall_ms)
    calls: dict[str, list[float]] = {}
    started = time.perf_counter()
    with timed_segments(engine.runner, calls):
        for _ in range(steps):
            engine.step()
    wall_ms = (time.perf_counter() - started) * 1000.0 / steps
    engine.cancel(seq)
    while engine.has_work:
        engine.step()
    medians = {part: statistics.median(values) for part, values in totals.items()}
    segments = {kind: {"ms_per_step": sum(seconds) * 1000.0 / steps, "us_per_call": statistics.median(seconds) * 1e6,
                       "calls_per_step": len(seconds) / steps} for kind, seconds in calls.items()}
    segments["outside the segments"] = {"ms_per_step": wall_ms - sum(s["ms_per_step"] for s in segments.values())}
    return {"step_ms": statistics.median(step_ms),
            "parts_ms": dict(sorted(medians.items(), key=lambda kv: -kv[1])),
            "segments_ms": segments}


@contextmanager
def timed_segments(runner: ModelRunner, calls: dict[str, list[float]]) -> Iterator[None]:
    """Time every segment call by kind while inside (the segments object is restored after)."""
    segments = runner.segments

    def timed(kind: str, run: Callable) -> Callable:
        def call(*args):
            started = time.perf_counter()
            result = run(*args)
            calls.setdefault(kind, []).append(time.perf_counter() - started)
            return result
        return call

    kinds = {"attention": "attention (q/k/v, cache write, attention, o_proj)", "ffn": "ffn",
             "substitute": "ffn substitutes", "head": "lm head"}
    for method, kind in kinds.items():  # instance attributes shadow the methods while inside
        setattr(segments, method, timed(kind, getattr(segments, method)))
    try:
        yield
    finally:
        for method in kinds:
            delattr(segments, method)


def _classify(event, roles: dict) -> str:
    name = event.name
    if name in MATMUL_OPS:
        for shape in event.input_shapes or []:
            if len(shape) == 2 and tuple(shape) in roles:
                return roles[tuple(shape)]
        return "other matmul"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention (sdpa)"
    if name.startswith("aten::index") or "index_put" in name or name == "aten::copy_":
        return "kv cache writes, row masks"
    return "everything else (norms, rotary, residuals, sampling, ...)"
