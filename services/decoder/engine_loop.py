"""The engine in one dedicated thread; requests reach it through an inbox and their
tokens come back on per-request asyncio queues.

Only this thread touches the engine. Admission control happens in `submit` (the
queue bound), validation that needs the tokenizer happens in the thread (engine.add)
and comes back to the caller as the request's first item.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

import structlog

from ffnskip.config import SamplingParams, SkipParams
from ffnskip.engine import Engine, GenerationResult, TokenEvent
from ffnskip.errors import FfnSkipError, ResourceExhausted, Unavailable

log = structlog.get_logger("decoder.engine_loop")
Item = Union[TokenEvent, GenerationResult, FfnSkipError]


@dataclass
class Submission:
    request_id: str
    prompt: Optional[str]
    messages: Optional[list[dict]]
    sampling: SamplingParams
    skip: SkipParams
    profile_version: int
    deadline: Optional[float]  # time.monotonic() seconds
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    received_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    seq: object = None

    def deliver(self, item: Item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: deque[Submission] = deque()
        self._cancels: deque[tuple[str, str]] = deque()
        self._active: dict[str, Submission] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.idle = threading.Event()  # set while no request is queued or running (drain waits on it)
        self.idle.set()

    # -- called from the asyncio side -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

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
            self.idle.clear()
            self._wake.notify()

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        with self._wake:
            self._cancels.append((request_id, reason))
            self._wake.notify()

    def drain(self) -> None:
        with self._wake:
            self._draining = True

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

    @property
    def in_flight(self) -> int:
        return len(self._active) + len(self._inbox)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancels or self.engine.has_work):
                    self._wake.wait()
                if self._stopping:
                    break
                inbox, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = list(self._cancels), deque()
            for submission in inbox:
                self._admit(submission)
            for request_id, reason in cancels:
                self._cancel(request_id, reason)
            self._expire_deadlines()
            if self.engine.has_work:
                self._step()
            with self._wake:
                if not self._active and not self._inbox:
                    self.idle.set()
        for request_id in list(self._active):
            self._cancel(request_id, "cancelled")

    def _admit(self, submission: Submission) -> None:
        try:
            submission.seq = self.engine.add(prompt=submission.prompt, messages=submission.messages,
                                             sampling=submission.sampling, skip=submission.skip,
                                             request_id=submission.request_id)
        except FfnSkipError as exc:
            submission.deliver(exc)
            return
        self._active[submission.request_id] = submission

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # a bug in a step must fail its requests, not hang them
            log.exception("engine step failed")
            for request_id in list(self._active):
                self._active.pop(request_id).deliver(Unavailable(f"decoder engine failed: {type(exc).__name__}"))
                self.engine.cancel(request_id, "error")
            return
        for event in events:
            submission = self._active.get(event.request_id)
            if submission is None:
                continue
            if event.index == 1:
                submission.first_token_at = time.perf_counter()
            submission.deliver(event)
            if event.finished:
                self._finish(submission)

    def _cancel(self, request_id: str, reason: str) -> None:
        submission = self._active.get(request_id)
        if submission is None:
            return
        self.engine.cancel(request_id, reason)
        self._finish(submission)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for request_id, submission in list(self._active.items()):
            if submission.deadline is not None and now >= submission.deadline:
                self._cancel(request_id, "deadline")

    def _finish(self, submission: Submission) -> None:
        self._active.pop(submission.request_id, None)
        submission.deliver(self.engine.result(submission.seq))
