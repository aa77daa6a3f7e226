"""Versioned, immutable calibration profiles in Redis, with an active pointer and rollback.

Each change that must be seen whole (publish + activate + job completion; activate;
rollback) is one Lua script, so a reader never sees a half-published state and
concurrent activations leave active == the top of the activations stack.

A profile that records FFN substitutes (Profile.substitutes) is published with their bytes
under `ffnskip:profile:{model}:substitutes:v{n}` in the same script as the profile, so a reader
that sees v{n} sees its substitutes too. Versions are never deleted today; whatever comes to
remove v{n} must remove its plot and substitutes keys with it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import cast

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ffnskip.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ffnskip.profile import Profile, utc_now_iso
from ffnskip.store.connection import redis_errors
from ffnskip.store.jobs import job_key

ProfileEvent = dict  # {"model": str, "version": int, "action": "activate"|"rollback"} or {"action": "resync"}

# KEYS: profile, plot, versions, models, active, activations, job, substitutes
# ARGV: json, has_plot, plot, version, model, activate, channel, has_job, now, has_substitutes, substitutes
_PUBLISH = """
if ARGV[8] == '1' then
  local state = redis.call('HGET', KEYS[7], 'state')
  if not state then return {'no_job', ''} end
  if state == 'succeeded' then return {'done', redis.call('HGET', KEYS[7], 'profile_version') or ''} end
  if state == 'failed' or state == 'cancelled' then return {'terminal', state} end
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return {'exists', ''} end
if ARGV[2] == '1' then redis.call('SET', KEYS[2], ARGV[3]) end
if ARGV[10] == '1' then redis.call('SET', KEYS[8], ARGV[11]) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
if ARGV[6] == '1' then
  redis.call('SET', KEYS[5], ARGV[4])
  redis.call('RPUSH', KEYS[6], ARGV[4])
  redis.call('PUBLISH', ARGV[7], cjson.encode({model=ARGV[5], version=tonumber(ARGV[4]), action='activate'}))
end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[7], 'state', 'succeeded', 'profile_version', ARGV[4],
             'finished_at', ARGV[9], 'updated_at', ARGV[9])
end
return {'ok', ARGV[4]}
"""

# KEYS: versions, active, activations   ARGV: version, model, channel
_ACTIVATE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 2 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({model=ARGV[2], version=tonumber(ARGV[1]), action='activate'}))
return 1
"""

# KEYS: active, activations   ARGV: model, channel
_ROLLBACK = """
if redis.call('LLEN', KEYS[2]) < 2 then return -1 end
redis.call('RPOP', KEYS[2])
local previous = redis.call('LINDEX', KEYS[2], -1)
redis.call('SET', KEYS[1], previous)
redis.call('PUBLISH', ARGV[2], cjson.encode({model=ARGV[1], version=tonumber(previous), action='rollback'}))
return tonumber(previous)
"""


def check_model_id(model: str) -> str:
    """Model ids become key segments: a ':' could make one model's key another's."""
    if not isinstance(model, str) or not model or any(c in model for c in ": \t\r\n"):
        raise InvalidArgument("model_id", f"must be non-empty without ':' or whitespace, got {model!r}")
    return model


