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

Time comes from an injectable ``clock`` so the policy is tested in milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Generator, Iterator
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


class Run:
    """Runs ``fn(*args)`` for every ``args`` of ``calls`` on ``backend``; iterate it for the
    results. ``describe(args)`` gives what ``TaskError.task`` shows."""

    def __init__(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        calls: Iterator[tuple[Any, ...]],
        *,
        total: int | None,
        ordered: bool,
        sizer: ChunkSizer,
        policy: Policy,
        progress: Progress,
        describe: Callable[[tuple[Any, ...]], Any],
        max_ahead: int | None,
        owns_backend: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.fn = fn
        self.calls = calls
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
        self.args: dict[int, tuple[Any, ...]] = {}  # unsettled tasks' arguments
        self.runs: dict[int, int] = {}  # runs that failed, per unsettled task (absent: none)
        self.bystander: dict[int, int] = {}
        # Tasks of a lost chunk whose culprit is unknown: each runs alone next time, so a
        # second death is charged to exactly one task.
        self.isolated: set[int] = set()
        self.chunks: dict[int, Chunk] = {}  # in flight
        self.pending: dict[int, set[int]] = {}  # chunk id -> its tasks not yet reported
        self.requeued: list[tuple[float, int]] = []  # heap of (not before, index)
        self.next_chunk_id = 0
        self.results: dict[int, Any] = {}  # settled, not yet released (ordered)
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
            self.backend.begin(self.fn, self._output)
            while True:
                # Fill first: pulling is what discovers the end of the input, and the check
                # below must see it (else we would wait for events that will never come).
                self._fill()
                released = self._release()
                if released:
                    yield released
                if self._finished():
                    break
                if self.exhausted and not self.requeued and self.backend.capacity() > 0:
                    self.backend.give_back()  # the tail: let idle workers share it
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

    def _finished(self) -> bool:
        return self.exhausted and not self.args and not self.results and not self.ready

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
            self.chunks[chunk.id] = chunk
            self.pending[chunk.id] = set(chunk.indices)
            self.backend.submit(chunk)

    def _next_chunk(self) -> Chunk | None:
        # Work still to hand out: what the input has left, and what came back to the queue.
        remaining = None
        if self.total is not None:
            remaining = max(0, self.total - self.pulled) + len(self.requeued)
        size = self.sizer.next_size(remaining)
        room = self.backend.room()
        if room is not None:
            size = min(size, room)
        indices: list[int] = []
        now = self.clock()
        while self.requeued and len(indices) < size and self.requeued[0][0] <= now:
            index = self.requeued[0][1]
            if index in self.isolated and indices:
                break
            indices.append(heapq.heappop(self.requeued)[1])
            if index in self.isolated:
                self.isolated.discard(index)
                break
        fresh = self._pull(size - len(indices))
        if fresh:
            indices.extend(range(self.pulled - len(fresh), self.pulled))
        if not indices:
            return None
        args = self.args
        chunk = Chunk(
            self.next_chunk_id,
            indices,
            fresh if len(fresh) == len(indices) else [args[i] for i in indices],
        )
        self.next_chunk_id += 1
        return chunk

    def _pull(self, wanted: int) -> list[tuple[Any, ...]]:
        """Take up to ``wanted`` new tasks from the input (fewer when ordered intake is too
        far ahead of release)."""
        if self.exhausted or wanted <= 0:
            return []
        if self.max_ahead is not None and self.ordered:
            wanted = min(wanted, self.max_ahead - (self.pulled - self.next_release))
            if wanted <= 0:
                return []
        fresh = list(itertools.islice(self.calls, wanted))
        first = self.pulled
        self.pulled += len(fresh)
        self.args.update(zip(range(first, self.pulled), fresh, strict=True))
        if len(fresh) < wanted:
            self.exhausted = True
            if self.total != self.pulled:
                self.total = self.pulled
                self.progress.set_total(self.pulled)
        return fresh

    # -- events ---------------------------------------------------------------------------

    def _on_completed(self, event: Completed) -> None:
        pending = self.pending.get(event.chunk_id)
        if pending is None:
            return  # the backend's contract rules this out; never count a task twice
        outcomes = event.outcomes
        reported = [outcome[0] for outcome in outcomes]
        if not pending.issuperset(reported):
            outcomes = [o for o in outcomes if o[0] in pending]
            reported = [outcome[0] for outcome in outcomes]
        pending.difference_update(reported)
        if not pending:
            del self.pending[event.chunk_id], self.chunks[event.chunk_id]
        self.sizer.observe(len(outcomes), event.busy_seconds)
        # The hot path: one dict operation per task, nothing else.
        args, failures = self.args, []
        if self.ordered:
            results = self.results
            for index, ok, value in outcomes:
                if ok:
                    results[index] = value
                    del args[index]
                else:
                    failures.append((index, value))
        else:
            ready = self.ready
            for index, ok, value in outcomes:
                if ok:
                    ready.append(value)
                    del args[index]
                else:
                    failures.append((index, value))
        done = len(outcomes) - len(failures)
        if done:
            self.completed += done
            self.progress.advance(done)
        for index, cause in failures:
            self._fail(index, cause)

    def _on_returned(self, event: Returned) -> None:
        pending = self.pending.get(event.chunk_id, set())
        for index in event.indices:
            if index in pending:
                pending.discard(index)
                heapq.heappush(self.requeued, (0.0, index))
        if not pending:
            self.pending.pop(event.chunk_id, None)
            self.chunks.pop(event.chunk_id, None)

    def _on_lost(self, event: Lost) -> None:
        for chunk_id in event.chunk_ids:
            chunk = self.chunks.pop(chunk_id, None)
            pending = self.pending.pop(chunk_id, set())
            if chunk is None:
                continue
            unfinished = [i for i in chunk.indices if i in pending]
            blamed = None
            # With no task known to be running, the suspects are the tasks of the chunk the
            # worker was on (the oldest it held); tasks of its waiting chunks never started.
            suspect = event.running is None and chunk_id == event.chunk_ids[0]
            if event.running is not None and event.running[0] == chunk_id:
                blamed = chunk.indices[event.running[1]]
            elif suspect and len(unfinished) > 1:
                self.isolated.update(unfinished)  # the culprit is one of them: run each alone
            for index in unfinished:
                if index == blamed:
                    self._fail(index, self._death_error(index, event))
                else:
                    self._requeue_unstarted(index, event, suspect=suspect)

    def _requeue_unstarted(self, index: int, event: Lost, *, suspect: bool) -> None:
        """An unfinished task of a lost worker that was not running when it went: run it
        again without using up an attempt. A suspect that keeps being lost is the culprit."""
        if suspect:
            self.bystander[index] = self.bystander.get(index, 0) + 1
            if self.bystander[index] > MAX_BYSTANDER_REQUEUES:
                self._fail(index, self._death_error(index, event))
                return
        heapq.heappush(self.requeued, (0.0, index))

    def _death_error(self, index: int, event: Lost) -> TaskError:
        task, attempts = self.describe(self.args[index]), self.runs.get(index, 0) + 1
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

    def _fail(self, index: int, cause: BaseException) -> None:
        """Apply the failure policy to a task that raised, crashed or timed out."""
        attempts = self.runs.get(index, 0) + 1
        if attempts <= self.policy.retries:
            self.runs[index] = attempts
            delay = self.policy.retry_delay * 2 ** (attempts - 1)
            heapq.heappush(self.requeued, (self.clock() + delay, index))
            self.progress.add_retried()
            return
        if isinstance(cause, TaskError):
            error = cause
            error.attempts = attempts
        else:
            task = self.describe(self.args[index])
            error = TaskError.from_cause(cause, index=index, task=task, attempts=attempts)
        self.failed.append(error)
        self.progress.add_failed()
        self.completed += 1
        self.progress.advance(1)
        if self.policy.errors == "raise":
            raise error
        self._settle(index, error)

    def _settle(self, index: int, value: Any) -> None:
        del self.args[index]
        self.runs.pop(index, None)
        self.bystander.pop(index, None)
        self.isolated.discard(index)
        if self.ordered:
            self.results[index] = value
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
            results, start = self.results, self.next_release
            end = start
            while end in results:
                end += 1
            self.next_release = end
            return [results.pop(i) for i in range(start, end)]
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
