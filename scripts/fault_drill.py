"""A fault drill on the real stack: `ffnskip up --decoders 2` on the embedded model, 16
clients streaming through the gateway without pause, and three faults in a row:

1. SIGKILL of decoder-1 (`up` restarts it; it must rejoin and serve again);
2. SIGSTOP of decoder-0 for 30 s (no call may wait longer than the stall timeout);
3. Redis frozen (SIGSTOP) for 30 s (UNAVAILABLE or success, never NOT_FOUND; full service
   within 10 s of its return).

Then every log file of the run is searched for the prompts sent and the texts generated.
Prints one table per phase and exits 1 when a bar is missed.

    .venv/bin/python scripts/fault_drill.py [--data-dir DIR] [--fault-s 30] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ffnskip.client import GatewayClient, build_request
from ffnskip.settings import cache_root

API_KEY = "drill-" + os.urandom(8).hex()
STALL_TIMEOUT_S = 10.0  # the gateway's default FFNSKIP_STALL_TIMEOUT_S and FIRST_TOKEN bound below
FIRST_TOKEN_TIMEOUT_S = 10.0
TOPICS = ["rainbows", "volcanoes", "tides", "bees", "glaciers", "comets", "coral reefs", "thunder"]


@dataclass
class Call:
    started: float
    ended: float = 0.0
    code: str = "OK"
    tokens: int = 0
    longest_wait_s: float = 0.0
    pod: str = ""
    details: str = ""


@dataclass
class Load:
    """`concurrency` clients streaming back to back until stopped; every call recorded."""

    address: str
    concurrency: int
    max_new_tokens: int
    calls: list[Call] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.concurrency)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self, n: int) -> None:
        with GatewayClient(self.address, api_key=API_KEY, timeout_s=120) as client:
            i = 0
            while not self.stop.is_set():
                prompt = f"drill {n}-{i}: explain {TOPICS[(n + i) % len(TOPICS)]} to a child in detail"
                i += 1
                self.prompts.append(prompt)
                self.calls.append(self._one(client, prompt))

    def _one(self, client: GatewayClient, prompt: str) -> Call:
        call = Call(started=time.monotonic())
        last, text = call.started, ""
        request = build_request("smollm2-135m", chat=prompt, max_new_tokens=self.max_new_tokens)
        request.sampling.ignore_eos = True
        try:
            for message in client.stream(request):
                now = time.monotonic()
                call.longest_wait_s, last = max(call.longest_wait_s, now - last), now
                if message.HasField("token"):
                    call.tokens += 1
                    text += message.token.text
                else:
                    call.pod = message.summary.served_by
        except grpc.RpcError as err:
            call.code, call.details = err.code().name, err.details() or ""
        call.ended = time.monotonic()
        call.longest_wait_s = max(call.longest_wait_s, call.ended - last)
        if call.code == "OK" and len(text) >= 24:
            self.texts.append(text)
        return call


class Up:
    """`ffnskip up` in the background, its output read line by line."""

    def __init__(self, data_dir: Path) -> None:
        command = [str(Path(sys.executable).parent / "ffnskip"), "up", "--decoders", "2", "--gateway-port", "0",
                   "--data-dir", str(data_dir)]
        env = {**os.environ, "FFNSKIP_API_KEYS": API_KEY, "FFNSKIP_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
               "FFNSKIP_FIRST_TOKEN_TIMEOUT_S": str(FIRST_TOKEN_TIMEOUT_S)}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.output.append(line)
            print(f"  up| {line}", flush=True)
            match = re.search(pattern, line)
            if match:
                return match

    def processes(self) -> dict[str, tuple[int, str]]:
        rows = (re.fullmatch(r"\s+(\S+)\s+pid (\d+)\s+(\S+)", line) for line in self.output)
        return {row[1]: (int(row[2]), row[3]) for row in rows if row}


def summarise(name: str, calls: list[Call]) -> dict:
    codes: dict[str, int] = {}
    for call in calls:
        codes[call.code] = codes.get(call.code, 0) + 1
    waits = sorted(c.longest_wait_s for c in calls) or [0.0]
    ok = [c for c in calls if c.code == "OK"]
    row = {"phase": name, "calls": len(calls), "codes": codes, "max_wait_s": round(waits[-1], 2),
           "p99_wait_s": round(waits[min(len(waits) - 1, int(0.99 * len(waits)))], 2),
           "e2e_p50_s": round(statistics.median([c.ended - c.started for c in ok]), 2) if ok else None}
    reasons = sorted({re.sub(r"\d+", "N", c.details)[:90] for c in calls if c.code != "OK"})
    print(f"{name:<22} calls {row['calls']:>4}  codes {codes}  longest silence {row['max_wait_s']} s "
          f"(p99 {row['p99_wait_s']})  e2e p50 {row['e2e_p50_s']} s", flush=True)
    for reason in reasons:
        print(f"{'':<24}{reason}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="`up`'s data dir (default: its own, ~/.cache/ffnskip/stack)")
    parser.add_argument("--fault-s", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    data_dir = args.data_dir or cache_root(os.environ) / "stack"
    up = Up(data_dir)
    failures: list[str] = []
    try:
        up.expect(r"serving; Ctrl-C stops the stack", timeout_s=1800)
        procs = up.processes()
        load = Load(procs["gateway"][1], args.concurrency, args.max_new_tokens)
        marks: dict[str, float] = {"start": time.monotonic()}
        threads = load.run()

        def phase(name: str, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.5)  # the drill's pacing: faults last a wall-clock time
            marks[name] = time.monotonic()

        phase("warm", 15)
        os.kill(procs["decoder-1"][0], signal.SIGKILL)
        up.expect(r"decoder-1 restarted", timeout_s=120)
        phase("after_kill", 30)

        os.kill(procs["decoder-0"][0], signal.SIGSTOP)
        phase("decoder_stopped", args.fault_s)
        os.kill(procs["decoder-0"][0], signal.SIGCONT)
        phase("after_stop", 15)

        redis_pid = up.processes()["redis"][0]
        os.kill(redis_pid, signal.SIGSTOP)
        phase("redis_down", args.fault_s)
        os.kill(redis_pid, signal.SIGCONT)
        redis_back = time.monotonic()
        phase("after_redis", 20)
        load.stop.set()
        for thread in threads:
            thread.join(timeout=180)
        marks["end"] = time.monotonic()

        print("\nphase                  (the calls running at some time in it; a phase is named by its end)")
        bounds = list(marks.items())
        for (_, start), (next_name, end) in zip(bounds, bounds[1:]):
            calls = [c for c in load.calls if c.started < end and c.ended > start]
            row = summarise(next_name, calls)
            if row["codes"].get("NOT_FOUND"):
                failures.append(f"{next_name}: NOT_FOUND answered")
            if row["max_wait_s"] > max(STALL_TIMEOUT_S, FIRST_TOKEN_TIMEOUT_S) + 2.0:
                failures.append(f"{next_name}: a call waited {row['max_wait_s']} s")
        late = [c for c in load.calls if c.started >= redis_back + 10 and c.code != "OK"]
        if late:
            failures.append(f"{len(late)} calls failed more than 10 s after Redis returned: {late[0]}")
        served_by_restarted = [c for c in load.calls if c.started >= marks["after_kill"] - 20 and c.pod == "decoder-1"]
        if not served_by_restarted:
            failures.append("the restarted decoder-1 served nothing")

        logs = sorted((data_dir / "logs").rglob("*.log"))
        leaked = [(p.name, s[:30]) for p in logs for s in (*load.prompts, *load.texts) if s in p.read_text(errors="replace")]
        print(f"\nlogs searched: {len(logs)} files, {len(load.prompts)} prompts and {len(load.texts)} generated texts; "
              f"found: {len(leaked)}")
        if leaked:
            failures.append(f"user data in logs: {leaked[:3]}")
    finally:
        up.process.send_signal(signal.SIGTERM)
        up.process.wait(timeout=120)
    print("\n" + ("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
