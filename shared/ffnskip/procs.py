"""Child processes for `ffnskip up`: a private redis-server and the services, each with
its output in a log file, readiness awaited on an event with a deadline (Redis' own
"Ready to accept connections" line, gRPC health Watch), never on a sleep.

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
from pathlib import Path
from typing import IO, Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ffnskip.errors import Unavailable

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dying_with_parent(command: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command  # setpriv execs: same pid


class Child:
    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: Optional[dict[str, str]] = None,
                 port: int = 0) -> None:
        self.name, self.command, self.log_path, self.port = name, list(command), log_path, port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None

    @classmethod
    def service(cls, name: str, module: str, env: dict[str, str], port: int, log_dir: Path) -> "Child":
        return cls(name, [sys.executable, "-m", module], log_dir / f"{name}.log", env, port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, pipe: bool = False) -> "Child":
        """Start; output goes to the log file, or to a pipe (`pipe`) the caller reads."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        out = subprocess.PIPE if pipe else self._log
        self.process = subprocess.Popen(_dying_with_parent(self.command), cwd=REPO, env=self.env, stdout=out,
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

    def wait(self, timeout_s: float) -> Optional[int]:
        """Wait for the exit; SIGKILL after `timeout_s`. Returns the exit code."""
        if self.process is None:
            return None
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


class RedisChild(Child):
    """A private redis-server on loopback; its RDB file in `data_dir` keeps profiles
    across runs (saved on SIGTERM and every minute after a change)."""

    READY = b"Ready to accept connections"

    def __init__(self, data_dir: Path, log_dir: Path, port: int = 0) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        port = port or free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--dbfilename",
                   "ffnskip.rdb", "--save", "60 1", "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        super().__init__("redis", command, log_dir / "redis.log", port=port)
        data_dir.mkdir(parents=True, exist_ok=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, pipe: bool = True) -> "RedisChild":
        super().start(pipe=True)
        threading.Thread(target=self._pump, name="redis-log", daemon=True).start()
        return self

    def _pump(self) -> None:
        """Copy redis' output to its log file, and note the line that says it is ready."""
        assert self.process is not None and self.process.stdout is not None and self._log is not None
        log = self._log
        for line in self.process.stdout:
            try:
                log.write(line)
                log.flush()
            except ValueError:  # the log was closed at shutdown
                return
            if self.READY in line:
                self._ready.set()
        self._ready.set()  # EOF: it exited; wait_ready sees that at once instead of timing out

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        if not self._ready.wait(timeout_s) or not self.alive():
            raise self.failed(f"not ready within {timeout_s:.0f} s")
