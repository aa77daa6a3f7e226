"""The identity of this host's CPU that compiled CPU code depends on."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_target(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What a CPU package's machine code depends on: torch's CPU capability (the vector width
    Inductor writes its kernels for) and this CPU's instruction-set flags. Inductor compiles with
    -march=native, so a package built on one CPU model may hold instructions that another of the
    same capability lacks; pods on different nodes share the compile cache, and each kind of CPU
    gets packages of its own."""
    try:
        flags = next((line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:  # not Linux
        flags = platform.processor()
    isa = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"{torch.backends.cpu.get_cpu_capability()}-{isa}"
