"""The int8 kernel (engine/int8_kernel.py, int8_matmul.cpp): built from source, both builds (AVX-512
VNNI and AVX2) sum exactly what the library's int8 GEMM sums over every shape and the whole int8
range, torch's CPU capability picks the build, int8_product takes it for a decode step's few rows
(and the library's GEMM for more), and a failed build leaves the library's GEMM serving."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffnskip.engine import int8_kernel
from ffnskip.engine.layers import int8_product, quantise_rows

needs_vnni = pytest.mark.skipif(not int8_kernel.runs("avx512_vnni"), reason="this CPU lacks AVX-512 VNNI")
needs_avx2 = pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="this CPU lacks AVX2: no build of the kernel runs")

# Shapes with every remainder the builds handle: K past a whole 64 (AVX-512) or 32 (AVX2) bytes,
# N odd and even (the two threads split the weight rows), N past a whole tile of 16 weight rows,
# M past the rows summed one output at a time (8) and past the kernel's ROWS (16).
SHAPES = [(1, 1), (15, 63), (16, 64), (17, 65), (7, 31), (8, 32), (9, 33), (40, 130), (33, 576)]
ROW_COUNTS = [1, 2, 3, 4, 5, 8, 9, 16, 17]


def extreme_operands(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 x [m, k] and w [n, k] with the range's ends in them: every -128 in a row of x and
    of w (the product 2^14 on every column), every 127 in w's last row."""
    generator = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    x[0, :] = -128  # the AVX-512 build's unsigned side sees w + 128, from 0 to 255
    w[0, :] = -128
    w[-1, :] = 127
    return x, w


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Path:
    """The directory the kernel was built in (and this process loaded it from)."""
    directory = tmp_path_factory.mktemp("kernel-cache")
    assert int8_kernel.load(directory)
    assert int8_kernel.loaded()
    return directory


@needs_vnni
def test_a_built_kernel_loads_without_the_build_tools(kernel):
    """A serving decoder loads what was built before: without importing torch's extension builder
    (and setuptools with it, 4 MB of its resident memory)."""
    script = ("import sys; from pathlib import Path; from ffnskip.engine import int8_kernel; "
              f"assert int8_kernel.load(Path({str(kernel)!r})); print('torch.utils.cpp_extension' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"  # after the kernel's log line


@needs_vnni
@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_the_kernel_sums_exactly_what_the_library_gemm_sums(kernel, m, n, k):
    assert int8_kernel.loaded_build() == "avx512_vnni"
    x, w = extreme_operands(m, n, k)
    assert torch.equal(torch.ops.ffnskip.int8_matmul(x, w), torch._int_mm(x, w.t()))


def capability_run(capability: str, directory: Path) -> str:
    """What a process whose torch runs at ATEN_CPU_CAPABILITY=`capability` loads (the kernel
    library is one per process): the build's name, or "none"; for a build, it is first checked
    against the library's GEMM on every shape (an AssertionError fails the process)."""
    script = f"""
import torch
from pathlib import Path
from ffnskip.engine import int8_kernel
from tests.unit.test_int8_kernel import ROW_COUNTS, SHAPES, extreme_operands
if int8_kernel.load(Path({str(directory)!r})):
    for m in ROW_COUNTS:
        for n, k in SHAPES:
            x, w = extreme_operands(m, n, k)
            assert torch.equal(torch.ops.ffnskip.int8_matmul(x, w), torch._int_mm(x, w.t())), (m, n, k)
print(int8_kernel.loaded_build() or "none")
"""
    environ = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@needs_avx2
def test_the_avx2_build_sums_exactly_what_the_library_gemm_sums(tmp_path):
    """Where torch runs at AVX2 (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2 on any newer one), the
    AVX2 build is the one loaded, and it is exact on every shape and at the range's ends."""
    assert capability_run("avx2", tmp_path) == "avx2"


def test_no_build_loads_where_torch_runs_without_vector_instructions(tmp_path):
    assert capability_run("default", tmp_path) == "none"


@needs_vnni
def test_a_transposed_view_is_read_as_its_values(kernel):
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (3, 70), dtype=torch.int8, generator=generator)
    w = torch.randint(-128, 128, (70, 20), dtype=torch.int8, generator=generator).t()  # not contiguous
    assert torch.equal(torch.ops.ffnskip.int8_matmul(x, w), torch._int_mm(x, w.t()))


def kernel_calls(rows: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = int8_product(rows, values, scale)
    return out, sum(event.name == "ffnskip::int8_matmul" for event in profile.events())


@needs_vnni
def test_int8_product_takes_the_kernel_for_a_few_rows_and_gives_the_same_numbers(kernel, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    values, scale = quantise_rows(torch.randn(48, 96, generator=generator))
    assert int8_kernel.rows() == 16
    for count in (1, 8, 9, 16, 17):
        rows = torch.randn(count, 96, generator=generator)
        with_kernel, calls = kernel_calls(rows, values, scale)
        assert calls == (1 if count <= 16 else 0)
        with monkeypatch.context() as patch:
            patch.setattr(int8_kernel, "_loaded", None)
            without, calls = kernel_calls(rows, values, scale)
        assert calls == 0
        assert torch.equal(with_kernel, without)


def test_a_failed_build_leaves_the_library_gemm(tmp_path, monkeypatch):
    broken = tmp_path / "int8_matmul.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(int8_kernel, "SOURCE", broken)
    monkeypatch.setattr(int8_kernel, "_loaded", None)
    monkeypatch.setattr(int8_kernel, "best_build", lambda: "avx2")  # the build is tried on any CPU
    assert not int8_kernel.load(tmp_path / "cache")
    assert not int8_kernel.loaded() and int8_kernel.digest() == "none"
    values, scale = quantise_rows(torch.randn(8, 16))
    rows = torch.randn(1, 16)
    out, calls = kernel_calls(rows, values, scale)
    assert calls == 0 and out.shape == (1, 8)
