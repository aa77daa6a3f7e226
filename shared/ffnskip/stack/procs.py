"""Child processes for `ffnskip up`: a private redis-server and the services, each with
its output in a log file, readiness awaited on an event with a deadline (Redis' own
"Ready to accept connections" line, gRPC health Watch), never on a sleep; and a
Supervisor that restarts a child which exits, with exponential backoff.

Children get SIGTERM if this process dies (PR_SET_PDEATHSIG, set by util-linux's
`setpriv --pdeathsig` where it exists), so a killed `ffnskip up` leaves no orphans;
they run in their own session, so a Ctrl-C reaches only the parent, which then stops
them in order. No Python code runs between fork and exec (no preexec_fn): a fork
that runs Python atfork handlers can deadlock against gRPC's threads in this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ffnskip.errors import Unavailable

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dying_with_parent(command: list[str]) -> list[str]:
    """`command` run so that it gets SIGTERM when this process dies, even by SIGKILL (Linux,
    with setpriv; elsewhere as is), so no child outlives the command that started it."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command  # setpriv execs: same pid


def in_background(command: list[str]) -> list[str]:
    """`command` under the idle scheduling policy (SCHED_IDLE, util-linux's `chrt`, where it
    exists): work that shares the machine with serving processes runs only on cores they leave
    free, so it uses them whole while nothing is served and yields them at once when a request
    comes. (A lower nice value is not enough: each time a background thread takes a core for its
    time slice, a decode step's OpenMP threads wait for the one it displaced.)"""
    chrt = shutil.which("chrt") if sys.platform == "linux" else None
    return [chrt, "--idle", "0", *command] if chrt else command


def exit_reason(returncode: int) -> str:
    """"signal 9" for a child killed by a signal (Popen's negative codes), else "code N"."""
    return f"signal {-returncode}" if returncode < 0 else f"code {returncode}"


