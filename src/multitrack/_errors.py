"""Every exception multitrack raises, in one place.

::

    MultitrackError                 base of everything below
     +-- TaskError                  a task failed; .index, .task (its arguments), .attempts.
     |    |                         __cause__ is the original exception, or a RemoteError
     |    |                         stand-in when it could not be rebuilt in the caller.
     |    +-- WorkerCrashed         the worker died while running it: .exitcode, .signal, .pid
     |    +-- TaskTimeout           it ran longer than ``timeout``; also a builtin TimeoutError
     |    +-- MemoryLimitExceeded   its worker grew past ``memory_limit`` and was stopped:
     |                              .limit, .reached (bytes)
     +-- WorkerStartError           a worker could not start (initializer raised, spawn failed,
     |                              no "ready" within the start-up bound)
     +-- CheckpointError            the checkpoint journal cannot be used: in use by another
                                    run, damaged, newer, not yours, read-only, disk full, or
                                    its function changed with on_change="refuse"; .path

``RemoteError`` is not a ``MultitrackError``: it stands in for a task's own exception when that
exception cannot cross the process boundary (its class is not importable in the caller, or it
refuses to unpickle). It keeps the original type name, message and traceback text.

Tracebacks cross process boundaries as text (never as objects) and come back attached to the
``__cause__`` chain, so the caller sees the worker's traceback under "The above exception was
the direct cause of ...", as with ``concurrent.futures``.
"""

from __future__ import annotations

import signal as _signal
from typing import Any

__all__ = [
    "CheckpointError",
    "MemoryLimitExceeded",
    "MultitrackError",
    "RemoteError",
    "RemoteTraceback",
    "TaskError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartError",
]


class MultitrackError(Exception):
    """Base class of every error multitrack raises itself.

    Example:
        >>> import multitrack as mt
        >>> issubclass(mt.TaskError, mt.MultitrackError)
        True
    """


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker.

    It is attached as the ``__cause__`` of the task's own exception so that the printed
    traceback shows where in the worker things went wrong.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + '"""\n' + self.text.rstrip("\n") + '\n"""'


class RemoteError(Exception):
    """Stand-in for a task's exception that could not be rebuilt in the caller.

    Attributes:
        type_name: qualified name of the original exception class, e.g. ``"mylib.BadThing"``.
        message: ``str()`` of the original exception.
        traceback_text: the worker-side traceback, as text.

    Example:
        >>> err = RemoteError("mylib.BadThing", "boom", "Traceback ...")
        >>> str(err)
        'mylib.BadThing: boom'
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def task_label(index: int, task: Any) -> str:
    """``task 3 (input 'a.png')``: how messages name a task."""
    return f"task {index} (input {_short_repr(task)})"


def _short_repr(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TaskError(MultitrackError):
    """A task failed.

    Attributes:
        index: position of the task in the input (0-based).
        task: the task's arguments: the item itself for a one-iterable ``map``, the tuple of
            arguments otherwise.
        attempts: how many times the task ran (1 unless ``retries`` re-ran it).
        results: when this error stopped the call (``errors="raise"``), what the call had
            finished: ``{index: result}`` in input order (a list in completion order with
            ``ordered=False``); for ``imap``, the finished results not yielded yet. A
            ``KeyboardInterrupt`` that stops a call carries the same ``results``.

    The original exception is ``__cause__``; its own ``__cause__`` carries the worker's
    traceback text.

    Example:
        >>> import multitrack as mt
        >>> try:
        ...     mt.map(lambda x: 1 / x, [1, 0], backend="serial", progress=False)
        ... except mt.TaskError as err:
        ...     print(err.index, type(err.__cause__).__name__)
        1 ZeroDivisionError
    """

    results: dict[int, Any] | list[Any] | None = None

    def __init__(self, message: str, *, index: int, task: Any, attempts: int = 1) -> None:
        super().__init__(message)
        self.index = index
        self.task = task
        self.attempts = attempts

    @classmethod
    def from_cause(
        cls, cause: BaseException, *, index: int, task: Any, attempts: int = 1
    ) -> TaskError:
        """Build the error for a task whose function raised ``cause``."""
        described = str(cause)
        kind = cause.type_name if isinstance(cause, RemoteError) else type(cause).__name__
        if isinstance(cause, RemoteError):
            described = cause.message
        message = f"{task_label(index, task)} failed: {kind}"
        if described:
            message += f": {described}"
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        err = cls(message, index=index, task=task, attempts=attempts)
        err.__cause__ = cause
        return err

    def __reduce__(self) -> Any:
        return (_rebuild_task_error, (type(self), self.args, self.__dict__))


def _rebuild_task_error(cls: type[TaskError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


def signal_name(signum: int) -> str:
    """``9`` -> ``"SIGKILL"``; unknown numbers come back as ``"signal 99"``."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_SIGNAL_HINTS = {
    "SIGKILL": "often the out-of-memory killer; check `dmesg` and lower `workers` "
    "or the memory each task needs",
    "SIGSEGV": "a crash in native code (a C extension); faulthandler's dump above, if any, "
    "shows where",
    "SIGABRT": "native code aborted (an assertion or a failed allocation in C)",
    "SIGBUS": "native code touched memory it may not (often a truncated memory-mapped file)",
    "SIGTERM": "something outside multitrack terminated the worker",
}


