"""Where the time of one decode step goes: matmuls by role, attention, the rest.

torch.profiler records every op with its input shapes; matmuls are assigned to a
role by the weight they multiply (FFN gate/up and down, attention q/k/v and o,
the LM head). In a compiled engine a segment is one call: its time is reported
as the graph's run and the wrapping around it. Profiled on a warm engine, median
over a few steps.
"""

from __future__ import annotations

import statistics

from torch.profiler import ProfilerActivity, profile

from ffnskip.config import DENSE, SamplingParams

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"}


def profile_decode_step(engine, prompt_ids: list[int], steps: int = 8) -> dict:
    config = engine.model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    roles = {
        (2 * inter, hidden): "ffn gate_up matmul", (hidden, inter): "ffn down matmul",
        (engine.model.q_size + 2 * engine.model.kv_size, hidden): "attention qkv matmul",
        (hidden, engine.model.q_size): "attention o matmul", (config.vocab_size, hidden): "lm_head matmul",
    }
    seq = engine.add(prompt_ids=prompt_ids, sampling=SamplingParams(max_new_tokens=steps + 4, ignore_eos=True), skip=DENSE)
    engine.step()  # prefill
    engine.step()  # one warm decode step
    totals: dict[str, list[float]] = {}
    step_ms = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            engine.step()
        parts: dict[str, float] = {}
        for event in prof.events():
            if event.cpu_parent is not None and event.cpu_parent.name not in ("ProfilerStep*",):
                continue  # count top-level ops only, so nothing is counted twice
            for part, us in _attribute(event, roles):
                parts[part] = parts.get(part, 0.0) + us / 1000.0
        for part, ms in parts.items():
            totals.setdefault(part, []).append(ms)
        step_ms.append(sum(parts.values()))
    engine.cancel(seq.request_id)
    while engine.has_work:
        engine.step()
    medians = {part: statistics.median(values) for part, values in totals.items()}
    return {"step_ms": statistics.median(step_ms),
            "parts_ms": dict(sorted(medians.items(), key=lambda kv: -kv[1]))}


def _attribute(event, roles: dict) -> list[tuple[str, float]]:
    """A top-level event's time by part; a compiled segment's call splits into the graph's own
    run (its matmuls and fused ops are one C++ call, invisible to the profiler) and the
    Python/Dynamo wrapping around it."""
    if event.name.startswith("Torch-Compiled Region"):
        graph = sum(child.cpu_time_total for child in event.cpu_children if "CompiledFxGraph" in child.name)
        return [("compiled segments (matmuls + fused ops)", graph),
                ("compiled-call overhead (dynamo, wrappers)", event.cpu_time_total - graph)]
    return [(_classify(event, roles), event.cpu_time_total)]


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