class Child:
    """One child process; start() may be called again after it exited (a restart: same
    command, environment and port, output appended to the same log)."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int = 0) -> None:
        self.name, self.command, self.log_path, self.port = name, list(command), log_path, port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def service(cls, name: str, module: str, env: dict[str, str], port: int, log_dir: Path,
                background: bool = False) -> Child:
        """A service run as `python -m module`; `background`: under the idle scheduling policy (in_background)."""
        command = [sys.executable, "-m", module]
        return cls(name, in_background(command) if background else command, log_dir / f"{name}.log", env, port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, pipe: bool = False) -> Child:
        """Start; output goes to the log file, or to a pipe (`pipe`) the caller reads."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()  # a restart: the previous run's handle
        self._log = open(self.log_path, "ab")
        out = subprocess.PIPE if pipe else self._log
        self.process = subprocess.Popen(dying_with_parent(self.command), cwd=REPO, env=self.env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def failed(self, what: str) -> Unavailable:
        code = self.process.poll() if self.process else None
        state = f"exited with {code}" if code is not None else "still running"
        return Unavailable(f"{self.name} {what} ({state}); log {self.log_path}:\n{self.log_tail()}")

    def wait_serving(self, timeout_s: float, service: str = "readiness") -> None:
        """Until gRPC health says SERVING for `service` (Watch: pushed, not polled)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                remaining = deadline - time.monotonic()
                if not self.alive() or remaining <= 0:
                    raise self.failed(f"not serving {service or 'health'} within {timeout_s:.0f} s")
                try:
                    # chunks of at most 5 s, so a child that died is noticed promptly
                    for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service),
                                            timeout=min(5.0, remaining), wait_for_ready=True):
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                        raise self.failed(f"health watch failed: {err.code().name} {err.details()}") from None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the exit; SIGKILL after `timeout_s`. Returns the exit code."""
        if self.process is None:
            return None
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisChild(Child):
    """A private redis-server on loopback whose data in `data_dir` keeps profiles and jobs
    across runs and crashes: an append-only file, written before each reply and fsynced
    every second (a crash of redis-server or of the machine loses at most about the last
    second), plus an RDB snapshot on SIGTERM and every minute after a change.

    A data directory from before the AOF (an RDB file, no AOF yet) is switched over
    without losing it: Redis with appendonly on at startup would load the empty AOF and
    ignore the RDB, so such a run starts with appendonly off, loads the RDB, and turns
    the AOF on at runtime (Redis then rewrites the AOF from memory)."""

    READY = b"Ready to accept connections"
    RDB = "ffnskip.rdb"
    AOF = "ffnskip.aof"

    def __init__(self, data_dir: Path, log_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        super().__init__("redis", [], log_dir / "redis.log", port=port or free_port())
        data_dir.mkdir(parents=True, exist_ok=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def has_aof(self) -> bool:
        """Redis 7 keeps the AOF in appendonlydir/ with a manifest (written once the AOF is
        complete); older versions in one file."""
        return (self.data_dir / "appendonlydir" / f"{self.AOF}.manifest").exists() or (self.data_dir / self.AOF).exists()

    def _command(self, appendonly: bool) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--dbfilename", self.RDB, "--save", "60 1", "--appendonly", "yes" if appendonly else "no",
                "--appendfilename", self.AOF, "--appendfsync", "everysec", "--daemonize", "no", "--logfile", ""]

    def start(self, pipe: bool = True) -> RedisChild:
        switch_to_aof = not self.has_aof() and (self.data_dir / self.RDB).exists()
        self.command = self._command(appendonly=not switch_to_aof)
        self._ready = threading.Event()  # this run's
        super().start(pipe=True)
        assert self.process is not None and self.process.stdout is not None and self._log is not None
        threading.Thread(target=self._pump, args=(self.process.stdout, self._log, self._ready, switch_to_aof),
                         name="redis-log", daemon=True).start()
        return self

    def _pump(self, output: IO[bytes], log: IO[bytes], ready: threading.Event, switch_to_aof: bool) -> None:
        """Copy one run's output to the log file, and note the line that says it is ready."""
        with output:
            for line in output:
                try:
                    log.write(line)
                    log.flush()
                except ValueError:  # the log was closed at shutdown or by a restart
                    return
                if self.READY in line:
                    if switch_to_aof:
                        self._enable_aof()
                    ready.set()
        ready.set()  # EOF: it exited; wait_ready sees that at once instead of timing out

    def _enable_aof(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        try:
            client.config_set("appendonly", "yes")
        except redis.RedisError:
            pass  # it died meanwhile; the next start switches over again, from the same RDB
        finally:
            client.close()

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        if not self._ready.wait(timeout_s) or not self.alive():
            raise self.failed(f"not ready within {timeout_s:.0f} s")


@dataclass(frozen=True)
class Backoff:
    """Delays before restarting a child that exited: `first_s`, doubling per exit up to
    `max_s`; back to `first_s` for a child that had stayed up `stable_s` (a crash after
    an hour is not part of a crash loop)."""

    first_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0


class Supervisor:
    """Keeps children running: restarts one that exited (exit code or signal) after a
    backoff, and reports each exit and restart as a line ("decoder-1 exited (signal 9);
    restart 1 in 1.0 s", "decoder-1 restarted (restart 1, pid N)").

    One waiter thread per child blocks in waitpid() (Popen.wait): that returns when the
    child exits, not when it is stopped or continued (SIGSTOP/SIGCONT), so a paused child
    is left alone. Each child keeps its command, environment and port across restarts,
    so a decoder rejoins the gateway's registry under its own id and address.

    stop() ends the supervision (no restart starts after it returns); the caller then
    stops the children itself."""

    def __init__(self, children: Sequence[Child], backoff: Backoff = Backoff(),
                 report: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.children = list(children)
        self.backoff = backoff
        self.report = report
        self.restarts: dict[str, int] = {child.name: 0 for child in self.children}
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() do not interleave
        self._threads: list[threading.Thread] = []

    def start(self) -> Supervisor:
        for child in self.children:
            thread = threading.Thread(target=self._supervise, args=(child,), name=f"supervise-{child.name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the waiter threads to end (each ends once its child has exited after
        stop()); True if all did within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _supervise(self, child: Child) -> None:
        # This thread forks the restarted child, and PR_SET_PDEATHSIG fires when the forking
        # *thread* ends: so it returns only once its child has exited.
        delay = self.backoff.first_s
        started = time.monotonic()
        while True:
            assert child.process is not None
            code = child.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.backoff.stable_s:
                delay = self.backoff.first_s
            attempt = self.restarts[child.name] + 1
            self._say(f"{child.name} exited ({exit_reason(code)}); restart {attempt} in {delay:.1f} s")
            if self._stopping.wait(delay):  # a timed delay that stop() cuts short
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    child.start()
                except OSError as err:  # e.g. the binary vanished; the old process's wait returns at once
                    self._say(f"{child.name} not restarted: {err}")
                else:
                    self.restarts[child.name] = attempt
                    self._say(f"{child.name} restarted (restart {attempt}, pid {child.pid})")
            started = time.monotonic()
            delay = min(delay * 2, self.backoff.max_s)

    def _say(self, line: str) -> None:
        try:
            self.report(line)
        except OSError:  # e.g. the terminal went away: a lost status line must not end the supervision
            pass
