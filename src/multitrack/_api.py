"""The public calls: ``map``, ``imap``, ``starmap`` and ``Pool``.

This layer only checks what the caller gave (before any worker starts), turns the inputs into a
lazy stream of argument tuples, and hands one ``Run`` to the caller. Scheduling lives in
``_run``, workers in ``backends``.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import operator
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from multitrack import backends
from multitrack._chunks import ChunkSizer
from multitrack._errors import TaskError
from multitrack._options import POOL_ONLY, Options, validate
from multitrack._progress import Progress, make_progress
from multitrack._report import Report
from multitrack._run import Checkpoint, Policy, Run
from multitrack.backends._base import Backend
from multitrack.backends._wire import Spread

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from multitrack._budget import Budget

__all__ = ["Pool", "imap", "map", "run_calls", "starmap"]

# In ordered ``imap``, how far intake may run ahead of the oldest result not yet released
# (bounded memory when one early task is slow). ``map`` keeps every result anyway.
MAX_AHEAD = 10_000


_F = TypeVar("_F", bound=Callable[..., Any])


def _short_interrupts(fn: _F) -> _F:
    """A Ctrl-C during the call shows the caller's line, not the scheduler's frames below
    it: the traceback is cut at this boundary (the interrupt is the user's own)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # pytest's convention
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as interrupt:
            raise interrupt.with_traceback(None) from None

    return call  # type: ignore[return-value]


class CallOptions(TypedDict, total=False):
    """Options of one call; see ``map`` for their meaning."""

    ordered: bool
    chunksize: int | str | None
    progress: bool | str
    desc: str | None
    errors: str
    timeout: float | None
    retries: int
    retry_delay: float
    checkpoint: str | os.PathLike[str] | None
    key: Callable[[Any], Any] | None
    on_change: str
    report: bool | str | os.PathLike[str] | Callable[[Report], Any] | None


class PoolOptions(CallOptions, total=False):
    """``CallOptions`` plus those that shape the workers (``workers`` aside)."""

    backend: str
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    max_tasks_per_worker: int | None
    start_method: str | None
    memory_limit: int | str | None
    address: str | None
    client: Any


class MapOptions(PoolOptions, total=False):
    """Every option of ``map``."""

    workers: int | None


@_short_interrupts
def map(
    fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[MapOptions]
) -> list[Any]:
    """Run ``fn`` on every item, on every core, with a progress bar; return the results in
    input order, like ``list(builtins.map(fn, *iterables))``.

    Several iterables are zipped: ``fn(a, b)`` for each pair, stopping at the shortest.

    Options (keyword-only):
        workers: pool size; default the CPUs this process may use (affinity and cgroup aware).
        backend: ``"process"`` (default), ``"thread"``, ``"serial"``, or ``"dask"`` /
            ``"ray"`` (a cluster; extras ``multitrack[dask]`` / ``multitrack[ray]``).
        ordered: results in input order (default); ``False``: in completion order.
        chunksize: tasks sent to a worker at once; ``None``/``"auto"`` sizes chunks from the
            measured task time.
        progress: ``True`` (bar on stderr: live on a terminal, a widget in Jupyter, plain
            lines in logs), ``False``, or ``"log"`` (plain lines always). ``MULTITRACK_PROGRESS=0``
            or ``TQDM_DISABLE=1`` turn it off.
        desc: label on the bar.
        errors: ``"raise"`` (first failure stops the run and raises ``TaskError``) or
            ``"return"`` (the failed task's slot holds its ``TaskError``; the run goes on).
        timeout: seconds one task may run; past it its worker is killed and replaced and the
            task fails with ``TaskTimeout``.
        retries: extra attempts for a task that raised, crashed its worker or timed out.
        retry_delay: seconds before the first retry, doubled for each further one.
        initializer, initargs: ``initializer(*initargs)`` runs once in each worker at start.
        max_tasks_per_worker: replace a worker after this many tasks (for leaky code).
        start_method: what a worker sees of the caller (``backend="process"``). ``"spawn"``
            (default; ``MULTITRACK_START_METHOD`` changes it): what a fresh interpreter
            would, the caller's modules imported anew, whatever threads the caller runs.
            ``"fork"``: a fork of the caller, its module state and memory as they are at
            the call (refused while another Python thread runs). See the README.
        memory_limit: a worker's memory (its proportional set size), as bytes or ``"2GB"``,
            ``"512MiB"``: past it the worker is replaced after its current task; past 1.5
            times it, it is stopped at once and its task fails with ``MemoryLimitExceeded``.
            ``"auto"``: a budget for the whole run instead (the smallest of the machine's
            memory, the cgroup's limit and ``RLIMIT_RSS``): near it no task starts, above it
            the newest task is stopped and run again later. Process backend only.
        address: with ``backend="dask"`` or ``"ray"``, the cluster to attach to (default:
            ``DASK_SCHEDULER_ADDRESS`` / an active dask client; ``RAY_ADDRESS`` / the Ray
            session already initialised; else a local cluster of ``workers`` processes,
            shut down after the call). See docs/distributed.md.
        client: with ``backend="dask"``, an existing ``distributed.Client`` to run on.

    Example:
        >>> import multitrack as mt
        >>> mt.map(pow, [2, 3, 4], [2, 2, 2], progress=False)
        [4, 9, 16]
    """
    call = _prepare("map", fn, iterables, options, star=False)
    return _collect(call.start(max_ahead=None))


@_short_interrupts
def imap(
    fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[MapOptions]
) -> Iterator[Any]:
    """Like ``map``, but lazy: results are yielded as they are ready (in input order, or in
    completion order with ``ordered=False``). Input is consumed as workers need it and memory
    stays bounded, so an endless generator works. Closing the iterator (``break`` out of the
    loop, or dropping it) stops its workers.

    Example:
        >>> import multitrack as mt
        >>> for square in mt.imap(lambda x: x * x, range(3), progress=False):
        ...     print(square)
        0
        1
        4
    """
    call = _prepare("imap", fn, iterables, options, star=False)
    return Results(call.start(max_ahead=MAX_AHEAD))


@_short_interrupts
def starmap(
    fn: Callable[..., Any], iterable: Iterable[Iterable[Any]], **options: Unpack[MapOptions]
) -> list[Any]:
    """Like ``map``, but each item is a tuple of arguments: ``fn(*item)``.

    Example:
        >>> import multitrack as mt
        >>> mt.starmap(pow, [(2, 5), (3, 2)], progress=False)
        [32, 9]
    """
    call = _prepare("starmap", fn, (iterable,), options, star=True)
    return _collect(call.start(max_ahead=None))


def run_calls(
    fn: Callable[..., Any],
    calls: Iterable[tuple[Any, ...]],
    *,
    total: int | None,
    progress: Progress,
    **options: Any,
) -> Iterator[Any]:
    """Engine entry for the mmengine drop-ins: ``fn(*call)`` for each call, with a progress
    object of their own. ``options`` are those of ``map``."""
    opts = validate(**options)
    backend = _new_backend(opts)
    return (
        _Call(
            Spread(fn),
            iter(calls),
            total,
            opts,
            backend,
            owns_backend=True,
            progress=progress,
            describe=_single_or_tuple,
        )
        .start(max_ahead=MAX_AHEAD)
        .__iter__()
    )


class Pool:
    """Workers kept alive across several calls, so start-up (and the initializer) is paid once.

    ``workers``, ``backend``, ``initializer``, ``initargs``, ``max_tasks_per_worker``,
    ``start_method`` and ``memory_limit`` belong to the pool; the other options may be given
    here as defaults and overridden per call.
    Calls run one at a time. Leaving the ``with`` block (or ``close()``) stops the workers;
    so does interpreter exit.

    Example:
        >>> import multitrack as mt
        >>> with mt.Pool(workers=2, progress=False) as pool:
        ...     pool.map(abs, [-1, -2]), pool.starmap(max, [(1, 5)])
        ([1, 2], [5])
    """

    def __init__(self, workers: int | None = None, **options: Unpack[PoolOptions]) -> None:
        self._options = validate(workers=workers, **options)
        self._backend: Backend | None = None
        self._busy: weakref.ref[Run] | None = None
        self._closed = False
        _live_pools.add(self)

    @property
    def workers(self) -> int:
        """The pool size."""
        return self._options.workers

    @_short_interrupts
    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[CallOptions]
    ) -> list[Any]:
        """``multitrack.map`` on this pool's workers."""
        return _collect(self._start("map", fn, iterables, options, star=False, max_ahead=None))

    @_short_interrupts
    def imap(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Unpack[CallOptions]
    ) -> Iterator[Any]:
        """``multitrack.imap`` on this pool's workers."""
        return Results(self._start("imap", fn, iterables, options, star=False, max_ahead=MAX_AHEAD))

    @_short_interrupts
    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        **options: Unpack[CallOptions],
    ) -> list[Any]:
        """``multitrack.starmap`` on this pool's workers."""
        return _collect(self._start("starmap", fn, (iterable,), options, star=True, max_ahead=None))

    def _start(
        self,
        name: str,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: Any,
        *,
        star: bool,
        max_ahead: int | None,
    ) -> Run:
        if self._closed:
            raise RuntimeError("this Pool is closed")
        for key in options:
            if key in POOL_ONLY:
                raise TypeError(f"{key} belongs to the Pool; pass it to Pool(...), not to {name}()")
        opts = validate(self._options, **options)
        task_fn, calls, total, describe = _inputs(name, fn, iterables, star)
        busy = self._busy() if self._busy is not None else None
        if busy is not None and not busy.over:
            raise RuntimeError(
                "this Pool is still running an earlier imap; finish or close() it first"
            )
        if self._backend is None:
            self._backend = _new_backend(opts)
        call = _Call(
            task_fn, calls, total, opts, self._backend, owns_backend=False, describe=describe
        )
        run = call.start(max_ahead=max_ahead)
        self._busy = weakref.ref(run)
        return run

    def close(self) -> None:
        """Stop the workers (waiting briefly for them to exit). Idempotent."""
        self._closed = True
        _live_pools.discard(self)
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close(kill=True)


class Results(Iterator[Any]):
    """What ``imap`` returns: the results as they come, and ``report``, the call's
    end-of-run report (complete once the iteration ended). ``close()`` stops the workers.

    Example:
        >>> import multitrack as mt
        >>> results = mt.imap(abs, [-1, -2], progress=False)
        >>> list(results), results.report.succeeded
        ([1, 2], 2)
    """

    def __init__(self, run: Run) -> None:
        self.report = run.report
        self._results = iter(run)

    def __iter__(self) -> Results:
        return self

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        """Stop the call now (its workers with it); what was not yielded is dropped."""
        self._results.close()  # type: ignore[attr-defined]


_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _close_pools_at_exit() -> None:
    for pool in list(_live_pools):
        pool.close()


class _Call:
    """One prepared call: validated options, input stream, backend."""

    def __init__(
        self,
        fn: Callable[..., Any],
        calls: Iterable[Any],
        total: int | None,
        opts: Options,
        backend: Backend,
        *,
        owns_backend: bool,
        describe: Callable[[tuple[Any, ...]], Any],
        progress: Progress | None = None,
    ) -> None:
        self.fn, self.calls, self.total, self.opts = fn, calls, total, opts
        self.backend, self.owns_backend, self.describe = backend, owns_backend, describe
        self.progress = progress

    def start(self, *, max_ahead: int | None) -> Run:
        opts = self.opts
        progress = self.progress or make_progress(opts.progress, total=self.total, desc=opts.desc)
        return Run(
            self.backend,
            self.fn,
            self.calls,
            total=self.total,
            ordered=opts.ordered,
            sizer=ChunkSizer(fixed=opts.chunksize, slots=self.backend.slots, cap=self._cap()),
            policy=Policy(opts.errors, opts.retries, opts.retry_delay, opts.timeout),
            progress=progress,
            describe=self.describe,
            max_ahead=max_ahead,
            owns_backend=self.owns_backend,
            checkpoint=None
            if opts.checkpoint is None
            else Checkpoint(opts.checkpoint, opts.key, opts.on_change),
            report=opts.report,
            backend_name=opts.backend,
            memory=self._memory_budget(),
        )

    def _memory_budget(self) -> Budget | None:
        """What the run keeps of its memory: with ``memory_limit="auto"``, its budget."""
        limit = self.opts.memory_limit
        if limit is None:
            return None
        from multitrack._budget import Budget
        from multitrack._memory import auto_budget

        size = auto_budget() if limit == "auto" else None
        return Budget(size, slots=self.backend.slots, clock=time.monotonic)

    def _cap(self) -> int | None:
        """The most tasks one chunk may hold, whatever its size would be."""
        if self.opts.timeout is not None and self.backend.times_chunks_only:
            return 1  # a deadline per task needs a chunk per task there
        return self.opts.max_tasks_per_worker


