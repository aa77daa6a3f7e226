"""The gateway's HTTP transport on real loopback sockets: a slow client holds nothing for long
(an idle connection or unfinished headers are cut at the keep-alive timeout, a stalled body is
a 408), a malformed number is a 400, and TLS on the HTTP port with the gRPC port's certificate.

Most tests run OpenAIApi alone (a Proxy over no decoders) in an event loop of its own thread, with
timeouts of a fraction of a second; the raw-socket clients wait on their socket with a timeout.
The last test starts a real gateway process with TLS and checks both ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ffnskip.errors import InvalidArgument
from ffnskip.stack.procs import Child, free_port
from services.gateway.channels import ChannelPool
from services.gateway.discovery import StaticDiscovery
from services.gateway.main import http_ssl_context
from services.gateway.openai_api import OpenAIApi
from services.gateway.prompt_samples import PromptSampler
from services.gateway.proxy import Proxy
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings
from services.gateway.telemetry import Telemetry
from tests.redis_server import running_redis

KEEPALIVE_S = 0.5
BODY_TIMEOUT_S = 0.5
WAIT_S = 10.0  # a socket read's bound: far above the timeouts under test, far below aiohttp's defaults (3,630 s)
API_KEY = "transport-test-key"
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a certificate")


class ServedApi:
    """OpenAIApi on 127.0.0.1 in an event loop of its own thread (the test's clients block)."""

    def __init__(self, keepalive_s: float = KEEPALIVE_S, body_timeout_s: float = BODY_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.api = self._call(self._make(keepalive_s, body_timeout_s))
        self.port = self._call(self.api.start("127.0.0.1", 0, ssl_context))

    @staticmethod
    async def _make(keepalive_s: float, body_timeout_s: float) -> OpenAIApi:
        proxy = Proxy(Router(StaticDiscovery([]), 0.0), ChannelPool(1 << 20, 20.0), Telemetry(), max_attempts=1)
        return OpenAIApi(proxy, PromptSampler(None, 0.0, "unused", 1), 4096, None, 1 << 20, 1.0,
                         keepalive_s=keepalive_s, body_timeout_s=body_timeout_s)

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self._call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[ServedApi]:
    api = ServedApi()
    try:
        yield api
    finally:
        api.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)  # every recv below waits on the socket, never longer than this
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it does not)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers in lower case, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def post(path: str, body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


# ------------------------------------------------------------------------------ timeouts

def test_a_stalled_body_is_408_naming_the_body_then_the_connection_closes(served):
    started = time.monotonic()  # before the server can see the connection: its timers start later
    with connect(served.port) as sock:
        sock.sendall(post("/v1/chat/completions", b'{"model": "m", ', content_length=1000))  # then nothing
        status, headers, body = read_response(sock)
        answered = time.monotonic() - started
        assert status == 408
        error = json.loads(body)["error"]
        assert error["param"] == "body" and error["code"] == "request_timeout"
        assert error["type"] == "invalid_request_error" and f"{BODY_TIMEOUT_S:g} s" in error["message"]
        assert headers["connection"].lower() == "close"
        assert BODY_TIMEOUT_S <= answered < WAIT_S
        assert read_until_closed(sock) == b""  # cut, not held for the rest of the body


def test_a_trickled_body_is_408_when_it_does_not_arrive_in_time(served):
    """Bytes that keep coming do not extend the deadline: it is for the whole body."""
    with connect(served.port) as sock:
        sock.sendall(post("/v1/completions", b"{", content_length=1000))
        sock.setblocking(False)
        deadline = time.monotonic() + WAIT_S
        reply = b""
        while not reply and time.monotonic() < deadline:  # a byte per 50 ms wait on the socket, until it answers
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                sock.send(b" ")
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_a_whole_body_in_time_is_read(served):
    """The timeout does not touch a body that arrives: this one is parsed (and finds no decoder)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    with connect(served.port) as sock:
        sock.sendall(post("/v1/chat/completions", body))
        status, _, reply = read_response(sock)
    assert status == 503 and json.loads(reply)["error"]["code"] == "unavailable"


def test_an_idle_connection_is_closed_at_the_keepalive_timeout(served):
    started = time.monotonic()
    with connect(served.port) as sock:
        assert read_until_closed(sock) == b""  # never a request: closed
        assert KEEPALIVE_S <= time.monotonic() - started < WAIT_S
    with connect(served.port) as sock:  # after a response, idle again: closed
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection", "keep-alive").lower() == "keep-alive"
        answered = time.monotonic()
        assert read_until_closed(sock) == b""
        assert KEEPALIVE_S * 0.9 <= time.monotonic() - answered < WAIT_S


def test_unfinished_headers_are_cut_at_the_keepalive_timeout(served):
    """aiohttp has no header timeout of its own: its keep-alive timer, which bytes short of a
    whole request do not reset, is the bound."""
    started = time.monotonic()
    with connect(served.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")  # and no more
        assert read_until_closed(sock) == b""
        assert KEEPALIVE_S <= time.monotonic() - started < WAIT_S


def test_a_number_of_too_many_digits_is_400_naming_the_body(served):
    """json.loads raises a plain ValueError (not JSONDecodeError) past the interpreter's digit limit."""
    digits = "7" * 5000
    with connect(served.port) as sock:
        sock.sendall(post("/v1/chat/completions", f'{{"model": "m", "max_tokens": {digits}}}'.encode()))
        status, _, body = read_response(sock)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "body" and error["type"] == "invalid_request_error"
    assert "digits" in error["message"] and "7777" not in error["message"]


def test_http_timeouts_are_settings():
    settings = GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1", "FFNSKIP_HTTP_KEEPALIVE_S": "12",
                                         "FFNSKIP_HTTP_BODY_TIMEOUT_S": "3.5"})
    assert (settings.http_keepalive_s, settings.http_body_timeout_s) == (12.0, 3.5)
    defaults = GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1"})
    assert (defaults.http_keepalive_s, defaults.http_body_timeout_s) == (75.0, 30.0)
    for name in ("FFNSKIP_HTTP_KEEPALIVE_S", "FFNSKIP_HTTP_BODY_TIMEOUT_S"):
        for bad in ("0", "-1", "inf", "3601"):
            with pytest.raises(InvalidArgument, match=name):
                GatewaySettings.from_env({"FFNSKIP_AUTH_DISABLED": "1", name: bad})


