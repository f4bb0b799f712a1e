"""The process backend's memory watch: it samples every worker's memory and says which worker
is to be retired or stopped under ``memory_limit``. The pool (``_process``) acts on it.

No thread: the pool's ``poll`` already waits with a bound; with a memory limit set, that bound
is also the next sampling time (``bound``), and after each wait the pool calls ``step``, which
samples when one is due (``SAMPLE_EVERY``) and does nothing otherwise. Without
``memory_limit`` the pool has no watch, and none of this costs anything::

    ProcessBackend.poll(timeout) ── wait(min(timeout, watch.bound())) ── watch.step(workers)
                                                                            │ pss(pid) each
          retire (give back, stop after its task) ◀── size > limit ─────────┤
          kill now, Lost(memory=(limit, size)) ◀──── size > 1.5 x limit ────┘ (running a task)

Why two levels: memory that grows task after task (a leak, a cache) is the common case, and a
worker that finishes its task and is replaced loses nothing. A task that alone outgrows the
limit by half would take the machine with it before it ends: it is stopped, and its task fails
with ``MemoryLimitExceeded`` (retried like any failure).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from multitrack._memory import cgroup_anon, pss
from multitrack.backends._base import MemoryUse
from multitrack.backends._proc import State, WorkerHandle

SAMPLE_EVERY = 0.25  # seconds between samples: 4 per second
# Under a run budget, past NEAR of it: 20 samples a second, so a task growing fast is seen
# before the kernel acts (about 1 ms of the caller's time per sample).
NEAR, SAMPLE_NEAR = 0.7, 0.05
HARD_FACTOR = 1.5  # past this many times the limit, a worker is stopped at once

RETIRE, KILL = "retire", "kill"


class MemoryWatch:
    """Samples of the workers' memory, and what ``limit`` (bytes per worker; ``None``: only
    measure, for ``memory_limit="auto"``) asks of them."""

    def __init__(
        self,
        limit: int | None,
        budget: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.budget = budget  # memory_limit="auto": the run's (the scheduler enforces it)
        self.clock = clock
        self.next_at = 0.0
        self.latest: MemoryUse | None = None
        self.retired = 0  # workers retired past the limit
        self.killed = 0  # workers stopped past HARD_FACTOR x the limit

    def begin(self) -> None:
        """A call begins: its first sample a period from now (a call shorter than that is
        not measured at all: it costs nothing)."""
        self.next_at = self.clock() + SAMPLE_EVERY

    def bound(self, timeout: float | None) -> float | None:
        """``timeout``, shortened to end at the next sample."""
        left = max(0.0, self.next_at - self.clock())
        return left if timeout is None else min(timeout, left)

    def step(self, workers: Iterable[WorkerHandle]) -> list[tuple[WorkerHandle, str, int]]:
        """When a sample is due, take it; return what to do: (worker, ``RETIRE`` or
        ``KILL``, its size)."""
        now = self.clock()
        if now < self.next_at:
            return []
        sizes: dict[int, int] = {}
        actions: list[tuple[WorkerHandle, str, int]] = []
        for worker in list(workers):
            if not worker.alive:
                continue
            size = pss(worker.pid)
            if size is None:
                continue  # gone meanwhile: its pidfd says so
            sizes[worker.key] = size
            action = self._judge(worker, size)
            if action is not None:
                actions.append((worker, action, size))
        sample = self.latest = MemoryUse(now, pss("self") or 0, sizes)
        near = False
        if self.budget is not None:
            sample.cgroup = cgroup_anon()
            near = sample.used >= NEAR * self.budget
        self.next_at = now + (SAMPLE_NEAR if near else SAMPLE_EVERY)
        return actions

    def _judge(self, worker: WorkerHandle, size: int) -> str | None:
        limit = self.limit
        if limit is None or size <= limit:
            return None
        if size > HARD_FACTOR * limit and worker.running() is not None:
            self.killed += 1
            return KILL
        if worker.state is State.READY:
            self.retired += 1
            return RETIRE
        return None  # starting, or retiring already
