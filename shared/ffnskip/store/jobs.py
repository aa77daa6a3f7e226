"""The calibration job queue: a Redis stream with a consumer group plus one hash per job.

Delivery is at-least-once (XACK only after the job's outcome is recorded; a dead
worker's entry is reclaimed with XAUTOCLAIM). The *effect* is exactly-once: the
job record's terminal state is checked and set inside the same Lua script as the
outcome (ProfileStore.publish sets "succeeded"), and entries of terminal jobs are
acked and skipped. State changes are Lua scripts so that a cancel, a reclaim and a
completion can never interleave half-way.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import ResponseError

from ffnskip.errors import FailedPrecondition, InvalidArgument, NotFound
from ffnskip.profile import utc_now_iso
from ffnskip.store.connection import redis_errors

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_INT_FIELDS = ("attempts", "done", "total", "profile_version")
_Entries = list[tuple[bytes, dict[bytes, bytes]]]  # XRANGE's reply: connect() makes bytes-replying clients


def job_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job:{job_id}"


# KEYS: stream, job, idem   ARGV: job_id, request, now, has_idem, idem_ttl_s, maxlen, idem_key_text
_SUBMIT = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return existing end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[5])
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'state', 'queued', 'request', ARGV[2], 'created_at', ARGV[3],
           'updated_at', ARGV[3], 'cancel_requested', '0', 'attempts', '0', 'idempotency_key', ARGV[7])
return ARGV[1]
"""

# One delivered entry: skip it if its job is over, dead-letter it if delivered too often,
# else mark the job running.  KEYS: stream, job, dead   ARGV: group, entry, consumer, max, now, job_id
_TAKE = """
local state = redis.call('HGET', KEYS[2], 'state')
if (not state) or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return {'skip', state or 'missing'}
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local deliveries = 1
if pending[1] then deliveries = tonumber(pending[1][4]) end
if deliveries > tonumber(ARGV[4]) then
  local err = 'dead-lettered: delivered ' .. deliveries .. ' times (max ' .. ARGV[4] ..
              '); each worker died or stalled before finishing it'
  redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[6], 'entry_id', ARGV[2], 'deliveries', deliveries, 'error', err)
  redis.call('HSET', KEYS[2], 'state', 'failed', 'error', err, 'finished_at', ARGV[5], 'updated_at', ARGV[5])
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return {'skip', 'dead'}
end
if redis.call('HGET', KEYS[2], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[2], 'state', 'cancelled', 'finished_at', ARGV[5], 'updated_at', ARGV[5])
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return {'skip', 'cancelled'}
end
redis.call('HSET', KEYS[2], 'state', 'running', 'consumer', ARGV[3], 'attempts', deliveries,
           'started_at', ARGV[5], 'updated_at', ARGV[5], 'heartbeat_at', ARGV[5])
return {'run', redis.call('HGET', KEYS[2], 'request'), tostring(deliveries)}
"""

# KEYS: stream, job   ARGV: group, entry, consumer, now
_HEARTBEAT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if (not pending[1]) or pending[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[4], 'updated_at', ARGV[4])
return 1
"""

# Record an outcome other than a published profile. A failure counts only from the
# job's current owner; a success counts from anyone, once.
# KEYS: stream, job   ARGV: group, entry, consumer, state, field, value, now
_FINISH = """
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' and state ~= 'queued' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
if ARGV[4] ~= 'succeeded' and redis.call('HGET', KEYS[2], 'consumer') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[4], ARGV[5], ARGV[6], 'finished_at', ARGV[7], 'updated_at', ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: job   ARGV: now
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return state end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  return 'cancelled'
end
return state
"""

# KEYS: job   ARGV: field/value pairs
_PROGRESS = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return state or false
"""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: str
    entry_id: str  # the stream entry, needed to ack or heartbeat it
    consumer: str
    request: dict
    deliveries: int  # 1 on the first delivery; > 1 means an earlier worker did not finish


