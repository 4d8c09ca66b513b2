"""The request queue in front of the engine (the one queue: HTTP and realtime requests alike wait
here): fair FIFO order, a concurrency limit, queue positions for waiting clients (engine.events
QueuePosition, mapped to the wire by engine.server.protocol), cancellation whether a request is
queued or running, and bounded hand-over from generation threads to sockets.

A `Job` wraps one engine call (`run(cancel) -> iterator of events`). `Scheduler.submit` puts it in
line; when its turn comes it runs on a worker thread and its events flow to the reader through an
asyncio queue. The hand-over is bounded by credits (`Limits.stream_buffer`): a generation thread
whose reader falls behind waits (it keeps its turn, as the engine runs one request at a time), and
a reader that takes nothing for `slow_reader_timeout_s` has its response cancelled. The final
event (Done / Error) is always delivered, outside the credits.

Cancellation sets the `threading.Event` the engine checks between the blocks of its media encoders,
between the layers of a prefill chunk and between decode steps, so generation stops within one layer or step and the engine frees the request's KV
cache. The engine tells the event each decode step it ends (engine.generate.step_ended), so the server
reports how many decode steps ended after a cancel (at most one), however many prompts, prefills and
windows (a long recording's transcription) the request ran.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.events import EVENT_TYPES, Done, Error, Event, GenerationStats, QueuePosition, TextDelta
from engine.server.protocol import ApiError

_END = object()
_ids = itertools.count(1)
_ENGINE_EVENTS = tuple(kind for kind in EVENT_TYPES.values() if kind is not QueuePosition)  # what an engine yields


class CancelFlag(threading.Event):
    """The cancel event handed to the engine. `is_set` is what the engine calls between prefill chunks and
    layers and once per decode step (`checks` counts those calls); `step_ended` is what its decode loop calls
    as each step's token arrives, so `steps_after_set` counts the decode steps that ended after the cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self.steps_after_set = 0
        self.set_at: float | None = None

    def is_set(self) -> bool:  # the engine's per-step check
        self.checks += 1
        return super().is_set()

    def peek(self) -> bool:  # the server's own look, not counted
        return super().is_set()

    def step_ended(self) -> None:  # the engine's decode loop: one more token computed
        if super().is_set():
            self.steps_after_set += 1

    def set(self) -> None:
        if not super().is_set():
            self.set_at = time.perf_counter()
        super().set()


@dataclass
class JobRecord:
    """Figures of a finished job (kept for /health, tests and the benchmark)."""

    id: str
    label: str
    finish_reason: str
    queue_wait_s: float
    run_s: float
    new_tokens: int
    cancel_latency_s: float | None  # cancel requested -> generation thread done
    steps_after_cancel: int | None  # decode steps that ran after the cancel was requested
    max_buffered: int  # most events waiting for the reader at once
    slow_reader: bool


class Job:
    def __init__(self, run: Callable[[threading.Event], Iterator[Event]], label: str = "request"):
        self.id = f"job_{next(_ids)}"
        self.run = run
        self.label = label
        self.cancel = CancelFlag()
        self.state = "new"  # new -> queued -> running -> finished
        self.abandoned = False  # the reader is gone: keep nothing for it
        self.slow_reader = False
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.first_token_at: float | None = None
        self.last_position: int | None = None
        self.record: JobRecord | None = None
        self.media_bytes = 0  # decoded media the job's request holds until it finishes (HTTP requests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._credits: threading.Semaphore | None = None
        self._buffered = 0
        self._max_buffered = 0
        self._count_lock = threading.Lock()

    @property
    def queue_wait_s(self) -> float:
        end = self.started_at if self.started_at is not None else (self.finished_at or time.perf_counter())
        return end - self.submitted_at

    def _attach(self, loop: asyncio.AbstractEventLoop, buffer: int) -> None:
        self._loop = loop
        self._queue = asyncio.Queue()
        self._credits = threading.Semaphore(buffer)

    def _push_from_loop(self, item, credited: bool = False) -> None:
        self._queue.put_nowait((credited, item))

    async def events(self) -> AsyncIterator[QueuePosition | Event]:
        """QueuePosition updates and engine events, ending after the final Done or Error."""
        while True:
            credited, item = await self._queue.get()
            if item is _END:
                return
            if credited:
                with self._count_lock:
                    self._buffered -= 1
                self._credits.release()
            yield item


