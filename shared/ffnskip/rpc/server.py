"""Build a grpc.aio server the way every ffnskip service needs it, and drain it on SIGTERM.

    server = Server([calibrator_pb2.DESCRIPTOR.services_by_name["Calibrator"].full_name])
    add_CalibratorServicer_to_server(servicer, server.grpc)
    await server.start("0.0.0.0:50053")     # credentials=... for TLS; returns the port
    await server.set_ready(True)
    await server.wait_for_signal()          # SIGTERM / SIGINT
    await server.drain(20, on_drain=...)    # readiness NOT_SERVING, let in-flight work finish, stop

Health (grpc.health.v1) answers for "" (the whole server), "liveness" and "readiness"
(the names the Kubernetes probes ask for): liveness is SERVING while the process runs
and its service says it works (set_live);
readiness and "" are SERVING only between set_ready(True) and the start of a drain.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ffnskip.errors import Unavailable
from ffnskip.logs import get_logger
from ffnskip.rpc.channels import MAX_MESSAGE_BYTES, message_limits
from ffnskip.rpc.status import StatusInterceptor

log = get_logger(__name__)

LIVENESS, READINESS = "liveness", "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        *message_limits(max_message_bytes),
        # Accept client keepalive pings every 10 s, with or without calls in flight
        # (gateway -> decoder channels ping that often to spot dead peers).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Our own pings find clients that vanished without closing (a killed pod).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class Server:
    """A grpc.aio server with health, reflection and the status interceptor."""

    def __init__(self, service_names: Sequence[str], max_message_bytes: int = MAX_MESSAGE_BYTES,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self.grpc = grpc.aio.server(interceptors=[StatusInterceptor(), *interceptors],
                                    options=server_options(max_message_bytes))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        self.port: int | None = None
        self._signal = asyncio.Event()

    async def start(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Bind (with TLS when `credentials` are given) and start; readiness stays NOT_SERVING
        until set_ready(True). Returns the port."""
        await self.health.set(LIVENESS, SERVING)
        await self.set_ready(False)
        try:
            port = (self.grpc.add_secure_port(address, credentials) if credentials is not None
                    else self.grpc.add_insecure_port(address))
        except RuntimeError as err:
            raise Unavailable(f"cannot listen on {address}: {err}") from err
        if not port:
            raise Unavailable(f"cannot listen on {address}")
        await self.grpc.start()
        self.port = port
        log.info("grpc server listening", address=address, port=port)
        return port

    async def set_live(self, live: bool) -> None:
        """Liveness NOT_SERVING tells the orchestrator to restart this process (a stuck worker)."""
        await self.health.set(LIVENESS, SERVING if live else NOT_SERVING)

    async def set_ready(self, ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        await self.health.set(READINESS, status)
        await self.health.set("", status)

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        log.info("signal received, draining", signal=signal.Signals(sig).name)
        self._signal.set()

    async def wait_for_signal(self) -> None:
        self.install_signal_handlers()
        await self._signal.wait()

    async def drain(self, grace_s: float, on_drain: Callable[[], Awaitable[object]] | None = None) -> None:
        """Readiness NOT_SERVING (liveness stays SERVING), then stop within `grace_s`.

        With `on_drain` (e.g. wait until the work in flight is done), the server keeps
        answering while it runs, so a request that arrives meanwhile reaches its handler and
        gets the service's own answer (a decoder's UNAVAILABLE "draining", which a gateway
        retries elsewhere) instead of a bare CANCELLED from a stopped server. RPCs still
        running when the grace period is over end with CANCELLED."""
        deadline = asyncio.get_running_loop().time() + grace_s
        await self.set_ready(False)
        if on_drain is not None:
            try:
                await asyncio.wait_for(on_drain(), timeout=grace_s)
            except asyncio.TimeoutError:
                log.warning("drain: work still running after the grace period", grace_s=grace_s)
        await self.grpc.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        log.info("grpc server stopped")
