"""JobQueue against a real redis-server: delivery, reclaim, exactly-once effect, dead letters."""

from __future__ import annotations

import time

import pytest
import redis

from ffnskip.errors import FailedPrecondition, NotFound, Unavailable
from ffnskip.store import ClaimedJob, JobQueue, ProfileStore, RedisSettings, connect
from tests.helpers.polling import wait_for
from tests.helpers.profiles import build_profile
from tests.redis_server import running_redis

MODEL = "tiny-llama"
LONG_IDLE_MS = 60_000  # "never reclaim" for tests that do not want reclaiming
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jobs(client: redis.Redis) -> JobQueue:
    return JobQueue(client)


@pytest.fixture
def store(client: redis.Redis) -> ProfileStore:
    return ProfileStore(client)


def pending_count(client: redis.Redis) -> int:
    return client.xpending("ffnskip:jobs", "calibrators")["pending"]


def test_submit_claim_progress_and_complete_by_publishing(jobs: JobQueue, store: ProfileStore, client: redis.Redis) -> None:
    job_id = jobs.submit({"model": MODEL, "size": 8})
    record = jobs.get(job_id)
    assert record["state"] == "queued" and record["request"] == {"model": MODEL, "size": 8}

    claimed = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    assert claimed is not None and claimed.job_id == job_id and claimed.deliveries == 1
    assert claimed.request == {"model": MODEL, "size": 8}
    assert jobs.get(job_id)["state"] == "running" and jobs.get(job_id)["consumer"] == "worker-a"

    jobs.progress(job_id, "measure", 3, 10, 12.5)
    jobs.heartbeat(claimed)
    record = jobs.get(job_id)
    assert (record["phase"], record["done"], record["total"], record["eta_s"]) == ("measure", 3, 10, 12.5)

    version = store.publish(build_profile(), activate=True, job_id=job_id)
    jobs.ack(claimed)
    record = jobs.get(job_id)
    assert record["state"] == "succeeded" and record["profile_version"] == version
    assert store.get_active(MODEL).job_id == job_id
    assert pending_count(client) == 0
    assert jobs.claim("worker-b", block_ms=0, min_idle_ms=0) is None
    assert [job["id"] for job in jobs.list(10)] == [job_id]


def test_idempotency_key_returns_the_first_job(jobs: JobQueue, client: redis.Redis) -> None:
    first = jobs.submit({"model": MODEL}, idempotency_key="nightly-2025-01-02")
    again = jobs.submit({"model": MODEL, "other": True}, idempotency_key="nightly-2025-01-02")
    other = jobs.submit({"model": MODEL}, idempotency_key="nightly-2025-01-03")
    assert first == again != other
    assert client.xlen("ffnskip:jobs") == 2
    assert jobs.get(first)["request"] == {"model": MODEL}


def test_dead_worker_job_is_reclaimed_and_completes_once(jobs: JobQueue, store: ProfileStore) -> None:
    job_id = jobs.submit({"model": MODEL})
    stalled = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    assert stalled is not None

    reclaimed = wait_for(lambda: jobs.claim("worker-b", block_ms=0, min_idle_ms=50))
    assert reclaimed.job_id == job_id and reclaimed.deliveries == 2
    assert jobs.get(job_id)["consumer"] == "worker-b"
    with pytest.raises(FailedPrecondition):
        jobs.heartbeat(stalled)  # A learns it lost the job
    assert jobs.fail(stalled, "late failure") is False  # and cannot fail B's job
    assert jobs.get(job_id)["state"] == "running"

    # Both workers finish: the job's effect happens once.
    first = store.publish(build_profile(), job_id=job_id)
    second = store.publish(build_profile(threshold=0.9), job_id=job_id)
    jobs.ack(stalled)
    jobs.ack(reclaimed)
    assert first == second
    assert store.list_versions(MODEL) == [first]
    assert jobs.get(job_id)["profile_version"] == first


