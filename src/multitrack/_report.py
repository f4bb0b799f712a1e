"""The end-of-run report: what a call did, where its time went, what failed and why.

``Report`` is fed by the scheduler (``_run.Run``) as events arrive and keeps fixed-size
aggregates only (counters, a top-5 heap, one group per failure kind with its first traceback
and at most ``KEEP_INDICES`` indices), so its memory does not grow with the number of tasks and
its cost is a few operations per chunk::

    Completed span ──▶ completed(count, busy, worker)   (+ slowest, for a task timed alone)
    final failure  ──▶ failed(error)    grouped by (type, innermost frame of the user's code)
    retry / reuse  ──▶ counters
    end of call    ──▶ finish(outcome) ──▶ printed (10 s or more, failures, or log mode),
                                           given to report=, kept on the imap iterator

Times come from the workers' own measurements (the busy time of each chunk), so "tasks' own
work" is what the function cost, and the rest of the workers' time (start-up, waiting for
work, the tail where some workers had nothing left) is the price of running in parallel.
A task is timed alone only when its chunk held just it: automatic chunk sizes give a chunk of
its own to any task over about 0.1 s, so the slowest tasks are the ones measured.
"""

from __future__ import annotations

import heapq
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from multitrack._errors import (
    RemoteError,
    RemoteTraceback,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)
from multitrack._progress import LogProgress, NullProgress, Progress

if TYPE_CHECKING:
    from multitrack._budget import Budget

KEEP_INDICES = 20  # indices kept per failure group (the count is exact)
SLOWEST = 5
SLOW_ENOUGH = 0.05  # seconds: quicker tasks are not worth a line among the slowest
PRINT_AFTER = 10.0  # seconds: a run this long prints its report even without failures
_FRAME = re.compile(r'File "([^"]+)", line (\d+),? in (\S+)')  # tracebacks and faulthandler


class FailureGroup:
    """Failures of one kind at one place: ``count`` of them, the first in full."""

    __slots__ = (
        "count",
        "first_index",
        "first_task",
        "indices",
        "kind",
        "message",
        "traceback",
        "where",
    )

    def __init__(
        self, kind: str, where: str, message: str, first_index: int, first_task: str, tb: str
    ) -> None:
        self.kind = kind  # exception type
        self.where = where  # innermost frame of the user's code: "job.py:12 in load"
        self.message = message
        self.first_index = first_index
        self.first_task = first_task
        self.traceback = tb
        self.count = 0
        self.indices: list[int] = []  # at most KEEP_INDICES


