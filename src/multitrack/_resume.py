"""One call's side of ``checkpoint=``: which tasks the journal already holds, and what to store.

``Resume`` sits between the scheduler (``_run.Run``) and the journal (``_checkpoint``)::

    Run._pull ──fresh tasks──▶ Resume.split ──▶ stored results: settled at once (reused)
                                            └──▶ the rest: sent to workers, keys kept here
    Run (a span settled) ──▶ Resume.record / record_failure ──▶ Journal (buffered span rows)
    Run (every scheduler step) ──▶ Resume.commit_due;  Run's finally ──▶ Resume.close

Two ways to name what is stored. A call that starts a journal (empty when opened, no
``key=``) has nothing to look up and keys nothing: it stores each span's arguments, pickled
in one call when they are plain builtin data, and the journal keys them when it is next
opened (``_journal_rows``). That is what keeps ``checkpoint=`` cheap on tiny tasks: no work
per task. Other arguments are keyed span by span when stored. A call that resumes a journal
keys every task as it is pulled, to look it up, and stores those keys with what runs.

A task is known by the digest of its arguments (``_keys.task_key``; ``key=`` replaces the
arguments by what the user's function returns for them) and by how many equal tasks came
before it in the input (its occurrence), so reordered, inserted or removed inputs find their
own results and two equal inputs are two tasks. An argument that cannot be digested falls back
to its position (said once). The keys of the tasks in flight are kept here until they settle,
so nothing is digested twice. Execution settings (workers, chunksize, backend, timeout) are no
part of any key: a run started on 16 cores resumes on a laptop, or on Ray.

Results are stored as the worker pickled them (``Completed.pickled``); the other backends'
are pickled here, a span at a time. Failures are stored with their type, message and
traceback (for the end-of-run report) and run again by the next run; a result that cannot be
pickled in the caller (a thread backend's lock, say) is not stored, and its task runs again
next time.
"""

from __future__ import annotations

import array
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from multitrack._checkpoint import Journal
from multitrack._errors import RemoteError, RemoteTraceback, TaskError
from multitrack._journal_rows import keys_of, plain_pickle
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
        self._seen: Occurrences | None = None  # made on first use: 16 MB (see _keys)
        self._keys: dict[int, tuple[bytes, int]] = {}  # index -> (key, occurrence), in flight
        self._by_position = 0  # tasks keyed by position: their arguments had no digest
        self._empty = self.journal.stored_ok == 0 and self.journal.stored_failed == 0
        self._lazy = self._empty and key is None  # keyed when next opened (see above)
        if self.journal.change_message:
            say(self.journal.change_message)

    def split(
        self, first: int, args: list[Any]
    ) -> tuple[Sequence[int], list[Any], list[tuple[int, Any]]]:
        """Of tasks ``first``, ``first + 1``, ... with ``args``: the indices and arguments of
        those to run, and (index, result) of those the journal holds a result for."""
        if self._lazy:
            return range(first, first + len(args)), args, []
        todo_indices: list[int] = []
        todo_args: list[Any] = []
        reused: list[tuple[int, Any]] = []
        for index, arg in enumerate(args, first):
            identity = self._identity(index, arg)
            stored = None if self._empty else self.journal.lookup(*identity)
            if stored is not None and stored.ok:
                reused.append((index, stored.value))
                continue
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
            self._by_position_said(index, arg)
            digest = index_key(index)
        if self._seen is None:
            self._seen = Occurrences()
        return digest, self._seen.next(digest)

    def _by_position_said(self, index: int, arg: Any) -> None:
        if not self._by_position:
            self._say(
                f"checkpoint: task {index}'s arguments ({type(arg).__name__}) have no "
                "digest; such tasks are known by their position in the input (give key= "
                "to name them)"
            )
        self._by_position += 1

    def record(
        self,
        indices: Sequence[int],
        args: list[Any],
        values: list[Any],
        errors: Collection[int],
        pickled: bytes | None,
        seconds: float,
    ) -> None:
        """Tasks ``indices`` (with ``args``) finished with ``values``, except the offsets in
        ``errors``; ``pickled``: ``values`` as the worker pickled them, when it did;
        ``seconds``: each one's share of the time."""
        skip = sorted(errors)
        if pickled is None:
            pickled = _pickle_values(values, skip)
        if len(skip) == len(values):
            return
        name = self._name_span(indices, args) if self._lazy else self._known_keys(indices, skip)
        self.journal.record_span(indices, pickled, skip=skip, seconds=seconds, **name)

    def _name_span(self, indices: Sequence[int], args: list[Any]) -> dict[str, bytes]:
        """In a call that started the journal: the span's arguments, or else its keys."""
        plain = plain_pickle(args)
        if plain is not None:
            return {"args": plain}
        keys, by_position = keys_of(args, indices)
        for offset in by_position:
            self._by_position_said(indices[offset], args[offset])
        return {"keys": keys}

    def _known_keys(self, indices: Sequence[int], skip: list[int]) -> dict[str, bytes]:
        """In a call that keyed its tasks: their keys and occurrence numbers (the failed
        ones keep theirs here: they may run again)."""
        keys, numbers, failed = self._keys, array.array("q"), set(skip)
        names = []
        for offset, index in enumerate(indices):
            identity = None if offset in failed else keys.pop(index, None)
            if identity is None:  # failed, or not keyed here: a placeholder, not stored
                identity = (bytes(16), 0)
                if offset not in failed:
                    skip.append(offset)
            names.append(identity[0])
            numbers.append(identity[1])
        return {"keys": b"".join(names), "occurrences": numbers.tobytes()}

    def record_failure(self, index: int, error: TaskError, args: Any) -> None:
        """Task ``index`` (with ``args``) failed for good with ``error``."""
        if self._lazy:
            name: dict[str, Any] = self._name_span([index], [args])
        else:
            identity = self._keys.pop(index, None)
            if identity is None:
                return
            name = {"key": identity[0], "occurrence": identity[1]}
        cause = error.__cause__ if error.__cause__ is not None else error
        type_name = cause.type_name if isinstance(cause, RemoteError) else type(cause).__name__
        self.journal.record_failure(
            index,
            **name,
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


def _pickle_values(values: list[Any], skip: list[int]) -> bytes:
    """A span's values pickled here (backends other than process): in one call, or else one
    by one, those that cannot be pickled left out (added to ``skip``: they run again)."""
    try:
        return _wire.dumps(values)
    except Exception:
        pass
    kept = list(values)
    for offset, value in enumerate(values):
        try:
            _wire.dumps(value)
        except Exception:
            kept[offset] = None
            if offset not in skip:
                skip.append(offset)
    skip.sort()
    return _wire.dumps(kept)


def _traceback_text(cause: BaseException) -> str:
    """The worker's traceback when it came as text, else the parent's."""
    remote = cause.__cause__
    if isinstance(remote, RemoteTraceback):
        return remote.text
    import traceback

    return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
