"""The decoder's view of its model's active profile: Redis first, a disk copy when
Redis is away, and never a profile that is malformed or made for other weights.

Requests snapshot (version, params, substitutes) when they arrive, so a swap never changes a
request in flight. Change events trigger a re-read; so does every (re)subscription
(pub/sub loses events while disconnected) and a slow timer.

A profile that records FFN substitutes is adopted only with them: their bytes are read beside it
(from Redis, or the disk copy), checked against the size and sha256 the profile records, and
built on the engine's device and dtype. A profile whose substitutes are missing, differ or do not
fit the model is refused like a malformed one: the previous profile stays active, and an error
names the refused version.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from ffnskip.config import Policy, SkipParams
from ffnskip.engine.substitutes import SubstituteSet
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


def _run_here(build: Callable[[], SubstituteSet]) -> SubstituteSet:
    return build()


@dataclass(frozen=True)
class SubstituteTarget:
    """Where the engine serves substitutes: its device, dtype, hidden width (None: unchecked) and
    matrices' format (SubstituteSet.served_by), and `run`, which runs the building on the engine's
    thread (EngineLoop.call: in a decoder that thread makes every torch call)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    width: int | None = None
    weights: str = "full"
    run: Callable[[Callable[[], SubstituteSet]], SubstituteSet] = _run_here

    def build(self, profile: Profile, blob: bytes | None) -> SubstituteSet:
        """The set `profile` records, from its bytes; InvalidArgument when they are missing, are
        not the bytes it records (size, sha256), or hold another set than it says."""
        profile.check_substitutes(blob)
        assert blob is not None  # check_substitutes refuses a missing blob of a profile that has substitutes
        return self.run(partial(self._built, profile, blob))

    def _built(self, profile: Profile, blob: bytes) -> SubstituteSet:
        try:
            parsed = SubstituteSet.from_bytes(blob)  # tensors only (weights_only), never code
        except Exception as exc:  # the digest matched, so the calibrator wrote bytes that are no set
            raise InvalidArgument("substitutes", f"not a substitute set ({type(exc).__name__})") from None
        recorded = profile.substitutes
        if list(parsed.layers) != recorded["layers"]:
            raise InvalidArgument("substitutes.layers", f"the set has layers {list(parsed.layers)}, "
                                  f"the profile records {recorded['layers']}")
        kinds = sorted({substitute.kind for substitute in parsed.layers.values()})
        if kinds != [recorded["kind"]]:
            raise InvalidArgument("substitutes.kind", f"the set has {kinds}, the profile records {recorded['kind']!r}")
        widths = sorted({int(substitute.bias.shape[0]) for substitute in parsed.layers.values()})
        if self.width is not None and widths != [self.width]:  # a wrong width would fail every step it runs in
            raise InvalidArgument("substitutes", f"width {widths}, the model's hidden size is {self.width}")
        return parsed.to(self.device, self.dtype).served_by(self.weights)


@dataclass(frozen=True)
class ActiveProfile:
    version: int  # 0 = no profile: the decoder's default parameters
    params: SkipParams
    substitutes: SubstituteSet | None = None  # the profile's, on the engine's device (None: plain skips)
    # the profile's record of them (kind, layers, bytes, sha256): a profile that records the same reuses them
    substitutes_record: dict = field(default_factory=dict)

    @property
    def substitute_bytes(self) -> int:
        """Bytes of the substitutes as served (the engine's dtype and matrix format); 0 for plain skips."""
        return 0 if self.substitutes is None else self.substitutes.nbytes

    def substitutes_for(self, skip: SkipParams) -> SubstituteSet | None:
        """The substitutes a request that runs under `skip` is served with.

        The profile's, when the request runs exactly the profile's parameters as served (the
        serving mode and quorum applied): it asked for no change, or named the very values the
        profile has. None when it changed any of them (policy, threshold, max_skip, warm-up,
        quorum): the substitutes were fitted to, and measured with, the FFNs the profile's own
        parameters skip, so a request that skips others or at other times skips plainly. A resumed
        request is checked against the same profile version (DecoderService), so with the same
        overrides it gets the same substitutes on any pod."""
        return self.substitutes if skip == self.params else None


