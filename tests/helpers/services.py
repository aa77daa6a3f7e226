"""Real service processes for tests: start `python -m services.X.main` on a free
loopback port, wait until gRPC health says SERVING (bounded deadline, no sleeps),
stop with a signal or kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.redis_server import free_port  # noqa: F401  (re-exported for service tests)

REPO = Path(__file__).resolve().parents[2]


def wait_serving(address: str, timeout_s: float, service: str = "", process: subprocess.Popen | None = None) -> None:
    """Block until the health service at `address` answers SERVING for `service`."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before serving on {address}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING within {timeout_s} s")
            try:
                # wait_for_ready blocks until the port accepts, bounded by the RPC timeout
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(2.0, remaining), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            # readiness flips once startup finishes; Watch would also do, Check keeps this simple
            time.sleep(0.05)  # polling cadence of a status check, not synchronisation on timing


class ServiceProcess:
    def __init__(self, module: str, env: dict[str, str], port: int, log_path: Path) -> None:
        self.module, self.port, self.log_path = module, port, log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> ServiceProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", self.module], cwd=REPO, env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_serving(self.address, timeout_s, process=self.process)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"{self.module} did not start; log:\n{self.log()[-3000:]}") from exc
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(timeout_s=30)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()
