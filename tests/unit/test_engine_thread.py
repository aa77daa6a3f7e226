"""A decoder runs every torch call on its engine thread: the engine is built there, compiled
segments are loaded and the raw weights released there between steps. PyTorch's CPU kernels
run on an OpenMP pool per calling thread; a second pool (the model built on the main thread,
packages loaded on a compile thread) made libgomp stop spinning and sleep after every parallel
region, which cost 3-6 ms per decode step on 2 cores."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ffnskip.config import DENSE, SamplingParams
from ffnskip.engine import Engine, GenerationResult, load_model
from ffnskip.engine.compiled import CompiledSegments
from ffnskip.errors import NotFound, Unavailable
from services.decoder import engine_loop as engine_loop_module
from services.decoder.engine_loop import EngineLoop, Submission
from services.decoder.main import load_compiled_segments

pytestmark = pytest.mark.timeout(300)
SAMPLING = SamplingParams(max_new_tokens=6, ignore_eos=True)


class ThreadsSeen:
    """The threads that ran each recorded call (the calls themselves run unchanged)."""

    def __init__(self) -> None:
        self.threads: dict[str, set[int]] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.threads.setdefault(name, set()).add(threading.get_ident())
            return fn(*args, **kwargs)
        return recorded


def serve_one(engine_loop: EngineLoop, prompt: str) -> GenerationResult:
    async def scenario() -> GenerationResult:
        submission = Submission(request_id="r", prompt=prompt, messages=None, sampling=SAMPLING, skip=DENSE,
                                profile_version=0, deadline=None, loop=asyncio.get_running_loop())
        engine_loop.submit(submission)
        while not isinstance(item := await asyncio.wait_for(submission.items.get(), 60), GenerationResult):
            pass
        return item
    return asyncio.run(scenario())


def test_the_engine_is_built_and_called_on_the_engine_thread(tiny_loaded):
    seen = ThreadsSeen()
    engine_loop = EngineLoop(seen.wrap("build", lambda: Engine(tiny_loaded, max_batch=2, max_seq_len=64)), max_queue=4,
                             on_step=seen.wrap("step", lambda seconds: None))
    engine = engine_loop.start()
    try:
        assert engine is engine_loop.engine
        assert engine_loop.call(threading.get_ident) != threading.get_ident()
        assert serve_one(engine_loop, "hello there").finish_reason == "length"
        assert seen.threads["build"] == seen.threads["step"] == {engine_loop.call(threading.get_ident)}
        with pytest.raises(ZeroDivisionError):  # the caller gets what the call raised
            engine_loop.call(lambda: 1 / 0)
    finally:
        engine_loop.stop()
    with pytest.raises(Unavailable, match="not running"):
        engine_loop.call(threading.get_ident)


def test_a_failed_build_is_raised_by_start(tmp_path):
    engine_loop = EngineLoop(lambda: Engine(load_model(str(tmp_path / "missing"), device="cpu", cache_dir=tmp_path)),
                             max_queue=1)
    with pytest.raises(NotFound, match="unknown model"):
        engine_loop.start()


def test_compiled_segments_are_loaded_and_raw_weights_released_on_the_engine_thread(tiny_dir, tmp_path):
    """Before: the decoder built the model on its main thread and loaded the packages and released
    the weights on its compile thread (three OpenMP pools in one process)."""
    seen = ThreadsSeen()

    def build() -> Engine:
        loaded = load_model(str(tiny_dir), device="cpu", dtype="float32", cache_dir=tmp_path)  # an empty compile cache
        engine = Engine(loaded, max_batch=1, max_seq_len=64, compile=True, eager_until_warm=True)
        for name in ("warm_up", "release_raw_weights", "step"):
            setattr(engine, name, seen.wrap(name, getattr(engine, name)))
        return engine

    engine_loop = EngineLoop(seen.wrap("build", build), max_queue=4)
    engine = engine_loop.start()
    try:
        eager = serve_one(engine_loop, "one two three").token_ids
        compiling = threading.Thread(target=load_compiled_segments, args=(engine_loop, 1))
        compiling.start()
        while compiling.is_alive():  # requests are served while the child compiles
            assert serve_one(engine_loop, "one two three").token_ids == eager
        compiling.join()
        segments = engine.runner.segments
        assert isinstance(segments, CompiledSegments) and segments.warm_buckets == {1}
        assert serve_one(engine_loop, "one two three").token_ids == eager  # now compiled, on the released weights
        engine_thread = engine_loop.call(threading.get_ident)
        assert set(seen.threads) == {"build", "warm_up", "release_raw_weights", "step"}
        assert all(threads == {engine_thread} for threads in seen.threads.values()), seen.threads
    finally:
        engine_loop.stop()


def test_the_heap_is_trimmed_on_the_engine_thread_each_time_the_work_runs_out(tiny_loaded, monkeypatch):
    """What a burst's activations left in the heap goes back to the OS when the decoder goes idle,
    between requests and never during one."""
    trims: list[tuple[int, int]] = []  # (thread, requests running then)
    engine_loop = EngineLoop(lambda: Engine(tiny_loaded, max_batch=2, max_seq_len=64), max_queue=4)
    monkeypatch.setattr(engine_loop_module, "return_freed_memory",
                        lambda: trims.append((threading.get_ident(), engine_loop.running)))
    engine_loop.start()
    try:
        engine_thread = engine_loop.call(threading.get_ident)
        assert trims == []  # a call is no work running out
        for served in (1, 2):
            assert serve_one(engine_loop, "hello there").finish_reason == "length"
            engine_loop.call(lambda: None)  # the loop's next pass: the one that finished has trimmed
            assert trims == [(engine_thread, 0)] * served
    finally:
        engine_loop.stop()