class WorkerCrashed(TaskError):
    """The worker process died while running this task.

    Attributes:
        exitcode: the worker's exit code, or ``None`` when it was killed by a signal.
        signal: the name of the signal that killed it (``"SIGKILL"``), or ``None``.
        pid: the worker's process id.
        oom: for a SIGKILL, whether the kernel's out-of-memory killer sent it, from the
            kernel's evidence (its log, the cgroup's ``oom_kill`` count); the message says
            which. ``None`` when that cannot be known (no SIGKILL, nothing readable).

    Example:
        >>> import multitrack as mt, os
        >>> out = mt.map(os._exit, [3], errors="return", progress=False)
        >>> out[0].exitcode
        3
    """

    def __init__(
        self,
        message: str,
        *,
        index: int,
        task: Any,
        attempts: int = 1,
        exitcode: int | None = None,
        signal: str | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(message, index=index, task=task, attempts=attempts)
        self.exitcode = exitcode
        self.signal = signal
        self.pid = pid
        self.oom: bool | None = None

    @classmethod
    def for_death(
        cls,
        *,
        index: int,
        task: Any,
        attempts: int,
        returncode: int | None,
        pid: int | None,
        oom: tuple[bool, str] | None = None,
    ) -> WorkerCrashed:
        """Describe a worker death from its ``Popen.returncode`` (negative = signal);
        ``oom``: whether the kernel's out-of-memory killer killed it, and the evidence."""
        signame = None
        exitcode = returncode
        if returncode is not None and returncode < 0:
            signame, exitcode = signal_name(-returncode), None
        if signame:
            how = f"killed by {signame}"
        elif exitcode is not None:
            how = f"exited with code {exitcode}"
        else:  # a cluster engine reports the death but not its cause
            how = "died (its engine does not say how)"
        message = f"{task_label(index, task)}: its worker (pid {pid}) {how} while running it"
        hint = _SIGNAL_HINTS.get(signame or "")
        if oom is not None:  # evidence, not a guess
            hint = _oom_hint(*oom)
        if hint:
            message += f" -- {hint}"
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        crashed = cls(
            message,
            index=index,
            task=task,
            attempts=attempts,
            exitcode=exitcode,
            signal=signame,
            pid=pid,
        )
        crashed.oom = None if oom is None else oom[0]
        return crashed


def _oom_hint(killed: bool, evidence: str) -> str:
    if killed:
        return (
            f"the kernel's out-of-memory killer killed it ({evidence}); set memory_limit= "
            "(see the README) or lower workers"
        )
    return f"not the out-of-memory killer ({evidence}): something else sent the signal"


class TaskTimeout(TaskError, TimeoutError):
    """The task ran longer than ``timeout`` seconds; its worker was killed and replaced.

    Also a builtin ``TimeoutError``, so ``except TimeoutError`` catches it.

    Attributes:
        stack: where the task was when it was stopped: its thread's Python stack as
            ``faulthandler`` dumped it just before the kill (even from inside C code holding
            the GIL), or ``None`` where it could not be taken (threads, clusters). It is also
            shown under the error's traceback.

    Example:
        >>> import multitrack as mt
        >>> issubclass(mt.TaskTimeout, TimeoutError)
        True
    """

    def __init__(
        self,
        message: str,
        *,
        index: int,
        task: Any,
        attempts: int = 1,
        stack: str | None = None,
    ) -> None:
        super().__init__(message, index=index, task=task, attempts=attempts)
        self.stack = stack
        if stack:
            note = "where the task was when it was stopped:\n" + stack
            self.__notes__ = [*getattr(self, "__notes__", []), note]  # add_note: 3.11+


class MemoryLimitExceeded(TaskError):
    """The task's worker grew past ``memory_limit`` and was stopped while running it: past
    1.5 times a per-worker limit, or, with ``memory_limit="auto"``, it was the newest task
    when the whole run neared its budget three times. Retried like any failure (``retries``).

    Not a builtin ``MemoryError``: nothing failed to allocate; multitrack stopped the task
    before the kernel's out-of-memory killer would have (a ``MemoryError`` subclass also
    cannot be rebuilt from a pickle).

    Attributes:
        limit: the limit in bytes (per worker, or the run's budget).
        reached: the size in bytes the worker (or the run) had reached when it was stopped.

    Example:
        >>> import multitrack as mt
        >>> err = mt.MemoryLimitExceeded("too big", index=0, task=1, limit=100, reached=160)
        >>> isinstance(err, mt.TaskError), err.limit, err.reached
        (True, 100, 160)
    """

    def __init__(
        self,
        message: str,
        *,
        index: int,
        task: Any,
        attempts: int = 1,
        limit: int = 0,
        reached: int = 0,
    ) -> None:
        super().__init__(message, index=index, task=task, attempts=attempts)
        self.limit = limit
        self.reached = reached


class WorkerStartError(MultitrackError):
    """A worker could not start: the initializer raised, the process failed to spawn, or it
    did not report ready in time. ``__cause__`` holds the initializer's exception when there
    was one.

    Example:
        >>> import multitrack as mt
        >>> issubclass(mt.WorkerStartError, mt.MultitrackError)
        True
    """


class CheckpointError(MultitrackError):
    """The checkpoint journal cannot be used; the message says why and what to do.

    Attributes:
        path: the journal's path.

    Example:
        >>> err = CheckpointError("run.sqlite is damaged", path="run.sqlite")
        >>> isinstance(err, MultitrackError), err.path
        (True, 'run.sqlite')
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> Any:
        return (_rebuild_checkpoint_error, (str(self), self.path))


def _rebuild_checkpoint_error(message: str, path: str) -> CheckpointError:
    return CheckpointError(message, path=path)
