"""One call's side of ``checkpoint=``: which tasks the journal already holds, and what to store.

``Resume`` sits between the scheduler (``_run.Run``) and the journal (``_checkpoint``)::

    Run._pull ──fresh tasks──▶ Resume.split ──▶ stored results: settled at once (reused)
                                            └──▶ the rest: sent to workers, keys kept here
    Run (a task settled) ──▶ Resume.record / record_failure ──▶ Journal (buffered rows)
    Run (every scheduler step) ──▶ Resume.commit_due;  Run's finally ──▶ Resume.close

A task is known by the digest of its arguments (``_keys.task_key``; ``key=`` replaces the
arguments by what the user's function returns for them) and by how many equal tasks came
before it in the input (its occurrence), so reordered, inserted or removed inputs find their
own results and two equal inputs are two tasks. An argument that cannot be digested falls back
to its position (said once). The keys of the tasks in flight are kept here until they settle,
so nothing is digested twice. Execution settings (workers, chunksize, backend, timeout) are no
part of any key: a run started on 16 cores resumes on a laptop, or on Ray.

Failures are stored with their type, message and traceback (for the end-of-run report) and
run again by the next run; a result that cannot be pickled in the caller (a thread backend's
lock, say) is not stored, and its task runs again next time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from multitrack._checkpoint import Journal
from multitrack._errors import RemoteError, RemoteTraceback, TaskError
from multitrack._keys import Occurrences, function_identity, index_key, task_key
from multitrack.backends import _wire

KeyFn = Callable[[Any], Any]


class Resume:
    """The journal of one call, and the keys of its tasks until they settle."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fn: Callable[..., Any],
        *,
        key: KeyFn | None,
        describe: Callable[[Any], Any],
        on_change: str,
        say: Callable[[str], None],
    ) -> None:
        self.journal = Journal.open(path, function=function_identity(fn), on_change=on_change)
        self._key = key
        self._describe = describe
        self._say = say
        self._seen = Occurrences()
        self._keys: dict[int, tuple[bytes, int]] = {}  # index -> (key, occurrence), in flight
        self._by_position = 0  # tasks keyed by position: their arguments had no digest
        self._empty = self.journal.stored_ok == 0 and self.journal.stored_failed == 0
        if self.journal.change_message:
            say(self.journal.change_message)

    def split(
        self, first: int, args: list[Any]
    ) -> tuple[list[int], list[Any], list[tuple[int, Any]]]:
        """Of tasks ``first``, ``first + 1``, ... with ``args``: the indices and arguments of
        those to run, and (index, result) of those the journal holds a result for."""
        todo_indices: list[int] = []
        todo_args: list[Any] = []
        reused: list[tuple[int, Any]] = []
        for index, arg in enumerate(args, first):
            identity = self._identity(index, arg)
            stored = None if self._empty else self.journal.lookup(*identity)
            if stored is not None and stored.ok and stored.payload is not None:
                try:
                    reused.append((index, _wire.loads(stored.payload)))
                    continue
                except Exception:  # it no longer unpickles (a class changed): run it again
                    pass
            self._keys[index] = identity
            todo_indices.append(index)
            todo_args.append(arg)
        return todo_indices, todo_args, reused

    def _identity(self, index: int, arg: Any) -> tuple[bytes, int]:
        if self._key is not None:
            try:
                named = self._key(self._describe(arg))
            except Exception as exc:
                raise TypeError(f"key= raised for task {index}: {_wire.describe(exc)}") from exc
            digest = task_key(named)
            if digest is None:
                raise TypeError(
                    f"key= must return str, bytes, numbers, paths or tuples of them; for task "
                    f"{index} it returned {type(named).__name__}"
                )
        else:
            digest = task_key(arg)
        if digest is None:
            if not self._by_position:
                self._say(
                    f"checkpoint: task {index}'s arguments ({type(arg).__name__}) have no "
                    "digest; such tasks are known by their position in the input (give key= "
                    "to name them)"
                )
            self._by_position += 1
            digest = index_key(index)
        return digest, self._seen.next(digest)

    def record(self, indices: Sequence[int], values: Sequence[Any], seconds: float) -> None:
        """Tasks ``indices`` succeeded with ``values`` (``seconds``: their share of the
        chunk's time)."""
        journal, keys = self.journal, self._keys
        for index, value in zip(indices, values, strict=True):
            identity = keys.pop(index, None)
            if identity is None:
                continue
            try:
                payload = _wire.dumps(value)
            except Exception:
                continue  # cannot be stored here: it runs again next time
            journal.record_result(*identity, index, payload, seconds=seconds, attempts=1)

    def record_failure(self, index: int, error: TaskError) -> None:
        """Task ``index`` failed for good with ``error``."""
        identity = self._keys.pop(index, None)
        if identity is None:
            return
        cause = error.__cause__ if error.__cause__ is not None else error
        type_name = cause.type_name if isinstance(cause, RemoteError) else type(cause).__name__
        self.journal.record_failure(
            *identity,
            index,
            type_name=type_name,
            message=str(cause),
            traceback=_traceback_text(cause),
            seconds=0.0,
            attempts=error.attempts,
        )

    def commit_due(self) -> None:
        self.journal.commit_due(time.monotonic())

    def close(self) -> None:
        """Store everything finished (on success, error and Ctrl-C alike)."""
        self.journal.close()


def _traceback_text(cause: BaseException) -> str:
    """The worker's traceback when it came as text, else the parent's."""
    remote = cause.__cause__
    if isinstance(remote, RemoteTraceback):
        return remote.text
    import traceback

    return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
