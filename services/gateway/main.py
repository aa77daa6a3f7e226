"""Gateway process: `python -m services.gateway.main` (settings from the FFNSKIP_*
variables in settings.ENV_VARS; nothing else reads the environment)."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis
from prometheus_client import start_http_server

from ffnskip.errors import FfnSkipError, InvalidArgument
from ffnskip.logs import get_logger
from ffnskip.rpc.process import run_service
from ffnskip.rpc.server import NOT_SERVING, SERVING, Server
from ffnskip.store.connection import connect
from ffnskip.store.registry import DecoderRegistry
from ffnskip.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.auth import API, OPS, AuthInterceptor
from services.gateway.channels import ChannelPool
from services.gateway.discovery import RegistryDiscovery
from services.gateway.endpoints import Endpoint
from services.gateway.fleet import FleetTelemetry, Flusher
from services.gateway.openai_api import OpenAIApi
from services.gateway.openai_mapping import http_body_limit
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy, Timeouts, code_of
from services.gateway.routing import Router
from services.gateway.servicer import GatewayServicer, method_roles
from services.gateway.settings import GatewaySettings
from services.gateway.telemetry import NO_DECODER, NO_MODEL, Telemetry

log = get_logger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def tls_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        cert, key = Path(settings.tls_cert).read_bytes(), Path(settings.tls_key).read_bytes()
    except OSError as exc:
        raise InvalidArgument("FFNSKIP_TLS_CERT", f"cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def http_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The HTTP port's TLS: the gRPC port's certificate and key (one Secret serves both ports)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no client certificates: API keys authenticate
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # aiohttp speaks HTTP/1.1 only: no h2 for ALPN to pick
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):  # readable, but not a PEM pair (a wrong file, or key and cert disagree)
            raise InvalidArgument("FFNSKIP_TLS_KEY", f"not a PEM certificate and its key ({exc.reason})") from None
        raise InvalidArgument("FFNSKIP_TLS_CERT", f"cannot read {exc.filename}: {exc.strerror}") from None
    return context


async def model_health(server: Server, models: set[str], endpoints: Sequence[Endpoint]) -> None:
    """Health service "model:<id>" is SERVING while some decoder takes requests for the
    model, so scripts (ffnskip up) and probes can Watch for it instead of polling."""
    ready = {e.model_id for e in endpoints if not e.draining}
    for model in sorted(models):
        await server.health.set(f"model:{model}", SERVING if model in ready else NOT_SERVING)


@dataclass
class Gateway:
    """The wired objects of one gateway process."""

    settings: GatewaySettings
    server: Server
    telemetry: Telemetry
    discovery: RegistryDiscovery
    flusher: Flusher
    pool: ChannelPool
    redis_client: redis.Redis
    http: OpenAIApi | None  # the OpenAI-compatible HTTP API, when FFNSKIP_HTTP_PORT is set


async def build(settings: GatewaySettings) -> Gateway:
    redis_client = connect(settings.redis)
    telemetry = Telemetry()
    fleet = FleetTelemetry(redis_client, settings.replica_id, settings.telemetry_ttl_s)
    try:  # a restarted replica (same id) continues its fleet counters instead of resetting them
        telemetry.seed(await asyncio.to_thread(fleet.read_own))
    except FfnSkipError as exc:
        log.warning("previous telemetry not read; counting from zero", error=exc.message)
    flusher = Flusher(fleet, telemetry.snapshot, settings.telemetry_flush_s)

    def refused(method: str, exc: BaseException) -> None:
        telemetry.error(NO_MODEL, NO_DECODER, code_of(exc).name)

    interceptors = [] if settings.auth_disabled else [AuthInterceptor(settings.keys, method_roles(API, OPS), refused)]
    server = Server([SERVICE_NAME], max_message_bytes=settings.max_message_bytes, interceptors=interceptors)
    pool = ChannelPool(settings.max_message_bytes, settings.keepalive_s)
    models_seen: set[str] = set()
    # the event loop keeps only weak references to tasks: one not held here may vanish mid-run
    background: set[asyncio.Task] = set()

    def on_change(endpoints: Sequence[Endpoint]) -> None:
        models_seen.update(e.model_id for e in endpoints)
        loop = asyncio.get_running_loop()
        for job in (pool.retain({e.address for e in endpoints}), model_health(server, models_seen, endpoints)):
            task = loop.create_task(job)
            background.add(task)
            task.add_done_callback(background.discard)

    discovery = RegistryDiscovery(DecoderRegistry(redis_client), settings.discovery_interval_s,
                                  settings.discovery_stale_s, on_change=on_change)
    timeouts = Timeouts(settings.attempt_timeout_s, settings.first_token_timeout_s, settings.stall_timeout_s)
    proxy = Proxy(Router(discovery, settings.quarantine_s), pool, telemetry, settings.max_attempts, timeouts,
                  resume=settings.stream_resume, affinity=settings.conversation_affinity)
    sampler = PromptSampler(redis_client, settings.prompt_sample_rate, settings.prompt_sample_stream,
                            settings.prompt_sample_maxlen)
    servicer = GatewayServicer(proxy, sampler, settings.max_new_tokens, fleet, flusher)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.grpc)
    http = None
    if settings.http_port:  # the same proxy, sampler, limits and keys as the gRPC API
        http = OpenAIApi(proxy, sampler, settings.max_new_tokens, None if settings.auth_disabled else settings.keys,
                         http_body_limit(settings.max_message_bytes), settings.drain_timeout_s,
                         keepalive_s=settings.http_keepalive_s,
                         body_timeout_s=settings.http_body_timeout_s)
    return Gateway(settings, server, telemetry, discovery, flusher, pool, redis_client, http)


async def serve(settings: GatewaySettings) -> None:
    credentials = tls_credentials(settings)
    http_tls = http_ssl_context(settings) if settings.http_port else None  # refused files stop us before anything starts
    gw = await build(settings)
    metrics_server = None
    if settings.metrics_port:
        metrics_server, _ = start_http_server(settings.metrics_port, settings.metrics_host, registry=gw.telemetry.registry)
    await gw.discovery.start()
    gw.flusher.start()
    port = await gw.server.start(f"{settings.host}:{settings.port}", credentials)
    http_port = await gw.http.start(settings.http_host, settings.http_port, http_tls) if gw.http is not None else None
    await gw.server.set_ready(True)
    log.info("gateway serving", port=port, http_port=http_port, gateway_id=settings.replica_id, tls=credentials is not None,
             auth="off" if settings.auth_disabled else repr(settings.keys), metrics_port=settings.metrics_port or None,
             decoders=len(gw.discovery.endpoints()), prompt_sample_rate=settings.prompt_sample_rate)
    if settings.auth_disabled:
        log.warning("authentication is OFF (FFNSKIP_AUTH_DISABLED); use only on a trusted loopback")
    await gw.server.wait_for_signal()

    # readiness off, in-flight calls of both APIs finish
    await asyncio.gather(gw.server.drain(settings.drain_timeout_s), gw.http.stop() if gw.http else asyncio.sleep(0))
    await gw.discovery.stop()
    await gw.flusher.stop()  # the final numbers of this run reach Redis
    await gw.pool.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    gw.redis_client.close()
    log.info("gateway stopped")


def main() -> int:
    return run_service("gateway", GatewaySettings.from_env, serve)


if __name__ == "__main__":
    sys.exit(main())
