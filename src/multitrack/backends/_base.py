"""What every backend speaks: chunks go in, events come out.

The scheduler (``_run.Run``) owns the call; a backend only moves chunks to workers and reports
what happened. The protocol is deliberately small so that the whole scheduling policy
(windowing, ordering, retries, timeouts, error modes) lives in one place and can be tested
against an in-memory fake backend with a fake clock::

    Run ──submit(Chunk)──▶ backend ──▶ workers
    Run ◀──poll(timeout)── [Completed | Lost] events
    Run ──running()──▶ what each worker is running and since when (for deadlines)
    Run ──kill(worker)──▶ stop a worker now (timeouts); its chunks come back as Lost
    Run ──memory()──▶ the latest sample of the workers' memory (``memory_limit``)

A backend never raises for a task's failure: failures travel inside ``Completed.errors`` or
as ``Lost``. It raises only for its own failures (``WorkerStartError``).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# One item's outcome by its position in its chunk: (position, ok, value-or-exception).
Outcome = tuple[int, bool, Any]


@dataclass(slots=True)
class Chunk:
    """A batch of tasks sent to one worker at once. ``args[k]`` are the arguments of task
    ``indices[k]``; ``k`` is the task's *position* in the chunk. Fresh tasks make a ``range``
    of indices (their results are then stored and released as one slice)."""

    id: int
    indices: Sequence[int]
    args: list[Any]  # one argument per task (several travel as a tuple; see ``Spread``)


@dataclass(slots=True)
class Completed:
    """Positions ``first``, ``first + 1``, ... of a chunk finished, one per entry of
    ``values``; where an offset is in ``errors`` that item raised, and ``errors[offset]`` is
    the exception (its ``values`` entry is a placeholder).

    Results travel as a list, not an event per item: the scheduler stores and releases them as
    slices, which is what keeps its cost per task near zero on tiny tasks. ``busy_seconds`` is
    the time the worker spent running exactly these items; it feeds the automatic chunk size."""

    chunk_id: int
    first: int
    values: list[Any]
    errors: dict[int, BaseException]
    busy_seconds: float
    worker: int = -1  # which worker ran them, where the backend knows (for the report)
    # ``values`` as the worker pickled them, self-contained (the process backend; ``None``
    # elsewhere): a journal stores these bytes instead of pickling the values again
    pickled: bytes | None = None

    @classmethod
    def failure(cls, chunk_id: int, position: int, error: BaseException) -> Completed:
        """One item that failed on its own (say, its arguments could not be sent)."""
        return cls(chunk_id, position, [None], {0: error}, 0.0)


def completed_from_outcomes(
    chunk_id: int, outcomes: Sequence[Outcome], busy_seconds: float
) -> list[Completed]:
    """Events for outcomes given item by item, in any order: one per run of consecutive
    positions, with the busy time shared out by item count."""
    events: list[Completed] = []
    ordered = sorted(outcomes, key=lambda outcome: outcome[0])
    share = busy_seconds / len(ordered) if ordered else 0.0
    for position, ok, value in ordered:
        last = events[-1] if events else None
        if last is None or last.first + len(last.values) != position:
            last = Completed(chunk_id, position, [], {}, 0.0)
            events.append(last)
        if not ok:
            last.errors[len(last.values)] = value
        last.values.append(value if ok else None)
        last.busy_seconds += share
    return events


@dataclass(slots=True)
class Lost:
    """A worker is gone (it died, or ``kill`` was asked) with chunks still assigned to it.

    ``running`` is ``(chunk_id, position)`` of the item it was running when it went, or
    ``None`` when it was between items; with ``span`` above 1 it was running one of the
    items ``position`` ... ``position + span - 1``, not known which (a block of quick tasks
    marked as one). Every unfinished item of ``chunk_ids`` must be blamed or resubmitted by
    the scheduler."""

    worker: int
    chunk_ids: list[int]
    running: tuple[int, int] | None
    returncode: int | None
    pid: int | None
    killed: bool = False
    span: int = 1
    stack: str | None = None  # killed: where its task was (``faulthandler``), when known
    memory: tuple[int, int] | None = None  # killed past memory_limit: (limit, size reached)
    oom: tuple[bool, str] | None = None  # a SIGKILL: the OOM killer's? (verdict, evidence)


@dataclass(slots=True)
class GivenBack:
    """A worker given back the tasks of a chunk it had not started, from position ``first``
    on (after ``give_back``); they are to be run again elsewhere, with no attempt used."""

    chunk_id: int
    first: int


Event = Completed | Lost | GivenBack


@dataclass(slots=True)
class MemoryUse:
    """One sample of a run's memory (proportional set sizes, bytes): the caller's own, and
    each worker's by its number."""

    taken_at: float  # time.monotonic
    caller: int
    workers: dict[int, int]
    cgroup: int | None = None  # under a budget: what the cgroup holds that cannot be reclaimed

    @property
    def total(self) -> int:
        return self.caller + sum(self.workers.values())

    @property
    def used(self) -> int:
        """What counts against a budget: the run's own, or its cgroup's when that is more
        (other processes there, memory PSS does not show)."""
        return max(self.total, self.cgroup or 0)

    @property
    def largest(self) -> int:
        return max(self.workers.values(), default=0)


