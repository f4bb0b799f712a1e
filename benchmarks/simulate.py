"""``python -m benchmarks.simulate``: the parent's CPU per task and per chunk as workers grow.

How far does one parent process carry? The scheduler (``multitrack._run.Run``) is run as it
is, with the real chunk sizer, the real pool policy (``_pooled.PooledBackend``: capacity,
which worker takes a chunk) and the real progress object switched off, against a simulated
pool of N workers on a simulated clock (the fake backend and injectable clock of
``tests/test_run_unit.py``, made event-driven)::

    Run ──submit──▶ SimPool: each worker holds a running and a waiting chunk; a chunk of k
                    tasks of t seconds ends k*t simulated seconds after it starts
    Run ◀──poll──── the earliest chunk ends: the clock jumps there, Completed events come back

Only the parent's work is real, and its CPU time is measured (``time.thread_time``) while
the simulated workers cost nothing. What a real parent does per wake-up beyond the scheduler
is imitated where it grows with N: ``poll`` scans every worker as ``ProcessBackend.poll``
does (start-up deadlines, health) and makes a real ``poll(2)`` over 3 descriptors per worker
(socket, pidfd, stdout and stderr pipes: 4 really, the pipes only while output comes), so the
kernel's per-descriptor cost is in the figure. Not imitated: pickling chunks and results and
the socket system calls, a constant per chunk (measured on the real backend: ``docs/cpu.md``).

The **parent's CPU share** is its real CPU time over the simulated run's length: the share of
one core the parent needs to keep N workers of t-second tasks busy. At 1 it is the limit: from
there, more workers add no throughput.
"""

from __future__ import annotations

import argparse
import heapq
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from multitrack._chunks import ChunkSizer
from multitrack._progress import NullProgress
from multitrack._run import Policy, Run
from multitrack.backends._base import Chunk, Completed, Event, Output
from multitrack.backends._pooled import PooledBackend

__all__ = ["Result", "SimPool", "simulate"]

FDS_PER_WORKER = 3


