"""The int8 product of a decode step's few rows on a CPU with AVX-512 VNNI: `ffnskip::int8_matmul`
(int8_matmul.cpp), built from source with the C++ compiler the compiled segments use, and loaded
into the process.

Measured on 2 AVX-512 cores with SmolLM2-135M's matrices, each read from memory (more matrices than
the caches hold), at one row: the 3072 x 576 gate/up product 70-85 us against `torch._int_mm`'s
173-190, the 49,152 x 576 LM head 0.9-1.2 ms against 2.5-2.8; 1.4-1.8x at 2 and 4 rows; at 8 rows
the two were level and at 16 the library was faster. Both sum the integer products exactly, so
which one runs changes the time and never a number: `layers.int8_product` takes the kernel for at
most `ROWS` rows once it is loaded, the library's GEMM otherwise (and on a GPU, and where the CPU
or the compiler lacks the instructions).

The library is built once per source, torch version and compiler into `<directory>/kernels/` (a
few seconds) and loaded once per process; the compiled segments' package key records whether it
was, since a package calls it.
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

ROWS = 4  # products over at most this many rows take the kernel
SOURCE = Path(__file__).with_name("int8_matmul.cpp")
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni")
_loaded = False


def loaded() -> bool:
    """Whether `torch.ops.ffnskip.int8_matmul` is loaded in this process."""
    return _loaded


def supported() -> bool:
    """Whether this CPU has the instructions the kernel uses (AVX-512 with VNNI)."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()


def digest() -> str:
    """What a compiled package calling the kernel depends on: its source, or "none" when not loaded."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16] if _loaded else "none"


def load(directory: Path) -> bool:
    """Build (where missing) and load the kernel; False, and the library's GEMM stays, where this
    CPU lacks the instructions or the build fails (the reason is logged)."""
    global _loaded
    if _loaded or not supported():
        return _loaded
    try:
        torch.ops.load_library(str(_built(Path(directory) / "kernels")))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr[-2000:] if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.warning("int8 kernel not built; the library's int8 GEMM serves every product", detail=detail)
        return False
    _loaded = True
    return True


def _built(directory: Path) -> Path:
    """The kernel's shared library under `directory`, compiled if this source, torch and compiler
    have not been before."""
    from torch._inductor.cpp_builder import get_cpp_compiler  # local: Inductor costs every importer

    compiler = get_cpp_compiler()
    key = hashlib.sha256(b"\0".join(part.encode() for part in (
        SOURCE.read_text(), torch.__version__, compiler, " ".join(_FLAGS)))).hexdigest()[:16]
    library = directory / f"int8_matmul-{key}.so"
    if library.exists():
        return library
    # local, and only to build: it imports setuptools, 4 MB a serving decoder need not hold
    from torch.utils.cpp_extension import include_paths, library_paths

    directory.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.stem}.{uuid.uuid4().hex}.so")  # processes may build at once
    lib_dir = library_paths()[0]
    command = [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               *(f"-I{path}" for path in include_paths()), str(SOURCE), "-o", str(partial),
               f"-L{lib_dir}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library
