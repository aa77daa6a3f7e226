"""The whole stack on loopback (`ffnskip up`, whose flags ffnskip.cli.up reads into StackOptions).

A private redis-server (its data in `data_dir`, so a profile survives between runs), the
calibrator, N decoders and the gateway. If the model has no active profile, a first
calibration to the default quality budget is queued (a job with activate_on_success) and
the decoders serve dense meanwhile, so the first answer does not wait for it; they switch
to the profile when it is activated. One real request goes through the gateway and its
answer is printed with the skip stats and latency, and the stack keeps serving while the
calibration's progress shows (or, with `once`, follows the calibration to its end and exits).
While it serves, a child that exits (a crash, a kill) is restarted with exponential backoff,
on its own port with its own id; only SIGINT (Ctrl-C) or SIGTERM stops the stack, in order:
the gateway drains, the decoders drain, the calibrator, and Redis last (its data is in an
append-only file).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ffnskip.client import GatewayClient, build_request, describe
from ffnskip.config import QualityBudget
from ffnskip.errors import FfnSkipError, InvalidArgument
from ffnskip.settings import Env, cache_root, threads_per_process
from ffnskip.stack.procs import Child, RedisChild, Supervisor, free_port
from ffnskip.v1 import calibrator_pb2, calibrator_pb2_grpc

START_TIMEOUT_S = 600.0  # the first run converts the embedded model (~40 s) on a slow machine
DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


@dataclass(frozen=True)
class StackOptions:
    """What `ffnskip up` starts and asks: its flags, typed (ffnskip.cli.up reads them)."""

    model: str = "smollm2-135m"  # model spec (the embedded SmolLM2-135M)
    decoders: int = 1  # decoder processes, 1 to 16
    gateway_port: int = 50051  # gateway gRPC port on 127.0.0.1 (0 = any free)
    http_port: int = 8080  # the gateway's OpenAI-compatible HTTP API on 127.0.0.1 (0 = any free)
    metrics_port: int = 0  # the gateway's /metrics (0 = any free)
    device: str = "auto"
    prompt: str = DEFAULT_PROMPT  # the first request's chat message
    max_new_tokens: int = 64
    target_skip: float | None = None  # target decode skip ratio of a needed calibration (None: the quality budget)
    # tokens per prompt of a needed calibration: the budget's free-running check reads the 80 after
    # the warm-up (at 32 it read 16 and let through a set whose longer answers missed the budget)
    calibration_tokens: int = 96
    data_dir: Path | None = None  # redis data and logs (None: $FFNSKIP_CACHE/stack)
    once: bool = False  # exit after the first request (and the first calibration, if one runs)


JobFollower = Callable[[Any, str], int]  # (calibrator stub, job id) -> 0 when the job succeeded


def run_stack(options: StackOptions, follow_job: JobFollower) -> int:
    """Start the stack, serve its first request, then serve until SIGINT or SIGTERM (or, with
    `once`, follow the first calibration to its end) and stop it; -> the exit status.
    `follow_job` shows a calibration's progress (the command line's progress bar)."""
    if not 1 <= options.decoders <= 16:
        raise InvalidArgument("decoders", f"must be in [1, 16], got {options.decoders}")
    for flag, port in (("gateway_port", options.gateway_port), ("http_port", options.http_port)):
        require_free_port(flag, port)

    data_dir = (options.data_dir or cache_root(os.environ) / "stack").expanduser().resolve()
    stack = Stack(options, data_dir, follow_job)
    # While starting, SIGINT and SIGTERM raise KeyboardInterrupt (also when a shell started
    # us in the background with SIGINT ignored), so a half-started stack is stopped cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        stack.first_request()
        if not options.once:
            return serve_until_stopped(stack)
        stack.follow_calibration()  # a --once run still leaves the profile for the next start
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the stack", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the shutdown is bounded; let it finish
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.shutdown()
    return 0


def require_free_port(flag: str, port: int) -> None:
    """A fixed port that something else holds is refused up front (else the gateway would fail
    to bind and be restarted forever); 0 is any free port."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port's TIME_WAIT is free
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise InvalidArgument(flag, f"port {port} on 127.0.0.1 is in use; pass --{flag.replace('_', '-')} 0 "
                                        f"for any free port") from None


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def serve_until_stopped(stack: Stack) -> int:
    """Serve, restarting children that exit, until SIGINT or SIGTERM (then 0)."""
    stack.supervise()
    with StopSignals(signal.SIGINT, signal.SIGTERM) as stop_signals:  # before "serving": none is missed
        print(f"\n{stack.process_table()}\n\nserving; Ctrl-C stops the stack", flush=True)
        if Env(os.environ).flag("FFNSKIP_COMPILE", True):  # the decoders' own default
            print(f"decoders load or compile their decode segments in the background and serve eagerly meanwhile "
                  f"(progress: 'decode segment' in {stack.log_dir}/decoder-*.log)", flush=True)
        if stack.calibration_job is not None:  # its progress bar while the stack serves
            threading.Thread(target=stack.follow_calibration, name="first-calibration", daemon=True).start()
        received = stop_signals.wait()
    print(f"\n{signal.Signals(received).name}: stopping the stack", flush=True)
    return 0


