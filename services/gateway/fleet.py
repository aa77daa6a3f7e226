"""Fleet-wide telemetry through Redis: each gateway replica writes its whole counter map
into one hash with a TTL, and GetTelemetry sums the hashes of every replica.

    ffnskip:telemetry:gateway:{replica}   hash: counter field -> number (TTL renewed on write)
    ffnskip:telemetry:gateways            set of replica ids (a hint, pruned of expired ones)

A write replaces absolute values (never increments), so a repeated or lost write cannot
double-count; a replica that goes away drops out when its hash expires.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import redis

from ffnskip.aio import cancel_and_wait
from ffnskip.errors import FfnSkipError
from ffnskip.logs import get_logger
from ffnskip.store.connection import redis_errors
from ffnskip.v1 import gateway_pb2
from services.gateway.telemetry import HISTOGRAMS, INF, parse_field

log = get_logger(__name__)
_SCALARS = ("generated_tokens", "ffn_blocks_total", "ffn_blocks_skipped", "failovers", "resumes")


class FleetTelemetry:
    def __init__(self, redis_client: redis.Redis, replica_id: str, ttl_s: float, prefix: str = "ffnskip") -> None:
        self._redis = redis_client
        self.replica_id = replica_id
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._index = f"{prefix}:telemetry:gateways"
        self._prefix = f"{prefix}:telemetry:gateway:"

    def write(self, counters: Mapping[str, float]) -> None:
        key = self._prefix + self.replica_id
        with redis_errors(self._redis):
            pipe = self._redis.pipeline(transaction=True)
            if counters:
                pipe.hset(key, mapping={k: repr(float(v)) for k, v in counters.items()})
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self._index, self.replica_id)
            pipe.execute()

    def read_own(self) -> dict[str, float]:
        with redis_errors(self._redis):
            raw = self._redis.hgetall(self._prefix + self.replica_id)
        return _decode(cast(dict[bytes, bytes], raw))  # connect() makes bytes-replying clients

    def read_all(self) -> tuple[int, dict[str, float]]:
        """(replicas included, their counters summed)."""
        with redis_errors(self._redis):
            ids = sorted(m.decode() for m in cast(set[bytes], self._redis.smembers(self._index)))  # bytes replies
            pipe = self._redis.pipeline(transaction=False)
            for replica in ids:
                pipe.hgetall(self._prefix + replica)
            hashes = pipe.execute() if ids else []
            gone = [replica for replica, raw in zip(ids, hashes) if not raw]
            if gone:
                self._redis.srem(self._index, *gone)
        total: dict[str, float] = defaultdict(float)
        for raw in hashes:
            for key, value in _decode(raw).items():
                total[key] += value
        return len(ids) - len(gone), dict(total)


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, float]:
    out = {}
    for key, value in raw.items():
        try:
            out[key.decode()] = float(value)
        except (UnicodeDecodeError, ValueError):
            continue  # a foreign or corrupt field is skipped, never summed
    return out


# -- the summary ----------------------------------------------------------------------

def summarise(gateways: int, counters: Mapping[str, float], model: str = "") -> gateway_pb2.GetTelemetryResponse:
    """Counter map -> one group per (model, decoder) plus a "" totals group per model."""
    groups: dict[tuple[str, str], dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    for key, value in counters.items():
        try:
            m, decoder, metric, label = parse_field(key)
        except (ValueError, TypeError):
            continue
        if model and m != model:
            continue
        groups[(m, decoder)][(metric, label)] += value
        groups[(m, "")][(metric, label)] += value
    response = gateway_pb2.GetTelemetryResponse(gateways=gateways)
    for (m, decoder) in sorted(groups):
        response.groups.append(_group(m, decoder, groups[(m, decoder)]))
    return response


def _group(model: str, decoder: str, values: Mapping[tuple[str, str], float]) -> gateway_pb2.TelemetryGroup:
    finished = {label: int(v) for (metric, label), v in values.items() if metric == "finished"}
    errors = {label: int(v) for (metric, label), v in values.items() if metric == "errors"}
    scalars = {name: int(values.get((name, ""), 0)) for name in _SCALARS}
    layers = {int(label): v for (metric, label), v in values.items() if metric == "layer_skipped"}
    tokens = scalars["generated_tokens"]
    group = gateway_pb2.TelemetryGroup(
        model=model, decoder=decoder, requests=sum(finished.values()), errors=sum(errors.values()),
        errors_by_code=errors, finished_by_reason=finished,
        skip_ratio=scalars["ffn_blocks_skipped"] / scalars["ffn_blocks_total"] if scalars["ffn_blocks_total"] else 0.0,
        layer_skip_frequency=[layers.get(i, 0.0) / tokens if tokens else 0.0 for i in range(max(layers, default=-1) + 1)],
        generated_tokens=tokens, ffn_blocks_total=scalars["ffn_blocks_total"],
        ffn_blocks_skipped=scalars["ffn_blocks_skipped"], failovers=scalars["failovers"], resumes=scalars["resumes"],
    )
    for name in HISTOGRAMS:
        getattr(group, name).CopyFrom(distribution(name, values))  # proto fields share the metric names
    return group


def distribution(name: str, values: Mapping[tuple[str, str], float]) -> gateway_pb2.Distribution:
    bounds = [*HISTOGRAMS[name], math.inf]
    by_bound = {math.inf if label == INF else float(label): v for (metric, label), v in values.items() if metric == name}
    counts = [int(by_bound.get(b, 0)) for b in bounds]
    count = sum(counts)
    total = values.get((name + ":sum", ""), 0.0)
    return gateway_pb2.Distribution(
        count=count, sum=total, mean=total / count if count else 0.0,
        p50=quantile(0.50, bounds, counts), p95=quantile(0.95, bounds, counts), p99=quantile(0.99, bounds, counts),
        upper_bounds=bounds, counts=counts,
    )


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float:
    """Prometheus' histogram_quantile over non-cumulative bucket counts."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    cumulative = 0
    for i, (bound, count) in enumerate(zip(bounds, counts)):
        if count and cumulative + count >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            if math.isinf(bound):
                return lower  # the +Inf bucket: the best known bound, as Prometheus does
            return lower + (bound - lower) * (rank - cumulative) / count
        cumulative += count
    finite = [b for b in bounds if not math.isinf(b)]
    return finite[-1] if finite else 0.0


class Flusher:
    """Writes this replica's counter map into Redis every `interval_s` (and on demand),
    from a worker thread; a failed write is retried at the next tick, nothing is lost
    because every write carries the totals."""

    def __init__(self, fleet: FleetTelemetry, snapshot: Callable[[], Mapping[str, float]], interval_s: float) -> None:
        self.fleet = fleet
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None
        self._failing = False

    async def flush(self) -> None:
        counters = self._snapshot()  # copied on the loop thread; written from a worker
        try:
            await asyncio.to_thread(self.fleet.write, counters)
        except FfnSkipError as exc:
            if not self._failing:
                log.warning("telemetry not written to redis; retrying", error=exc.message)
            self._failing = True
            raise
        self._failing = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)  # the flush period, not a synchronisation
            try:
                await self.flush()
            except FfnSkipError:
                pass  # logged in flush; the next tick carries the totals

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="telemetry-flush")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        try:
            await self.flush()  # the last numbers of this run
        except FfnSkipError:
            pass
