"""`ffnskip load` bounds: loopback only, bounded count, duration and concurrency."""

from __future__ import annotations

import asyncio

import pytest

from ffnskip.bench.load import check_loopback, percentiles, run_load
from ffnskip.errors import InvalidArgument


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.0.0.2:9"])
def test_loopback_addresses_are_accepted(address):
    check_loopback(address)


@pytest.mark.parametrize("address", ["10.1.2.3:50051", "8.8.8.8:443"])
def test_other_addresses_are_refused(address):
    with pytest.raises(InvalidArgument, match="loopback only"):
        check_loopback(address)


@pytest.mark.parametrize("kwargs, field", [
    ({"count": 0}, "count"), ({"count": 10**6}, "count"), ({"duration_s": 0}, "duration"),
    ({"duration_s": 10**5}, "duration"), ({"concurrency": 0}, "concurrency"), ({"concurrency": 1000}, "concurrency"),
])
def test_load_is_bounded(kwargs, field):
    with pytest.raises(InvalidArgument, match=field):
        asyncio.run(run_load("127.0.0.1:1", "m", **kwargs))


def test_percentiles_nearest_rank():
    assert percentiles([]) == {}
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
