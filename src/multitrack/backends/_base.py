"""What every backend speaks: chunks go in, events come out.

The scheduler (``_run.Run``) owns the call; a backend only moves chunks to workers and reports
what happened. The protocol is deliberately small so that the whole scheduling policy
(windowing, ordering, retries, timeouts, error modes) lives in one place and can be tested
against an in-memory fake backend with a fake clock::

    Run ──submit(Chunk)──▶ backend ──▶ workers
    Run ◀──poll(timeout)── [Completed | Lost] events
    Run ──running()──▶ what each worker is running and since when (for deadlines)
    Run ──kill(worker)──▶ stop a worker now (timeouts); its chunks come back as Lost

A backend never raises for a task's failure: failures travel inside ``Completed.outcomes`` or
as ``Lost``. It raises only for its own failures (``WorkerStartError``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# One item's outcome as it comes back from a worker: (index, ok, value-or-exception).
Outcome = tuple[int, bool, Any]


@dataclass(slots=True)
class Chunk:
    """A batch of tasks sent to one worker at once. ``args[k]`` are the arguments of
    ``indices[k]``."""

    id: int
    indices: list[int]
    args: list[tuple[Any, ...]]


@dataclass(slots=True)
class Completed:
    """Some items of a chunk finished (successfully or with an exception).

    ``busy_seconds`` is the time the worker spent running exactly these items; it feeds the
    automatic chunk size."""

    chunk_id: int
    outcomes: list[Outcome]
    busy_seconds: float


@dataclass(slots=True)
class Lost:
    """A worker is gone (it died, or ``kill`` was asked) with chunks still assigned to it.

    ``running`` is ``(chunk_id, position)`` of the item it was running when it went, or
    ``None`` when it was between items. Every unfinished item of ``chunk_ids`` must be
    blamed or resubmitted by the scheduler."""

    worker: int
    chunk_ids: list[int]
    running: tuple[int, int] | None
    returncode: int | None
    pid: int | None
    killed: bool = False


@dataclass(slots=True)
class Returned:
    """A worker handed back the tasks of a chunk it had not started (after ``give_back``);
    they are to be run again elsewhere, with no attempt used."""

    chunk_id: int
    indices: list[int]


Event = Completed | Lost | Returned


@dataclass(slots=True)
class Running:
    """One item being run right now: for per-task deadlines."""

    worker: int
    chunk_id: int
    position: int
    started_at: float


# Where worker output goes: ``output(text, stream)`` with whole lines, stream "stdout"/"stderr".
Output = Callable[[str, str], None]


class Backend(ABC):
    """A pool of workers. Created by ``backends.create``; one instance may serve several
    calls (``mt.Pool``)."""

    #: how many items can run at the same time
    slots: int
    #: whether ``kill`` really stops a running item (processes: yes; threads: abandoned)
    can_kill: bool = False

    @abstractmethod
    def begin(self, fn: Callable[..., Any], output: Output) -> None:
        """Prepare for a call: start workers if needed and ship ``fn`` to them. Raises
        ``TypeError`` when ``fn`` cannot be sent to the workers."""

    @abstractmethod
    def capacity(self) -> int:
        """How many more chunks may be submitted now without queueing behind a busy worker
        for long (each worker holds at most one running and one waiting chunk)."""

    def room(self) -> int | None:
        """The largest chunk a free worker may take now (``max_tasks_per_worker`` left to
        it), or ``None`` for no limit."""
        return None

    @abstractmethod
    def submit(self, chunk: Chunk) -> None:
        """Hand a chunk to a worker. Never blocks for long."""

    @abstractmethod
    def poll(self, timeout: float | None) -> Sequence[Event]:
        """Wait at most ``timeout`` seconds (``None``: until something happens) and return
        what happened. May return an empty list."""

    def running(self) -> list[Running]:
        """The items being run right now, with their start times (``time.monotonic``)."""
        return []

    def give_back(self) -> None:  # noqa: B027 - optional capability
        """Some worker is idle and no work is left to hand out: ask the busiest worker to
        return the unstarted tasks of its chunk (``Returned`` event), so they can be shared.
        Backends that cannot do this ignore it."""

    def kill(self, worker: int) -> None:  # noqa: B027 - optional capability
        """Stop ``worker`` now; its chunks come back in a ``Lost(killed=True)`` event."""

    @abstractmethod
    def end(self, *, abort: bool) -> None:
        """The call is over. ``abort``: stop every worker still running a chunk of it (its
        results are no longer wanted). Workers may be kept for the next call."""

    @abstractmethod
    def close(self, *, kill: bool = False) -> None:
        """Stop every worker and release every resource. Idempotent. ``kill``: do not wait
        for a graceful exit."""
