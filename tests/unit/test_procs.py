"""ffnskip.stack.procs with real processes: children of a killed parent do not outlive it; the
Supervisor restarts a child that exits (with backoff and a count), leaves a stopped or
continued child alone and ends on request; RedisChild's data survives a SIGKILL of
redis-server (append-only file) and an RDB-only data directory is switched to the AOF
without losing it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from ffnskip.stack.procs import Backoff, Child, RedisChild, Supervisor
from tests.helpers.polling import process_state, wait_for

PARENT = """
import sys
from pathlib import Path
from ffnskip.stack.procs import Child
child = Child("sleeper", ["sleep", "300"], Path(sys.argv[1]) / "sleeper.log").start()
print(child.process.pid, flush=True)
sys.stdin.read()  # until killed
"""

DEADLINE_S = 10.0  # for each awaited event; every one is expected within milliseconds


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    pid = int(parent.stdout.readline())
    assert process_state(pid) not in ("", "Z"), "the child should be running before its parent dies"
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait(timeout=10)
    wait_for(lambda: process_state(pid) in ("", "Z"), DEADLINE_S, "the child of a killed parent is gone")


class Reports:
    """The supervisor's report lines as they come, each with the time it came."""

    def __init__(self) -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()

    def __call__(self, line: str) -> None:
        self.lines.put((time.monotonic(), line))

    def next(self) -> tuple[float, str]:
        try:
            return self.lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"no report line within {DEADLINE_S} s") from None

    def expect(self, pattern: str) -> tuple[float, re.Match[str]]:
        at, line = self.next()
        match = re.fullmatch(pattern, line)
        assert match, f"{line!r} does not match {pattern!r}"
        return at, match


@pytest.fixture
def supervised(tmp_path) -> Iterator[Callable[..., tuple[Child, Supervisor, Reports]]]:
    """supervised(command, backoff) -> (child, supervisor, reports); stopped afterwards."""
    started: list[tuple[Child, Supervisor]] = []

    def start(command: list[str], backoff: Backoff) -> tuple[Child, Supervisor, Reports]:
        reports = Reports()
        child = Child("worker", command, tmp_path / "worker.log").start()
        supervisor = Supervisor([child], backoff, report=reports).start()
        started.append((child, supervisor))
        return child, supervisor, reports

    yield start
    for child, supervisor in started:
        supervisor.stop()
        child.signal(signal.SIGKILL)
        child.wait(timeout_s=10)
        assert supervisor.join(timeout_s=10), "a waiter thread outlived its stopped child"


SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_a_killed_child_is_restarted_after_the_backoff_with_its_count(supervised):
    # stable_s=0: every run counts as stable, so each restart waits the first delay again
    child, supervisor, reports = supervised(SLEEPER, Backoff(first_s=0.2, max_s=1.0, stable_s=0.0))
    pids = [child.pid]
    for restart in (1, 2):
        os.kill(child.pid, signal.SIGKILL)
        exited_at, _ = reports.expect(rf"worker exited \(signal 9\); restart {restart} in 0\.2 s")
        restarted_at, match = reports.expect(rf"worker restarted \(restart {restart}, pid (\d+)\)")
        assert restarted_at - exited_at >= 0.19, "restarted before its backoff"
        assert int(match[1]) == child.pid and child.pid not in pids and child.alive()
        pids.append(child.pid)
    assert supervisor.restarts == {"worker": 2}


def test_a_crash_loop_backs_off_exponentially_up_to_the_cap(supervised):
    _, supervisor, reports = supervised(["sh", "-c", "exit 3"], Backoff(first_s=0.05, max_s=0.2, stable_s=60.0))
    delays = []
    for restart in (1, 2, 3, 4):
        _, match = reports.expect(rf"worker exited \(code 3\); restart {restart} in ([\d.]+) s")
        delays.append(float(match[1]))
        reports.expect(rf"worker restarted \(restart {restart}, pid \d+\)")
    assert delays == [0.1, 0.1, 0.2, 0.2]  # 0.05, 0.1, 0.2, 0.2 at one decimal
    supervisor.stop()


