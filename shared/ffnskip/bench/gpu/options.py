"""What a GPU bench run is asked to do (`ffnskip bench --gpu`, scripts/gpu_bench.py), checked
when made: the options every part of the bench reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ffnskip.bench.gpu.workload import CONFIGS
from ffnskip.errors import InvalidArgument

MECHANISMS = ("auto", "conditional", "segmented", "eager")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class GpuBenchOptions:
    """What `ffnskip bench --gpu` (and scripts/gpu_bench.py) runs; the module's docstring says what each measures."""

    model: str = "1b"  # a shape of CONFIGS
    batches: tuple[int, ...] = (1, 8)  # one graph bucket each
    new_tokens: int = 128
    reps: int = 8
    device: str = "auto"  # auto: cuda when there is one, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    mechanism: str = "auto"  # auto: conditional on cuda when the probe passes, else segmented; eager on cpu
    prompt_len: int = 16
    target_skip: float = 0.25  # the per-token skip ratio the calibration aims at
    calib_steps: int = 8
    k: int | None = None  # skip run length (default: half the hot layers)
    cold_start: int | None = None
    cold_end: int | None = None
    static_layers: tuple[int, ...] | None = None  # for `static` (default: spread over the hot range)
    seed: int = 0
    self_check: bool = True
    json: bool = False  # JSON on stdout, the table on stderr

    def __post_init__(self) -> None:
        if self.model not in CONFIGS:
            raise InvalidArgument("model", f"expected one of {', '.join(sorted(CONFIGS))}, got {self.model!r}")
        if not self.batches or min(self.batches) < 1:
            raise InvalidArgument("batches", "need positive integers")
        for name in ("new_tokens", "reps", "prompt_len", "calib_steps"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, "must be >= 1")
        if self.mechanism not in MECHANISMS:
            raise InvalidArgument("mechanism", f"expected one of {', '.join(MECHANISMS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidArgument("dtype", f"expected auto or one of {', '.join(DTYPES)}")
