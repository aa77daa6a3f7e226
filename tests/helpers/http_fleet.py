"""An HTTP fleet for the OpenAI API's e2e tests (the `http` fixture in tests/e2e/conftest.py):
a redis-server, a decoder serving a tiny random Llama and a gateway with its HTTP listener."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai

from ffnskip.v1 import decoder_pb2, decoder_pb2_grpc
from tests.helpers.fleet import API_KEY, Fleet

PROMPT = "Tell me about the sea."


class HttpFleet:
    def __init__(self, fleet: Fleet, http_port: int, decoder_metrics_port: int, redis_url: str) -> None:
        self.fleet, self.http_port, self.decoder_metrics_port, self.redis_url = fleet, http_port, decoder_metrics_port, redis_url

    def openai(self, key: str = API_KEY, port: int | None = None) -> openai.OpenAI:
        # no retries: each test sees the status the gateway answered, not the client's retry of it
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port or self.http_port}/v1", api_key=key, max_retries=0,
                             timeout=60.0)

    def decoder_metrics(self) -> dict[str, float]:
        return metrics_of(f"http://127.0.0.1:{self.decoder_metrics_port}/metrics")

    def gateway_metrics(self) -> dict[str, float]:
        return metrics_of(f"http://127.0.0.1:{self.fleet.metrics_ports['gw-a']}/metrics")


def metrics_of(url: str) -> dict[str, float]:
    """Samples by name and labels, the labels sorted: 'name{a="1",b="2"}' -> value."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            pairs = sorted(labels.rstrip("}").split(",")) if labels else []
            samples[name + ("{" + ",".join(pairs) + "}" if pairs else "")] = float(value)
    return samples


def decoder_idle(http: HttpFleet) -> bool:
    with grpc.insecure_channel(http.fleet.decoders["d1"].address) as channel:
        info = decoder_pb2_grpc.DecoderStub(channel).Info(decoder_pb2.InfoRequest(), timeout=10)
    return info.running == 0 and info.waiting == 0


def chat(content: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": content}]


def post(http: HttpFleet, path: str, body: bytes | dict) -> tuple[int, dict]:
    """A raw POST, as a client other than `openai` sends it: (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http.http_port}{path}", data=data,
                                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
