"""Bookkeeping shared by the backends that own their workers (processes, threads): how many
chunks each worker holds, its ``max_tasks_per_worker`` quota, and which worker takes the next
chunk. The backends differ in how a worker runs and dies, not in this."""

from __future__ import annotations

import sys
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from multitrack.backends._base import Backend

# How many chunks one worker may hold: one running, one waiting, so it never idles on a
# round trip to the scheduler.
PER_WORKER = 2


class Worker(Protocol):
    """What the shared bookkeeping needs to know about one worker."""

    tasks_done: int

    def chunks_held(self) -> int:
        """Chunks assigned to it and not reported yet (the scheduler asks this several times
        per chunk: it must be cheap)."""
        ...

    def tasks_held(self) -> int:
        """Tasks of those chunks (only ``max_tasks_per_worker`` needs it)."""
        ...


class PooledBackend(Backend):
    """A backend whose workers are its own to start, count and replace."""

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        self.slots = workers
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks = max_tasks_per_worker

    @abstractmethod
    def _ready_workers(self) -> Iterable[Any]:
        """Workers able to run chunks now (started, not retiring)."""

    def capacity(self) -> int:
        return sum(PER_WORKER - worker.chunks_held() for worker in self._free())

    def room(self) -> int | None:
        if self.max_tasks is None:
            return None
        return max((self._quota_left(worker) for worker in self._free()), default=0)

    def _free(self) -> list[Any]:
        """Workers that may take another chunk now (asked a few times per chunk: the common
        case, no quota, is the short one)."""
        ready = self._ready_workers()
        if self.max_tasks is None:
            return [worker for worker in ready if worker.chunks_held() < PER_WORKER]
        return [
            worker
            for worker in ready
            if worker.chunks_held() < PER_WORKER and self._quota_left(worker) > 0
        ]

    def _quota_left(self, worker: Worker) -> int:
        """Tasks ``worker`` may still be given under ``max_tasks_per_worker``."""
        if self.max_tasks is None:
            return sys.maxsize
        return self.max_tasks - worker.tasks_done - worker.tasks_held()

    def _pick(self, size: int) -> Any:
        """The least loaded free worker with room for ``size`` tasks."""
        candidates = [worker for worker in self._free() if self._quota_left(worker) >= size]
        if not candidates:
            raise RuntimeError("submit() without room")  # a scheduler bug, not user error
        return min(candidates, key=lambda worker: worker.chunks_held())