@dataclass(slots=True)
class Running:
    """One item being run right now: for per-task deadlines."""

    worker: int
    chunk_id: int
    position: int
    started_at: float


# Where worker output goes: ``output(text, stream)`` with whole lines, stream "stdout"/"stderr".
Output = Callable[[str, str], None]


def print_through(text: str, stream: str) -> None:
    """The ``Output`` of a backend before its first call: straight to this process's stream."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()


class Backend(ABC):
    """A pool of workers. Created by ``backends.create``; one instance may serve several
    calls (``mt.Pool``)."""

    #: how many items can run at the same time
    slots: int
    #: whether ``kill`` really stops a running item (processes: yes; threads: abandoned)
    can_kill: bool = False
    #: whether ``running`` can only say when a whole chunk started (clusters), not each task:
    #: then a call with deadlines sends one task per chunk, or the first task's deadline
    #: would cover the whole chunk and a timeout could not be charged to one task
    times_chunks_only: bool = False

    @abstractmethod
    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        """Prepare for a call: start workers if needed and ship ``fn`` (called with one
        argument per task) to them. ``timed``: the call has per-task deadlines, so
        ``running`` must know when each task started. Raises ``TypeError`` when ``fn`` cannot
        be sent to the workers."""

    @abstractmethod
    def capacity(self) -> int:
        """How many more chunks may be submitted now without queueing behind a busy worker
        for long (each worker holds at most one running and one waiting chunk)."""

    def room(self) -> int | None:
        """The largest chunk a free worker may take now (``max_tasks_per_worker`` left to
        it), or ``None`` for no limit."""
        return None

    @abstractmethod
    def submit(self, chunk: Chunk) -> int | None:
        """Hand a chunk to a worker. Never blocks for long. Returns the bytes its arguments
        took to send (chunk sizes stay under a byte budget), or ``None`` when nothing is
        pickled or the backend does not know."""

    @abstractmethod
    def poll(self, timeout: float | None) -> Sequence[Event]:
        """Wait at most ``timeout`` seconds (``None``: until something happens) and return
        what happened. May return an empty list."""

    def running(self) -> list[Running]:
        """The items being run right now, with their start times (``time.monotonic``)."""
        return []

    def give_back(self) -> None:  # noqa: B027 - optional capability
        """Some worker is idle and no work is left to hand out: ask the busiest worker to
        return the unstarted tasks of its chunk (``GivenBack`` event), so they can be shared.
        Backends that cannot do this ignore it."""

    def stack(self, worker: int) -> str | None:
        """What ``worker``'s task is doing now (its Python stack), without stopping it;
        ``None`` where that cannot be known."""
        return None

    def kill(self, worker: int) -> None:  # noqa: B027 - optional capability
        """Stop ``worker`` now; its chunks come back in a ``Lost(killed=True)`` event."""

    def memory(self) -> MemoryUse | None:
        """The latest sample of the memory its workers use (taken in ``poll`` a few times a
        second when ``memory_limit`` is set), or ``None``: not measured."""
        return None

    @abstractmethod
    def end(self, *, abort: bool) -> None:
        """The call is over. ``abort``: stop every worker still running a chunk of it (its
        results are no longer wanted). Workers may be kept for the next call."""

    @abstractmethod
    def close(self, *, kill: bool = False) -> None:
        """Stop every worker and release every resource. Idempotent. ``kill``: do not wait
        for a graceful exit."""