class Report:
    """What one call did. ``str(report)`` is the text printed at the end of a run;
    ``report.to_json()`` the same as data.

    (Plain classes here, not dataclasses: every call makes a report, and the dataclass
    decorator alone cost milliseconds of the first call's imports.)

    Example:
        >>> import multitrack as mt
        >>> it = mt.imap(abs, [-1, -2, 3], progress=False)
        >>> list(it), it.report.succeeded, it.report.failed
        ([1, 2, 3], 3, 0)
    """

    def __init__(self, function: str, backend: str, workers: int, total: int | None) -> None:
        self.function = function
        self.backend = backend
        self.workers = workers
        self.total = total
        self.seconds = 0.0
        self.outcome = "running"
        self.succeeded = 0
        self.failed = 0
        self.failed_by_kind: Counter[str] = Counter()
        self.retried = 0
        self.reused = 0
        self.busy_seconds = 0.0  # the tasks' own time, measured in the workers
        self.busy_by_worker: dict[int, float] = {}
        self.tasks_by_worker: Counter[int] = Counter()
        self.startup_seconds = 0.0
        self.tail_seconds = 0.0  # from the last task sent to the last result
        self.groups: dict[tuple[str, str], FailureGroup] = {}
        self._slowest: list[tuple[float, int, str]] = []
        # memory_limit= given: peaks (bytes) and what was done about them; None: not measured
        self.memory: dict[str, int] | None = None

    def __repr__(self) -> str:
        return (
            f"Report({self.function!r}, {self.outcome}: {self.succeeded} ok, "
            f"{self.failed} failed, {self.seconds:.2f} s)"
        )

    # -- fed by the scheduler ----------------------------------------------------------------

    def completed(self, succeeded: int, busy: float, worker: int) -> None:
        self.busy_seconds += busy
        if worker >= 0:
            self.busy_by_worker[worker] = self.busy_by_worker.get(worker, 0.0) + busy
            self.tasks_by_worker[worker] += succeeded

    def timed_alone(self, index: int, task: Any, seconds: float) -> None:
        """Task ``index`` ran alone in ``seconds``: a candidate for the slowest."""
        entry = (seconds, index, _short(task))
        if len(self._slowest) < SLOWEST:
            heapq.heappush(self._slowest, entry)
        elif seconds > self._slowest[0][0]:
            heapq.heapreplace(self._slowest, entry)

    def failed_for_good(self, error: TaskError) -> None:
        kind = _kind(error)
        self.failed_by_kind[kind] += 1
        tb_text = _traceback_text(error)
        where, message = _where_and_what(error, tb_text)
        group = self.groups.get((kind, where))
        if group is None:
            group = self.groups[(kind, where)] = FailureGroup(
                kind, where, message, error.index, _short(error.task), tb_text
            )
        group.count += 1
        if len(group.indices) < KEEP_INDICES:
            group.indices.append(error.index)

    # -- the end ---------------------------------------------------------------------------

    def finish(
        self, outcome: str, counts: Progress, *, seconds: float, tail: float, startup: float
    ) -> None:
        """The call ended: the counts are the progress object's (their one owner)."""
        self.outcome, self.seconds, self.total = outcome, seconds, counts.total
        self.tail_seconds, self.startup_seconds = tail, startup
        self.failed, self.retried, self.reused = counts.failed, counts.retried, counts.reused
        self.succeeded = counts.completed - counts.failed - counts.reused

    def memory_seen(self, budget: Budget, *, retired: int, killed: int) -> None:
        """The run's memory (``memory_limit=``): its peaks, and the workers replaced."""
        self.memory = {
            "largest_worker": budget.peak_worker,
            "total": budget.peak_total,
            "workers_retired": retired,
            "workers_stopped": killed,
            "tasks_stopped_for_budget": budget.stops,
        }
        if budget.size is not None:
            self.memory["budget"] = budget.size.size

    @property
    def slowest(self) -> list[tuple[float, int, str]]:
        """(seconds, index, input) of the slowest tasks timed alone, the slowest first."""
        return sorted(self._slowest, reverse=True)

    def worth_printing(self, *, log_mode: bool) -> bool:
        return self.failed > 0 or log_mode or self.seconds >= PRINT_AFTER

    def to_json(self) -> str:
        """The report as JSON (``report="run.json"`` writes it there)."""
        import json  # only here: a report printed as text does not need it

        data = {
            "function": self.function,
            "backend": self.backend,
            "workers": self.workers,
            "total": self.total,
            "seconds": round(self.seconds, 3),
            "outcome": self.outcome,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_by_kind": dict(self.failed_by_kind),
            "retried": self.retried,
            "reused": self.reused,
            "busy_seconds": round(self.busy_seconds, 3),
            "busy_by_worker": {str(k): round(v, 3) for k, v in self.busy_by_worker.items()},
            "tasks_by_worker": {str(k): v for k, v in self.tasks_by_worker.items()},
            "startup_seconds": round(self.startup_seconds, 3),
            "tail_seconds": round(self.tail_seconds, 3),
            "memory": self.memory,
            "failures": [
                {
                    "type": g.kind,
                    "where": g.where,
                    "message": g.message,
                    "count": g.count,
                    "first_index": g.first_index,
                    "first_input": g.first_task,
                    "indices": g.indices,
                    "traceback": g.traceback,
                }
                for g in self.groups.values()
            ],
            "slowest": [
                {"index": i, "seconds": round(s, 3), "input": t} for s, i, t in self.slowest
            ],
        }
        return json.dumps(data, indent=2)

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def _lines(self) -> list[str]:
        count = f"{self.succeeded + self.failed + self.reused:,}"
        ended = "" if self.outcome == "done" else f", {self.outcome}"
        lines = [
            f"multitrack: {self.function} x {count} in {_duration(self.seconds)} on "
            f"{self.workers} workers ({self.backend}){ended}"
        ]
        # most first; a tie by name, not by which failure came first (timing)
        by_count = sorted(self.failed_by_kind.items(), key=lambda item: (-item[1], item[0]))
        kinds = ", ".join(f"{n} {kind}" for kind, n in by_count)
        failed = f"{self.failed:,} failed ({kinds})" if self.failed else "0 failed"
        lines.append(
            f"  {self.succeeded:,} ok · {failed} · {self.retried:,} retried · "
            f"{self.reused:,} reused"
        )
        lines.append("  " + self._time_line())
        if len(self.busy_by_worker) > 1:
            lines.append("  " + self._workers_line())
        if self.memory is not None:
            lines.append("  " + _memory_line(self.memory))
        for group in sorted(self.groups.values(), key=lambda g: -g.count):
            more = sorted(i for i in group.indices if i != group.first_index)
            also = f"; also {', '.join(map(str, more))}" if more else ""
            if group.count > len(group.indices):
                also += ", ..."
            at = f"  at {group.where}" if " in " in group.where else ""  # a crash has no place
            lines.append(
                f"  {group.count}x {group.kind}: {group.message}{at}  "
                f"first task {group.first_index} (input {group.first_task}){also}"
            )
        if self.groups:
            first = min(self.groups.values(), key=lambda g: g.first_index)
            lines.append(f"  first failure's traceback (task {first.first_index}):")
            lines.extend("    " + line for line in first.traceback.rstrip().splitlines())
        slowest = [entry for entry in self.slowest if entry[0] >= SLOW_ENOUGH]
        if slowest:
            slow = " · ".join(f"task {i} {s:.1f} s ({t})" for s, i, t in slowest)
            lines.append(f"  slowest: {slow}")
        return lines

    def _time_line(self) -> str:
        capacity = self.seconds * self.workers
        share = f" ({self.busy_seconds / capacity:.0%} of the workers' time)" if capacity else ""
        return (
            f"time: tasks' own work {_duration(self.busy_seconds)}{share} · start-up "
            f"{_duration(self.startup_seconds)} · tail {_duration(self.tail_seconds)}"
        )

    def _workers_line(self) -> str:
        parts = []
        busiest = sorted(self.busy_by_worker, key=lambda w: -self.busy_by_worker[w])[:8]
        for worker in sorted(busiest):
            busy = self.busy_by_worker[worker]
            share = f"{busy / self.seconds:.0%}" if self.seconds else "?"
            parts.append(f"#{worker} {share} ({self.tasks_by_worker[worker]:,} tasks)")
        return "workers: " + " · ".join(parts)


