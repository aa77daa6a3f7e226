"""The engine in one dedicated thread; requests reach it through an inbox and their
tokens come back on per-request asyncio queues.

Only this thread touches the engine, and in a decoder it runs every torch call of the
process: it builds the engine (`EngineLoop(build)`, then `start`) and runs other work on
it between steps (`call`, e.g. loading compiled segments). PyTorch's CPU kernels run on an
OpenMP thread pool per calling thread, and when a process holds more pool threads than
CPUs, libgomp stops spinning between parallel regions (100 spins instead of 300,000) and
puts its workers to sleep after each one: a model built on the main thread and stepped on
this one cost about 430 context switches and 3-6 ms more per fp32 decode step of
SmolLM2-135M on 2 cores (docs/performance.md). Admission control happens in `submit` (the
queue bound), validation that needs the tokenizer happens in the thread (engine.add)
and comes back to the caller as the request's first item.

A request's identity is its Submission object and the engine's sequence id: never the
client's request id, which is only a label (two callers may send the same one, and
neither may receive or cancel the other's tokens).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine, GenerationResult, TokenEvent
from ffnskip.engine.heap import return_freed_memory
from ffnskip.engine.sequence import Sequence
from ffnskip.engine.substitutes import SubstituteSet
from ffnskip.errors import FfnSkipError, ResourceExhausted, Unavailable
from ffnskip.logs import get_logger

log = get_logger(__name__)
Item = TokenEvent | GenerationResult | FfnSkipError
T = TypeVar("T")


@dataclass
class Submission:
    request_id: str  # the caller's label, for logs and the response; not unique
    prompt: str | None
    messages: list[dict] | None
    sampling: SamplingParams
    skip: SkipParams
    profile_version: int
    deadline: float | None  # time.monotonic() seconds
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    received_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    seq: Sequence | None = None  # set by the engine thread when admitted
    tokens_at_cancel: int | None = None  # tokens it had when its caller's cancel reached the decoder
    prompt_ids: list[int] | None = None  # a prompt given as token ids (then prompt and messages are None)
    resumed: tuple[int, ...] = ()  # tokens another decoder delivered: generation continues after them
    resumed_skips: tuple[tuple[int, ...], ...] = ()  # the layers each of them skipped
    substitutes: SubstituteSet | None = None  # what its skipped FFNs are replaced with (ActiveProfile.substitutes_for)

    def deliver(self, item: Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass


class EngineLoop:
    engine: Engine  # set by the constructor, or by start() once the engine thread has built it

    def __init__(self, engine: Engine | Callable[[], Engine], max_queue: int,
                 on_result: Callable[[GenerationResult, int | None], None] = lambda result, after: None,
                 on_step: Callable[[float], None] = lambda seconds: None) -> None:
        """`engine`: the engine, or a function that builds it on the engine thread (start waits for it)."""
        if isinstance(engine, Engine):
            self.engine = engine
            self._build: Callable[[], Engine] | None = None
        else:
            self._build = engine
        self._built: Future[Engine] = Future()
        self.max_queue = max_queue
        # every sequence's end, cancelled and expired ones too (whose callers no longer read it), with the
        # tokens a cancelled one generated after its cancel arrived (the step in progress: at most 1): metrics
        self.on_result = on_result
        # each engine step's seconds: how much of a served token is the engine's
        self.on_step = on_step
        self._inbox: deque[Submission] = deque()
        self._cancels: deque[tuple[Submission, str]] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: dict[int, Submission] = {}  # by the engine's sequence id
        self._wake = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.idle = threading.Event()  # set while no request is queued or running (drain waits on it)
        self.idle.set()
        self._progress_at = time.monotonic()  # the engine thread's last pass through its loop

    # -- called from the asyncio side -------------------------------------------------------

    def start(self) -> Engine:
        """Start the engine thread; return once the engine is built (raise what building it raised)."""
        self._thread.start()
        self.engine = self._built.result()
        return self.engine

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps; return what it returns (raise what it raises)."""
        if threading.get_ident() == self._thread.ident:
            return fn()
        future: Future[T] = Future()
        with self._wake:
            if self._stopping or not self._thread.is_alive():
                raise Unavailable("decoder engine loop is not running")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result()

    def submit(self, submission: Submission) -> None:
        with self._wake:
            if self._draining:
                raise Unavailable("decoder is draining: it finishes in-flight requests and accepts no new ones")
            # Requests ahead of this one take the free rows first; only those left over queue. (The
            # engine thread admits in batches, so a burst arriving at an idle decoder sits in the
            # inbox for a moment: counting it against the queue alone refused requests that had a row.)
            if self.waiting - self.engine.cache.free_rows >= self.max_queue:
                raise ResourceExhausted(f"decoder queue is full ({self.max_queue} waiting)", retry_after_s=1.0)
            self._inbox.append(submission)
            if self.idle.is_set():  # work starts now, not when the thread last went idle
                self._progress_at = time.monotonic()
            self.idle.clear()
            self._wake.notify()

    def cancel(self, submission: Submission, reason: str = "cancelled") -> None:
        with self._wake:
            if submission.tokens_at_cancel is None:  # read across threads: a list's length, at worst one step old
                submission.tokens_at_cancel = len(submission.seq.generated) if submission.seq is not None else 0
            self._cancels.append((submission, reason))
            self._wake.notify()

    def drain(self) -> None:
        with self._wake:
            self._draining = True

    @property
    def draining(self) -> bool:
        """Set by drain(): no new request is accepted (the one flag the decoder reports)."""
        return self._draining

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.engine.waiting)

    def stalled_s(self) -> float:
        """Seconds the engine thread has had work without finishing a pass (0 when idle):
        a step that never returns, a deadlock, a dead thread."""
        if self.idle.is_set() and self._thread.is_alive():
            return 0.0
        return time.monotonic() - self._progress_at

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._build is not None:
                self.engine = self._build()
            self._built.set_result(self.engine)
        except BaseException as exc:  # start() raises it in the caller
            self._built.set_exception(exc)
            return
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancels or self._calls or self.engine.has_work):
                    self._wake.wait()
                self._progress_at = time.monotonic()
                calls, self._calls = list(self._calls), deque()
                if self._stopping:
                    break
                inbox, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = list(self._cancels), deque()
            for fn, future in calls:
                _run_call(fn, future)
            for submission in inbox:
                self._admit(submission)
            for submission, reason in cancels:
                self._cancel(submission, reason)
            self._expire_deadlines()
            if self.engine.has_work:
                self._step()
            with self._wake:
                went_idle = not self._active and not self._inbox and not self.idle.is_set()
                if went_idle:
                    self.idle.set()
            if went_idle:  # what the requests' activations left in the heap goes back to the OS
                return_freed_memory()
        for _, future in calls:
            future.set_exception(Unavailable("decoder engine loop stopped"))
        for submission in list(self._active.values()):
            self._cancel(submission, "cancelled")

    def _admit(self, submission: Submission) -> None:
        try:
            submission.seq = self.engine.add(prompt=submission.prompt, messages=submission.messages,
                                             sampling=submission.sampling, skip=submission.skip,
                                             request_id=submission.request_id, prompt_ids=submission.prompt_ids,
                                             resumed=submission.resumed, resumed_skips=submission.resumed_skips,
                                             substitutes=submission.substitutes)
        except FfnSkipError as exc:
            submission.deliver(exc)
            return
        self._active[submission.seq.seq_id] = submission
        if submission.seq.finished:  # resumed after its last token: only the summary was missing
            self._finish(submission)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.engine.step()
            self.on_step(time.perf_counter() - started)
        except Exception as exc:  # a bug in a step must fail its requests, not hang them
            log.exception("engine step failed")
            for failed in list(self._active.values()):
                assert failed.seq is not None  # only admitted submissions are active
                self._active.pop(failed.seq.seq_id).deliver(Unavailable(f"decoder engine failed: {type(exc).__name__}"))
                self.engine.cancel(failed.seq, "error")
            return
        for event in events:
            submission = self._active.get(event.seq_id)
            if submission is None:
                continue
            if submission.first_token_at is None:  # a resumed request's first is not token 1
                submission.first_token_at = time.perf_counter()
            submission.deliver(event)
            if event.finished:
                self._finish(submission)

    def _cancel(self, submission: Submission, reason: str) -> None:
        if submission.seq is None or submission.seq.seq_id not in self._active:
            return  # refused at admission, or already finished
        self.engine.cancel(submission.seq, reason)
        self._finish(submission)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for submission in list(self._active.values()):
            if submission.deadline is not None and now >= submission.deadline:
                self._cancel(submission, "deadline")

    def _finish(self, submission: Submission) -> None:
        assert submission.seq is not None
        self._active.pop(submission.seq.seq_id, None)
        result = self.engine.result(submission.seq)
        at_cancel = submission.tokens_at_cancel if result.finish_reason == "cancelled" else None
        self.on_result(result, None if at_cancel is None else len(result.token_ids) - at_cancel)
        submission.deliver(result)


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # the caller of EngineLoop.call gets it
        future.set_exception(exc)
