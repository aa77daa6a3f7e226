"""The routing policy: a pure function from the known endpoints and this gateway's
in-flight counts to one endpoint. No I/O, no clock: the caller passes `now`.

Least load is the gateway's own in-flight count per decoder (it is exact and current;
the load a decoder reports with its heartbeat lags by a heartbeat), tie-broken by that
reported load. Exact ties rotate with `rotation`, so sequential traffic on an idle fleet
spreads over the pods instead of always landing on the first id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Endpoint:
    """One decoder pod as discovered, valid until `expires_at` (a monotonic time)."""

    decoder_id: str
    address: str
    model_id: str
    capacity: int = 1
    load: float = 0.0
    profile_version: Optional[int] = None
    draining: bool = False
    expires_at: float = float("inf")

    @classmethod
    def from_registry(cls, info: Mapping[str, Any], expires_at: float) -> "Endpoint":
        return cls(
            decoder_id=str(info["id"]), address=str(info["address"]), model_id=str(info["model_id"]),
            capacity=int(info["capacity"]), load=float(info["load"]),
            profile_version=info.get("profile_version"), draining=bool(info["draining"]), expires_at=expires_at,
        )

    def live(self, now: float) -> bool:
        return now < self.expires_at


def routable(endpoints: Sequence[Endpoint], model: str, now: float, exclude: Collection[str] = (),
             profile_version: Optional[int] = None) -> list[Endpoint]:
    """Endpoints of `model` that may take a new request: live, not draining, not excluded, and
    serving `profile_version` when one is given (a resumed stream must keep its profile)."""
    return [
        e for e in endpoints
        if e.model_id == model and not e.draining and e.live(now) and e.decoder_id not in exclude
        and (profile_version is None or e.profile_version == profile_version)
    ]


def pick(
    endpoints: Sequence[Endpoint],
    in_flight: Mapping[str, int],
    model: str,
    now: float,
    exclude: Collection[str] = (),
    rotation: int = 0,
    profile_version: Optional[int] = None,
) -> Optional[Endpoint]:
    """The endpoint for the next request of `model` (of `profile_version`, when given), or None
    when none may take it."""
    candidates = routable(endpoints, model, now, exclude, profile_version)
    if not candidates:
        return None

    def key(e: Endpoint) -> tuple[int, float]:
        return (in_flight.get(e.decoder_id, 0), e.load)

    best = min(key(e) for e in candidates)
    tied = sorted((e for e in candidates if key(e) == best), key=lambda e: e.decoder_id)
    return tied[rotation % len(tied)]