class StopSignals:
    """Catches `signals` from entry on; wait() blocks until one arrives and returns it.

    Python runs signal handlers in the main thread only, and a signal the kernel hands
    to another thread (gRPC's, the supervisor's) does not wake a main thread blocked on
    a lock. The interpreter's wakeup fd does: its C-level handler writes each signal's
    number there, whichever thread took the signal, so that number is the event."""

    def __init__(self, *signals: int) -> None:
        self.signals = signals
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = -1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # The fd first, so no signal is lost: one that comes before the handlers are swapped
        # meets the old handler (KeyboardInterrupt: stopped as during the start).
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        # a Python handler, even one that does nothing, is what makes the C handler write the fd
        self._previous = {sig: signal.signal(sig, lambda *_: None) for sig in self.signals}
        return self

    def wait(self) -> int:
        while True:
            for number in self._reader.recv(64):
                if number in self.signals:
                    return number

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._reader.close()
        self._writer.close()


class Stack:
    def __init__(self, options: StackOptions, data_dir: Path, follow_job: JobFollower) -> None:
        self.options = options
        self.follow_job = follow_job
        self.model = options.model
        self.log_dir = data_dir / "logs"
        self.redis = RedisChild(data_dir / "redis", self.log_dir)
        self.api_key = os.environ.get("FFNSKIP_API_KEYS", "").split(",")[0].strip() or "dev-" + secrets.token_urlsafe(24)
        self.ops_key = os.environ.get("FFNSKIP_OPS_KEYS", "").split(",")[0].strip() or "ops-" + secrets.token_urlsafe(24)
        self.calibrator: Child | None = None
        self.gateway: Child | None = None
        self.decoders: list[Child] = []
        self.decoder_metrics_ports: list[int] = []  # each decoder's /metrics (its memory too: process_*)
        self.metrics_port = options.metrics_port or free_port()
        self.http_port = options.http_port or free_port()
        self.supervisor: Supervisor | None = None
        self.calibration_job: str | None = None  # the first calibration, while it runs

    def children(self) -> list[Child]:
        return [c for c in (self.gateway, *self.decoders, self.calibrator, self.redis) if c is not None]

    def supervise(self) -> None:
        """From now on a child that exits is restarted (with backoff) until shutdown()."""
        self.supervisor = Supervisor(self.children()).start()

    def process_table(self) -> str:
        """One line per child: name, pid, address (what to kill to see a restart)."""
        rows = [f"  {c.name:<12} pid {c.pid:<8} {c.address}" for c in self.children()]
        return "\n".join(["processes (one that exits is restarted, with backoff):", *rows])

    def _env(self, **values: str) -> dict[str, str]:
        return {"FFNSKIP_REDIS_URL": self.redis.url, "FFNSKIP_DEVICE": self.options.device, **values}

    def start(self) -> None:
        print(f"starting the stack for {self.model} (logs in {self.log_dir})", flush=True)
        weights = os.environ.get("FFNSKIP_WEIGHTS") or "auto"
        print(f"decoders: FFNSKIP_WEIGHTS={weights}" + (" (int8 weights and activations on a CPU, the model's dtype on a GPU)"
                                                        if weights == "auto" else ""), flush=True)
        self.redis.start()
        self.redis.wait_ready()
        calibrated = self._active_profile() is not None
        port = free_port()
        # calibration shares the machine's cores with the decoders here, so it runs in the background:
        # on 2 cores requests served during the first calibration got 1.2-11 tokens/s, now 14-65
        self.calibrator = Child.service("calibrator", "services.calibrator.main", self._env(
            FFNSKIP_CALIBRATOR_HOST="127.0.0.1", FFNSKIP_CALIBRATOR_PORT=str(port), FFNSKIP_MODELS=self.model),
            port, self.log_dir, background=True).start()
        self._start_gateway()
        self._start_decoders()  # with no profile yet they serve dense, and pick the first one up when it is active
        self.calibrator.wait_serving(START_TIMEOUT_S)
        if not calibrated:
            self.calibration_job = self._submit_calibration()
        assert self.gateway is not None
        for child in [*self.decoders, self.gateway]:
            child.wait_serving(START_TIMEOUT_S)
        self.gateway.wait_serving(60.0, service=f"model:{self.model}")  # the gateway has found a decoder

    def _start_gateway(self) -> None:
        port = self.options.gateway_port or free_port()
        self.gateway = Child.service("gateway", "services.gateway.main", self._env(
            FFNSKIP_GATEWAY_HOST="127.0.0.1", FFNSKIP_GATEWAY_PORT=str(port), FFNSKIP_GATEWAY_ID="gateway-local",
            FFNSKIP_METRICS_HOST="127.0.0.1", FFNSKIP_METRICS_PORT=str(self.metrics_port),
            FFNSKIP_HTTP_HOST="127.0.0.1", FFNSKIP_HTTP_PORT=str(self.http_port),
            FFNSKIP_API_KEYS=self.api_key, FFNSKIP_OPS_KEYS=self.ops_key), port, self.log_dir).start()

    def _start_decoders(self) -> None:
        for i in range(self.options.decoders):
            port, metrics_port = free_port(), free_port()
            self.decoder_metrics_ports.append(metrics_port)
            self.decoders.append(Child.service(f"decoder-{i}", "services.decoder.main", self._env(
                FFNSKIP_DECODER_HOST="127.0.0.1", FFNSKIP_DECODER_PORT=str(port), FFNSKIP_DECODER_ID=f"decoder-{i}",
                FFNSKIP_ADVERTISE_ADDRESS=f"127.0.0.1:{port}", FFNSKIP_MODEL=self.model, FFNSKIP_MODEL_NAME=self.model,
                FFNSKIP_METRICS_HOST="127.0.0.1", FFNSKIP_METRICS_PORT=str(metrics_port),
                FFNSKIP_THREADS=str(threads_per_process(self.options.decoders))),
                port, self.log_dir).start())

    def _active_profile(self) -> int | None:
        from ffnskip.store.connection import RedisSettings, connect
        from ffnskip.store.profiles import ProfileStore

        client = connect(RedisSettings(url=self.redis.url))
        try:
            return ProfileStore(client).active_version(self.model)
        finally:
            client.close()

    def _submit_calibration(self) -> str:
        """Queue the first calibration (the default quality budget, activated on success); the
        stack serves dense meanwhile. Returns the job id."""

        assert self.calibrator is not None
        budget = QualityBudget()
        request = calibrator_pb2.SubmitCalibrationRequest(
            model=self.model, activate_on_success=True, tokens_per_prompt=self.options.calibration_tokens)
        if self.options.target_skip is not None:  # the alternative objective, asked for
            request.target_skip_ratio = self.options.target_skip
            objective = f"target decode skip ratio {self.options.target_skip}"
        else:
            request.max_kl, request.max_relative_nll = budget.max_kl, budget.max_relative_nll
            objective = f"quality budget: KL <= {budget.max_kl} nats/token, relative NLL <= {budget.max_relative_nll}"
        with grpc.insecure_channel(self.calibrator.address) as channel:
            try:
                job_id = calibrator_pb2_grpc.CalibratorStub(channel).SubmitCalibration(request, timeout=30).job_id
            except grpc.RpcError as err:
                raise FfnSkipError(f"calibration not submitted: {err.code().name}: {err.details()}") from None
        print(f"{self.model} has no active skip profile: calibrating it (job {job_id}, {objective}; first run only, "
              f"minutes on a CPU); the decoders serve dense until it is active", flush=True)
        return job_id

    def follow_calibration(self) -> None:
        """Follow the first calibration to its end with `follow_job` (the command line's progress
        bar, as `ffnskip ops watch` shows it), then say what is served. Ctrl-C cancels the job, so no worker picks an
        abandoned job up later."""

        if self.calibration_job is None or self.calibrator is None:
            return
        with grpc.insecure_channel(self.calibrator.address) as channel:
            stub = calibrator_pb2_grpc.CalibratorStub(channel)
            try:
                code = self.follow_job(stub, self.calibration_job)
            except KeyboardInterrupt:  # Ctrl-C while following the job
                self.cancel_calibration()
                raise
            except grpc.RpcError:  # the stack is stopping
                return
        self.calibration_job = None
        if code != 0:
            print("warning: calibration failed or missed its budget; the decoders serve dense "
                  "(`ffnskip ops profiles` shows what was stored)", file=sys.stderr, flush=True)
        else:
            print("the decoders now serve the new profile", flush=True)

    def cancel_calibration(self) -> None:
        """Cancel the first calibration if it is still running (the stack is stopping)."""

        job_id, self.calibration_job = self.calibration_job, None
        if job_id is None or self.calibrator is None:
            return
        with grpc.insecure_channel(self.calibrator.address) as channel:
            try:
                calibrator_pb2_grpc.CalibratorStub(channel).CancelJob(calibrator_pb2.CancelJobRequest(job_id=job_id), timeout=10)
            except grpc.RpcError:
                pass  # the calibrator is gone already: its worker's lease runs out and the job is reclaimed

    def first_request(self) -> None:
        assert self.gateway is not None
        request = build_request(self.model, chat=self.options.prompt, max_new_tokens=self.options.max_new_tokens)
        print(f"\n> {self.options.prompt}\n", flush=True)
        started = time.monotonic()
        with GatewayClient(self.gateway.address, api_key=self.api_key, timeout_s=300.0) as client:
            summary = None
            try:
                for message in client.stream(request):
                    if message.HasField("token"):
                        print(message.token.text, end="", flush=True)
                    else:
                        summary = message.summary
            except grpc.RpcError as err:  # one line for the user, as every other command says it
                raise FfnSkipError(f"the first request failed: {err.code().name}: {err.details()}") from None
        if summary is None:
            raise FfnSkipError("the gateway ended the stream without a summary")
        print("\n")
        print(describe(summary, time.monotonic() - started))
        print(self.connection_help())

    def connection_help(self) -> str:
        assert self.gateway is not None
        return "\n".join([
            f"gateway     {self.gateway.address}   (metrics http://127.0.0.1:{self.metrics_port}/metrics)",
            f"HTTP API    http://127.0.0.1:{self.http_port}/v1   (OpenAI-compatible: chat/completions, completions, "
            f"models)",
            f"API key     {self.api_key}",
            f"ops key     {self.ops_key}",
            f"calibrator  {self.calibrator.address if self.calibrator else '-'}   redis {self.redis.url}",
            "decoders    " + "   ".join(f"{d.name} metrics http://127.0.0.1:{port}/metrics"
                                       for d, port in zip(self.decoders, self.decoder_metrics_ports)),
            f"try         ffnskip client stream --address {self.gateway.address} --api-key {self.api_key} "
            f"--model {self.model} \"Tell me a joke\"",
            f"            ffnskip client telemetry --address {self.gateway.address} --api-key {self.ops_key}",
            f"            curl -s http://127.0.0.1:{self.http_port}/v1/chat/completions -H 'Authorization: Bearer "
            f"{self.api_key}' -H 'Content-Type: application/json' -d '{{\"model\": \"{self.model}\", "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Tell me a joke\"}}]}}'",
        ])

    def shutdown(self) -> None:
        """Gateway first (it drains its streams), then decoders and calibrator, Redis last;
        the supervision ends first, so nothing stopped here is restarted."""
        if self.supervisor is not None:
            self.supervisor.stop()
        self.cancel_calibration()  # a first calibration cut short is not left for the next start
        for group in ([self.gateway], [*self.decoders, self.calibrator], [self.redis]):
            members = [c for c in group if c is not None]
            for child in members:
                child.signal(signal.SIGTERM)
            for child in members:
                child.wait(timeout_s=60.0)
        if self.supervisor is not None:
            self.supervisor.join(timeout_s=10.0)
        print("stack stopped", flush=True)
