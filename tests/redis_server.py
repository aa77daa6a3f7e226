"""A real redis-server on a free loopback port, for tests (not a test module itself).

    with running_redis() as server:        # or the `redis_server` pytest fixture
        client = redis.Redis.from_url(server.url)
        server.stop(); server.start()      # restart on the same port (an outage)

Readiness is a PING polled against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DEFAULT_OPTIONS = {"save": "", "appendonly": "no"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; `options` are redis.conf directives (name -> value)."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 10.0, **options: str) -> None:
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.options = {**DEFAULT_OPTIONS, **{name.replace("_", "-"): str(v) for name, v in options.items()}}
        self._dir = Path(tempfile.mkdtemp(prefix="ffnskip-redis-"))
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._dir)]
        command += ["--daemonize", "no", "--logfile", str(self._dir / "redis.log")]
        for name, value in self.options.items():
            command += [f"--{name}", value]
        return command

    def start(self) -> RedisServer:
        if self.running:
            return self
        self._process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                    time.sleep(0.02)  # poll interval, bounded by the deadline above
            raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {self.start_timeout_s}s")
        finally:
            client.close()

    def _log_tail(self) -> str:
        log = self._dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (redis flushes AOF when enabled), then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
        if process.stderr is not None:
            process.stderr.close()

    def kill(self) -> None:
        """An abrupt crash: SIGKILL without a chance to persist anything."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(start_attempts: int = 3, **options: str) -> Iterator[RedisServer]:
    """A started server, stopped and removed on exit. Retries on a port grabbed in between."""
    server: RedisServer | None = None
    for attempt in range(start_attempts):
        server = RedisServer(**options)
        try:
            server.start()
            break
        except RuntimeError:
            server.cleanup()
            if attempt == start_attempts - 1:
                raise
    assert server is not None
    try:
        yield server
    finally:
        server.cleanup()