# ------------------------------------------------------------------------------------ TLS

def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (it is its own CA)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def tls_settings(cert: Path, key: Path) -> GatewaySettings:
    return GatewaySettings.from_env({"FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_TLS_CERT": str(cert),
                                     "FFNSKIP_TLS_KEY": str(key)})


def https_get(url: str, cafile: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    with urllib.request.urlopen(url, timeout=WAIT_S, context=context) as reply:
        return reply.status, reply.read()


def plain_http_answer(port: int) -> bytes:
    """What a plaintext HTTP request gets from the port (b"" when the server just hangs up)."""
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            return read_until_closed(sock)
        except ConnectionResetError:
            return b""


@needs_openssl
def test_https_with_the_grpc_certificate(tmp_path):
    cert, key = make_certificate(tmp_path)
    context = http_ssl_context(tls_settings(cert, key))
    assert context is not None
    api = ServedApi(ssl_context=context)
    try:
        status, body = https_get(f"https://localhost:{api.port}/health", cert)
        assert status == 200 and json.loads(body) == {"status": "ok"}
        with pytest.raises(urllib.error.URLError) as untrusted:  # a client that does not trust the CA refuses
            with urllib.request.urlopen(f"https://localhost:{api.port}/health", timeout=WAIT_S,
                                        context=ssl.create_default_context()):
                pass
        assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
        assert not plain_http_answer(api.port).startswith(b"HTTP/")  # no plaintext answer on the TLS port
    finally:
        api.close()
    assert http_ssl_context(GatewaySettings.from_env({"FFNSKIP_API_KEYS": API_KEY})) is None  # no TLS settings


@needs_openssl
def test_unusable_tls_files_are_refused_naming_the_setting(tmp_path):
    cert, key = make_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = make_certificate(tmp_path / "other")
    with pytest.raises(InvalidArgument, match="FFNSKIP_TLS_KEY"):  # a key that is not the certificate's
        http_ssl_context(tls_settings(other_cert, key))
    with pytest.raises(InvalidArgument, match="FFNSKIP_TLS_CERT.*cannot read"):
        http_ssl_context(tls_settings(tmp_path / "nope.pem", key))


def wait_tls_ready(address: str, cert: Path, timeout_s: float = 60.0) -> None:
    """Until the gateway's gRPC health (over TLS) says readiness is SERVING: both ports are up."""
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"),
                                                               timeout=timeout_s, wait_for_ready=True):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return


@needs_openssl
def test_the_gateway_process_serves_https_when_its_grpc_port_has_tls(tmp_path):
    cert, key = make_certificate(tmp_path)
    port, http_port = free_port(), free_port()
    with running_redis() as redis_server:
        env = {"FFNSKIP_REDIS_URL": redis_server.url, "FFNSKIP_GATEWAY_HOST": "127.0.0.1",
               "FFNSKIP_GATEWAY_PORT": str(port), "FFNSKIP_HTTP_HOST": "127.0.0.1", "FFNSKIP_HTTP_PORT": str(http_port),
               "FFNSKIP_METRICS_PORT": "0", "FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_TLS_CERT": str(cert),
               "FFNSKIP_TLS_KEY": str(key), "FFNSKIP_HTTP_KEEPALIVE_S": str(KEEPALIVE_S),
               "FFNSKIP_DRAIN_TIMEOUT_S": "5"}
        gateway = Child.service("gw-tls", "services.gateway.main", env, port, tmp_path).start()
        try:
            wait_tls_ready(f"localhost:{port}", cert)
            status, body = https_get(f"https://localhost:{http_port}/health", cert)
            assert status == 200 and json.loads(body) == {"status": "ok"}
            assert not plain_http_answer(http_port).startswith(b"HTTP/")
            # the process reads the keep-alive setting: an idle TLS connection is closed
            raw = socket.create_connection(("127.0.0.1", http_port), timeout=WAIT_S)
            with ssl.create_default_context(cafile=str(cert)).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(WAIT_S)
                assert tls.recv(1) == b""
        finally:
            gateway.signal()
            assert gateway.wait(timeout_s=30) == 0, gateway.log_tail()