def test_heartbeat_keeps_a_live_job_from_being_stolen(jobs: JobQueue, client: redis.Redis) -> None:
    jobs.submit({"model": MODEL})
    claimed = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    assert claimed is not None

    def idle_ms() -> int:
        return client.xpending_range("ffnskip:jobs", "calibrators", "-", "+", 1)[0]["time_since_delivered"]

    wait_for(lambda: idle_ms() >= 400)
    jobs.heartbeat(claimed)
    assert jobs.claim("worker-b", block_ms=0, min_idle_ms=400) is None
    assert jobs.get(claimed.job_id)["consumer"] == "worker-a"


def test_dead_letter_after_max_deliveries(client: redis.Redis) -> None:
    jobs = JobQueue(client, max_deliveries=2)
    job_id = jobs.submit({"model": MODEL})
    assert jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS) is not None
    assert wait_for(lambda: jobs.claim("worker-b", block_ms=0, min_idle_ms=50)).deliveries == 2

    def dead() -> bool:
        assert jobs.claim("worker-c", block_ms=0, min_idle_ms=50) is None  # never handed out a third time
        return jobs.get(job_id)["state"] == "failed"

    wait_for(dead)
    assert "delivered 3 times" in jobs.get(job_id)["error"]
    letters = jobs.dead_letters()
    assert [letter["job_id"] for letter in letters] == [job_id]
    assert pending_count(client) == 0


def test_cancel_queued_and_running_jobs(jobs: JobQueue, client: redis.Redis) -> None:
    queued = jobs.submit({"model": MODEL})
    assert jobs.cancel(queued) == "cancelled"
    assert jobs.get(queued)["state"] == "cancelled"
    assert jobs.claim("worker-a", block_ms=0, min_idle_ms=LONG_IDLE_MS) is None  # skipped and acked
    assert pending_count(client) == 0

    running = jobs.submit({"model": MODEL})
    claimed = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    assert claimed is not None and not jobs.is_cancel_requested(running)
    assert jobs.cancel(running) == "running"
    assert jobs.is_cancel_requested(running)
    assert jobs.mark_cancelled(claimed)
    assert jobs.get(running)["state"] == "cancelled"
    assert jobs.cancel(running) == "cancelled"  # idempotent
    with pytest.raises(NotFound):
        jobs.cancel("no-such-job")
    with pytest.raises(NotFound):
        jobs.get("no-such-job")


def test_fail_and_complete_without_profile(jobs: JobQueue, store: ProfileStore, client: redis.Redis) -> None:
    failing, evaluating = jobs.submit({"n": 1}), jobs.submit({"n": 2})
    first = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    second = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
    assert isinstance(first, ClaimedJob) and isinstance(second, ClaimedJob)
    assert (first.job_id, second.job_id) == (failing, evaluating)

    assert jobs.fail(first, "out of memory")
    assert jobs.get(failing)["state"] == "failed" and jobs.get(failing)["error"] == "out of memory"
    with pytest.raises(FailedPrecondition):
        store.publish(build_profile(), job_id=failing)  # a failed job never publishes afterwards

    assert jobs.complete_without_profile(second, {"accuracy": 0.5})
    assert jobs.complete_without_profile(second, {"accuracy": 0.9}) is False
    assert jobs.get(evaluating)["result"] == {"accuracy": 0.5}
    assert pending_count(client) == 0
    with pytest.raises(NotFound):
        store.publish(build_profile(), job_id="no-such-job")


def test_submit_with_redis_down_is_unavailable_and_queues_nothing() -> None:
    with running_redis(appendonly="yes", appendfsync="always") as server:
        client = connect(RedisSettings(url=server.url, retries=2, socket_timeout_s=2.0))
        jobs = JobQueue(client)
        kept = jobs.submit({"model": MODEL})
        server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            jobs.submit({"model": MODEL}, idempotency_key="during-outage")
        assert time.monotonic() - started < 5.0
        server.start()
        assert client.xlen("ffnskip:jobs") == 1
        assert client.get("ffnskip:job-idem:during-outage") is None
        assert [job["id"] for job in jobs.list(10)] == [kept]
        claimed = jobs.claim("worker-a", block_ms=200, min_idle_ms=LONG_IDLE_MS)
        assert claimed is not None and claimed.job_id == kept