class JobQueue:
    def __init__(
        self,
        redis_client: redis.Redis,
        prefix: str = "ffnskip",
        group: str = "calibrators",
        max_deliveries: int = 3,
        max_stream_len: int = 10_000,
        idempotency_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        if max_deliveries < 1:
            raise InvalidArgument("max_deliveries", f"must be >= 1, got {max_deliveries}")
        self._redis = redis_client
        self._prefix = prefix
        self._group = group
        self._max_deliveries = max_deliveries
        self._max_stream_len = max_stream_len
        self._idempotency_ttl_s = idempotency_ttl_s
        self.stream = f"{prefix}:jobs"
        self.dead_stream = f"{prefix}:jobs:dead"
        self._group_ready = False
        self._submit = redis_client.register_script(_SUBMIT)
        self._take = redis_client.register_script(_TAKE)
        self._heartbeat = redis_client.register_script(_HEARTBEAT)
        self._finish = redis_client.register_script(_FINISH)
        self._cancel = redis_client.register_script(_CANCEL)
        self._progress = redis_client.register_script(_PROGRESS)

    def _job_key(self, job_id: str) -> str:
        return job_key(self._prefix, job_id)

    # --- producers -------------------------------------------------------------------

    def submit(self, request: dict, idempotency_key: str | None = None) -> str:
        """Queue a job; with an idempotency key, a resubmission returns the first job's id."""
        try:
            request_json = json.dumps(request, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidArgument("request", f"must be JSON-serialisable: {err}") from None
        if idempotency_key is not None and not idempotency_key:
            raise InvalidArgument("idempotency_key", "must not be empty")
        job_id = uuid.uuid4().hex
        idem_key = f"{self._prefix}:job-idem:{idempotency_key}" if idempotency_key else f"{self._prefix}:job-idem:-"
        keys = [self.stream, self._job_key(job_id), idem_key]
        args = [job_id, request_json, utc_now_iso(), "1" if idempotency_key else "0",
                self._idempotency_ttl_s, self._max_stream_len, idempotency_key or ""]
        # One script: the stream entry, the record and the idempotency key appear together or not at all.
        with redis_errors(self._redis):
            return self._submit(keys=keys, args=args).decode()

    def get(self, job_id: str) -> dict[str, Any]:
        with redis_errors(self._redis):
            raw = self._redis.hgetall(self._job_key(job_id))
        if not raw:
            raise NotFound(f"job {job_id!r} does not exist")
        return _decode_record(raw)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` jobs, newest first."""
        with redis_errors(self._redis):
            entries = cast(_Entries, self._redis.xrevrange(self.stream, count=limit))
            job_ids = [fields[b"job_id"].decode() for _, fields in entries if b"job_id" in fields]
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(self._job_key(job_id))
            records = pipe.execute()
        return [_decode_record(raw) for raw in records if raw]

    def cancel(self, job_id: str) -> str:
        """Request cancellation; a queued job is cancelled at once. Returns the job's state."""
        with redis_errors(self._redis):
            state = self._cancel(keys=[self._job_key(job_id)], args=[utc_now_iso()])
        if state is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return state.decode()

    # --- workers ---------------------------------------------------------------------

    def claim(self, consumer: str, block_ms: int = 1000, min_idle_ms: int = 60_000) -> ClaimedJob | None:
        """The next job for `consumer`: first one a dead worker left idle, then a new one."""
        with redis_errors(self._redis):
            self._ensure_group()
            try:
                return self._claim_stale(consumer, min_idle_ms) or self._claim_new(consumer, block_ms)
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                self._group_ready = False  # Redis lost the group (restart without persistence)
                self._ensure_group()
                return None

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From id 0, so entries queued before the first worker ever started are delivered.
            self._redis.xgroup_create(self.stream, self._group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._group_ready = True

    def _claim_stale(self, consumer: str, min_idle_ms: int) -> ClaimedJob | None:
        cursor: Any = "0-0"
        for _ in range(100):  # bounded: each call scans at most a few PEL entries
            reply = self._redis.xautoclaim(self.stream, self._group, consumer, min_idle_ms, start_id=cursor, count=1)
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                job = self._take_entry(consumer, entry_id, fields)
                if job is not None:
                    return job
            if cursor in (b"0-0", "0-0"):
                return None
        return None

    def _claim_new(self, consumer: str, block_ms: int) -> ClaimedJob | None:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        block_cap_ms = self._block_cap_ms()
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block = min(remaining_ms, block_cap_ms) if remaining_ms > 0 else None
            reply = self._redis.xreadgroup(self._group, consumer, {self.stream: ">"}, count=1, block=block)
            entries = _stream_entries(reply)
            if not entries:
                return None
            for entry_id, fields in entries:
                job = self._take_entry(consumer, entry_id, fields)
                if job is not None:
                    return job
            # Every entry was skipped (job already over): read on within the same deadline.

    def _block_cap_ms(self) -> int:
        # A block longer than the socket timeout would look like a dead Redis.
        timeout = self._redis.connection_pool.connection_kwargs.get("socket_timeout")
        return 60_000 if timeout is None else max(1, int(timeout * 1000) - 500)

    def _take_entry(self, consumer: str, entry_id: Any, fields: dict | None) -> ClaimedJob | None:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        job_id = (fields or {}).get(b"job_id", b"").decode()
        if not job_id:  # not one of ours; ack so it never comes back
            self._redis.xack(self.stream, self._group, entry)
            return None
        keys = [self.stream, self._job_key(job_id), self.dead_stream]
        args = [self._group, entry, consumer, self._max_deliveries, utc_now_iso(), job_id]
        reply = self._take(keys=keys, args=args)
        if reply[0] != b"run":
            return None
        return ClaimedJob(job_id, entry, consumer, json.loads(reply[1]), int(reply[2]))

    def heartbeat(self, claimed: ClaimedJob) -> None:
        """Reset the entry's idle time so a live, long job is not reclaimed."""
        keys = [self.stream, self._job_key(claimed.job_id)]
        with redis_errors(self._redis):
            owned = self._heartbeat(keys=keys, args=[self._group, claimed.entry_id, claimed.consumer, utc_now_iso()])
        if not owned:
            raise FailedPrecondition(f"job {claimed.job_id} is no longer owned by {claimed.consumer} (reclaimed or finished)")

    def progress(self, job_id: str, phase: str, done: int, total: int, eta_s: float | None = None) -> None:
        fields: list[str | int | float] = ["phase", phase, "done", int(done), "total", int(total),
                                           "updated_at", utc_now_iso()]
        fields += ["eta_s", "" if eta_s is None else float(eta_s)]
        with redis_errors(self._redis):
            state = self._progress(keys=[self._job_key(job_id)], args=fields)
        if state is None:
            raise NotFound(f"job {job_id!r} does not exist")

    def is_cancel_requested(self, job_id: str) -> bool:
        with redis_errors(self._redis):
            return self._redis.hget(self._job_key(job_id), "cancel_requested") == b"1"

    def fail(self, claimed: ClaimedJob, error: str) -> bool:
        """Record a failure and ack; False when the job was already over or taken by another worker."""
        return self._record_outcome(claimed, "failed", "error", error)

    def mark_cancelled(self, claimed: ClaimedJob) -> bool:
        """A worker that saw is_cancel_requested stops and records the job as cancelled."""
        return self._record_outcome(claimed, "cancelled", "error", "cancelled on request")

    def complete_without_profile(self, claimed: ClaimedJob, result: dict) -> bool:
        """Succeed a job that publishes no profile; False when it had already finished."""
        return self._record_outcome(claimed, "succeeded", "result", json.dumps(result, sort_keys=True))

    def _record_outcome(self, claimed: ClaimedJob, state: str, field: str, value: str) -> bool:
        keys = [self.stream, self._job_key(claimed.job_id)]
        args = [self._group, claimed.entry_id, claimed.consumer, state, field, value, utc_now_iso()]
        with redis_errors(self._redis):
            return bool(self._finish(keys=keys, args=args))

    def ack(self, claimed: ClaimedJob) -> None:
        with redis_errors(self._redis):
            self._redis.xack(self.stream, self._group, claimed.entry_id)

    def dead_letters(self, limit: int = 100) -> builtins.list[dict[str, str]]:  # `list` here is the method
        with redis_errors(self._redis):
            entries = cast(_Entries, self._redis.xrange(self.dead_stream, count=limit))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def _stream_entries(reply: Any) -> list:
    """XREADGROUP's RESP2 reply [[stream, [(id, fields), ...]]] as [(id, fields)]."""
    return [entry for _, entries in reply or [] for entry in entries]


def _decode_record(raw: dict) -> dict[str, Any]:
    record: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    record["request"] = json.loads(record.get("request") or "{}")
    if "result" in record:
        record["result"] = json.loads(record["result"])
    for name in _INT_FIELDS:
        if record.get(name):
            record[name] = int(record[name])
    record["eta_s"] = float(record["eta_s"]) if record.get("eta_s") else None
    record["cancel_requested"] = record.get("cancel_requested") == "1"
    return record