def test_a_stopped_and_continued_child_is_left_alone(supervised):
    child, supervisor, reports = supervised(SLEEPER, Backoff(first_s=0.1))
    pid = child.pid
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: process_state(pid) == "T", DEADLINE_S, "the child is stopped")
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: process_state(pid) not in ("T", ""), DEADLINE_S, "the child runs again")
    assert child.pid == pid and child.alive()
    # the first report is about this kill: the stop and the continue produced none
    os.kill(pid, signal.SIGKILL)
    reports.expect(r"worker exited \(signal 9\); restart 1 in 0\.1 s")
    reports.expect(r"worker restarted \(restart 1, pid \d+\)")
    assert supervisor.restarts == {"worker": 1}


def test_stop_cuts_a_backoff_short_and_restarts_nothing(supervised):
    child, supervisor, reports = supervised(SLEEPER, Backoff(first_s=60.0))
    pid = child.pid
    os.kill(pid, signal.SIGKILL)
    reports.expect(r"worker exited \(signal 9\); restart 1 in 60\.0 s")
    supervisor.stop()
    assert supervisor.join(timeout_s=DEADLINE_S), "stop() did not end the backoff wait"
    assert child.pid == pid and not child.alive() and supervisor.restarts == {"worker": 0}
    assert reports.lines.empty()


def test_an_exit_after_stop_is_not_restarted(supervised):
    child, supervisor, reports = supervised(SLEEPER, Backoff(first_s=0.1))
    supervisor.stop()
    child.signal(signal.SIGTERM)
    assert child.wait(timeout_s=DEADLINE_S) == -signal.SIGTERM
    assert supervisor.join(timeout_s=DEADLINE_S)
    assert reports.lines.empty() and not child.alive()


@pytest.fixture
def redis_child(tmp_path) -> Iterator[RedisChild]:
    child = RedisChild(tmp_path / "data", tmp_path / "logs")
    yield child
    child.signal(signal.SIGKILL)
    child.wait(timeout_s=10)


def _client(child: RedisChild) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=child.port, socket_timeout=5, decode_responses=True)


def _kill_and_restart(child: RedisChild) -> None:
    """SIGKILL (no shutdown save), then the same command again: same port and data dir."""
    port = child.port
    child.signal(signal.SIGKILL)
    child.wait(timeout_s=10)
    child.start().wait_ready()
    assert child.port == port


def test_redis_data_survives_sigkill_through_the_aof(redis_child):
    redis_child.start().wait_ready()
    client = _client(redis_child)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    client.set("profile", "v1")
    # A killed process loses only what it has not written to the file yet (fsync matters
    # for a machine crash, not a process kill); an empty AOF buffer says the SET is written.
    wait_for(lambda: client.info("persistence")["aof_buffer_length"] == 0, DEADLINE_S, "the SET is in the AOF")
    client.close()
    _kill_and_restart(redis_child)
    with _client(redis_child) as client:
        assert client.get("profile") == "v1"


def test_an_rdb_only_data_dir_is_switched_to_the_aof_without_losing_it(redis_child, tmp_path):
    redis_child.start().wait_ready()
    with _client(redis_child) as client:
        client.set("profile", "v1")
        client.save()  # ffnskip.rdb, as a run from before the AOF left it
    redis_child.signal(signal.SIGKILL)
    redis_child.wait(timeout_s=10)
    for path in sorted((tmp_path / "data" / "appendonlydir").iterdir()):
        path.unlink()
    assert not redis_child.has_aof()

    redis_child.start().wait_ready()
    with _client(redis_child) as client:
        assert client.get("profile") == "v1"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    wait_for(redis_child.has_aof, DEADLINE_S, "the AOF rewritten from memory (its manifest)")
    (tmp_path / "data" / RedisChild.RDB).unlink()  # from now on the AOF alone carries the data
    _kill_and_restart(redis_child)
    with _client(redis_child) as client:
        assert client.get("profile") == "v1"
