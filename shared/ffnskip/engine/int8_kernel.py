"""The int8 product of a decode step's few rows on a CPU: `ffnskip::int8_matmul` (int8_matmul.cpp),
built from source with the C++ compiler the compiled segments use, and loaded into the process.
One source, two builds: "avx512_vnni" (the int8 dot-product instruction) and "avx2" (bytes widened
to 16 bits). A process loads the best one that both its CPU and torch's CPU capability allow:
ATEN_CPU_CAPABILITY=avx2, which holds torch's own kernels and Inductor's code to AVX2, holds this
one to AVX2 too (on an AVX-512 CPU it shows what an AVX2-only one gets).

Measured (the AVX-512 build) on 2 Intel AVX-512 cores with SmolLM2-135M's matrices, each read from
memory (more matrices than the caches hold), at one row: the 3072 x 576 gate/up product 70-85 us
against `torch._int_mm`'s 173-190, the 49,152 x 576 LM head 0.9-1.2 ms against 2.5-2.8. On 2 AMD
EPYC cores, since each weight row is read whole in memory order: gate/up 43-54 us at one row and
52-77 at 4 (the AVX2 build 45-50 and 86-99, where the library takes 104 and 123 at AVX2), the LM
head at 8 rows 0.82-0.92 ms against the library's 1.9-2.0. At 16 rows, one output at a time lost
to the library (gate/up 164-173 us against 124-129); the AVX-512 build's tiles of 16 weight rows
take 86-90 there, the down product 42-45 against 90-91, the 576 x 576 ones 19-20 against 37, the
LM head 1.4-1.5 ms against 2.0-2.2. Both sum the integer products exactly, so which one runs
changes the time and never a number: `layers.int8_product` takes the kernel for at most `rows()`
rows once it is loaded (16 for the AVX-512 build, 8 for the AVX2 one), the library's GEMM
otherwise (a prefill chunk, a GPU, a CPU without either instruction set, a failed build).

The library is built once per source, build, torch version and compiler into
`<directory>/kernels/` (a few seconds) and loaded once per process; the compiled segments' package
key records whether it was, since a package calls it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import torch

from ffnskip.logs import get_logger

log = get_logger(__name__)

# products over at most this many rows take the kernel, by build: the AVX-512 build sums more than
# 8 rows in tiles of 16 weight rows (int8_matmul.cpp), which at 16 rows took 0.5-0.7 of the
# library's time on 2 AMD EPYC cores; the AVX2 build has no tiles, and the library is faster there
ROWS = {"avx512_vnni": 16, "avx2": 8}
SOURCE = Path(__file__).with_name("int8_matmul.cpp")
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp")
# each build's instruction flags, best first: the source picks its path from what they allow
BUILDS: dict[str, tuple[str, ...]] = {
    "avx512_vnni": ("-mavx512f", "-mavx512bw", "-mavx512vnni"),
    "avx2": ("-mavx2",),
}
_loaded: str | None = None  # the build loaded in this process


def loaded() -> bool:
    """Whether `torch.ops.ffnskip.int8_matmul` is loaded in this process."""
    return _loaded is not None


def loaded_build() -> str | None:
    """Which build is loaded ("avx512_vnni", "avx2"), None where none is."""
    return _loaded


def runs(build: str) -> bool:
    """Whether this CPU has the instructions `build` uses and torch's CPU capability allows them."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if build == "avx512_vnni":
        return capability == "AVX512" and torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()
    return build == "avx2" and capability in ("AVX512", "AVX2") and torch.cpu._is_avx2_supported()


def rows() -> int:
    """The most rows of x a product takes the loaded kernel for; 0 where none is loaded."""
    return ROWS[_loaded] if _loaded is not None else 0


def best_build() -> str | None:
    """The build this process loads: the first of `BUILDS` it runs; None for none."""
    return next((build for build in BUILDS if runs(build)), None)


def digest() -> str:
    """What a compiled package calling the kernel depends on: its source and the rows it takes (a
    package traced for a batch bucket calls it or the library), or "none" when not loaded."""
    if _loaded is None:
        return "none"
    return hashlib.sha256(SOURCE.read_bytes() + f"rows {rows()}".encode()).hexdigest()[:16]


def load(directory: Path) -> bool:
    """Build (where missing) and load the best build of the kernel; False, and the library's GEMM
    stays, where none runs here or the build fails (the reason is logged)."""
    global _loaded
    build = best_build()
    if _loaded is not None or build is None:
        return _loaded is not None
    try:
        torch.ops.load_library(str(_built(Path(directory) / "kernels", build)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr[-2000:] if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.warning("int8 kernel not built; the library's int8 GEMM serves every product", build=build, detail=detail)
        return False
    _loaded = build
    log.info("int8 kernel loaded", build=build)
    return True


def _built(directory: Path, build: str) -> Path:
    """The kernel's shared library of `build` under `directory`, compiled if this source, build,
    torch and compiler have not been before."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # local: Inductor costs every importer

    compiler = get_cpp_compiler()
    flags = (*_FLAGS, *BUILDS[build])
    key = hashlib.sha256(b"\0".join(part.encode() for part in (
        SOURCE.read_text(), torch.__version__, compiler, " ".join(flags)))).hexdigest()[:16]
    library = directory / f"int8_matmul-{build}-{key}.so"
    if library.exists():
        return library
    # local, and only to build: it imports setuptools, 4 MB a serving decoder need not hold
    from torch.utils.cpp_extension import include_paths, library_paths

    directory.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.stem}.{uuid.uuid4().hex}.so")  # processes may build at once
    lib_dir = library_paths()[0]
    command = [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               *(f"-I{path}" for path in include_paths()), str(SOURCE), "-o", str(partial),
               f"-L{lib_dir}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library
