"""A decoder pod as the gateway knows it: what discovery finds and routing chooses among."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """One decoder pod as discovered, valid until `expires_at` (a monotonic time)."""

    decoder_id: str
    address: str
    model_id: str
    capacity: int = 1
    load: float = 0.0
    profile_version: int | None = None
    draining: bool = False
    expires_at: float = float("inf")

    @classmethod
    def from_registry(cls, info: Mapping[str, Any], expires_at: float) -> Endpoint:
        return cls(
            decoder_id=str(info["id"]), address=str(info["address"]), model_id=str(info["model_id"]),
            capacity=int(info["capacity"]), load=float(info["load"]),
            profile_version=info.get("profile_version"), draining=bool(info["draining"]), expires_at=expires_at,
        )

    def live(self, now: float) -> bool:
        return now < self.expires_at
