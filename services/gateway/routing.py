"""The routing policy: `pick`, a pure function from the known endpoints and this gateway's
in-flight counts to one endpoint (no I/O, no clock: the caller passes `now`), and `Router`,
which holds the state it reads (in-flight counts, quarantined pods) and the discovery snapshot.

Least load is the gateway's own in-flight count per decoder (it is exact and current;
the load a decoder reports with its heartbeat lags by a heartbeat), tie-broken by that
reported load. Exact ties rotate with `rotation`, so sequential traffic on an idle fleet
spreads over the pods instead of always landing on the first id.

A request with an `affinity` (its conversation's first message: a chat resending itself, or
users sharing a system prompt) goes to the pod that highest-random-weight hashing gives that
key, among the pods within AFFINITY_SLACK requests of the least loaded: the pod whose prompt
cache holds the conversation gets it again while it is healthy and not much busier, and a
pod leaving moves only its own conversations.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from ffnskip import errors
from services.gateway.discovery import Discovery
from services.gateway.endpoints import Endpoint

# requests in flight a pod may have beyond the least loaded one and still take its conversations:
# a prompt cache hit saves a prefill of the whole conversation; each request in flight slows a
# pod's every step a little
AFFINITY_SLACK = 2


def routable(endpoints: Sequence[Endpoint], model: str, now: float, exclude: Collection[str] = (),
             profile_version: int | None = None) -> list[Endpoint]:
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
    profile_version: int | None = None,
    affinity: str | None = None,
) -> Endpoint | None:
    """The endpoint for the next request of `model` (of `profile_version`, when given), or None
    when none may take it; with `affinity`, its pod among the nearly least loaded (the module's
    docstring)."""
    candidates = routable(endpoints, model, now, exclude, profile_version)
    if not candidates:
        return None

    def key(e: Endpoint) -> tuple[int, float]:
        return (in_flight.get(e.decoder_id, 0), e.load)

    if affinity:
        least = min(in_flight.get(e.decoder_id, 0) for e in candidates)
        near = [e for e in candidates if in_flight.get(e.decoder_id, 0) <= least + AFFINITY_SLACK]
        return max(near, key=lambda e: _weight(affinity, e.decoder_id))
    best = min(key(e) for e in candidates)
    tied = sorted((e for e in candidates if key(e) == best), key=lambda e: e.decoder_id)
    return tied[rotation % len(tied)]


def _weight(affinity: str, decoder_id: str) -> bytes:
    """The pod's random weight for a key (highest-random-weight hashing)."""
    return hashlib.sha256(f"{affinity}\0{decoder_id}".encode()).digest()


class Router:
    """The routing policy plus the state it needs: in-flight counts and quarantine."""

    def __init__(self, discovery: Discovery, quarantine_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.discovery = discovery
        self.in_flight: dict[str, int] = {}
        self._quarantine_s = quarantine_s
        self._quarantined: dict[str, float] = {}
        self._clock = clock
        self._rotation = itertools.count()

    def live(self, model: str | None = None) -> list[Endpoint]:
        now = self._clock()
        return [e for e in self.discovery.endpoints() if e.live(now) and (model is None or e.model_id == model)]

    def serves(self, model: str) -> bool:
        return bool(self.live(model))

    def choose(self, model: str, tried: set[str], profile_version: int | None = None,
               affinity: str | None = None) -> Endpoint:
        """A pod for `model` not in `tried` (serving `profile_version`, when given; the pod of
        `affinity` among the nearly least loaded, when given: pick)."""
        now = self._clock()
        endpoints = self.discovery.endpoints()
        if not self.serves(model):
            served = sorted({e.model_id for e in self.live()})
            if not served or not self.discovery.current():  # it cannot know: clients should retry
                why = "decoder registry unreachable" if not self.discovery.current() else "none registered"
                raise errors.Unavailable(f"no decoder of model {model!r} is known right now ({why}); retry")
            raise errors.NotFound(f"model: no decoder serves {model!r}; served now: {', '.join(served)}")
        suspect = {d for d, until in self._quarantined.items() if until > now}
        rotation = next(self._rotation)
        chosen = pick(endpoints, self.in_flight, model, now, tried | suspect, rotation, profile_version, affinity)
        if chosen is None and suspect - tried:  # a suspect pod is better than none
            chosen = pick(endpoints, self.in_flight, model, now, tried, rotation, profile_version, affinity)
        if chosen is None:
            raise errors.Unavailable(f"no healthy decoder for model {model!r} right now (tried {len(tried)}); retry")
        return chosen

    def quarantine(self, decoder_id: str) -> None:
        self._quarantined[decoder_id] = self._clock() + self._quarantine_s

    def acquire(self, decoder_id: str) -> None:
        self.in_flight[decoder_id] = self.in_flight.get(decoder_id, 0) + 1

    def release(self, decoder_id: str) -> None:
        left = self.in_flight.get(decoder_id, 0) - 1
        if left > 0:
            self.in_flight[decoder_id] = left
        else:
            self.in_flight.pop(decoder_id, None)
