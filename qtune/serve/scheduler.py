"""The worker thread of `qtune serve`: it owns the model and batches the requests waiting for it.

One worker thread runs every model call. Requests wait in a queue; the worker takes every waiting request
(up to `max_batch` rows over adapters that can be resident together, after waiting `batch_wait_ms`
for company) and decodes them as one mixed-adapter batch (AdapterPool.generate), streaming each row's
text back to its request as it grows. Between two decoding steps, requests that arrived meanwhile
join the running batch (continuous batching) while there is room; rows leave as soon as they finish.
A prompt longer than `prefill_chunk` tokens is prefilled a chunk at a time between two steps, so it
delays the running rows by one chunk per step, not by its whole prefill; short prompts that arrive
meanwhile overtake it. A row past its deadline (the server's time budget) stops with an error.
Loading, unloading and classification run between batches: while one waits, no new row joins, so
the running batch drains. A client that disconnects cancels its row, which leaves at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qtune.serve.decode import BASE, Row
from qtune.serve.pool import AdapterPool


@dataclass
class _Generation:
    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("delta", text) ... then ("done", None) or ("error", message)
    stream: bool


@dataclass
class _Call:
    """Anything else the worker must run between batches (classification, loading, unloading)."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    classify: tuple[list[str], list[str]] | None = None  # (adapters, texts): merged with other classify calls


@dataclass
class Scheduler:
    """The single thread that runs the model, and the queue that feeds it."""

    pool: AdapterPool
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    prefill_chunk: int | None = 512  # a longer joining prompt is prefilled this many tokens between two steps
    steps: deque = field(default_factory=lambda: deque(maxlen=100_000))  # adapters of the rows of each forward pass
    finished: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (adapter, finish_reason, tokens)

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qtune-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- called from the event loop

    def submit_generation(self, row: Row, stream: bool) -> _Generation:
        job = _Generation(row, asyncio.get_running_loop(), asyncio.Queue(), stream)
        self._queue.put(job)
        return job

    async def call(self, fn: Callable[[], Any], classify: tuple[list[str], list[str]] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        job = _Call(fn, loop, loop.create_future(), classify)
        self._queue.put(job)
        return await job.future

    # -- the worker thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
                # Give concurrent requests a few milliseconds to join this batch.
                deadline = time.monotonic() + self.batch_wait_ms / 1000
                while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        self._pending.append(self._queue.get(timeout=left))
                    except queue.Empty:
                        break
            self._drain()
            self._run_calls()
            self._run_batch()

    def _run_calls(self) -> None:
        calls = [j for j in self._pending if isinstance(j, _Call)]
        if not calls:
            return
        self._pending = deque(j for j in self._pending if not isinstance(j, _Call))
        classify = [c for c in calls if c.classify is not None]
        if len(classify) > 1:  # one forward pass for every waiting classification request
            adapters = [a for c in classify for a in c.classify[0]]
            texts = [t for c in classify for t in c.classify[1]]
            try:
                results = self.pool.classify(adapters, texts)
            except Exception:
                pass  # one of them is bad: run them one by one below, so each gets its own answer
            else:
                start = 0
                for c in classify:
                    n = len(c.classify[1])
                    _resolve(c, results[start : start + n])
                    start += n
                calls = [c for c in calls if c.classify is None]
        for c in calls:
            try:
                result = c.fn()
            except Exception as e:
                c.loop.call_soon_threadsafe(_set_exception, c.future, e)
            else:
                _resolve(c, result)

    def _take(self, running: dict[int, _Generation]) -> list[_Generation]:
        """Waiting requests that fit beside the running ones: max_batch rows, adapters resident together."""
        adapters = {j.row.adapter for j in running.values()} - {BASE}
        taken, rest = [], deque()
        for job in self._pending:
            if isinstance(job, _Call):
                rest.append(job)
            elif job.row.cancelled:
                job.row.finish_reason = "cancelled"
                self.finished.append((job.row.adapter, "cancelled", 0))
            elif job.row.deadline is not None and time.monotonic() > job.row.deadline:
                job.row.finish_reason = "timeout"
                self.finished.append((job.row.adapter, "timeout", 0))
                self._send(job, "error", "the request waited past this server's time budget before it ran")
            elif job.row.adapter != BASE and job.row.adapter not in self.pool.adapters:
                self._send(job, "error", f"adapter {job.row.adapter!r} was unloaded before this request ran")
            elif len(running) + len(taken) < self.max_batch and (
                job.row.adapter in adapters
                or job.row.adapter == BASE
                or not adapters  # the first adapter always goes: if it alone is too big, the pool says so
                or self.pool.fits(adapters | {job.row.adapter})  # not only max_adapters: max_adapter_bytes too
            ):
                taken.append(job)
                adapters.add(job.row.adapter)
            else:
                rest.append(job)
        self._pending = rest
        for job in taken:
            running[id(job.row)] = job
        return taken

    def _run_batch(self) -> None:
        running: dict[int, _Generation] = {}
        first = self._take(running)
        if not first:
            return

        def admit(n: int) -> list[Row]:
            """Between two steps: let waiting requests join, unless a call (load, unload, classify) waits."""
            for key, job in list(running.items()):
                if job.row.finish_reason is not None:  # cancelled before its prefill: never stepped
                    self.finished.append((job.row.adapter, job.row.finish_reason, len(job.row.tokens)))
                    del running[key]
            self._drain()
            if self._stop.is_set() or any(isinstance(j, _Call) for j in self._pending):
                return []
            return [j.row for j in self._take(running)]

        def on_step(rows: list[Row]) -> None:
            self.steps.append(tuple(r.adapter for r in rows if r.finish_reason != "error"))
            for row in rows:
                job = running[id(row)]
                if job.stream:
                    text = row.stream_text()
                    if len(text) > row.sent:
                        self._send(job, "delta", text[row.sent :])
                        row.sent = len(text)
                if row.finish_reason is not None or row.cancelled:
                    reason = row.finish_reason or "cancelled"
                    self.finished.append((row.adapter, reason, len(row.tokens)))
                    if reason == "timeout":
                        n = len(row.tokens)
                        self._send(job, "error", f"the request ran past this server's time budget after {n} tokens")
                    elif reason == "error":
                        self._send(job, "error", row.error)
                    else:
                        self._send(job, "done", None)
                    del running[id(row)]

        try:
            self.pool.generate([j.row for j in first], on_step, admit, self.prefill_chunk)
        except Exception as e:
            for job in running.values():
                job.row.finish_reason = "error"
                self._send(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    @staticmethod
    def _send(job: _Generation, kind: str, value: Any) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))


def _resolve(call: _Call, value: Any) -> None:
    call.loop.call_soon_threadsafe(lambda: call.future.done() or call.future.set_result(value))


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
