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

Who owns what: ``Run`` owns the loop and the failure policy; ``_ledger.Ledger`` owns where
every unsettled task is (in flight, given back, in the retry heap) and the blame kept across
attempts; ``_order.Release`` owns settled results until they are released; the progress
object owns the counts the bar and the summary show. Why nothing here touches single tasks
on the common path: docs/performance.md. With ``memory_limit``, ``_budget.Budget`` decides
what the run's memory allows (``_memory_step``, ``_fill``) and ``Run`` acts on it.

Time comes from an injectable ``clock`` so the policy is tested in milliseconds.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multitrack._chunks import ChunkSizer
from multitrack._errors import (
    MemoryLimitExceeded,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    task_label,
)
from multitrack._ledger import MAX_BYSTANDER_REQUEUES, Ledger
from multitrack._order import Release
from multitrack._progress import Outcome, Progress
from multitrack._report import Report, ReportOption, deliver, function_name
from multitrack._stuck import CHECK_EVERY, Stuck
from multitrack.backends._base import Backend, Chunk, Completed, GivenBack, Lost

if TYPE_CHECKING:  # sqlite3 and the journal are imported by calls with checkpoint= only
    from multitrack._budget import Budget
    from multitrack._resume import Resume

__all__ = ["MAX_BYSTANDER_REQUEUES", "Checkpoint", "Policy", "Run"]


@dataclass
class Policy:
    """How failures are handled."""

    errors: str = "raise"  # "raise" | "return"
    retries: int = 0
    retry_delay: float = 0.0  # seconds before a retry, doubled on each further attempt
    timeout: float | None = None