class Scheduler:
    def __init__(self, concurrency: int = 1, max_queue: int = 256, stream_buffer: int = 32,
                 slow_reader_timeout_s: float = 30.0, max_media_bytes: int | None = None,
                 other_media: Callable[[], int] | None = None):
        self.concurrency = concurrency
        self.max_media_bytes = max_media_bytes  # decoded media of waiting and running jobs, with `other_media`
        self.other_media = other_media  # what else holds media under the same limit (realtime sessions)
        self.max_queue = max_queue
        self.stream_buffer = stream_buffer
        self.slow_reader_timeout_s = slow_reader_timeout_s
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ming-generate")
        self.history: deque[JobRecord] = deque(maxlen=1024)
        self.counts = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self._closed = False

    # ----------------------------------------------------------------- loop side
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def media_bytes(self) -> int:
        """Decoded media the waiting and running jobs' requests hold."""
        return sum(j.media_bytes for j in self._waiting) + sum(j.media_bytes for j in self._running)

    def submit(self, job: Job, continuing: bool = False) -> None:
        """Put a job in line (call on the event loop). Raises ApiError when the line is full, or the job's media would
        pass the media limit. `continuing`: the job continues a request let in already (a chat's later choice, put in
        line when the one before ends): the line bounds requests and the request's media was counted when it was let
        in, so only a server shutting down refuses it (OpenAI answers all of a request's choices or none)."""
        if self._closed:
            raise ApiError("the server is shutting down", code="server_shutting_down", status=503)
        if not continuing:
            self._admit(job)
        job._attach(asyncio.get_running_loop(), self.stream_buffer)
        job.state = "queued"
        job.submitted_at = time.perf_counter()
        self.counts["submitted"] += 1
        self._waiting.append(job)
        self._pump()
        self._announce()

    def _admit(self, job: Job) -> None:
        """Refuses a new request when the line is full or its media would pass the limit."""
        if len(self._waiting) >= self.max_queue:
            self.counts["refused"] += 1
            raise ApiError(f"the request queue is full ({self.max_queue} requests waiting); try again later",
                           code="queue_full", status=429)
        if job.media_bytes and self.max_media_bytes is not None:
            held = self.media_bytes + (self.other_media() if self.other_media is not None else 0)
            if held + job.media_bytes > self.max_media_bytes:
                self.counts["refused"] += 1
                mib = 1024 * 1024
                raise ApiError(f"the server already holds {held / mib:.0f} MiB of media for requests and sessions, and "
                               f"this request's {job.media_bytes / mib:.1f} MiB would pass its limit of "
                               f"{self.max_media_bytes / mib:.0f} MiB; try again later", code="server_media_limit",
                               status=503)

    def cancel(self, job: Job, abandon: bool = False) -> None:
        """Stop a job: a waiting one leaves the line at once; a running one stops within one
        decode step. `abandon`: its reader is gone, so nothing more is queued for it."""
        if abandon:
            job.abandoned = True
        if job.state == "queued":
            self._waiting.remove(job)
            job.cancel.set()
            job.state = "finished"
            job.finished_at = time.perf_counter()
            stats = GenerationStats(queue_wait_s=job.queue_wait_s)
            job._push_from_loop(Done(text="", finish_reason="cancelled", stats=stats))
            job._push_from_loop(_END)
            self._record(job, "cancelled", 0)
            self._announce()
        elif job.state == "running":
            job.cancel.set()

    def close(self) -> None:
        self._closed = True
        for job in list(self._waiting):
            self.cancel(job, abandon=True)
        for job in list(self._running):
            job.abandoned = True
            job.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _pump(self) -> None:
        while len(self._running) < self.concurrency and self._waiting:
            job = self._waiting.popleft()
            self._running.add(job)
            job.state = "running"
            job.started_at = time.perf_counter()
            job.last_position = 0
            job._push_from_loop(QueuePosition(0, len(self._waiting)))
            self._executor.submit(self._work, job)

    def _announce(self) -> None:
        n = len(self._waiting)
        for i, job in enumerate(self._waiting):
            if job.last_position != i + 1:
                job.last_position = i + 1
                job._push_from_loop(QueuePosition(i + 1, n))

    def _finished(self, job: Job, finish_reason: str, new_tokens: int) -> None:
        self._running.discard(job)
        job.state = "finished"
        job._push_from_loop(_END)
        self._record(job, finish_reason, new_tokens)
        if not self._closed:
            self._pump()
            self._announce()

    def _record(self, job: Job, finish_reason: str, new_tokens: int) -> None:
        flag = job.cancel
        latency = steps = None
        if flag.set_at is not None and job.started_at is not None and job.finished_at is not None:
            latency = max(0.0, job.finished_at - max(flag.set_at, job.started_at))
            steps = flag.steps_after_set if finish_reason == "cancelled" else None
        key = {"stop": "completed", "length": "completed", "cancelled": "cancelled"}.get(finish_reason, "failed")
        self.counts[key] += 1
        job.record = JobRecord(id=job.id, label=job.label, finish_reason=finish_reason,
                               queue_wait_s=job.queue_wait_s,
                               run_s=(job.finished_at - job.started_at) if job.started_at and job.finished_at else 0.0,
                               new_tokens=new_tokens, cancel_latency_s=latency, steps_after_cancel=steps,
                               max_buffered=job._max_buffered, slow_reader=job.slow_reader)
        self.history.append(job.record)

    # ----------------------------------------------------------------- worker thread
    def _work(self, job: Job) -> None:
        finish, new_tokens, terminal = "error", 0, False
        gen = None
        try:
            gen = job.run(job.cancel)
            for ev in gen:
                if not isinstance(ev, _ENGINE_EVENTS):  # an unknown kind ends the response as an error
                    self._hand_over(job, Error(f"the engine yielded {type(ev).__name__}, which is not an event of "
                                               "engine.events", code="engine_error"), credited=False)
                    terminal = True
                    break
                if isinstance(ev, Done):
                    finish, new_tokens, terminal = ev.finish_reason, ev.stats.new_tokens, True
                    ev.stats.queue_wait_s += job.queue_wait_s
                elif isinstance(ev, Error):
                    terminal = True
                elif isinstance(ev, TextDelta) and job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                self._hand_over(job, ev, credited=not terminal)
                if terminal:
                    break
        except Exception as e:  # an engine fault ends this request with an error, never the server
            self._hand_over(job, Error(f"{type(e).__name__}: {e}", code="engine_error"), credited=False)
            terminal = True
        finally:
            if gen is not None and hasattr(gen, "close"):
                gen.close()  # frees the KV cache even if the loop above stopped early
            if not terminal:
                self._hand_over(job, Error("the engine ended the response without a result", code="engine_error"),
                                credited=False)
            if job.slow_reader and finish == "cancelled":
                finish = "slow_reader"
            job.finished_at = time.perf_counter()
            self._call_loop(job, self._finished, job, finish, new_tokens)

    def _hand_over(self, job: Job, ev: Event, credited: bool) -> None:
        if job.abandoned:
            return
        if credited:
            credited = self._wait_credit(job)
            if job.abandoned:
                return
        if credited:
            with job._count_lock:
                job._buffered += 1
                job._max_buffered = max(job._max_buffered, job._buffered)
        self._call_loop(job, job._push_from_loop, ev, credited)

    def _wait_credit(self, job: Job) -> bool:
        """Block until the reader has room; False when the job was cancelled meanwhile (the
        event is then delivered anyway: at most one more token and the final event follow)."""
        start = time.perf_counter()
        while not job._credits.acquire(timeout=0.02):
            if job.cancel.peek() or job.abandoned:
                return False
            if time.perf_counter() - start > self.slow_reader_timeout_s:
                job.slow_reader = True
                job.cancel.set()
                return False
        return True

    @staticmethod
    def _call_loop(job: Job, fn, *args) -> None:
        try:
            job._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass
