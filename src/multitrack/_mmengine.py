"""Drop-in replacements for mmengine's ``track_parallel_progress``, ``track_progress`` and
``track_iter_progress`` (mmengine 0.10): same signatures, same ``tasks`` / ``(tasks, n)``
convention, same results. Switching is one import line::

    from mmengine.utils import track_parallel_progress      # before
    from multitrack import track_parallel_progress          # after

What stays the same: ``func(task)`` gets one argument per task (``track_progress`` adds its
``**kwargs``); results come back as a list in input order (completion order with
``keep_order=False``); ``skip_first`` leaves the first ``nproc * chunksize`` results out of the
rate; ``initargs`` must be a tuple when an initializer is given (``TypeError`` otherwise, and
ignored without one); ``track_progress`` and ``track_iter_progress`` stay serial. The bar looks
like mmengine's::

    [>>>>>>>>>>>>>>>                                   ] 3/10, 1.2 task/s, elapsed: 2s, ETA:     6s
    completed: 7, elapsed: 2s, 3.5 tasks/s                      (when the total is unknown)

What is fixed:

* **Any iterable** is accepted (mmengine rejects ``dict_values``, sets and generators with a
  ``TypeError``). A tuple is ``(tasks, n)`` exactly when mmengine would read it so (two items,
  an iterable and an int); any other tuple is a plain sequence of tasks. Without a length the
  bar counts without a total until the input runs out.
* **Throttled output**. mmengine writes a ``\\r`` segment per task (1.6 MB for 20,000 tasks).
  On a terminal we redraw at most every ``TTY_INTERVAL`` (0.1 s, faster than the eye follows)
  and at least every ``TTY_TICK`` (so ``elapsed`` moves during a slow task). Anywhere else
  (a log file, CI, an agent reading the output) ``\\r`` is noise, so we write whole lines: one
  at the start, the final one, and one per log interval between them. The interval is the one
  every multitrack log uses (30 s, or ``MULTITRACK_LOG_INTERVAL``): one knob for the library,
  a heartbeat well inside any CI "no output" watchdog, and ~13 KB for an hour-long run.
  20,000 quick tasks write two lines (~190 bytes).
* **The bar counts completions**, not ordered consumption, so one slow first task does not
  freeze it; it always ends with ``"\\n"``, also when a task fails.
* **The parallel run is multitrack's engine**, not ``multiprocessing.Pool``: a failing task
  stops the run and its workers (mmengine leaves its pool running), a worker killed by the OOM
  killer or a segfault raises ``WorkerCrashed`` at once (mmengine hangs forever), a failing
  initializer raises ``WorkerStartError`` (mmengine restarts workers in a loop), lambdas and
  local functions work, and worker ``print`` output is written above the bar.
* ``file`` is looked up when the function is called: the default (the ``sys.stdout`` seen at
  import, kept so the signature reads like mmengine's) or ``None`` mean "the current
  ``sys.stdout``", so ``contextlib.redirect_stdout`` and pytest's ``capsys`` see the bar.
  ``MULTITRACK_PROGRESS=0`` or ``TQDM_DISABLE=1`` silence the bar (worker output still shows).

Exceptions -- the decision. mmengine (through ``Pool``) re-raises the task's own exception, and
code written for it says ``except ValueError``. multitrack's contract says a failed task raises
``TaskError`` (``.index``, ``.task``, the original as ``__cause__``). A drop-in must not break the
first, and the library must keep the second, so the parallel function raises an exception that
is *both*: an instance of a subclass of ``TaskError`` and of the original class (its name reads
``TaskError[ValueError]``). ``except ValueError`` and ``except multitrack.TaskError`` both catch
it; ``args`` and the original's attributes (``errno``, ``filename``, custom ones) are copied, the
way unpickling rebuilt the original; ``str()`` is TaskError's message, which names the task and
quotes the original message; the untouched original is ``__cause__``. Only ``type(e) is
ValueError`` tells the difference. When that class cannot be built (the original is itself a
multitrack error, only a ``RemoteError`` stand-in reached us, or its class refuses to be
subclassed or rebuilt) a plain ``TaskError`` is raised. A dead worker raises ``WorkerCrashed``,
which mmengine has no equivalent for (it hangs). The serial functions run ``func`` in the
caller, so there its exceptions propagate untouched, exactly as in mmengine.

``chunksize``: mmengine's default of 1 sends tasks one at a time, which makes tiny tasks several
times slower than they need be (20,000 trivial tasks on 2 cores: 2.1 s with chunks of 1, 0.6 s
adaptive). Here the default 1 means multitrack's adaptive size, which starts at 1 and grows only
while tasks take well under 50 ms; any other value is used as given. Results are the same either
way (chunking never changes them in ``Pool`` either).
"""

from __future__ import annotations

import operator
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, Protocol

from multitrack._api import run_calls
from multitrack._errors import MultitrackError, RemoteError, TaskError
from multitrack._options import integer
from multitrack._progress import Outcome, Progress, _disabled_by_env, _log_interval
from multitrack.backends._platform import usable_cpus

__all__ = ["track_iter_progress", "track_parallel_progress", "track_progress"]

TTY_INTERVAL = 0.1  # seconds: least time between two redraws on a terminal
TTY_TICK = 1.0  # seconds: most time between two redraws on a terminal (elapsed keeps moving)


class Writable(Protocol):
    """What ``file`` must offer (``isatty`` and ``fileno`` are used when present)."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


# The literal default of ``file``, as in mmengine's signature; it stands for "the sys.stdout of
# the moment of the call" (see ``_resolve_file``).
_STDOUT_AT_IMPORT: Writable | None = sys.stdout


# -- the public functions -------------------------------------------------------------------


def track_parallel_progress(
    func: Callable[[Any], Any],
    tasks: Iterable[Any] | tuple[Iterable[Any], int],
    nproc: int | None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] | None = None,
    bar_width: int = 50,
    chunksize: int = 1,
    skip_first: bool = False,
    keep_order: bool = True,
    file: Writable | None = _STDOUT_AT_IMPORT,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``func(task)`` for every task on ``nproc`` worker processes, with mmengine's bar.

    Keywords multitrack adds (``track_progress`` has none: its keywords go to ``func``):
    ``checkpoint``, a journal file: a rerun with the same file returns the results stored
    there and runs only the missing tasks (see ``multitrack.map``); ``start_method``, what a
    worker sees of the caller (below).

    Workers are forks of the caller, as mmengine's are on Linux (``start_method="fork"``,
    unlike ``multitrack.map``'s default): they see the caller's modules as they are at the
    call, and start without importing anything again, numpy's or OpenCV's threads or not.
    The cases where that is unsafe differ from mmengine: while another *Python* thread runs
    in the caller, a fork could copy a lock it holds; after the caller ran a GNU OpenMP
    parallel region (torch), a fork hangs in its own first one (mmengine's workers do) unless
    OpenMP's pool lets go of its threads first, which multitrack asks of it (an OpenMP 5.0
    call, GCC 9 and later: torch's libgomp has it). In those cases workers start as fresh
    interpreters instead (a warning says why), and see modules imported anew, not as the
    caller changed them. With ``helper.py`` holding ``SCALE = 1``, a ``setup(s)`` that sets
    it and ``work(x)`` returning ``x * SCALE``::

        helper.setup(10)
        track_parallel_progress(helper.work, [1, 2, 3], 2)  # [10, 20, 30], as mmengine
        # while a Python thread runs, or with start_method="spawn": [1, 2, 3]

    ``MULTITRACK_START_METHOD`` or ``start_method=`` choose either semantics for good (see
    the README's "How workers start").

    ``tasks`` is any iterable, or ``(iterable, n)`` when the length is known but not available
    (a generator). ``nproc=None`` means every CPU this process may use. Results come in input
    order (``keep_order=True``) or as completed. A task that raises stops the run and its
    workers: the exception is both a ``multitrack.TaskError`` and an instance of the task's
    own exception class (see the module docstring); a worker that dies raises
    ``multitrack.WorkerCrashed``.

    Example:
        >>> from multitrack import track_parallel_progress  # was: from mmengine.utils import ...
        >>> import io
        >>> track_parallel_progress(abs, [-1, -2, 3], 2, file=io.StringIO())
        [1, 2, 3]
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__} {func!r:.80}")
    iterable, total = _split_tasks(tasks)
    workers = _check_nproc(nproc)
    chunksize = _check_chunksize(chunksize)
    options = {
        "workers": workers,
        "ordered": bool(keep_order),
        "chunksize": None if chunksize == 1 else chunksize,  # 1: adaptive (module docstring)
        **_init_options(initializer, initargs),
    }
    if checkpoint is not None:
        options["checkpoint"] = checkpoint
    options["start_method"] = _start_method(start_method)
    skip = workers * chunksize if skip_first else 0
    bar = TrackBar(total, bar_width=bar_width, file=_resolve_file(file), skip=skip)
    try:
        return _run_parallel(func, iterable, total, bar, options)
    finally:
        bar.close("error")  # a no-op when the engine already closed it


def track_progress(
    func: Callable[..., Any],
    tasks: Iterable[Any] | tuple[Iterable[Any], int],
    bar_width: int = 50,
    file: Writable | None = _STDOUT_AT_IMPORT,
    **kwargs: Any,
) -> list[Any]:
    """Run ``func(task, **kwargs)`` for every task in a plain loop, with mmengine's bar.

    Example:
        >>> from multitrack import track_progress  # was: from mmengine.utils import ...
        >>> import io
        >>> track_progress(round, [1.234, 5.678], ndigits=1, file=io.StringIO())
        [1.2, 5.7]
    """
    iterable, total = _split_tasks(tasks)
    bar = TrackBar(total, bar_width=bar_width, file=_resolve_file(file))
    results: list[Any] = []
    outcome: Outcome = "error"
    try:
        for task in iterable:
            results.append(func(task, **kwargs))
            bar.advance()
        bar.set_total(len(results))
        outcome = "done"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        bar.close(outcome)
    return results


def track_iter_progress(
    tasks: Iterable[Any] | tuple[Iterable[Any], int],
    bar_width: int = 50,
    file: Writable | None = _STDOUT_AT_IMPORT,
) -> Iterator[Any]:
    """Yield the tasks one by one, advancing mmengine's bar each time the loop body is done.

    Example:
        >>> from multitrack import track_iter_progress  # was: from mmengine.utils import ...
        >>> import io
        >>> [word.upper() for word in track_iter_progress(["a", "b"], file=io.StringIO())]
        ['A', 'B']
    """
    iterable, total = _split_tasks(tasks)
    bar = TrackBar(total, bar_width=bar_width, file=_resolve_file(file))
    count = 0
    outcome: Outcome = "error"
    try:
        for task in iterable:
            yield task
            count += 1
            bar.advance()
        bar.set_total(count)
        outcome = "done"
    except (GeneratorExit, KeyboardInterrupt):  # GeneratorExit: a `break` in the caller's loop
        outcome = "interrupted"
        raise
    finally:
        bar.close(outcome)


# -- arguments ------------------------------------------------------------------------------


def _split_tasks(tasks: Any) -> tuple[Iterable[Any], int | None]:
    """``tasks`` -> (the iterable of tasks, their number when known)."""
    if _is_counted_pair(tasks):
        return tasks[0], tasks[1]
    try:
        iter(tasks)
    except TypeError:
        raise TypeError(
            f'"tasks" must be an iterable or a (tasks, n) tuple, but got {type(tasks).__name__}'
        ) from None
    try:
        hint = operator.length_hint(tasks, -1)
    except (TypeError, ValueError):  # a broken __len__ or __length_hint__: just no total
        hint = -1
    return tasks, (hint if hint >= 0 else None)


def _is_counted_pair(tasks: Any) -> bool:
    """mmengine's ``(iterable, n)`` convention, recognised exactly as mmengine does."""
    return (
        isinstance(tasks, tuple)
        and len(tasks) == 2
        and isinstance(tasks[0], Iterable)
        and isinstance(tasks[1], int)
    )


def _check_nproc(nproc: Any) -> int:
    """``nproc`` as ``Pool(nproc)`` takes it: a positive integer (numpy's too, as
    ``operator.index`` accepts it), or ``None`` for every CPU."""
    if nproc is None:
        return usable_cpus()
    return integer("nproc", nproc)


def _check_chunksize(chunksize: Any) -> int:
    return integer("chunksize", chunksize)


def _start_method(given: str | None) -> str | None:
    """The drop-in's start method: ``given``, else the environment's, else a fork of the
    caller (mmengine's semantics) when that is safe, else the default, said in a warning."""
    from multitrack.backends._platform import CAN_FORK
    from multitrack.backends._start import (
        START_METHOD_ENV,
        other_python_threads,
        refuse_native_fork,
    )

    if given is not None or os.environ.get(START_METHOD_ENV, "").strip() or not CAN_FORK:
        return given  # where fork is unsafe (macOS) mmengine's workers are spawned too
    threads = other_python_threads()
    if threads:
        why = f"other Python threads run ({', '.join(threads)})"
    elif refuse_native_fork() is not None:
        why = (
            "it ran a GNU OpenMP parallel region whose threads would not let go (a fork of "
            "it would hang in its first)"
        )
    else:
        return "fork"
    import warnings

    warnings.warn(
        f"track_parallel_progress: {why}, so workers cannot be forks of this process as "
        "mmengine's are: they start as fresh interpreters, and see modules imported anew "
        "(start_method='spawn')",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _init_options(initializer: Any, initargs: Any) -> dict[str, Any]:
    """mmengine's ``init_pool`` rules: ``initargs`` counts only with an initializer."""
    if initializer is None:
        return {}
    if initargs is None:
        return {"initializer": initializer}
    if not isinstance(initargs, tuple):
        raise TypeError('"initargs" must be a tuple')
    return {"initializer": initializer, "initargs": initargs}


def _resolve_file(file: Writable | None) -> Writable | None:
    """Where the bar goes: ``None`` (nowhere) when the bar is switched off."""
    if file is None or file is _STDOUT_AT_IMPORT:
        file = sys.stdout
    return None if _disabled_by_env() else file


# -- the parallel run -----------------------------------------------------------------------


def _run_parallel(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    total: int | None,
    bar: TrackBar,
    options: dict[str, Any],
) -> list[Any]:
    """The run on multitrack's engine; a task's exception comes out as ``_drop_in_error``."""
    results = run_calls(
        func,
        ((task,) for task in iterable),
        total=total,
        progress=bar,
        errors="raise",
        backend="process",
        **options,
    )
    try:
        return list(results)
    except TaskError as error:
        drop_in = _drop_in_error(error)
        if drop_in is error:
            raise
        raise drop_in from error.__cause__


def _drop_in_error(error: TaskError) -> TaskError:
    """``error`` as an instance of both ``TaskError`` and its cause's class, when possible."""
    cause = error.__cause__
    if (
        type(error) is not TaskError
        or not isinstance(cause, Exception)  # a worker's SystemExit must not exit the caller
        or isinstance(cause, MultitrackError | RemoteError)
    ):
        return error
    try:
        reduced = cause.__reduce_ex__(2)
        if not isinstance(reduced, tuple) or reduced[0] is not type(cause):
            return error  # a custom __reduce__: we cannot tell how to rebuild it
        state = reduced[2] if len(reduced) > 2 and isinstance(reduced[2], dict) else {}
        extra = {**state, **error.__dict__, "_message": str(error)}
        return _rebuild_dual(type(cause), tuple(reduced[1]), extra)
    except Exception:  # its class refuses to be subclassed or rebuilt: keep the plain one
        return error


_DUAL_CLASSES: dict[type[BaseException], type[TaskError]] = {}


def _dual_class(kind: type[BaseException]) -> type[TaskError]:
    """The cached ``TaskError[kind]`` class: a subclass of both."""
    dual = _DUAL_CLASSES.get(kind)
    if dual is None:
        name = f"TaskError[{kind.__qualname__}]"
        namespace = {
            "__module__": "multitrack",
            "__qualname__": name,
            "__doc__": f"A TaskError that is also a {kind.__qualname__} (mmengine drop-in).",
            "__str__": _dual_str,
            "__reduce__": _dual_reduce,
            "_kind": kind,
        }
        dual = _DUAL_CLASSES[kind] = type(name, (TaskError, kind), namespace)
    return dual


def _rebuild_dual(
    kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> TaskError:
    """Build ``TaskError[kind]`` the way unpickling builds ``kind``: ``__new__`` and
    ``__init__`` of ``kind`` with its reduce arguments, then its ``__dict__``."""
    cls = _dual_class(kind)
    dual = cls.__new__(cls, *args)
    kind.__init__(dual, *args)
    dual.__dict__.update(state, _reduce_args=args)
    return dual


def _dual_str(self: TaskError) -> str:
    return str(self.__dict__.get("_message", ""))


def _dual_reduce(self: TaskError) -> Any:
    state = {k: v for k, v in self.__dict__.items() if k != "_reduce_args"}
    kind = type(self).__dict__["_kind"]
    return (_rebuild_dual, (kind, self.__dict__["_reduce_args"], state))


# -- the bar --------------------------------------------------------------------------------


def format_bar(
    completed: int, total: int | None, elapsed: float, bar_width: int, columns: int | None
) -> str:
    """One state of mmengine's ``ProgressBar``, without ``\\r`` or newline.

    ``columns`` is the terminal width the bar must fit (mmengine's rule), ``None`` for no limit.
    """
    seconds = int(elapsed + 0.5)
    if total is None or total <= 0:
        if completed == 0:
            return f"completed: 0, elapsed: {seconds}s"
        return f"completed: {completed}, elapsed: {seconds}s, {_rate(completed, elapsed)} tasks/s"
    if completed == 0:
        text = f"] 0/{total}, elapsed: {seconds}s, ETA:"
    else:
        fraction = completed / total
        eta = max(0, int(elapsed * (1 - fraction) / fraction + 0.5))
        text = (
            f"] {completed}/{total}, {_rate(completed, elapsed)} task/s, "
            f"elapsed: {seconds}s, ETA: {eta:5}s"
        )
    width = _bar_chars(bar_width, columns, len(text) + 1)
    marks = int(width * min(1.0, completed / total))
    return "[" + ">" * marks + " " * (width - marks) + text


def _rate(completed: int, elapsed: float) -> str:
    return f"{completed / elapsed if elapsed > 0 else float('inf'):.1f}"


def _bar_chars(bar_width: int, columns: int | None, text_len: int) -> int:
    """mmengine's rule: the bar shrinks so that the line fits the terminal, at least 2."""
    if columns is None:
        return max(2, bar_width)
    return max(2, min(bar_width, columns - text_len - 1, int(columns * 0.6)))


class TrackBar(Progress):
    """mmengine's bar, fed by completion events and throttled (module docstring).

    ``skip`` completions are left out of the count and the rate, and the clock starts after
    them (mmengine's ``skip_first``); ``completed`` and ``total`` (from ``Progress``) include
    them. With ``file=None`` nothing is drawn, but worker output is still passed through.
    ``clock`` and ``log_interval`` (default: ``MULTITRACK_LOG_INTERVAL`` or 30 s, as for every
    multitrack log) are injectable for tests.
    """

    def __init__(
        self,
        total: int | None,
        *,
        bar_width: int = 50,
        file: Writable | None,
        skip: int = 0,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float | None = None,
    ) -> None:
        super().__init__(total=total, clock=clock)
        self._file = file
        self._tty = _isatty(file)
        self._bar_width = bar_width
        self._skip = skip
        self._log_interval = _log_interval() if log_interval is None else log_interval
        self._started_at = clock()
        self._started = False
        self._drawn_at = float("-inf")
        self._drawn_count = -1
        self._line_len = 0  # length of our unfinished line on a terminal; 0 when none
        if skip <= 0:
            self._begin()

    # -- the engine's interface

    def advance(self, n: int = 1) -> None:
        """``n`` more tasks completed."""
        self.completed += n
        if not self._started:
            if self.completed >= self._skip:
                self._begin()
        elif self._since_draw() >= self._interval():
            self._draw()

    def write(self, text: str, *, stream: Literal["stdout", "stderr"] = "stdout") -> None:
        """Pass a worker's output through: clear the bar, write the lines, draw it again."""
        live = self._tty and self._started and not self.closed
        if self._line_len and self._file is not None:
            self._file.write("\r" + " " * self._line_len + "\r")
            self._file.flush()
            self._line_len = 0
        super().write(text if text.endswith("\n") or not live else text + "\n", stream=stream)
        if live:
            self._draw()

    def wakeup_in(self) -> float | None:
        """Seconds until ``tick`` has something to redraw; ``None`` when never."""
        if self.closed or not self._started or self._file is None:
            return None
        return max(0.0, self._interval() - self._since_draw())

    def tick(self) -> None:
        """Redraw if due (elapsed time and ETA move even without completions)."""
        if self.wakeup_in() == 0.0:
            self._draw()

    def close(self, outcome: Outcome = "done") -> None:
        """Draw the final state and end the line. Idempotent."""
        if self.closed:
            return
        super().close(outcome)
        if self._file is None:
            return
        if self._tty:
            if self._started:
                self._draw()
            self._file.write("\n")  # as mmengine, even when the bar never started
            self._line_len = 0
        elif self._started and self._shown() != self._drawn_count:
            self._draw()
        self._file.flush()

    # -- drawing

    def _shown(self) -> int:
        return max(0, self.completed - self._skip)

    def _begin(self) -> None:
        """Start the clock and draw mmengine's start line (``0/N``, no rate yet)."""
        self._started = True
        self._started_at = self._clock()
        self._draw(shown=0)

    def _interval(self) -> float:
        if not self._tty:
            return self._log_interval
        return TTY_INTERVAL if self._shown() != self._drawn_count else TTY_TICK

    def _since_draw(self) -> float:
        return self._clock() - self._drawn_at

    def _draw(self, shown: int | None = None) -> None:
        if self._file is None:
            return
        now = self._clock()
        count = self._shown() if shown is None else shown
        total = None if self.total is None else self.total - self._skip
        columns = _columns() if self._tty else None
        line = format_bar(count, total, now - self._started_at, self._bar_width, columns)
        if self._tty:
            # '\r' only after a line of ours, and pad over a longer previous one.
            text = ("\r" if self._line_len else "") + line.ljust(self._line_len)
            self._line_len = len(line)
        else:
            text = line + "\n"
        self._file.write(text)
        self._file.flush()
        self._drawn_at = now
        self._drawn_count = count


def _isatty(file: Writable | None) -> bool:
    try:
        return bool(file is not None and file.isatty())  # type: ignore[attr-defined]
    except Exception:  # no isatty, or a closed file
        return False


def _columns() -> int:
    """The width mmengine reads: ``COLUMNS`` when set, else the terminal's (as
    ``shutil.get_terminal_size`` finds it), else 80."""
    return shutil.get_terminal_size().columns