class ProfileStore:
    def __init__(self, redis_client: redis.Redis, prefix: str = "ffnskip") -> None:
        self._redis = redis_client
        self._prefix = prefix
        self.channel = f"{prefix}:profile-events"
        self._publish = redis_client.register_script(_PUBLISH)
        self._activate = redis_client.register_script(_ACTIVATE)
        self._rollback = redis_client.register_script(_ROLLBACK)

    def _key(self, model: str, suffix: str) -> str:
        return f"{self._prefix}:profile:{check_model_id(model)}:{suffix}"

    def publish(
        self, profile: Profile, plot_png: bytes | None = None, activate: bool = False, job_id: str | None = None,
        substitutes: bytes | None = None,
    ) -> int:
        """Store `profile` under a new version, with its plot and the substitute set it records
        (SubstituteSet.to_bytes: required exactly when profile.substitutes is non-empty, and
        matching its size and digest, else InvalidArgument); returns the version (the job's, if
        it already completed)."""
        model = profile.model_id
        profile.check_substitutes(substitutes)  # before a version is allocated: a refusal leaves no gap
        with redis_errors(self._redis):
            # Allocated outside the script so the JSON can carry its own version; a failed
            # or duplicate publish just leaves a gap in the numbering.
            version = int(self._redis.incr(self._key(model, "next")))
            stored = profile.with_version(version)
            if job_id and not stored.job_id:
                stored = replace(stored, job_id=job_id)
            keys = [
                self._key(model, f"v{version}"),
                self._key(model, f"plot:v{version}"),
                self._key(model, "versions"),
                f"{self._prefix}:models",
                self._key(model, "active"),
                self._key(model, "activations"),
                job_key(self._prefix, job_id) if job_id else self._key(model, "no-job"),
                self._key(model, f"substitutes:v{version}"),
            ]
            args = [
                stored.to_json(),
                "1" if plot_png is not None else "0",
                plot_png or b"",
                version,
                model,
                "1" if activate else "0",
                self.channel,
                "1" if job_id else "0",
                utc_now_iso(),
                "1" if substitutes is not None else "0",
                substitutes or b"",
            ]
            status, value = self._publish(keys=keys, args=args)
        return self._publish_result(status, value, job_id, model, version)

    @staticmethod
    def _publish_result(status: bytes, value: bytes, job_id: str | None, model: str, version: int) -> int:
        if status == b"ok":
            return int(value)
        if status == b"done":  # the job already published: exactly-once effect
            return int(value)
        if status == b"no_job":
            raise NotFound(f"job {job_id!r} does not exist")
        if status == b"terminal":
            raise FailedPrecondition(f"job {job_id!r} is {value.decode()}; its profile was not published")
        raise AlreadyExists(f"profile v{version} of model {model!r} already exists")

    def get(self, model: str, version: int) -> Profile:
        key = self._key(model, f"v{version}")
        with redis_errors(self._redis):
            raw = self._redis.get(key)
        if raw is None:
            raise NotFound(f"model {model!r} has no profile v{version}")
        return self._parse(key, raw, model, version)

    @staticmethod
    def _parse(key: str, raw: bytes | str, model: str, version: int) -> Profile:
        try:
            profile = Profile.from_json(raw)
        except InvalidArgument as err:
            raise InvalidArgument(err.field, f"{err.problem} (stored at {key})") from None
        if profile.model_id != model or profile.version != version:
            raise InvalidArgument(
                "profile.version", f"{key} holds model {profile.model_id!r} v{profile.version}, not {model!r} v{version}"
            )
        return profile

    def get_plot(self, model: str, version: int) -> bytes | None:
        with redis_errors(self._redis):
            # connect() makes bytes-replying clients
            return cast(bytes | None, self._redis.get(self._key(model, f"plot:v{version}")))

    def get_substitutes(self, model: str, version: int) -> bytes | None:
        """The substitute set's bytes published with profile `version` (None: it has none). The
        reader checks them against the profile (Profile.check_substitutes) before serving them."""
        with redis_errors(self._redis):
            return cast(bytes | None, self._redis.get(self._key(model, f"substitutes:v{version}")))

    def active_version(self, model: str) -> int | None:
        key = self._key(model, "active")
        with redis_errors(self._redis):
            raw = self._redis.get(key)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument("profile.active", f"{key} holds {raw!r}, not a version number") from None

    def get_active(self, model: str) -> Profile | None:
        version = self.active_version(model)
        return None if version is None else self.get(model, version)

    def list_versions(self, model: str) -> list[int]:
        with redis_errors(self._redis):
            members = cast(list[bytes], self._redis.zrange(self._key(model, "versions"), 0, -1))  # no scores
        return [int(member) for member in members]

    def list_models(self) -> list[str]:
        with redis_errors(self._redis):
            members = cast(set[bytes], self._redis.smembers(f"{self._prefix}:models"))  # bytes replies
        return sorted(member.decode() for member in members)

    def activations(self, model: str) -> list[int]:
        """The rollback stack, oldest first; its last element is the active version."""
        with redis_errors(self._redis):
            return [int(v) for v in self._redis.lrange(self._key(model, "activations"), 0, -1)]

    def activate(self, model: str, version: int) -> None:
        """Point `model` at `version` (a no-op when it is already active)."""
        keys = [self._key(model, "versions"), self._key(model, "active"), self._key(model, "activations")]
        with redis_errors(self._redis):
            result = self._activate(keys=keys, args=[int(version), model, self.channel])
        if result == 0:
            raise NotFound(f"model {model!r} has no profile v{version}")

    def rollback(self, model: str) -> int:
        """Re-activate the previously active version; returns it."""
        keys = [self._key(model, "active"), self._key(model, "activations")]
        with redis_errors(self._redis):
            result = int(self._rollback(keys=keys, args=[model, self.channel]))
        if result < 0:
            raise FailedPrecondition(f"model {model!r} has no previously active profile to roll back to")
        return result

    def events(self, poll_s: float = 1.0) -> ProfileEvents:
        return ProfileEvents(self._redis, self.channel, poll_s=poll_s)

    def subscribe(self, callback: Callable[[ProfileEvent], None], stop_event: threading.Event, poll_s: float = 0.5) -> None:
        """Call `callback` for each event (resync included) until `stop_event` is set."""
        events = self.events(poll_s=poll_s)
        try:
            while not stop_event.is_set():
                event = events.get(timeout=poll_s)
                if event is not None:
                    callback(event)
        finally:
            events.close()


