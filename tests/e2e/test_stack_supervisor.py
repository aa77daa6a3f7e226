"""`ffnskip up` as a supervisor, for real (not --once) on a tiny random Llama with two
decoders: a SIGKILLed decoder is restarted under its own id and port while the gateway
keeps serving, a SIGSTOPped and continued decoder is left alone, and only SIGTERM stops
the stack (exit 0, no child left). The stack's Redis is seeded with an active profile,
so `up` skips the first calibration (tests/e2e/test_stack.py covers that)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from transformers import AutoConfig

from ffnskip.client import GatewayClient, build_request
from ffnskip.engine.loading import model_fingerprint
from ffnskip.stack.procs import RedisChild
from ffnskip.store.profiles import ProfileStore
from tests.e2e.test_stack import up_command, up_env
from tests.helpers.polling import process_state, wait_for
from tests.helpers.profiles import build_profile
from tests.helpers.services import wait_serving
from tests.helpers.tiny import save_tiny_model

API_KEY = "supervisor-test-key"
START_TIMEOUT_S = 300.0  # the stack's start and first request (seconds, unless the machine is busy)
EVENT_TIMEOUT_S = 120.0  # a restart line, a decoder's readiness, a request


class Process(NamedTuple):
    pid: int
    address: str


class RunningUp:
    """`ffnskip up` in the background; its stdout lines read as they come (a reader
    thread feeds a queue, so expect() waits on lines with a deadline, not on sleeps)."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env)
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # EOF

    def expect(self, pattern: str, timeout_s: float = EVENT_TIMEOUT_S) -> re.Match[str]:
        """The next line that matches `pattern` (re.search), within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s:\n{self.tail()}") from None
            if line is None:
                self._lines.put(None)  # EOF stays visible to the next expect()
                raise AssertionError(f"`up` ended (rc {self.process.poll()}) before {pattern!r}:\n{self.tail()}")
            self.output.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def processes(self) -> dict[str, Process]:
        """The process table `up` printed before "serving": name -> (pid, address)."""
        rows = (re.fullmatch(r"\s+(\S+)\s+pid (\d+)\s+(\S+)", line) for line in self.output)
        return {row[1]: Process(int(row[2]), row[3]) for row in rows if row}

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()  # the children follow (PR_SET_PDEATHSIG)
                self.process.wait(timeout=30)


def served(client: GatewayClient, model: Path) -> str:
    """One short request through the gateway; the decoder that served it."""
    reply = client.generate(build_request(str(model), prompt="Once upon a time", max_new_tokens=4),
                            timeout_s=EVENT_TIMEOUT_S)
    assert reply.text and reply.served_by.startswith("decoder-")
    return reply.served_by


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("supervisor-model"))


@pytest.fixture
def data_dir(tmp_path, model_dir) -> Path:
    """A stack data directory whose Redis holds an active profile for the model."""
    data_dir = tmp_path / "stack"
    server = RedisChild(data_dir / "redis", data_dir / "logs").start()  # the layout `up` uses
    try:
        server.wait_ready()
        fingerprint = model_fingerprint(str(model_dir), None, AutoConfig.from_pretrained(model_dir), tmp_path)
        with redis.Redis.from_url(server.url) as client:
            ProfileStore(client).publish(build_profile(model_id=str(model_dir), fingerprint=fingerprint), activate=True)
    finally:
        server.signal(signal.SIGTERM)
        server.wait(timeout_s=30)
    return data_dir


@pytest.fixture
def stack(data_dir, model_dir):
    command = up_command(data_dir, model_dir, "--decoders", "2", "--gateway-port", "0")
    running = RunningUp(command, up_env(data_dir, FFNSKIP_API_KEYS=API_KEY))
    yield running
    running.stop()


def test_up_restarts_a_killed_decoder_ignores_a_stopped_one_and_stops_on_sigterm(stack, model_dir):
    stack.expect(r"^served by decoder-\d .*profile v1", START_TIMEOUT_S)  # the seeded profile: no calibration
    stack.expect(r"^serving; Ctrl-C stops the stack")
    first = stack.processes()
    assert {"gateway", "decoder-0", "decoder-1", "calibrator", "redis"} <= first.keys(), stack.tail()
    pids = {process.pid for process in first.values()}
    # calibration yields the shared cores to serving: the calibrator alone runs under the idle policy
    # (where util-linux's chrt exists, as on any Debian; without it, as the others)
    background = os.SCHED_IDLE if shutil.which("chrt") else os.SCHED_OTHER
    assert os.sched_getscheduler(first["calibrator"].pid) == background
    assert {os.sched_getscheduler(first[name].pid) for name in ("gateway", "decoder-0", "decoder-1")} == {os.SCHED_OTHER}

    with GatewayClient(first["gateway"].address, api_key=API_KEY) as client:
        # SIGKILL decoder-1: reported, the gateway keeps serving on decoder-0 meanwhile
        os.kill(first["decoder-1"].pid, signal.SIGKILL)
        stack.expect(r"^decoder-1 exited \(signal 9\); restart 1 in 1\.0 s$")
        assert served(client, model_dir)  # on decoder-0, or failed over to it
        restarted = int(stack.expect(r"^decoder-1 restarted \(restart 1, pid (\d+)\)$")[1])
        assert restarted != first["decoder-1"].pid
        pids.add(restarted)
        wait_serving(first["decoder-1"].address, EVENT_TIMEOUT_S, service="readiness")  # its own port again
        # ... and rejoins the gateway (whose channel to it reconnects with a backoff of its
        # own): the gateway spreads requests over both, so one lands on decoder-1 soon
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while served(client, model_dir) != "decoder-1":
            assert time.monotonic() < deadline, "the restarted decoder-1 served nothing through the gateway"
            time.sleep(0.1)  # request cadence of a poll with a deadline

        # SIGSTOP / SIGCONT: not an exit; no restart, and `up` keeps serving
        os.kill(restarted, signal.SIGSTOP)
        wait_for(lambda: process_state(restarted) == "T", 10, "the decoder stopped")
        assert stack.process.poll() is None
        os.kill(restarted, signal.SIGCONT)
        wait_for(lambda: process_state(restarted) in ("R", "S", "D"), 10, "the decoder running again")
        assert served(client, model_dir)  # a round trip through the whole stack after the stop
        assert stack.process.poll() is None

    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=120) == 0, stack.tail()
    stack.expect(r"^SIGTERM: stopping the stack$")
    stack.expect(r"^stack stopped$")
    exits = [line for line in stack.output if " exited " in line]
    assert exits == ["decoder-1 exited (signal 9); restart 1 in 1.0 s"]  # the stop and continue made none
    assert [pid for pid in pids if process_state(pid)] == [], "children outlived `up`"
