"""A fleet of real processes on loopback for the e2e tests: decoder processes serving a
tiny random Llama and gateway processes, over a redis-server the test provides;
readiness awaited on gRPC health with deadlines."""

from __future__ import annotations

import contextlib
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ffnskip.client import GatewayClient, build_request
from ffnskip.settings import threads_per_process
from ffnskip.stack.procs import Child, free_port
from tests.helpers.polling import wait_for  # noqa: F401 - the fleet tests' waiting, from one place
from tests.helpers.tiny import save_tiny_model
from tests.redis_server import RedisServer, running_redis

MODEL = "tiny"
API_KEY, OPS_KEY = "test-api-key", "test-ops-key"
LONG_PROMPT = "Count slowly to one hundred."  # greedy on the tiny model: no EOS within 200 tokens


class Fleet:
    def __init__(self, tmp: Path, redis_url: str, model_dir: Path) -> None:
        self.tmp, self.redis_url, self.model_dir = tmp, redis_url, model_dir
        self.decoders: dict[str, Child] = {}
        self.gateways: dict[str, Child] = {}
        self.metrics_ports: dict[str, int] = {}

    def decoder(self, name: str, **extra: str) -> Child:
        port = free_port()
        env = {"FFNSKIP_MODEL": str(self.model_dir), "FFNSKIP_MODEL_NAME": MODEL, "FFNSKIP_REDIS_URL": self.redis_url,
               "FFNSKIP_DECODER_HOST": "127.0.0.1", "FFNSKIP_DECODER_PORT": str(port), "FFNSKIP_DECODER_ID": name,
               "FFNSKIP_DEVICE": "cpu", "FFNSKIP_MAX_BATCH": "4", "FFNSKIP_MAX_QUEUE": "64", "FFNSKIP_MAX_SEQ_LEN": "256",
               "FFNSKIP_MAX_NEW_TOKENS_CAP": "200", "FFNSKIP_REGISTRY_TTL_S": "2", "FFNSKIP_DRAIN_TIMEOUT_S": "10",
               "FFNSKIP_PROFILE_CACHE_DIR": str(self.tmp / "profiles"), **extra}
        child = self.decoders[name] = Child.service(name, "services.decoder.main", env, port, self.tmp).start()
        return child

    def gateway(self, name: str, port: int = 0, **extra: str) -> Child:
        port = port or free_port()
        metrics = self.metrics_ports.setdefault(name, free_port())
        env = {"FFNSKIP_REDIS_URL": self.redis_url, "FFNSKIP_GATEWAY_HOST": "127.0.0.1", "FFNSKIP_GATEWAY_PORT": str(port),
               "FFNSKIP_GATEWAY_ID": name, "FFNSKIP_METRICS_HOST": "127.0.0.1", "FFNSKIP_METRICS_PORT": str(metrics),
               "FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_OPS_KEYS": OPS_KEY, "FFNSKIP_DISCOVERY_INTERVAL_S": "0.2",
               "FFNSKIP_TELEMETRY_FLUSH_S": "0.5", "FFNSKIP_MAX_NEW_TOKENS": "256", "FFNSKIP_DRAIN_TIMEOUT_S": "10", **extra}
        child = self.gateways[name] = Child.service(name, "services.gateway.main", env, port, self.tmp).start()
        return child

    def ready(self, *children: Child, timeout_s: float = 180.0) -> None:
        for child in children:
            child.wait_serving(timeout_s)
        for child in children:
            if child in self.gateways.values():
                child.wait_serving(30.0, service=f"model:{MODEL}")  # it has found a decoder of the model

    def client(self, key: str = API_KEY, gateway: str = "gw-a") -> GatewayClient:
        return GatewayClient(self.gateways[gateway].address, api_key=key, timeout_s=60.0)

    def metrics(self, gateway: str = "gw-a") -> str:
        """The gateway's Prometheus exposition."""
        url = f"http://127.0.0.1:{self.metrics_ports[gateway]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        for child in [*self.gateways.values(), *self.decoders.values()]:
            child.signal(signal.SIGCONT)  # a frozen child cannot drain
            child.signal()
        for child in [*self.gateways.values(), *self.decoders.values()]:
            child.wait(timeout_s=30.0)


@contextlib.contextmanager
def two_decoder_fleet(tmp: Path, decoder_env: dict[str, str] | None = None,
                      gateway_env: dict[str, str] | None = None) -> Iterator[tuple[Fleet, RedisServer]]:
    """Decoders d1 and d2 and gateway gw-a over a redis-server of their own, all ready."""
    model_dir = save_tiny_model(tmp / "tiny")
    with running_redis() as redis_server:
        fleet = Fleet(tmp, redis_server.url, model_dir)
        try:
            env = {"FFNSKIP_THREADS": str(threads_per_process(2)), **(decoder_env or {})}  # two on one host
            d1, d2 = fleet.decoder("d1", **env), fleet.decoder("d2", **env)
            gw = fleet.gateway("gw-a", **(gateway_env or {}))  # all load at once
            fleet.ready(d1, d2, gw)
            yield fleet, redis_server
        finally:
            fleet.stop()


def request(max_new_tokens: int = 6, prompt: str = "hello there", **kwargs) -> object:
    return build_request(MODEL, chat=prompt, max_new_tokens=max_new_tokens, **kwargs)


def decoders_listed(client: GatewayClient, model: str = MODEL) -> dict:
    models = {m.model: m for m in client.list_models().models}
    return {d.decoder_id: d for d in models[model].decoders} if model in models else {}
