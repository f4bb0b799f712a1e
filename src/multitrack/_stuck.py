"""What a run that "seems stuck" is doing: the oldest running task on the bar, and on demand
every running task's input, age and stack.

``Stuck`` is driven by the scheduler (``_run.Run``), once per loop, and asks the backend and
the ledger what runs where; it keeps no copy of either::

    kill -USR1 <caller's pid> ──▶ handler: a flag ──▶ next step: dump every running task
                                                      (input, age, its worker's stack) to stderr
    every step, at most once a second ──▶ the oldest running task, when it has run far
                                          longer than tasks usually take ──▶ on the bar:
                                          "task 17 running 45 s"

The signal handler is installed only in the main thread and only where SIGUSR1 has its
default action (which would kill the process): a handler of the caller's own is never
replaced. It is put back when the call ends. While it is installed the scheduler's wait is
bounded to a second, so a dump comes within a second even when nothing else wakes the loop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from multitrack._errors import task_label
from multitrack.backends._base import Backend

DUMP_SIGNAL = signal.SIGUSR1
LONG_FACTOR = 10.0  # a task running this many times the usual time is shown on the bar
LONG_AT_LEAST = 10.0  # ... and never before it has run this many seconds
CHECK_EVERY = 1.0  # seconds between looks at the running tasks


class Stuck:
    """One call's view of its running tasks (see the module docstring). Not to be confused
    with ``backends._watch.Watch``, the process backend's wait on its descriptors."""

    def __init__(
        self,
        backend: Backend,
        task_at: Callable[[int, int], tuple[int, Any] | None],
        describe: Callable[[Any], Any],
        typical: Callable[[], float | None],
        write: Callable[[str], None],
        show: Callable[[str | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._task_at = task_at
        self._describe = describe
        self._typical = typical
        self._write = write
        self._show = show
        self._clock = clock
        self._wanted = False
        self._previous: Any = None
        self._next_check = 0.0
        self._shown: str | None = None

    # -- the signal -----------------------------------------------------------------------

    def install(self) -> bool:
        """Take SIGUSR1 for the call, where that is safe; whether it was taken."""
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            if signal.getsignal(DUMP_SIGNAL) is not signal.SIG_DFL:
                return False
            self._previous = signal.signal(DUMP_SIGNAL, self._on_signal)
        except (ValueError, OSError):
            return False
        return True

    @property
    def installed(self) -> bool:
        """Whether SIGUSR1 is ours for the call (the scheduler then wakes once a second)."""
        return self._previous is not None

    def uninstall(self) -> None:
        if self._previous is not None:
            try:
                signal.signal(DUMP_SIGNAL, self._previous)
            except (ValueError, OSError):
                pass
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._wanted = True  # the scheduler's loop dumps at its next step

    # -- each step --------------------------------------------------------------------------

    def step(self) -> None:
        if self._wanted:
            self._wanted = False
            self._write(self.dump())
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._show_oldest(now)

    def _running(self, now: float) -> list[tuple[float, int, Any, int]]:
        """(age, index, task, worker) of each running task, the oldest first."""
        found = []
        for running in self._backend.running():
            task = self._task_at(running.chunk_id, running.position)
            if task is not None:
                age = now - running.started_at
                found.append((age, task[0], self._describe(task[1]), running.worker))
        return sorted(found, key=lambda item: -item[0])

    def _show_oldest(self, now: float) -> None:
        running = self._running(now)
        text = None
        if running:
            age, index, _, _ = running[0]
            typical = self._typical() or 0.0
            if age >= max(LONG_AT_LEAST, LONG_FACTOR * typical):
                text = f"task {index} running {age:.0f} s"
        if text != self._shown:
            self._shown = text
            self._show(text)

    def dump(self) -> str:
        """Every running task: its input, how long it has run, and its worker's stack."""
        now = self._clock()
        running = self._running(now)
        noun = "task" if len(running) == 1 else "tasks"
        lines = [f"multitrack: {len(running)} {noun} running"]
        for age, index, task, worker in running:
            lines.append(f"  {task_label(index, task)}: running {age:.1f} s")
            stack = self._backend.stack(worker)
            if stack:
                lines.extend("    " + line for line in stack.splitlines())
        return "\n".join(lines) + "\n"