def _memory_line(memory: dict[str, int]) -> str:
    """``memory: largest worker 312 MB · 1.2 GB in all (peaks) · 3 workers replaced``."""
    from multitrack._memory import format_size

    line = (
        f"memory: largest worker {format_size(memory['largest_worker'])} · "
        f"{format_size(memory['total'])} in all (peaks)"
    )
    if "budget" in memory:
        line += f" of a {format_size(memory['budget'])} budget"
    retired, stopped = memory["workers_retired"], memory["workers_stopped"]
    if retired:
        line += f" · {retired} worker{'s' * (retired != 1)} replaced past the limit"
    if stopped:
        line += f" · {stopped} stopped past 1.5 x the limit"
    if memory["tasks_stopped_for_budget"]:
        line += f" · {memory['tasks_stopped_for_budget']} tasks stopped for the budget"
    return line


#: ``report=``: None (printed when worth it), True/False (always/never printed), a path (also
#: written there as JSON), or a callable (also given the ``Report``)
ReportOption = bool | str | os.PathLike[str] | Callable[[Report], Any] | None


def deliver(report: Report, option: ReportOption, progress: Progress) -> None:
    """Print ``report`` after the bar's last line when it is worth it (a long run, failures,
    or status lines; never with the bar off unless ``report=True``), and hand it to
    ``report=``."""
    silent = isinstance(progress, NullProgress)
    worth = report.worth_printing(log_mode=isinstance(progress, LogProgress))
    if option is True or (option is not False and not silent and worth):
        progress.write(str(report) + "\n", stream="stderr")
    if isinstance(option, str | os.PathLike):
        with open(option, "w", encoding="utf-8") as file:
            file.write(report.to_json())
    elif callable(option):
        option(report)


def _kind(error: TaskError) -> str:
    if type(error) is not TaskError:
        return type(error).__name__  # WorkerCrashed, TaskTimeout
    cause = error.__cause__
    if isinstance(cause, RemoteError):
        return cause.type_name
    return type(cause).__name__ if cause is not None else "TaskError"


def _traceback_text(error: TaskError) -> str:
    cause = error.__cause__
    remote = cause.__cause__ if cause is not None else None
    if isinstance(remote, RemoteTraceback):
        return remote.text
    if isinstance(cause, RemoteError) and cause.traceback_text:
        return cause.traceback_text
    stack = getattr(error, "stack", None)
    if stack:
        return str(stack)
    return str(error)


def _where_and_what(error: TaskError, tb_text: str) -> tuple[str, str]:
    """Where a failure happened and what it says, short: a crash by its signal or exit
    code, anything else by the innermost frame of the user's code."""
    if isinstance(error, WorkerCrashed):
        how = f"killed by {error.signal}" if error.signal else f"exited with {error.exitcode}"
        return how, f"its worker was {how}" if error.signal else f"its worker {how}"
    if isinstance(error, TaskTimeout):
        return _innermost_user_frame(tb_text), "timed out"
    cause = error.__cause__ if error.__cause__ is not None else error
    return _innermost_user_frame(tb_text), _short(str(cause))


def _innermost_user_frame(tb_text: str) -> str:
    """``"job.py:12 in load"``: the last frame of a traceback that is not multitrack's own nor
    Python's standard library (else the last frame, else ``"?"``)."""
    frames = _FRAME.findall(tb_text)
    for path, line, name in reversed(frames):
        normal = path.replace("\\", "/")
        if "/multitrack/" in normal or ("/lib/python3" in normal and "site-packages" not in normal):
            continue
        return f"{normal.rsplit('/', 1)[-1]}:{line} in {name}"
    if frames:
        path, line, name = frames[-1]
        return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line} in {name}"
    return "?"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def function_name(fn: Any) -> str:
    """How the report names the function (``Spread`` and ``partial`` unwrapped).

    Example:
        >>> import functools
        >>> function_name(functools.partial(round, ndigits=1))
        'round'
    """
    for _ in range(8):
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        inner = inner or getattr(fn, "fn", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
