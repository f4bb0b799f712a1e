"""One call, from the first task pulled to the last result released.

``Run`` is the only place where scheduling *policy* lives; backends only move chunks::

    input iterator ──pull lazily──▶ [retry queue] ──chunks──▶ backend.submit
                                                               │
    caller ◀── release (in order, or as completed) ◀── results buffer ◀── backend.poll events
                                                               │
                  deadlines (timeout) ──▶ backend.kill ────────┘   progress: on completion

Bounds that keep the promises:

* **Memory**: input is pulled only while the backend has room (each worker holds at most a
  running and a waiting chunk), and in ordered ``imap`` only while fewer than ``max_ahead``
  tasks sit between the oldest unreleased result and the newest task pulled; a slow first task
  therefore pauses intake instead of filling memory.
* **Waiting**: every ``poll`` has a timeout: the nearest task deadline, the progress bar's next
  refresh, or none when neither exists (the backend's wait still wakes on any death).
* **Blame**: a completion, a crash or a deadline is charged to exactly one task; the other
  unfinished tasks of a lost worker go back to the queue without using up their attempts.
* **Lifetime**: whatever ends the call (return, error, Ctrl-C, an ``imap`` closed or collected
  half-way), ``finally`` stops the workers still running its tasks.

Cost per task: on tiny tasks this loop *is* the overhead (profiled on 200,000 trivial calls:
a dict insert, a set update, an outcome tuple and a dict pop per task made the parent cost
1.5 µs a task, six times ``Pool.map``'s whole cost). Nothing here touches single tasks on
the common path now: fresh tasks go out as a ``range`` of indices with their argument list,
results come back as a list for a span of positions, are stored as one slice keyed by its
first index and released with ``list.extend``. Single tasks are handled one by one only
when they fail, are retried or are handed back.

Time comes from an injectable ``clock`` so the policy is tested in milliseconds.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from multitrack._chunks import ChunkSizer
from multitrack._errors import TaskError, TaskTimeout, WorkerCrashed, task_label
from multitrack._progress import NullProgress, Progress
from multitrack.backends._base import Backend, Chunk, Completed, Lost, Returned

# A task requeued this many times because the worker holding it died *between* tasks is
# treated as the cause (a death while unpickling its arguments looks exactly like that).
MAX_BYSTANDER_REQUEUES = 2


@dataclass
class Policy:
    """How failures are handled."""

    errors: str = "raise"  # "raise" | "return"
    retries: int = 0
    retry_delay: float = 0.0  # seconds before a retry, doubled on each further attempt
    timeout: float | None = None


class _Flight:
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
        self.unreported[first : first + count] = bytes(count)
        self.left -= count
        return True

    def unfinished(self) -> list[int]:
        """The positions not reported yet."""
        return [position for position, flag in enumerate(self.unreported) if flag]


class Run:
    """Runs ``fn(arg)`` for every ``arg`` of ``calls`` on ``backend``; iterate it for the
    results. ``describe(arg)`` gives what ``TaskError.task`` shows."""

    def __init__(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        calls: Iterable[Any],
        *,
        total: int | None,
        ordered: bool,
        sizer: ChunkSizer,
        policy: Policy,
        progress: Progress,
        describe: Callable[[Any], Any],
        max_ahead: int | None,
        owns_backend: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.fn = fn
        # A list or tuple (exactly: a subclass may iterate its own way) is read by index,
        # which, like builtin map's iterator, sees items appended meanwhile; anything else
        # through its iterator.
        exact = type(calls) in (list, tuple)
        self.sequence = calls if exact and isinstance(calls, (list, tuple)) else None
        self.calls = iter(calls)
        self.total = total
        self.ordered = ordered
        self.sizer = sizer
        self.policy = policy
        self.progress = progress
        self.describe = describe
        self.max_ahead = max_ahead
        self.owns_backend = owns_backend
        self.clock = clock

        self.pulled = 0  # tasks taken from the input so far
        self.exhausted = False
        # Every unsettled task is in exactly one of: a chunk in flight, the handed-back
        # queue, or the retry queue.
        self.flights: dict[int, _Flight] = {}  # chunk id -> chunk in flight
        # Runs of tasks a worker handed back unstarted (give_back), as (indices, arguments)
        # slices of their chunk: they go out again first, whole slices at a time. (Requeued
        # one task at a time, a tail of 20,000 trivial tasks cost the parent more than the
        # rest of the call: py-spy put half its samples in the heap and _Flight.take.)
        self.handed_back: collections.deque[tuple[Sequence[int], list[Any]]] = collections.deque()
        # Heap of (not before, index, arguments); an index is in it at most once, so the
        # arguments are never compared.
        self.requeued: list[tuple[float, int, Any]] = []
        self.runs: dict[int, int] = {}  # runs that failed, per unsettled task (absent: none)
        self.bystander: dict[int, int] = {}
        # Tasks of a lost chunk whose culprit is unknown: each runs alone next time, so a
        # second death is charged to exactly one task.
        self.isolated: set[int] = set()
        self.next_chunk_id = 0
        # Settled, not yet released (ordered): runs of consecutive results by first index.
        self.results: dict[int, list[Any]] = {}
        self.ready: list[Any] = []  # settled, not yet released (unordered)
        self.next_release = 0
        self.completed = 0
        self.failed: list[TaskError] = []
        self.over = False  # set once the call has ended, however it ended

    # -- the loop -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """The results one by one (what ``imap`` gives)."""
        batches = self.batches()
        try:
            for batch in batches:
                yield from batch
        finally:
            batches.close()  # an imap closed half-way stops its workers now, not at GC

    def batches(self) -> Generator[list[Any], None, None]:
        """The results in lists, as they become releasable (what ``map`` collects)."""
        outcome: Literal["done", "error", "interrupted"] = "error"
        try:
            self.backend.begin(self.fn, self._output, timed=self.policy.timeout is not None)
            while True:
                # Release, then fill, then wait. Releasing first reopens intake that the
                # ordered window (max_ahead) had paused; filling before the check below is
                # what discovers the end of the input. Either the other way round, and the
                # loop can wait for events when nothing is in flight: forever.
                released = self._release()
                self._fill()
                if released:
                    yield released
                if self._finished():
                    break
                if self.exhausted and not self._queued() and self.backend.capacity() > 0:
                    self.backend.give_back()  # the tail: let idle workers share it
                self._check_not_stalled()
                for event in self.backend.poll(self._wait_time()):
                    if isinstance(event, Completed):
                        self._on_completed(event)
                    elif isinstance(event, Lost):
                        self._on_lost(event)
                    else:
                        self._on_returned(event)
                self._enforce_deadlines()
                if self._due(self.progress.wakeup_in()):
                    self.progress.tick()
            outcome = "done"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            self._shutdown(outcome)

    def _shutdown(self, outcome: Literal["done", "error", "interrupted"]) -> None:
        self.over = True
        aborted = outcome != "done"
        try:
            self.backend.end(abort=aborted)
            if self.owns_backend:
                self.backend.close(kill=aborted)
        finally:
            if self.failed and not aborted and not isinstance(self.progress, NullProgress):
                self._summarize_failures()
            self.progress.close(outcome)

    def _check_not_stalled(self) -> None:
        """Workers free, nothing in flight, nothing queued, and yet not finished: no event
        can ever come. A scheduler bug, but raising beats waiting forever."""
        if not self.flights and not self._queued() and self.backend.capacity() > 0:
            raise RuntimeError(
                f"multitrack stalled: {self.pulled} tasks pulled, {self.next_release} "
                f"released, nothing running (exhausted={self.exhausted}); please report this"
            )

    def _finished(self) -> bool:
        return (
            self.exhausted
            and not self.flights
            and not self._queued()
            and not self.results
            and not self.ready
        )

    def _wait_time(self) -> float | None:
        waits = [self.progress.wakeup_in()]
        if self.policy.timeout is not None:
            now = self.clock()
            deadlines = [r.started_at + self.policy.timeout for r in self.backend.running()]
            waits.append(min(deadlines, default=now + self.policy.timeout) - now)
        if self.requeued and self.backend.capacity() > 0:
            waits.append(self.requeued[0][0] - self.clock())
        known = [w for w in waits if w is not None]
        return max(0.0, min(known)) if known else None

    @staticmethod
    def _due(wait: float | None) -> bool:
        return wait is not None and wait <= 0

    # -- feeding --------------------------------------------------------------------------

    def _fill(self) -> None:
        while self.backend.capacity() > 0:
            chunk = self._next_chunk()
            if chunk is None:
                return
            self.flights[chunk.id] = _Flight(chunk)
            sent = self.backend.submit(chunk)
            if sent is not None:
                self.sizer.observe_sent(len(chunk.indices), sent)

    def _next_chunk(self) -> Chunk | None:
        # Work still to hand out: what the input has left, and what came back to the queue.
        remaining = None
        if self.total is not None:
            remaining = max(0, self.total - self.pulled) + len(self.requeued)
            remaining += sum(len(indices) for indices, _ in self.handed_back)
        size = self.sizer.next_size(remaining)
        room = self.backend.room()
        if room is not None:
            size = min(size, room)
        if self.handed_back:
            return self._new_chunk(*self._take_handed_back(size))
        again = self._take_requeued(size)
        fresh = self._pull(size - len(again))
        if not again and not fresh:
            return None
        indices: Sequence[int] = range(self.pulled - len(fresh), self.pulled)
        args = fresh
        if again:
            indices = [index for index, _ in again] + list(indices)
            args = [arg for _, arg in again] + fresh
        return self._new_chunk(indices, args)

    def _new_chunk(self, indices: Sequence[int], args: list[Any]) -> Chunk:
        chunk = Chunk(self.next_chunk_id, indices, args)
        self.next_chunk_id += 1
        return chunk

    def _queued(self) -> bool:
        """Whether tasks wait to be sent again (handed back, or to be retried)."""
        return bool(self.handed_back or self.requeued)

    def _take_handed_back(self, size: int) -> tuple[Sequence[int], list[Any]]:
        """Up to ``size`` tasks from the first handed-back run, as (indices, arguments)."""
        indices, args = self.handed_back.popleft()
        if len(indices) > size:
            self.handed_back.appendleft((indices[size:], args[size:]))
            indices, args = indices[:size], args[:size]
        return indices, args

    def _take_requeued(self, size: int) -> list[tuple[int, Any]]:
        """Up to ``size`` (index, arguments) of the retry queue that are due; an isolated task
        goes alone."""
        taken: list[tuple[int, Any]] = []
        now = self.clock()
        while self.requeued and len(taken) < size and self.requeued[0][0] <= now:
            index = self.requeued[0][1]
            if index in self.isolated and taken:
                break
            _, _, args = heapq.heappop(self.requeued)
            taken.append((index, args))
            if index in self.isolated:
                self.isolated.discard(index)
                break
        return taken

    def _pull(self, wanted: int) -> list[Any]:
        """Take up to ``wanted`` new tasks from the input (fewer when ordered intake is too
        far ahead of release)."""
        if self.exhausted or wanted <= 0:
            return []
        if self.max_ahead is not None and self.ordered:
            wanted = min(wanted, self.max_ahead - (self.pulled - self.next_release))
            if wanted <= 0:
                return []
        if self.sequence is not None:  # a list is sliced: a third of islice's cost
            taken = self.sequence[self.pulled : self.pulled + wanted]
            fresh = taken if type(taken) is list else list(taken)
        else:
            fresh = list(itertools.islice(self.calls, wanted))
        self.pulled += len(fresh)
        if len(fresh) < wanted:
            self.exhausted = True
            if self.total != self.pulled:
                self.total = self.pulled
                self.progress.set_total(self.pulled)
        return fresh

    # -- events ---------------------------------------------------------------------------

    def _on_completed(self, event: Completed) -> None:
        flight = self.flights.get(event.chunk_id)
        if flight is None:
            return  # the backend's contract rules this out; never count a task twice
        first, values, errors = event.first, event.values, event.errors
        if not flight.take(first, len(values)):
            self._on_completed_item_by_item(flight, event)
            return
        if not flight.left:
            del self.flights[event.chunk_id]
        self.sizer.observe(len(values), event.busy_seconds)
        chunk = flight.chunk
        if errors:
            self._store_around(chunk, first, values, errors)
        else:
            self._store(chunk.indices, first, values)
        done = len(values) - len(errors)
        if done:
            self.completed += done
            self.progress.advance(done)
        for offset in sorted(errors):
            position = first + offset
            self._fail(chunk.indices[position], errors[offset], chunk.args[position])

    def _on_completed_item_by_item(self, flight: _Flight, event: Completed) -> None:
        """The slow path for an event that repeats positions already reported (which the
        backends rule out): settle only what is still open."""
        for offset, value in enumerate(event.values):
            position = event.first + offset
            if position < len(flight.unreported) and flight.unreported[position]:
                errors = {0: event.errors[offset]} if offset in event.errors else {}
                self._on_completed(Completed(event.chunk_id, position, [value], errors, 0.0))

    def _store_around(
        self, chunk: Chunk, first: int, values: list[Any], errors: dict[int, BaseException]
    ) -> None:
        """Store the results of a span, leaving out the items that failed."""
        start = 0
        for offset in sorted(errors):
            if offset > start:
                self._store(chunk.indices, first + start, values[start:offset])
            start = offset + 1
        if start < len(values):
            self._store(chunk.indices, first + start, values[start:])

    def _store(self, indices: Sequence[int], first: int, values: list[Any]) -> None:
        """Keep the results of positions ``first``, ... of a chunk until they are released."""
        if not self.ordered:
            self.ready.extend(values)
        elif isinstance(indices, range):
            self.results[indices[first]] = values
        else:
            for index, value in zip(indices[first : first + len(values)], values, strict=True):
                self.results[index] = [value]

    def _on_returned(self, event: Returned) -> None:
        flight = self.flights.get(event.chunk_id)
        if flight is None:
            return
        chunk = flight.chunk
        first, end = event.first, len(chunk.indices)
        if first < end and flight.take(first, end - first):
            self.handed_back.append((chunk.indices[first:end], chunk.args[first:end]))
        else:  # some of them were reported already (backends rule this out): one by one
            for position in range(first, end):
                if flight.take(position, 1):
                    one = slice(position, position + 1)
                    self.handed_back.append((chunk.indices[one], chunk.args[one]))
        if not flight.left:
            del self.flights[event.chunk_id]

    def _on_lost(self, event: Lost) -> None:
        for chunk_id in event.chunk_ids:
            flight = self.flights.pop(chunk_id, None)
            if flight is None:
                continue
            chunk, unfinished = flight.chunk, flight.unfinished()
            blamed, suspects = _culprit(event, chunk_id, unfinished)
            # The culprit is one of the suspects: each runs alone next time, so that a second
            # death is charged exactly.
            self.isolated.update(chunk.indices[position] for position in suspects)
            for position in unfinished:
                index, args = chunk.indices[position], chunk.args[position]
                if position == blamed:
                    self._fail(index, self._death_error(index, args, event), args)
                else:
                    self._requeue_unstarted(index, args, event, suspect=position in suspects)

    def _requeue_unstarted(self, index: int, args: Any, event: Lost, *, suspect: bool) -> None:
        """An unfinished task of a lost worker that was not running when it went: run it
        again without using up an attempt. A suspect that keeps being lost is the culprit."""
        if suspect:
            self.bystander[index] = self.bystander.get(index, 0) + 1
            if self.bystander[index] > MAX_BYSTANDER_REQUEUES:
                self._fail(index, self._death_error(index, args, event), args)
                return
        self._requeue(index, args, 0.0)

    def _requeue(self, index: int, args: Any, not_before: float) -> None:
        heapq.heappush(self.requeued, (not_before, index, args))

    def _death_error(self, index: int, args: Any, event: Lost) -> TaskError:
        task, attempts = self.describe(args), self.runs.get(index, 0) + 1
        if event.killed:
            what = (
                "its worker was stopped and replaced"
                if self.backend.can_kill
                else "it cannot be stopped: its thread was abandoned to finish in the background"
            )
            return TaskTimeout(
                f"{task_label(index, task)} timed out after {self.policy.timeout:g} s ({what})",
                index=index,
                task=task,
                attempts=attempts,
            )
        return WorkerCrashed.for_death(
            index=index, task=task, attempts=attempts, returncode=event.returncode, pid=event.pid
        )

    def _fail(self, index: int, cause: BaseException, args: Any) -> None:
        """Apply the failure policy to a task that raised, crashed or timed out."""
        attempts = self.runs.get(index, 0) + 1
        if attempts <= self.policy.retries:
            self.runs[index] = attempts
            delay = self.policy.retry_delay * 2 ** (attempts - 1)
            self._requeue(index, args, self.clock() + delay)
            self.progress.add_retried()
            return
        if isinstance(cause, TaskError):
            error = cause
            error.attempts = attempts
        else:
            task = self.describe(args)
            error = TaskError.from_cause(cause, index=index, task=task, attempts=attempts)
        self.failed.append(error)
        self.progress.add_failed()
        self.completed += 1
        self.progress.advance(1)
        if self.policy.errors == "raise":
            raise error
        self._settle(index, error)

    def _settle(self, index: int, value: Any) -> None:
        self.runs.pop(index, None)
        self.bystander.pop(index, None)
        self.isolated.discard(index)
        if self.ordered:
            self.results[index] = [value]
        else:
            self.ready.append(value)

    def _enforce_deadlines(self) -> None:
        timeout = self.policy.timeout
        if timeout is None:
            return
        now = self.clock()
        for running in self.backend.running():
            if now - running.started_at >= timeout:
                self.backend.kill(running.worker)

    # -- releasing ------------------------------------------------------------------------

    def _release(self) -> list[Any]:
        """Take the results that may be handed to the caller now."""
        if self.ordered:
            # The first run is returned as it is and the next ones are added to it: the
            # lists are this scheduler's own (one per result event), so nothing is copied
            # twice on the way to the caller.
            released = self.results.pop(self.next_release, None)
            if released is None:
                return []
            self.next_release += len(released)
            run = self.results.pop(self.next_release, None)
            while run is not None:
                released += run
                self.next_release += len(run)
                run = self.results.pop(self.next_release, None)
            return released
        batch, self.ready = self.ready, []
        self.next_release += len(batch)
        return batch

    # -- output ---------------------------------------------------------------------------

    def _output(self, text: str, stream: str) -> None:
        self.progress.write(text, stream="stderr" if stream == "stderr" else "stdout")

    def _summarize_failures(self) -> None:
        first = self.failed[0]
        self.progress.write(
            f"multitrack: {len(self.failed)} of {self.completed} tasks failed; their results "
            f"hold TaskError. First: {first}\n",
            stream="stderr",
        )


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
