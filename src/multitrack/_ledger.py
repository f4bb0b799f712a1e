"""Where every unsettled task is: the scheduler's ledger.

A task pulled from the input is *unsettled* until its result or its final ``TaskError`` is
stored for release (``_order``). While unsettled it is in exactly one of three places, and
``Ledger`` is the only owner of all three::

    pulled ──▶ in flight (a chunk sent to a worker, position not reported yet)
                  │  Completed ──▶ settled (or failed: retry heap / settled as TaskError)
                  │  GivenBack  ──▶ given back ──▶ in flight again (whole slices)
                  │  Lost      ──▶ blamed (failed) / retry heap (bystanders, suspects)
               retry heap (not before t) ──▶ in flight again

It also keeps what blame needs across attempts: the runs that failed per task (attempts),
how often a task was lost while merely queued on a dying worker (``bystander``; past
``MAX_BYSTANDER_REQUEUES`` it is taken for the culprit), and the tasks that must run alone
(``isolated``: the culprit of a death was one of them, so the next death is charged exactly).
``unsettled`` lists every place's indices so tests can assert the invariant after every
event (``tests/test_run_unit.py``).
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Sequence
from typing import Any

from multitrack.backends._base import Chunk, Completed, GivenBack, Lost

# A task requeued this many times because the worker holding it died *between* tasks is
# treated as the cause (a death while unpickling its arguments looks exactly like that).
MAX_BYSTANDER_REQUEUES = 2


class _InFlight:
    """A chunk in flight, and which of its positions have not been reported yet."""

    __slots__ = ("chunk", "left", "unreported")

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.left = len(chunk.indices)
        self.unreported = bytearray(b"\x01") * self.left  # one byte per position

    def take(self, first: int, count: int) -> bool:
        """Mark positions ``first``... as reported; ``False`` (and nothing marked) when one
        of them was reported already."""
        end = first + count
        if end > len(self.unreported) or self.unreported.find(0, first, end) != -1:
            return False
        self.unreported[first:end] = bytes(count)
        self.left -= count
        return True

    def unfinished(self) -> list[int]:
        """The positions not reported yet."""
        return [position for position, flag in enumerate(self.unreported) if flag]


class Ledger:
    """The unsettled tasks of one call (see the module docstring)."""

    def __init__(self) -> None:
        self._flights: dict[int, _InFlight] = {}  # chunk id -> chunk in flight
        # Runs of tasks a worker given back unstarted, as (indices, arguments) slices of
        # their chunk: they go out again first, whole slices at a time.
        self._given_back: collections.deque[tuple[Sequence[int], list[Any]]] = collections.deque()
        # Heap of (not before, index, arguments); an index is in it at most once, so the
        # arguments are never compared.
        self._requeued: list[tuple[float, int, Any]] = []
        self._failed_runs: dict[int, int] = {}  # runs that failed, per unsettled task
        self._bystander: dict[int, int] = {}
        self._isolated: set[int] = set()
        self._next_chunk_id = 0

    # -- what is where ------------------------------------------------------------------------

    def in_flight(self) -> bool:
        return bool(self._flights)

    def in_flight_count(self) -> int:
        """Chunks in flight."""
        return len(self._flights)

    def queued(self) -> bool:
        """Whether tasks wait to be sent again (given back, or to be retried)."""
        return bool(self._given_back or self._requeued)

    def queued_count(self) -> int:
        return len(self._requeued) + sum(len(indices) for indices, _ in self._given_back)

    def next_retry_at(self) -> float | None:
        return self._requeued[0][0] if self._requeued else None

    def task_at(self, chunk_id: int, position: int) -> tuple[int, Any] | None:
        """(index, arguments) of the task at ``position`` of a chunk in flight, if it is
        still unsettled there."""
        flight = self._flights.get(chunk_id)
        if flight is None or not 0 <= position < len(flight.unreported):
            return None
        if not flight.unreported[position]:
            return None
        return flight.chunk.indices[position], flight.chunk.args[position]

    def attempts(self, index: int) -> int:
        """Runs of task ``index`` so far, counting the one just finished."""
        return self._failed_runs.get(index, 0) + 1

    def unsettled(self) -> list[int]:
        """Every unsettled index, once per place it is in (the invariant: no repeats)."""
        places = [
            flight.chunk.indices[position]
            for flight in self._flights.values()
            for position in flight.unfinished()
        ]
        places += [index for indices, _ in self._given_back for index in indices]
        places += [index for _, index, _ in self._requeued]
        return places

    # -- sending --------------------------------------------------------------------------

    def new_chunk(self, indices: Sequence[int], args: list[Any]) -> Chunk:
        """A chunk of these tasks, now in flight."""
        chunk = Chunk(self._next_chunk_id, indices, args)
        self._next_chunk_id += 1
        self._flights[chunk.id] = _InFlight(chunk)
        return chunk

    def take_given_back(self, size: int) -> tuple[Sequence[int], list[Any]] | None:
        """Up to ``size`` tasks of the first given-back run, as (indices, arguments)."""
        if not self._given_back:
            return None
        indices, args = self._given_back.popleft()
        if len(indices) > size:
            self._given_back.appendleft((indices[size:], args[size:]))
            indices, args = indices[:size], args[:size]
        return indices, args

    def take_requeued(self, size: int, now: float) -> list[tuple[int, Any]]:
        """Up to ``size`` (index, arguments) of the retry heap that are due; an isolated task
        goes alone."""
        taken: list[tuple[int, Any]] = []
        heap = self._requeued
        while heap and len(taken) < size and heap[0][0] <= now:
            index = heap[0][1]
            if index in self._isolated and taken:
                break
            _, _, args = heapq.heappop(heap)
            taken.append((index, args))
            if index in self._isolated:
                self._isolated.discard(index)
                break
        return taken

    def requeue(self, index: int, args: Any, not_before: float) -> None:
        heapq.heappush(self._requeued, (not_before, index, args))

    def retry(self, index: int, args: Any, not_before: float) -> None:
        """Task ``index`` failed and runs again (one more attempt used)."""
        self._failed_runs[index] = self.attempts(index)
        self.requeue(index, args, not_before)

    def settled(self, index: int) -> None:
        """Task ``index`` is settled: forget what blame kept about it."""
        self._failed_runs.pop(index, None)
        self._bystander.pop(index, None)
        self._isolated.discard(index)

    def ran_without_dying(self, indices: Sequence[int], first: int, count: int) -> None:
        """Tasks ``indices[first:first + count]`` finished (a value or an exception) and their
        worker lived: none of them caused a death they were suspected of (nothing done per
        task, not even a slice, unless a worker died in this call)."""
        if self._bystander or self._isolated:
            for index in indices[first : first + count]:
                self._bystander.pop(index, None)
                self._isolated.discard(index)

    def isolate(self, index: int) -> None:
        """Task ``index`` killed its worker: if it runs again, it runs alone, so that a
        second death is charged to it and to nobody else."""
        self._isolated.add(index)

    def remembers_failures(self) -> bool:
        """Whether some task of this call failed and is being run again."""
        return bool(self._failed_runs)

    def succeeded(self, indices: Sequence[int]) -> None:
        """Tasks ``indices`` succeeded: forget their failed runs (``ran_without_dying``
        already forgot their suspicion)."""
        for index in indices:
            self._failed_runs.pop(index, None)

    # -- events ---------------------------------------------------------------------------

    def completed(self, event: Completed) -> list[tuple[Chunk, Completed]]:
        """Account for ``event``: (its chunk, the event to apply), or, when it repeats
        positions already reported (which the backends rule out), one such pair per
        position still open; nothing for a chunk not in flight."""
        flight = self._flights.get(event.chunk_id)
        if flight is None:
            return []
        chunk = flight.chunk
        if flight.take(event.first, len(event.values)):
            applied = [(chunk, event)]
        else:
            applied = []
            for offset, value in enumerate(event.values):
                position = event.first + offset
                if flight.take(position, 1):
                    errors = {0: event.errors[offset]} if offset in event.errors else {}
                    one = Completed(event.chunk_id, position, [value], errors, 0.0)
                    applied.append((chunk, one))
        if not flight.left:
            del self._flights[event.chunk_id]
        return applied

    def given_back(self, event: GivenBack) -> None:
        """A worker given back the tasks of a chunk from ``event.first`` on."""
        flight = self._flights.get(event.chunk_id)
        if flight is None:
            return
        chunk = flight.chunk
        first, end = event.first, len(chunk.indices)
        if first < end and flight.take(first, end - first):
            self._given_back.append((chunk.indices[first:end], chunk.args[first:end]))
        else:  # some of them were reported already (backends rule this out): one by one
            for position in range(first, end):
                if flight.take(position, 1):
                    one = slice(position, position + 1)
                    self._given_back.append((chunk.indices[one], chunk.args[one]))
        if not flight.left:
            del self._flights[event.chunk_id]

    def lost(self, event: Lost) -> list[tuple[int, Any]]:
        """A worker died with chunks: requeue their unfinished tasks, without using an
        attempt, except those to blame for the death: returned as (index, arguments)."""
        blamed: list[tuple[int, Any]] = []
        for chunk_id in event.chunk_ids:
            flight = self._flights.pop(chunk_id, None)
            if flight is None:
                continue
            chunk, unfinished = flight.chunk, flight.unfinished()
            culprit, suspects = _culprit(event, chunk_id, unfinished)
            # The culprit is one of the suspects: each runs alone next time, so that a second
            # death is charged exactly.
            self._isolated.update(chunk.indices[position] for position in suspects)
            for position in unfinished:
                index, args = chunk.indices[position], chunk.args[position]
                if position == culprit or (position in suspects and self._lost_too_often(index)):
                    blamed.append((index, args))
                else:
                    self.requeue(index, args, 0.0)
        return blamed

    def _lost_too_often(self, index: int) -> bool:
        """A suspect that keeps being lost is the culprit."""
        self._bystander[index] = self._bystander.get(index, 0) + 1
        return self._bystander[index] > MAX_BYSTANDER_REQUEUES


def _culprit(event: Lost, chunk_id: int, unfinished: list[int]) -> tuple[int | None, set[int]]:
    """Of the unfinished positions of a lost worker's chunk: the one to blame for the death,
    or else the suspects (none when the chunk was only waiting)."""
    if event.running is None:
        # No task known to be running: the suspects are the tasks of the chunk the worker
        # was on (the oldest it held); tasks of its waiting chunks never started.
        return None, set(unfinished) if chunk_id == event.chunk_ids[0] else set()
    running_chunk, position = event.running
    if running_chunk != chunk_id:
        return None, set()
    if event.span == 1:
        return position, set()
    # It was running a block of quick tasks: any unfinished one of the block may be it.
    return None, {p for p in unfinished if position <= p < position + event.span}