class ProfileEvents:
    """Profile change events; yields {"action": "resync"} whenever the subscription is (re)made.

    Pub/sub drops messages while disconnected, so a consumer must re-read the active
    pointers on "resync". redis-py may reconnect and resubscribe by itself; every
    subscription confirmation is therefore treated as a reconnect.
    """

    def __init__(self, redis_client: redis.Redis, channel: str, poll_s: float = 1.0, max_backoff_s: float = 2.0) -> None:
        self._redis = redis_client
        self._channel = channel
        self._poll_s = poll_s
        self._max_backoff_s = max_backoff_s
        self._pubsub: redis.client.PubSub | None = None
        self._closed = threading.Event()
        self._failures = 0
        # close() may come from another thread while get() reads; the reader then closes
        # the connection itself, since closing a socket under a reader is not safe.
        self._lock = threading.Lock()
        self._reading = False

    def get(self, timeout: float) -> ProfileEvent | None:
        """The next event, or None when `timeout` passes (or the iterator is closed) first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._reading = True
        try:
            while not self._closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                event = self._next_event(min(remaining, self._poll_s))
                if event is not None:
                    return event
            return None
        finally:
            with self._lock:
                self._reading = False
                if self._closed.is_set():
                    self._drop_connection()

    def _next_event(self, wait_s: float) -> ProfileEvent | None:
        try:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
                self._pubsub.subscribe(self._channel)
            message = self._pubsub.get_message(timeout=wait_s)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._drop_connection()
            self._failures += 1
            self._closed.wait(min(self._max_backoff_s, 0.05 * 2**self._failures))  # back off, but wake on close
            return None
        self._failures = 0
        return self._to_event(message)

    @staticmethod
    def _to_event(message: dict | None) -> ProfileEvent | None:
        if message is None:
            return None
        if message["type"] == "subscribe":
            return {"action": "resync"}
        if message["type"] != "message":
            return None
        try:
            event = json.loads(message["data"])
            return {"model": str(event["model"]), "version": int(event["version"]), "action": str(event["action"])}
        except (ValueError, KeyError, TypeError):
            return None  # not ours or corrupt: the next resync re-reads the truth anyway

    def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may itself fail; it is gone either way
                pass

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            if not self._reading:
                self._drop_connection()

    def __iter__(self) -> Iterator[ProfileEvent]:
        return self

    def __next__(self) -> ProfileEvent:
        while not self._closed.is_set():
            event = self.get(timeout=self._poll_s)
            if event is not None:
                return event
        raise StopIteration

    def __enter__(self) -> ProfileEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