class ProfileWatcher:
    def __init__(self, store: ProfileStore, model_id: str, fingerprint: str, cache_dir: Path,
                 default: SkipParams, resync_s: float = 30.0, mode: ServingMode = ServingMode.PROFILE, quorum: float = 0.5,
                 substitutes: SubstituteTarget | None = None) -> None:
        self.store = store
        self.model_id = model_id
        self.fingerprint = fingerprint
        stem = model_id.replace("/", "_")
        self.cache_file = cache_dir / f"{stem}.profile.json"
        # the disk copy's substitutes, named by their digest (written before the profile that names them)
        self._blob_name = re.compile(re.escape(stem) + r"\.substitutes\.[0-9a-f]{64}\.bin")
        self._blob_prefix = f"{stem}.substitutes."
        self.resync_s = resync_s
        self.mode, self.quorum = mode, quorum
        self.target = substitutes or SubstituteTarget()  # default: CPU, float32, no width check
        self._current = ActiveProfile(0, default)
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # one re-read at a time: an older read never lands after a newer one
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
        with self._refreshing:
            try:
                profile = self.store.get_active(self.model_id)
                # substitutes already active (the same record: the same bytes) are not read again
                blob = self.store.get_substitutes(self.model_id, profile.version) \
                    if profile is not None and self._new_substitutes(profile) else None
            except Unavailable as exc:
                log.warning("redis unavailable; keeping profile", version=self.current.version, error=str(exc))
                return False
            except InvalidArgument as exc:
                log.error("malformed active profile refused; keeping previous", version=self.current.version, error=exc.message)
                return True
            if profile is not None:
                self._adopt(profile, "redis", blob)
            return True

    def _new_substitutes(self, profile: Profile) -> bool:
        return bool(profile.substitutes) and profile.substitutes != self.current.substitutes_record

    def _adopt(self, profile: Profile, source: str, blob: bytes | None) -> None:
        """Make `profile` active with `blob`, its substitutes' bytes (None: it has none, or the
        active ones are the same); on any refusal the previous profile stays active."""
        if profile.fingerprint != self.fingerprint:
            log.error("profile for other weights refused; keeping previous", version=profile.version,
                      profile_fingerprint=profile.fingerprint, model_fingerprint=self.fingerprint)
            return
        try:
            params = serving_params(profile.skip_params(), self.mode, self.quorum)
        except FfnSkipError as exc:
            log.error("profile parameters refused", version=profile.version, error=exc.message)
            return
        substitutes: SubstituteSet | None = None
        if profile.substitutes and not self._new_substitutes(profile):
            substitutes = self.current.substitutes  # the same record: the same bytes, checked and built already
        elif profile.substitutes:
            try:
                substitutes = self.target.build(profile, blob)
            except Exception as exc:  # refused bytes, or the engine could not take them: never a half-adopted profile
                log.error("profile substitutes refused; keeping previous", version=profile.version, source=source,
                          kept_version=self.current.version, error=exc.message if isinstance(exc, FfnSkipError) else repr(exc))
                return
        with self._lock:
            changed = profile.version != self._current.version
            self._current = ActiveProfile(profile.version, params, substitutes, profile.substitutes)
        if changed:
            log.info("profile active", version=profile.version, source=source, policy=params.policy, threshold=params.threshold,
                     max_skip=params.max_skip, warm_up=params.warm_up, cold_start=params.cold_start, cold_end=params.cold_end,
                     substitutes=profile.substitutes.get("kind", "none"), substitute_layers=profile.substitutes.get("layers", []),
                     substitute_bytes=self.current.substitute_bytes)
        if source == "redis":
            self._write_disk_copy(profile, blob)

    def _blob_file(self, digest: str) -> Path:
        return self.cache_file.parent / f"{self._blob_prefix}{digest}.bin"

    def _write_disk_copy(self, profile: Profile, blob: bytes | None) -> None:
        """The profile and its substitutes' bytes (`blob`; None: it has none, or they are on disk
        already), so a restart without Redis serves both."""
        digest = profile.substitutes.get("digest", "")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            if blob is not None:  # before the profile that names it: a crash between leaves the old pair whole
                _write_atomic(self._blob_file(digest), blob)
            _write_atomic(self.cache_file, profile.to_json().encode())
            for path in self.cache_file.parent.iterdir():  # other profiles' substitutes are no longer needed
                if self._blob_name.fullmatch(path.name) and path != self._blob_file(digest):
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot write profile disk copy", path=str(self.cache_file), error=str(exc))

    def _load_disk_copy(self) -> None:
        with self._refreshing:
            try:
                profile = Profile.from_json(self.cache_file.read_text())
            except FileNotFoundError:
                log.warning("no profile in redis or on disk; serving defaults", path=str(self.cache_file))
                return
            except (OSError, InvalidArgument, json.JSONDecodeError) as exc:
                log.error("disk copy of the profile refused", path=str(self.cache_file), error=str(exc))
                return
            blob = None
            if profile.substitutes:
                try:
                    blob = self._blob_file(profile.substitutes["digest"]).read_bytes()
                except OSError:  # missing: _adopt refuses the profile, saying so
                    pass
            self._adopt(profile, "disk", blob)

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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # readers see the old file or the new one, never half