def _collect(run: Run) -> list[Any]:
    """Every result of a run, in a list (``map``): gathered batch by batch, not one by one.
    A run stopped by a failure or Ctrl-C hands what it finished to the exception
    (``.results``)."""
    results: list[Any] = []
    try:
        for batch in run.batches():
            if not results:
                results = batch  # the run's own list: kept, not copied
            else:
                results += batch
    except (TaskError, KeyboardInterrupt) as stopped:
        stopped.results = _finished(results, run)  # type: ignore[union-attr]
        raise
    return results


def _finished(released: list[Any], run: Run) -> dict[int, Any] | list[Any]:
    """What a stopped run finished: ``{index: result}`` in input order, or a list in the
    order tasks completed (``ordered=False``)."""
    held = run.order.held()
    if isinstance(held, list):
        return released + held
    finished = dict(enumerate(released))
    finished.update(held)
    return dict(sorted(finished.items()))


def _prepare(
    name: str,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: Any,
    *,
    star: bool,
) -> _Call:
    opts = validate(**options)
    task_fn, calls, total, describe = _inputs(name, fn, iterables, star)
    backend = _new_backend(opts)
    return _Call(task_fn, calls, total, opts, backend, owns_backend=True, describe=describe)


def _new_backend(opts: Options) -> Backend:
    return backends.create(
        opts.backend,
        opts.workers,
        initializer=opts.initializer,
        initargs=opts.initargs,
        max_tasks_per_worker=opts.max_tasks_per_worker,
        start_method=opts.start_method,
        address=opts.address,
        client=opts.client,
        fit_cluster=opts.fit_cluster,
        memory_limit=opts.memory_limit,
    )


