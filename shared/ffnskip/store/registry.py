"""Decoder registry: each decoder pod keeps a JSON entry alive with a TTL.

A pod that dies simply stops renewing its key and drops out within ttl_s; the index
set is only a hint for enumeration and is pruned of ids whose key has expired.
"""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from ffnskip.errors import InvalidArgument
from ffnskip.store.connection import redis_errors

REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "address": (str,),
    "model_id": (str,),
    "capacity": (int,),
    "load": (int, float),
    "profile_version": (int, type(None)),
    "draining": (bool,),
}


# Prune only ids whose key is still gone: one may have re-registered since we looked.
# KEYS: index   ARGV: key prefix, ids...
_PRUNE = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


def _check_info(info: Any) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise InvalidArgument("decoder", f"must be an object, got {type(info).__name__}")
    for name, types in REQUIRED_FIELDS.items():
        if name not in info:
            raise InvalidArgument(f"decoder.{name}", "missing")
        value = info[name]
        wrong_bool = isinstance(value, bool) and bool not in types  # bool is an int subclass
        if not isinstance(value, types) or wrong_bool:
            raise InvalidArgument(f"decoder.{name}", f"wrong type {type(value).__name__}")
    if not info["id"] or ":" in info["id"]:
        raise InvalidArgument("decoder.id", f"must be non-empty without ':', got {info['id']!r}")
    return info


class DecoderRegistry:
    def __init__(self, redis_client: redis.Redis, prefix: str = "ffnskip") -> None:
        self._redis = redis_client
        self._prefix = prefix
        self._index = f"{prefix}:decoders"
        self._prune = redis_client.register_script(_PRUNE)

    def _key(self, decoder_id: str) -> str:
        return f"{self._prefix}:decoder:{decoder_id}"

    def register(self, info: dict[str, Any], ttl_s: float) -> None:
        """Write (or renew) the entry; it disappears ttl_s after the last renewal."""
        _check_info(info)
        if ttl_s <= 0:
            raise InvalidArgument("ttl_s", f"must be > 0, got {ttl_s}")
        payload = json.dumps(info, sort_keys=True)
        with redis_errors(self._redis):
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._key(info["id"]), payload, px=max(1, int(ttl_s * 1000)))
            pipe.sadd(self._index, info["id"])
            pipe.execute()

    def heartbeat(self, decoder_id: str, info: dict[str, Any], ttl_s: float) -> None:
        """Renew with fresh info (load, draining, profile version)."""
        if info.get("id") != decoder_id:
            raise InvalidArgument("decoder.id", f"info is for {info.get('id')!r}, not {decoder_id!r}")
        self.register(info, ttl_s)

    def withdraw(self, decoder_id: str) -> None:
        with redis_errors(self._redis):
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key(decoder_id))
            pipe.srem(self._index, decoder_id)
            pipe.execute()

    def get(self, decoder_id: str) -> dict[str, Any] | None:
        with redis_errors(self._redis):
            raw = self._redis.get(self._key(decoder_id))
        return _parse(raw) if raw is not None else None

    def list(self, model: str | None = None) -> list[dict[str, Any]]:
        """Live decoders (of `model` when given), sorted by id; expired ids are pruned."""
        with redis_errors(self._redis):
            members = cast(set[bytes], self._redis.smembers(self._index))  # connect() makes bytes-replying clients
            ids = sorted(member.decode() for member in members)
            if not ids:
                return []
            raws = self._redis.mget([self._key(decoder_id) for decoder_id in ids])
            expired = [decoder_id for decoder_id, raw in zip(ids, raws) if raw is None]
            if expired:
                self._prune(keys=[self._index], args=[self._key(""), *expired])
        entries = [entry for entry in (_parse(raw) for raw in raws if raw is not None) if entry is not None]
        return [entry for entry in entries if model is None or entry["model_id"] == model]


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    # A corrupt entry is skipped rather than routed to; it expires on its own.
    try:
        return _check_info(json.loads(raw))
    except (ValueError, InvalidArgument):
        return None
