"""The serial backend: every task runs in the caller's thread, one after the other.

It is the semantic reference the other backends are tested against, and the tool for
debugging (breakpoints and profilers work, tracebacks are local). It keeps the same contract:
results in order, failures as ``TaskError`` with the same policy, the same progress bar.
Nothing can be killed here, so it has no per-task timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends._base import Backend, Chunk, Completed, Event, Output


class SerialBackend(Backend):
    """Runs chunks inline when the scheduler polls."""

    can_kill = False

    def __init__(
        self,
        workers: int = 1,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        self.slots = 1
        self.initializer = initializer
        self.initargs = initargs
        self._initialized = False
        self._fn: Callable[..., Any] | None = None
        self._queued: list[Chunk] = []

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        self._fn = fn
        if not self._initialized:
            self._initialized = True
            if self.initializer is not None:
                try:
                    self.initializer(*self.initargs)
                except Exception as exc:
                    raise WorkerStartError(
                        f"the initializer failed: {type(exc).__name__}: {exc}"
                    ) from exc

    def capacity(self) -> int:
        return 0 if self._queued else 1

    def submit(self, chunk: Chunk) -> None:
        self._queued.append(chunk)

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if not self._queued:
            if timeout:
                time.sleep(min(timeout, 0.01))
            return []
        chunk = self._queued.pop(0)
        fn = self._fn
        assert fn is not None
        begun = time.monotonic()
        values: list[Any] = []
        errors: dict[int, BaseException] = {}
        for arg in chunk.args:
            try:
                values.append(fn(arg))
            except (Exception, SystemExit) as exc:
                # A task's sys.exit() is its failure, not the end of the caller's program.
                # KeyboardInterrupt passes: here it cannot be told apart from a real Ctrl-C.
                errors[len(values)] = exc
                values.append(None)
        return [Completed(chunk.id, 0, values, errors, time.monotonic() - begun)]

    def end(self, *, abort: bool) -> None:
        self._queued.clear()
        self._fn = None

    def close(self, *, kill: bool = False) -> None:
        self._queued.clear()