def _inputs(
    name: str, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], star: bool
) -> tuple[Callable[[Any], Any], Iterable[Any], int | None, Callable[[Any], Any]]:
    """Check ``fn`` and the iterables. Return what workers call with one argument per task,
    the lazy stream of those arguments, the total when it can be known without consuming
    anything, and how to describe a task in an error. A single list or tuple comes back as it
    is, for the scheduler to slice.

    A task of a single iterable travels as the bare item, not a 1-tuple: on tiny tasks the
    tuples cost more than the work (build, pickle, unpickle, ``fn(*args)``: about 0.4 µs
    a task, measured). Several arguments travel as a tuple that ``Spread`` unpacks."""
    if not callable(fn):
        raise TypeError(f"{name}() fn must be callable, got {type(fn).__name__} {fn!r:.80}")
    if not iterables:
        raise TypeError(f"{name}() needs at least one iterable of inputs after fn")
    iterators = []
    for position, iterable in enumerate(iterables):
        try:
            iterators.append(iter(iterable))
        except TypeError:
            which = "iterable" if star else f"iterable #{position + 1}"
            raise TypeError(
                f"{name}() {which} is not iterable: got {type(iterable).__name__}"
            ) from None
    total = _total(iterables)
    if star:
        return Spread(fn), builtins.map(_star_args, iterators[0]), total, _same
    if len(iterators) == 1:
        single = iterables[0]
        return fn, single if type(single) in (list, tuple) else iterators[0], total, _same
    # like map: stop at the shortest
    return Spread(fn), builtins.zip(*iterators, strict=False), total, _same


def _total(iterables: tuple[Iterable[Any], ...]) -> int | None:
    hints = []
    for iterable in iterables:
        hint = operator.length_hint(iterable, -1)
        if hint < 0:
            return None
        hints.append(hint)
    return min(hints)


def _star_args(item: Any) -> Any:
    """A ``starmap`` item as the tuple of its arguments. An item that is not iterable goes
    as it is: unpacking it fails in the worker, as that task's ``TaskError`` (with its
    index), not as an error that stops the whole run."""
    try:
        return tuple(item)
    except TypeError:
        return item


def _same(arg: Any) -> Any:
    return arg


def _single_or_tuple(args: tuple[Any, ...]) -> Any:
    return args[0] if len(args) == 1 else args
