"""Where the decoders are: a small interface, the Redis registry behind it in production
and tests, a static list for unit tests.

The registry refresh runs in the background, so routing reads an in-memory snapshot and
never waits on Redis. Each endpoint is valid until `expires_at`: a decoder that stops
heart-beating vanishes from the registry (its key's TTL) and so from the next snapshot;
while Redis itself is unreachable the last snapshot stays usable for `stale_s`, then
expires, so an outage degrades to UNAVAILABLE instead of routing on old news forever.
`current()` says whether the snapshot is today's news: only then may the gateway say
that no decoder serves a model (NOT_FOUND) rather than that it cannot know (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ffnskip.aio import cancel_and_wait
from ffnskip.errors import FfnSkipError
from ffnskip.logs import get_logger
from ffnskip.store.registry import DecoderRegistry
from services.gateway.endpoints import Endpoint

log = get_logger(__name__)


class Discovery(Protocol):
    def endpoints(self) -> Sequence[Endpoint]: ...

    def current(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StaticDiscovery:
    """A fixed list (unit tests, or a fleet without Redis)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = list(endpoints)

    def endpoints(self) -> Sequence[Endpoint]:
        return list(self._endpoints)

    def current(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class RegistryDiscovery:
    """Polls DecoderRegistry.list() every `interval_s` in a worker thread (the store is
    synchronous redis-py)."""

    def __init__(self, registry: DecoderRegistry, interval_s: float = 0.5, stale_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[Sequence[Endpoint]], None] | None = None) -> None:
        """`on_change(endpoints)` runs on the event loop after each change of the set."""
        self._registry = registry
        self._interval_s = interval_s
        self._stale_s = stale_s
        self._clock = clock
        self._on_change = on_change
        self._snapshot: list[Endpoint] = []
        self._task: asyncio.Task | None = None
        self._failing = False
        self._first = True

    def endpoints(self) -> Sequence[Endpoint]:
        return self._snapshot

    def current(self) -> bool:
        """True when the last refresh reached the registry."""
        return not (self._first or self._failing)

    async def refresh(self) -> None:
        try:
            infos = await asyncio.to_thread(self._registry.list)
        except FfnSkipError as exc:  # Redis down: keep the old snapshot until it expires
            if not self._failing:
                log.warning("decoder registry unreachable; routing on the last snapshot", error=exc.message,
                            stale_after_s=self._stale_s)
            self._failing = True
            return
        if self._failing:
            log.info("decoder registry reachable again")
        self._failing = False
        expires_at = self._clock() + self._stale_s
        snapshot = [Endpoint.from_registry(info, expires_at) for info in infos]
        changed = self._first or _shape(snapshot) != _shape(self._snapshot)
        self._snapshot, self._first = snapshot, False
        if changed:
            log.info("decoders changed", decoders=[f"{e.decoder_id}@{e.address}{' (draining)' if e.draining else ''}"
                                                   for e in snapshot])
            if self._on_change is not None:
                self._on_change(snapshot)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)  # the polling period, not a synchronisation

    async def start(self) -> None:
        await self.refresh()  # a first snapshot before the server takes traffic
        self._task = asyncio.create_task(self._run(), name="registry-discovery")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def _shape(endpoints: Sequence[Endpoint]) -> list[tuple[str, str, str, bool]]:
    return sorted((e.decoder_id, e.address, e.model_id, e.draining) for e in endpoints)