@dataclass
class Checkpoint:
    """``checkpoint=``, ``key=`` and ``on_change=`` of one call (see ``_resume``)."""

    path: str | os.PathLike[str]
    key: Callable[[Any], Any] | None = None
    on_change: str = "keep"


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
        checkpoint: Checkpoint | None = None,
        report: ReportOption = None,
        backend_name: str = "process",
        clock: Callable[[], float] = time.monotonic,
        memory: Budget | None = None,
    ) -> None:
        self.backend = backend
        self.fn = fn
        # A list or tuple (exactly: a subclass may iterate its own way) is read by index,
        # which, like builtin map's iterator, sees items appended meanwhile; anything else
        # through its iterator.
        exact = type(calls) in (list, tuple)
        self.sequence = calls if exact and isinstance(calls, (list, tuple)) else None
        self.calls = iter(calls)
        self.sizer = sizer
        self.policy = policy
        self.progress = progress  # owns the counts and the total
        progress.set_total(total)
        self.describe = describe
        self.max_ahead = max_ahead
        self.owns_backend = owns_backend
        self.clock = clock
        self.memory = memory  # memory_limit= given: the run's memory, and its budget

        self.pulled = 0  # tasks taken from the input so far
        self.exhausted = False
        self.ledger = Ledger()  # where every unsettled task is
        self.order = Release(ordered=ordered)  # settled results until they are released
        self.checkpoint = checkpoint
        self.resume: Resume | None = None  # the journal, once the call starts
        self.stuck = self._make_stuck()
        self.report = Report(function_name(fn), backend_name, backend.slots, total)
        self.report_option = report
        self.started_at = clock()
        self.last_sent_at = self.started_at
        self.startup_before = getattr(backend, "startup_seconds", 0.0)
        self.memory_actions_before = getattr(backend, "memory_actions", (0, 0))
        self.over = False  # set once the call has ended, however it ended

    # -- the loop -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """The results one by one (what ``imap`` gives)."""
        batches = self.batches()
        try:
            for batch in batches:
                yield from batch
        except (TaskError, KeyboardInterrupt) as stopped:
            stopped.results = self.order.held()  # type: ignore[union-attr]  # not yielded yet
            if isinstance(stopped, KeyboardInterrupt):  # the user's own: their line, not ours
                raise stopped.with_traceback(None) from None
            raise
        finally:
            batches.close()  # an imap closed half-way stops its workers now, not at GC

    def batches(self) -> Generator[list[Any], None, None]:
        """The results in lists, as they become releasable (what ``map`` collects)."""
        outcome: Outcome = "error"
        try:
            self.stuck.install()
            self.backend.begin(self.fn, self._output, timed=self.policy.timeout is not None)
            self._open_journal()  # while the workers start (its imports and open: ~10 ms)
            while True:
                # Release, then fill, then wait. Releasing first reopens intake that the
                # ordered window (max_ahead) had paused; filling before the check below is
                # what discovers the end of the input. Either the other way round, and the
                # loop can wait for events when nothing is in flight: forever.
                released = self.order.release()
                self._fill()
                if released:
                    yield released
                if self._finished():
                    break
                if self.order.releasable():
                    continue  # tasks settled from a checkpoint's journal while filling
                if self.exhausted and not self.ledger.queued() and self.backend.capacity() > 0:
                    self.backend.give_back()  # the tail: let idle workers share it
                self._check_not_stalled()
                self._dispatch(self.backend.poll(self._wait_time()))
                if self.resume is not None:
                    self.resume.commit_due()
                self._enforce_deadlines()
                if self.memory is not None:
                    self._memory_step(self.memory)
                self.stuck.step()
                if self._due(self.progress.wakeup_in()):
                    self.progress.tick()
            outcome = "done"
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        except GeneratorExit:  # the caller closed its imap: nothing failed
            outcome = "closed"
            raise
        finally:
            self._shutdown(outcome)

    def _dispatch(self, events: Sequence[Completed | Lost | GivenBack]) -> None:
        for event in events:
            if isinstance(event, Completed):
                for chunk, applied in self.ledger.completed(event):
                    self._on_completed(chunk, applied)
            elif isinstance(event, Lost):
                stopped = self.memory is not None and self.memory.was_stopped(event.worker)
                for index, args in self.ledger.lost(event):
                    self.ledger.isolate(index)
                    if stopped and self._stopped_for_memory(index, args):
                        continue
                    self._fail(index, self._death_error(index, args, event, stopped), args)
            else:
                self.ledger.given_back(event)

    def _shutdown(self, outcome: Outcome) -> None:
        self.over = True
        self.stuck.uninstall()
        aborted = outcome != "done"
        try:
            self.backend.end(abort=aborted)
            if self.owns_backend:
                self.backend.close(kill=aborted)
        finally:
            try:
                if self.resume is not None:
                    self.resume.close()  # everything finished is stored, however it ended
            finally:
                self.progress.close(outcome)
                self._finish_report(outcome)

    def _finish_report(self, outcome: str) -> None:
        now = self.clock()
        self.report.finish(
            outcome,
            self.progress,
            seconds=now - self.started_at,
            tail=max(0.0, now - self.last_sent_at),
            startup=getattr(self.backend, "startup_seconds", 0.0) - self.startup_before,
        )
        if self.memory is not None:
            retired, killed = getattr(self.backend, "memory_actions", (0, 0))
            before = self.memory_actions_before
            self.report.memory_seen(
                self.memory, retired=retired - before[0], killed=killed - before[1]
            )
        deliver(self.report, self.report_option, self.progress)

    def _make_stuck(self) -> Stuck:
        return Stuck(
            self.backend,
            self.ledger.task_at,
            self.describe,
            lambda: self.sizer.per_task,
            lambda text: self.progress.write(text, stream="stderr"),
            self.progress.set_status,
            self.clock,
        )

    def _open_journal(self) -> None:
        spec = self.checkpoint
        if spec is None:
            return
        from multitrack._resume import Resume

        self.resume = Resume(
            spec.path,
            self.fn,
            key=spec.key,
            describe=self.describe,
            on_change=spec.on_change,
            say=lambda text: self.progress.write(text + "\n", stream="stderr"),
        )

    def _check_not_stalled(self) -> None:
        """Workers free, nothing in flight, nothing queued, and yet not finished: no event
        can ever come. A scheduler bug, but raising beats waiting forever."""
        ledger = self.ledger
        if not ledger.in_flight() and not ledger.queued() and self.backend.capacity() > 0:
            raise RuntimeError(
                f"multitrack stalled: {self.pulled} tasks pulled, {self.order.released} "
                f"released, nothing running (exhausted={self.exhausted}); please report this"
            )

    def _finished(self) -> bool:
        ledger = self.ledger
        return (
            self.exhausted
            and not ledger.in_flight()
            and not ledger.queued()
            and not self.order.holding()
        )

    def _wait_time(self) -> float | None:
        waits = [self.progress.wakeup_in()]
        if self.policy.timeout is not None:
            now = self.clock()
            deadlines = [r.started_at + self.policy.timeout for r in self.backend.running()]
            waits.append(min(deadlines, default=now + self.policy.timeout) - now)
        retry_at = self.ledger.next_retry_at()
        if retry_at is not None and self.backend.capacity() > 0:
            waits.append(retry_at - self.clock())
        if self.stuck.installed:
            waits.append(CHECK_EVERY)  # a dump asked for by SIGUSR1 comes within a second
        known = [w for w in waits if w is not None]
        return max(0.0, min(known)) if known else None

    @staticmethod
    def _due(wait: float | None) -> bool:
        return wait is not None and wait <= 0

    # -- feeding --------------------------------------------------------------------------

    def _fill(self) -> None:
        memory = self.memory
        while self.backend.capacity() > 0:
            if memory is not None and not memory.may_start(self.ledger.in_flight_count()):
                return
            chunk = self._next_chunk()
            if chunk is None:
                return
            sent = self.backend.submit(chunk)
            self.last_sent_at = self.clock()
            if sent is not None:
                self.sizer.observe_sent(len(chunk.indices), sent)

    def _next_chunk(self) -> Chunk | None:
        # Work still to hand out: what the input has left, and what came back to the queue.
        ledger = self.ledger
        total = self.progress.total
        remaining = None
        if total is not None:
            remaining = max(0, total - self.pulled) + ledger.queued_count()
        size = self.sizer.next_size(remaining)
        room = self.backend.room()
        if room is not None:
            size = min(size, room)
        given_back = ledger.take_given_back(size)
        if given_back is not None:
            return ledger.new_chunk(*given_back)
        again = ledger.take_requeued(size, self.clock())
        indices, fresh = self._pull_to_run(size - len(again))
        if not again and not fresh:
            return None
        args = fresh
        if again:
            indices = [index for index, _ in again] + list(indices)
            args = [arg for _, arg in again] + fresh
        return ledger.new_chunk(indices, args)

    def _pull_to_run(self, wanted: int) -> tuple[Sequence[int], list[Any]]:
        """Up to ``wanted`` new tasks to send, as (indices, arguments). With a checkpoint,
        tasks whose results the journal holds are settled here instead; pulling goes on
        until something is left to send or the input (or the ordered window) ends."""
        fresh = self._pull(wanted)
        resume = self.resume
        if resume is None:
            return range(self.pulled - len(fresh), self.pulled), fresh
        while True:
            indices, todo, reused = resume.split(self.pulled - len(fresh), fresh)
            for index, value in reused:
                self.order.store_one(index, value)
            if reused:
                self.progress.add_reused(len(reused))
            if todo or not fresh:
                return indices, todo
            fresh = self._pull(wanted)

    def _pull(self, wanted: int) -> list[Any]:
        """Take up to ``wanted`` new tasks from the input (fewer when ordered intake is too
        far ahead of release)."""
        if self.exhausted or wanted <= 0:
            return []
        if self.max_ahead is not None and self.order.ordered:
            wanted = min(wanted, self.max_ahead - (self.pulled - self.order.released))
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
            if self.progress.total != self.pulled:
                self.progress.set_total(self.pulled)
        return fresh

    # -- events ---------------------------------------------------------------------------

    def _on_completed(self, chunk: Chunk, event: Completed) -> None:
        first, values, errors = event.first, event.values, event.errors
        self.sizer.observe(len(values), event.busy_seconds)
        self.ledger.ran_without_dying(chunk.indices, first, len(values))
        if self.memory is not None and self.memory.alone:
            self.memory.settled(chunk.indices[first : first + len(values)])
        if errors:
            self._store_around(chunk, first, values, errors)
        else:
            self.order.store(chunk.indices, first, values)
        done = len(values) - len(errors)
        self.report.completed(done, event.busy_seconds, event.worker)
        if len(chunk.indices) == 1 and done:  # a task alone in its chunk: its own time
            index = chunk.indices[first]
            self.report.timed_alone(index, self.describe(chunk.args[first]), event.busy_seconds)
        if done:
            self.progress.advance(done)
            # Per task only when it matters: a retried task succeeded.
            if self.ledger.remembers_failures():
                self.ledger.succeeded(_succeeded(chunk.indices, first, values, errors))
            if self.resume is not None:  # a span a time: docs/performance.md
                end = first + len(values)
                args = (
                    chunk.args if first == 0 and end == len(chunk.args) else chunk.args[first:end]
                )
                seconds = event.busy_seconds / len(values)
                indices = chunk.indices[first:end]
                self.resume.record(indices, args, values, errors, event.pickled, seconds)
        for offset in sorted(errors):
            position = first + offset
            self._fail(chunk.indices[position], errors[offset], chunk.args[position])

    def _store_around(
        self, chunk: Chunk, first: int, values: list[Any], errors: dict[int, BaseException]
    ) -> None:
        """Store the results of a span, leaving out the items that failed."""
        start = 0
        for offset in sorted(errors):
            if offset > start:
                self.order.store(chunk.indices, first + start, values[start:offset])
            start = offset + 1
        if start < len(values):
            self.order.store(chunk.indices, first + start, values[start:])

    def _death_error(self, index: int, args: Any, event: Lost, stopped: bool = False) -> TaskError:
        task, attempts = self.describe(args), self.ledger.attempts(index)
        if event.memory is not None or stopped:
            return self._memory_error(index, task, attempts, event)
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
                stack=event.stack,
            )
        return WorkerCrashed.for_death(
            index=index,
            task=task,
            attempts=attempts,
            returncode=event.returncode,
            pid=event.pid,
            oom=event.oom,
        )

    # -- memory (memory_limit=) ---------------------------------------------------------

    def _memory_step(self, memory: Budget) -> None:
        """A new sample of the run's memory: show it; under a budget, stop the newest task
        when the run is about to outgrow it (its loss comes back at the next poll)."""
        if not memory.observe(self.backend.memory()):
            return
        self.progress.set_memory(memory.bar_text())
        worker = memory.decide(self.backend.running())
        if worker is not None:
            self.backend.kill(worker)

    def _stopped_for_memory(self, index: int, args: Any) -> bool:
        """Task ``index`` was stopped to keep the run inside its budget: ``True`` when it is
        requeued (no attempt used), ``False`` when it fails (it was stopped running alone)."""
        assert self.memory is not None
        if not self.memory.stopped(index):
            return False
        self.ledger.requeue(index, args, self.clock())
        self.progress.add_retried()
        return True

    def _memory_error(self, index: int, task: Any, attempts: int, event: Lost) -> TaskError:
        from multitrack._memory import format_size

        if event.memory is not None:
            limit, reached = event.memory
            what = (
                f"its worker (pid {event.pid}) grew to {format_size(reached)}, past 1.5 x "
                f"memory_limit={format_size(limit)}, and was stopped"
            )
        else:
            assert self.memory is not None and self.memory.size is not None
            limit, reached = self.memory.exceeded()
            what = (
                f"it was stopped {self.memory.stopped_times(index)} times, the last one running "
                f"alone, as the run reached {format_size(reached)} of its "
                f"{format_size(limit)} budget (memory_limit='auto': {self.memory.size.source})"
            )
        message = f"{task_label(index, task)}: {what}"
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        return MemoryLimitExceeded(
            message, index=index, task=task, attempts=attempts, limit=limit, reached=reached
        )

    def _fail(self, index: int, cause: BaseException, args: Any) -> None:
        """Apply the failure policy to a task that raised, crashed or timed out."""
        attempts = self.ledger.attempts(index)
        if attempts <= self.policy.retries:
            delay = self.policy.retry_delay * 2 ** (attempts - 1)
            self.ledger.retry(index, args, self.clock() + delay)
            self.progress.add_retried()
            return
        if isinstance(cause, TaskError):
            error = cause
            error.attempts = attempts
        else:
            task = self.describe(args)
            error = TaskError.from_cause(cause, index=index, task=task, attempts=attempts)
        if self.resume is not None:
            self.resume.record_failure(index, error, args)
        self.report.failed_for_good(error)
        self.progress.add_failed()
        self.progress.advance(1)
        if self.policy.errors == "raise":
            raise error
        self.ledger.settled(index)
        if self.memory is not None:
            self.memory.settled((index,))
        self.order.store_one(index, error)

    def _enforce_deadlines(self) -> None:
        timeout = self.policy.timeout
        if timeout is None:
            return
        now = self.clock()
        for running in self.backend.running():
            if now - running.started_at >= timeout:
                self.backend.kill(running.worker)

    # -- output ---------------------------------------------------------------------------

    def _output(self, text: str, stream: str) -> None:
        self.progress.write(text, stream="stderr" if stream == "stderr" else "stdout")


def _succeeded(
    indices: Sequence[int], first: int, values: list[Any], errors: dict[int, BaseException]
) -> Sequence[int]:
    """The indices of the tasks of a span that succeeded."""
    if not errors:
        return indices[first : first + len(values)]
    return [indices[first + k] for k in range(len(values)) if k not in errors]
