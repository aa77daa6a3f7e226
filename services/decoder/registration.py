"""Announce this decoder to the gateway through the Redis registry, with a TTL heartbeat."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ffnskip.errors import FfnSkipError
from ffnskip.logs import get_logger
from ffnskip.store.registry import DecoderRegistry

log = get_logger(__name__)


class Registration:
    def __init__(self, registry: DecoderRegistry, info: Callable[[], dict], ttl_s: float) -> None:
        self.registry = registry
        self.info = info
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat_once()
        self._thread.start()

    def beat_once(self) -> None:
        info = self.info()
        try:
            self.registry.heartbeat(info["id"], info, self.ttl_s)
        except FfnSkipError as exc:  # Redis away: the entry expires and the gateway stops routing here
            log.warning("registry heartbeat failed", error=str(exc))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.beat_once()

    def withdraw(self) -> None:
        self._stop.set()
        try:
            self.registry.withdraw(self.info()["id"])
        except FfnSkipError as exc:
            log.warning("registry withdraw failed; the entry expires by TTL", error=str(exc))
