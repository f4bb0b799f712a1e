"""The thread backend: worker threads in the caller's process, for I/O-bound work or code that
releases the GIL (numpy, OpenCV, network calls).

Each thread has its own inbox; all of them post to one outbox the scheduler waits on with a
timeout. Nothing is pickled: the function and its arguments are shared objects.

Threads cannot be killed. ``kill`` (used for timeouts) therefore *abandons* the thread: the
scheduler treats the task as timed out and a fresh thread takes the slot, while the abandoned
one finishes the item it is stuck in, drops its result and exits. Its item cannot be stopped;
that is the documented price of threads (trio's ``abandon_on_cancel`` makes the same trade).
For the same reason ``end(abort=True)`` cannot stop an item in progress: it lets it finish and
discards the result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends._base import Chunk, Completed, Event, Lost, Output, Running
from multitrack.backends._pooled import PooledBackend

JOIN_GRACE = 2.0


@dataclass(eq=False)
class _Thread:
    key: int
    inbox: queue.SimpleQueue[Chunk | None] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    ready: bool = False
    abandoned: bool = False
    chunks: dict[int, Chunk] = field(default_factory=dict)
    current: tuple[int, int, float] | None = None
    tasks_done: int = 0

    def chunks_held(self) -> int:
        return len(self.chunks)

    def tasks_held(self) -> int:
        return sum(len(c.indices) for c in self.chunks.values())

    def is_abandoned(self) -> bool:
        # A method, not the attribute: another thread flips it while an item runs.
        return self.abandoned


class ThreadBackend(PooledBackend):
    """A pool of worker threads."""

    can_kill = False

    def __init__(self, workers: int, **options: Any) -> None:
        super().__init__(workers, **options)  # initializer, initargs, max_tasks_per_worker
        self._threads: dict[int, _Thread] = {}
        self._next_key = 0
        self._outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._fn: Callable[..., Any] | None = None
        self._call = 0  # results of an earlier call are told apart by this number
        self._events: list[Event] = []
        self._closed = False

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this pool is closed")
        self._fn = fn
        self._call += 1
        while len(self._threads) < self.slots:
            self._spawn()

    def _ready_workers(self) -> list[_Thread]:
        return [t for t in self._threads.values() if t.ready]

    def submit(self, chunk: Chunk) -> None:
        target: _Thread = self._pick(len(chunk.indices))
        target.chunks[chunk.id] = chunk
        target.inbox.put(chunk)

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        try:
            messages = [self._outbox.get(timeout=timeout)]
        except queue.Empty:
            messages = []
        while True:
            try:
                messages.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        for message in messages:
            self._handle(message)
        events, self._events = self._events, []
        return events

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, key = message[0], message[1]
        worker = self._threads.get(key)
        if worker is None or worker.abandoned:
            return
        if kind == "ready":
            worker.ready = True
        elif kind == "start_error":
            cause = message[2]
            raise WorkerStartError(
                f"the initializer failed in a worker thread: {type(cause).__name__}: {cause}"
            ) from cause
        elif kind == "done":
            _, _, call, done = message
            if call != self._call or worker.chunks.pop(done.chunk_id, None) is None:
                return
            worker.tasks_done += len(done.values)
            self._events.append(done)
            if not worker.chunks and self._quota_left(worker) <= 0:
                self._retire(worker)
                while len(self._threads) < self.slots and not self._closed:
                    self._spawn()

    def running(self) -> list[Running]:
        now_running = []
        for worker in self._threads.values():
            current = worker.current
            if current is not None and current[0] in worker.chunks:
                now_running.append(Running(worker.key, *current))
        return now_running

    def kill(self, worker: int) -> None:
        victim = self._threads.get(worker)
        if victim is None:
            return
        current = victim.current
        running = (current[0], current[1]) if current and current[0] in victim.chunks else None
        self._retire(victim)
        self._events.append(Lost(victim.key, list(victim.chunks), running, None, None, True))
        victim.chunks.clear()
        while len(self._threads) < self.slots and not self._closed:
            self._spawn()

    def end(self, *, abort: bool) -> None:
        self._events.clear()
        for worker in list(self._threads.values()):
            if worker.chunks and abort:
                self._retire(worker)  # its item runs to completion; the result is dropped
            worker.chunks.clear()
        self._fn = None

    def close(self, *, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        workers = list(self._threads.values())
        for worker in workers:
            self._retire(worker)
        if not kill:
            deadline = time.monotonic() + JOIN_GRACE
            for worker in workers:
                if worker.thread is not None:
                    worker.thread.join(max(0.0, deadline - time.monotonic()))

    def _retire(self, worker: _Thread) -> None:
        worker.abandoned = True
        worker.inbox.put(None)
        self._threads.pop(worker.key, None)

    def _spawn(self) -> None:
        worker = _Thread(self._next_key)
        self._next_key += 1
        worker.thread = threading.Thread(
            target=self._serve, args=(worker,), name=f"multitrack-worker-{worker.key}", daemon=True
        )
        self._threads[worker.key] = worker
        worker.thread.start()

    def _serve(self, worker: _Thread) -> None:
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:
                self._outbox.put(("start_error", worker.key, exc))
                return
        self._outbox.put(("ready", worker.key))
        clock = time.monotonic
        while True:
            chunk = worker.inbox.get()
            if chunk is None or worker.abandoned:
                return
            call, fn = self._call, self._fn
            if fn is None:
                continue
            values: list[Any] = []
            errors: dict[int, BaseException] = {}
            begun = clock()
            for position, arg in enumerate(chunk.args):
                worker.current = (chunk.id, position, clock())
                try:
                    values.append(fn(arg))
                except BaseException as exc:
                    errors[position] = exc
                    values.append(None)
                if worker.is_abandoned():
                    return
            worker.current = None
            done = Completed(chunk.id, 0, values, errors, clock() - begun, worker.key)
            self._outbox.put(("done", worker.key, call, done))