class SimClock:
    """Simulated seconds; the pool moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimWorker:
    """One simulated worker: the chunks it holds, the first one running."""

    key: int
    chunks: deque[Chunk] = field(default_factory=deque)
    tasks_done: int = 0
    booting: bool = False  # never, here: every worker is up from the start
    boot_deadline: float = 0.0

    def chunks_held(self) -> int:
        return len(self.chunks)

    def tasks_held(self) -> int:
        return sum(len(chunk.indices) for chunk in self.chunks)


class SimPool(PooledBackend):
    """N simulated workers whose tasks take ``task_s`` simulated seconds each."""

    can_kill = False

    def __init__(self, workers: int, task_s: float, clock: SimClock, *, fds: bool = True):
        super().__init__(workers)
        self.task_s, self.clock = task_s, clock
        self.workers = [SimWorker(key) for key in range(workers)]
        self.ends: list[tuple[float, int]] = []  # (when its running chunk ends, worker)
        self.chunks = 0
        self._poller = select.poll()
        self._fds: list[int] = []
        if fds:
            self._open_descriptors(workers * FDS_PER_WORKER)

    def _open_descriptors(self, count: int) -> None:
        for _ in range(count):
            read_end, write_end = os.pipe()
            self._fds += [read_end, write_end]
            self._poller.register(read_end, select.POLLIN)

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        self.fn = fn

    def _ready_workers(self) -> list[SimWorker]:
        return self.workers

    def submit(self, chunk: Chunk) -> int | None:
        worker: SimWorker = self._pick(len(chunk.indices))
        worker.chunks.append(chunk)
        self.chunks += 1
        if len(worker.chunks) == 1:
            self._start(worker)
        return None

    def _start(self, worker: SimWorker) -> None:
        length = len(worker.chunks[0].indices) * self.task_s
        heapq.heappush(self.ends, (self.clock.now + length, worker.key))

    def poll(self, timeout: float | None) -> Sequence[Event]:
        self._poller.poll(0)  # the kernel's cost of watching every worker's descriptors
        self._scan_workers()
        if not self.ends:
            if timeout is None:
                raise RuntimeError("the scheduler waits forever with nothing running")
            self.clock.now += timeout
            return []
        when = self.ends[0][0]
        if timeout is not None and when > self.clock.now + timeout:
            self.clock.now += timeout
            return []
        self.clock.now = max(self.clock.now, when)
        events: list[Event] = []
        while self.ends and self.ends[0][0] <= self.clock.now:
            events.append(self._finish(self.workers[heapq.heappop(self.ends)[1]]))
        return events

    def _scan_workers(self) -> None:
        """What ``ProcessBackend.poll`` does for every worker at every wake-up: a start-up
        deadline and a health check each."""
        now = self.clock.now
        booting = [w.boot_deadline for w in self.workers if w.booting]
        for worker in self.workers:
            if worker.booting and now > min(booting):
                raise RuntimeError("a simulated worker did not start")

    def _finish(self, worker: SimWorker) -> Completed:
        chunk = worker.chunks.popleft()
        worker.tasks_done += len(chunk.indices)
        if worker.chunks:
            self._start(worker)
        busy = len(chunk.indices) * self.task_s
        return Completed(chunk.id, 0, list(chunk.args), {}, busy, worker.key)

    def end(self, *, abort: bool) -> None:
        pass

    def close(self, *, kill: bool = False) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@dataclass(frozen=True)
class Result:
    """One simulated call."""

    workers: int
    task_s: float
    tasks: int
    chunks: int
    parent_cpu_s: float
    simulated_s: float

    @property
    def per_chunk_us(self) -> float:
        return self.parent_cpu_s / self.chunks * 1e6

    @property
    def per_task_us(self) -> float:
        return self.parent_cpu_s / self.tasks * 1e6

    @property
    def parent_share(self) -> float:
        """The parent's CPU over the run's length: the share of a core it needs."""
        return self.parent_cpu_s / self.simulated_s


def simulate(
    workers: int, task_s: float, tasks: int, *, chunksize: int | None = None, fds: bool = True
) -> Result:
    """One ``map`` of ``tasks`` tasks of ``task_s`` seconds on ``workers`` simulated workers."""
    clock = SimClock()
    pool = SimPool(workers, task_s, clock, fds=fds)
    run = Run(
        pool,
        _identity,
        list(range(tasks)),
        total=tasks,
        ordered=True,
        sizer=ChunkSizer(fixed=chunksize, slots=workers),
        policy=Policy(),
        progress=NullProgress(total=tasks, clock=clock),
        describe=_identity,
        max_ahead=None,
        owns_backend=True,
        clock=clock,
    )
    started, cpu = clock.now, time.thread_time()
    count = sum(len(batch) for batch in run.batches())
    cpu = time.thread_time() - cpu
    if count != tasks:
        raise AssertionError(f"{count} results for {tasks} tasks")
    return Result(workers, task_s, tasks, pool.chunks, cpu, clock.now - started)


def _identity(value: Any) -> Any:
    return value


def tasks_for(workers: int, task_s: float, chunks_per_worker: int = 20) -> int:
    """Enough tasks for about ``chunks_per_worker`` chunks of 0.1 s of work per worker."""
    per_chunk = max(1, round(0.1 / task_s))
    return workers * chunks_per_worker * per_chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__)
    parser.add_argument("--workers", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--task-ms", default="1,20", help="simulated task times, ms")
    parser.add_argument("--chunksize", type=int, help="fixed chunks (default: auto)")
    parser.add_argument("--repeat", type=int, default=3, help="the median of this many")
    parser.add_argument("--no-fds", action="store_true", help="no real poll(2) over pipes")
    args = parser.parse_args(argv)
    print(
        "| task ms | workers | tasks | chunks | parent CPU per chunk µs | per task µs "
        "| tasks/s the parent can dispatch | parent CPU share |\n|---|---|---|---|---|---|---|---|"
    )
    for task_ms in (float(t) for t in args.task_ms.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            runs = [
                simulate(
                    workers,
                    task_ms / 1000,
                    tasks_for(workers, task_ms / 1000),
                    chunksize=args.chunksize,
                    fds=not args.no_fds,
                )
                for _ in range(args.repeat)
            ]
            r = sorted(runs, key=lambda run: run.parent_cpu_s)[len(runs) // 2]
            print(
                f"| {task_ms:g} | {workers} | {r.tasks:,} | {r.chunks:,} | {r.per_chunk_us:.1f} "
                f"| {r.per_task_us:.2f} | {r.tasks / r.parent_cpu_s:,.0f} "
                f"| {r.parent_share:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
