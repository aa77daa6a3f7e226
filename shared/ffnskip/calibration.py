"""Calibration: measure cos(h, h + ffn(h)) per layer in observe mode, find the cold
regions, and tune threshold / max_skip / warm_up with real skip runs to a target
decode skip ratio. Produces a Profile (version 0; the store assigns the version)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ffnskip.errors import InvalidArgument

MAX_PROMPTS = 512
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class CalibrationRequest:
    prompts: tuple[str, ...]
    target_skip_ratio: float = 0.25
    tokens_per_prompt: int = 128
    batch_size: int = 8
    job_id: str = ""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InvalidArgument("prompts", "the calibration set is empty")
        if len(self.prompts) > MAX_PROMPTS:
            raise InvalidArgument("prompts", f"at most {MAX_PROMPTS} prompts, got {len(self.prompts)}")
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise InvalidArgument("prompts", "every prompt must be a non-empty string")
        if not (0.0 < self.target_skip_ratio <= 0.9):
            raise InvalidArgument("target_skip_ratio", f"must be in (0, 0.9], got {self.target_skip_ratio}")
        if not (8 <= self.tokens_per_prompt <= 1024):
            raise InvalidArgument("tokens_per_prompt", f"must be in [8, 1024], got {self.tokens_per_prompt}")
        if not (1 <= self.batch_size <= 64):
            raise InvalidArgument("batch_size", f"must be in [1, 64], got {self.batch_size}")


@dataclass(frozen=True)
class CalibrationOutcome:
    profile: "object"  # ffnskip.profile.Profile, version 0
    plot_png: bytes


def calibrate(loaded, request: CalibrationRequest, progress: Optional[ProgressFn] = None,
              should_cancel: Optional[CancelFn] = None) -> CalibrationOutcome:
    """Raises ffnskip.errors.Cancelled when should_cancel() becomes true between batches."""
    raise NotImplementedError
