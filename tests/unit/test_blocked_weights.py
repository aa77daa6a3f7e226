"""`project` over a blocked weight: the same product as F.linear; at one row, a multiply-and-reduce
only where Inductor compiles it, a batched matmul when run eagerly. Eagerly, the multiply-and-reduce
materialised the whole product: a decoder prefilling on its released (blocked) weights allocated
113 MB for SmolLM2's LM head per prompt, about 40 ms of each time to first token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ffnskip.engine.layers import blocked, project


class _Project(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(blocked(weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, None, 1000)


def test_an_eager_row_is_multiplied_without_materialising_the_product():
    weight, x = torch.randn(1000, 64), torch.randn(1, 1, 64)
    blocked_weight = blocked(weight)
    with torch.profiler.profile(profile_memory=True) as prof:
        out = project(x, blocked_weight, None, 1000)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest < weight.numel() * weight.element_size() // 10, largest


def test_rows_give_the_same_product_as_linear():
    weight, bias = torch.randn(1000, 64), torch.randn(1000)
    for rows in (1, 3, 16):
        x = torch.randn(rows, 1, 64)
        torch.testing.assert_close(project(x, blocked(weight), bias, 1000), F.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)


def test_a_traced_row_is_a_multiply_and_reduce():
    """What the compiled decode step runs at batch 1 (Inductor's own vectorised loop, not a library GEMV)."""
    program = torch.export.export(_Project(torch.randn(1000, 64)).eval(), (torch.randn(1, 1, 64),))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.sum.dim_IntList" in ops and not any("bmm" in op or "matmul" in op for op in ops), ops
