"""The decoder's view of its model's active profile: Redis first, a disk copy when
Redis is away, and never a profile that is malformed or made for other weights.

Requests snapshot (version, params) when they arrive, so a swap never changes a
request in flight. Change events trigger a re-read; so does every (re)subscription
(pub/sub loses events while disconnected) and a slow timer.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ffnskip.config import Policy, SkipParams
from ffnskip.errors import FfnSkipError, InvalidArgument, Unavailable
from ffnskip.logs import get_logger
from ffnskip.profile import Profile
from ffnskip.store.profiles import ProfileStore
from services.decoder.settings import ServingMode

log = get_logger(__name__)


def serving_params(params: SkipParams, mode: ServingMode, quorum: float) -> SkipParams:
    """The decoder's configured serving mode over a profile's parameters: ALIGNED makes an
    adaptive profile decide per batch; anything else is served as calibrated. The quorum is the
    decoder's (a profile has none), so a request that asks for aligned gets it too."""
    params = replace(params, quorum=quorum)
    aligned = mode is ServingMode.ALIGNED and params.policy is Policy.ADAPTIVE
    return replace(params, policy=Policy.ALIGNED) if aligned else params


@dataclass(frozen=True)
class ActiveProfile:
    version: int  # 0 = no profile: the decoder's default parameters
    params: SkipParams


class ProfileWatcher:
    def __init__(self, store: ProfileStore, model_id: str, fingerprint: str, cache_dir: Path,
                 default: SkipParams, resync_s: float = 30.0, mode: ServingMode = ServingMode.PROFILE, quorum: float = 0.5) -> None:
        self.store = store
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.cache_file = cache_dir / f"{model_id.replace('/', '_')}.profile.json"
        self.resync_s = resync_s
        self.mode, self.quorum = mode, quorum
        self._current = ActiveProfile(0, default)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresh_now = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def current(self) -> ActiveProfile:
        with self._lock:
            return self._current

    def start(self) -> None:
        if not self.refresh():
            self._load_disk_copy()
        for target, name in ((self._listen, "profile-events"), (self._resync, "profile-resync")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._refresh_now.set()

    def refresh(self) -> bool:
        """Re-read the active profile; returns False when Redis could not be asked."""
        try:
            profile = self.store.get_active(self.model_id)
        except Unavailable as exc:
            log.warning("redis unavailable; keeping profile", version=self.current.version, error=str(exc))
            return False
        except InvalidArgument as exc:
            log.error("malformed active profile refused; keeping previous", version=self.current.version, error=exc.message)
            return True
        if profile is not None:
            self._adopt(profile, source="redis")
        return True

    def _adopt(self, profile: Profile, source: str) -> None:
        if profile.fingerprint != self.fingerprint:
            log.error("profile for other weights refused; keeping previous", version=profile.version,
                      profile_fingerprint=profile.fingerprint, model_fingerprint=self.fingerprint)
            return
        try:
            params = serving_params(profile.skip_params(), self.mode, self.quorum)
        except FfnSkipError as exc:
            log.error("profile parameters refused", version=profile.version, error=exc.message)
            return
        with self._lock:
            changed = profile.version != self._current.version
            self._current = ActiveProfile(profile.version, params)
        if changed:
            log.info("profile active", version=profile.version, source=source, policy=params.policy, threshold=params.threshold,
                     max_skip=params.max_skip, warm_up=params.warm_up, cold_start=params.cold_start, cold_end=params.cold_end)
        if source == "redis":
            self._write_disk_copy(profile)

    def _write_disk_copy(self, profile: Profile) -> None:
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(profile.to_json())
            tmp.replace(self.cache_file)  # readers see the old copy or the new one, never half
        except OSError as exc:
            log.warning("cannot write profile disk copy", path=str(self.cache_file), error=str(exc))

    def _load_disk_copy(self) -> None:
        try:
            profile = Profile.from_json(self.cache_file.read_text())
        except FileNotFoundError:
            log.warning("no profile in redis or on disk; serving defaults", path=str(self.cache_file))
            return
        except (OSError, InvalidArgument, json.JSONDecodeError) as exc:
            log.error("disk copy of the profile refused", path=str(self.cache_file), error=str(exc))
            return
        self._adopt(profile, source="disk")

    def _listen(self) -> None:
        def on_event(event: dict) -> None:
            if event.get("action") == "resync" or event.get("model") == self.model_id:
                self.refresh()

        while not self._stop.is_set():
            try:
                self.store.subscribe(on_event, self._stop)
            except FfnSkipError as exc:  # the subscription retries inside; this is a last resort
                log.warning("profile subscription failed; retrying", error=str(exc))
                self._stop.wait(1.0)

    def _resync(self) -> None:
        while not self._stop.wait(self.resync_s):
            self.refresh()
