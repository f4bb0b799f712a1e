"""The contenders: each library called the way its documentation recommends, bar on where it
has one.

Every contender is a ``Contender``: a ``call`` that runs ``fn`` over a list of items on
``workers`` processes and returns the results in input order, started **and** stopped inside
the call, so pool start-up and shutdown are part of its time. ``timed`` puts the timer around
it (``multitrack-pool`` overrides it: its pool is started, and warmed up, before the timer).
``first`` is the cold-start probe: seconds from asking for a lazy map to its first result,
for those that have a lazy form.

The cluster backends (``cluster=True``: multitrack with ``backend="ray"`` or ``"dask"``) are
not peers: nothing else here runs on a cluster. With no cluster configured, as in the harness,
each call starts a local one and stops it, inside the timer, as a one-shot script pays it; the
report puts them in a section of their own. Each of their runs costs a cluster start (Ray
about 5 s, dask about 1-2 s on the 2-core machine) on top of the work, so they run on
``CLUSTER_WORKLOADS`` only, at most ``CLUSTER_MAX_RUNS`` times each: all six workloads would
add about 10 minutes to the default run, these about 5.

Library modules are imported by ``load`` before anything is timed (the child calls it first),
so import time is not counted for anyone: the modules the call itself uses too, which a
library may import only on its first call (``multiprocessing.pool`` for ``Pool``;
multitrack's process backend, and tqdm for its bar on a terminal).

Where the bars go, and what each does when its stream is not a terminal (the harness gives
every child a log file, or a pseudo-terminal with ``--bars tty``):

* multitrack: on a terminal a tqdm bar on stderr; otherwise status lines (one per 30 s and a
  summary), never ``\\r`` redraws. Neither is switched off.
* mpire and ``process_map``: tqdm on stderr; tqdm draws on a non-terminal too (``disable`` is
  ``False``), throttled to 10 redraws a second.
* mmengine: its own bar on stdout, one ``\\r`` redraw plus a flush per task, terminal or not.
* joblib, pebble, ``multiprocessing.Pool``, ``ProcessPoolExecutor``, the loop: no bar.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLUSTER_MAX_RUNS",
    "CLUSTER_WORKLOADS",
    "CONTENDERS",
    "DEFAULT",
    "ON_REQUEST",
    "Contender",
    "process_map_chunksize",
    "split",
]

Fn = Callable[[Any], Any]
Call = Callable[[Fn, list[Any], int], list[Any]]
First = Callable[[Fn, list[Any], int], float]

#: What the cluster backends run on (see the module docstring): per-task overhead, CPU-bound
#: work, large inputs, and the cold-start probe, which is their start-up alone.
CLUSTER_WORKLOADS = ("b", "c", "e", "cold")
#: ... and how many runs each of those measurements gets at most (5 of the 10 cold-start runs).
CLUSTER_MAX_RUNS = 5


@dataclass(frozen=True)
class Contender:
    """One way of running a map, as the report shows it."""

    name: str
    code: str  # the call, as the docs recommend it
    bar: str  # "" when the library has none
    modules: tuple[str, ...]  # imported by ``load``, before any timer
    call: Call
    first: First | None = None
    peer: bool = True  # counts as "a peer" when picking the best one
    serial: bool = False  # runs the tasks one at a time on one core (the loop)
    warm: bool = False  # its pool is started before the timer
    cluster: bool = False  # a cluster backend on one machine: reported apart from the peers
    own_cpu_seen: bool = True  # its processes' CPU time reaches the runner's getrusage
    workloads: tuple[str, ...] | None = None  # the keys it runs on ("cold": the probe); None: all
    max_runs: int | None = None  # at most this many runs per measurement; None: as many as asked
    notes: tuple[str, ...] = field(default=())

    def runs_in(self, key: str, run: int, runs: int) -> bool:
        """Whether run ``run`` (0-based) of the ``runs`` of workload ``key`` includes it: only
        on its ``workloads``, and at most ``max_runs`` times, spread evenly over the runs so
        that drift in the machine's load hits it as it hits the others."""
        if self.workloads is not None and key not in self.workloads:
            return False
        if key == "cold" and self.first is None:
            return False
        if key == "replace" and (self.serial or self.warm or self.cluster):
            return False  # benchmarks.replace: the loop would die itself
        if self.max_runs is None or self.max_runs >= runs:
            return True
        return run in {i * runs // self.max_runs for i in range(self.max_runs)}

    def load(self) -> None:
        """Import the library (and its submodules the call uses) now, untimed."""
        for module in self.modules:
            importlib.import_module(module)

    def timed(
        self, fn: Fn, items: list[Any], workers: int, calls: int = 1
    ) -> tuple[float, list[Any]]:
        """(seconds, results) of ``calls`` consecutive calls on equal consecutive parts of
        ``items`` (a script that maps several times), each call starting and stopping its own
        pool unless ``warm`` (then one pool, started before the timer, serves them all)."""
        batches = split(items, calls)
        if self.warm:
            return _timed_warm_pool(fn, batches, workers)
        started = time.perf_counter()
        results = [result for batch in batches for result in self.call(fn, batch, workers)]
        return time.perf_counter() - started, results


def split(items: list[Any], calls: int) -> list[list[Any]]:
    """``items`` in ``calls`` consecutive parts of equal size (the last one takes the rest)."""
    size = len(items) // calls
    return [items[i * size : (i + 1) * size] for i in range(calls - 1)] + [
        items[(calls - 1) * size :]
    ]


# What ``mt.map`` imports on its first call: the process backend (as Pool's contenders load
# ``multiprocessing.pool``) and, for a bar on a terminal, tqdm (as mpire's and process_map's
# contenders load it).
_MULTITRACK_MODULES = (
    "multitrack",
    "multitrack._api",
    "multitrack.backends._process",
    "multitrack._tqdm_bar",
)


# -- the calls ---------------------------------------------------------------------------------


def _loop(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    results = []
    for item in items:  # the baseline is literally a for-loop, as in the user's script
        results.append(fn(item))  # noqa: PERF401
    return results


def _multitrack(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    return _multitrack_on("process", fn, items, workers)


def _multitrack_fork(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    import multitrack as mt

    return mt.map(fn, items, workers=workers, start_method="fork")


def _multitrack_first(fn: Fn, items: list[Any], workers: int) -> float:
    return _multitrack_on_first("process", fn, items, workers)


def _multitrack_on(backend: str, fn: Fn, items: list[Any], workers: int) -> list[Any]:
    """``mt.map`` on ``backend``. On a cluster backend, with no cluster configured (the
    harness's children have none), it starts a local one of ``workers`` CPUs and shuts it
    down before returning, so the timer sees the cluster's start and stop."""
    import multitrack as mt

    return mt.map(fn, items, workers=workers, backend=backend)


def _multitrack_on_first(backend: str, fn: Fn, items: list[Any], workers: int) -> float:
    import multitrack as mt

    started = time.perf_counter()
    results = mt.imap(fn, items, workers=workers, backend=backend)
    next(results)
    elapsed = time.perf_counter() - started
    _close(results)  # stops the workers (or local cluster), untimed, as for the others
    return elapsed


def _multitrack_ray(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    return _multitrack_on("ray", fn, items, workers)


def _multitrack_ray_first(fn: Fn, items: list[Any], workers: int) -> float:
    return _multitrack_on_first("ray", fn, items, workers)


def _multitrack_dask(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    return _multitrack_on("dask", fn, items, workers)


def _multitrack_dask_first(fn: Fn, items: list[Any], workers: int) -> float:
    return _multitrack_on_first("dask", fn, items, workers)


def _timed_warm_pool(fn: Fn, batches: list[list[Any]], workers: int) -> tuple[float, list[Any]]:
    """multitrack with a reused ``mt.Pool``: started and warmed up (one small map, so every
    worker is up) before the timer, closed after it; one ``map`` per batch."""
    import multitrack as mt

    with mt.Pool(workers=workers) as pool:
        pool.map(fn, batches[0][: 2 * workers], progress=False)
        started = time.perf_counter()
        results = [result for batch in batches for result in pool.map(fn, batch)]
        elapsed = time.perf_counter() - started
    return elapsed, results


def _multitrack_checkpoint(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    """``mt.map`` writing a fresh journal: what ``checkpoint=`` costs a run that stores every
    result (the journal and its folder are removed after the call, untimed cleanup aside)."""
    import shutil
    import tempfile

    import multitrack as mt

    folder = tempfile.mkdtemp(prefix="mt-bench-journal-")
    try:
        return mt.map(fn, items, workers=workers, checkpoint=f"{folder}/run.sqlite")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mt_track(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    import multitrack as mt

    return list(mt.track_parallel_progress(fn, items, workers))


def _pool_imap(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        return list(pool.imap(fn, items, chunksize=1))


def _pool_imap_first(fn: Fn, items: list[Any], workers: int) -> float:
    import multiprocessing

    started = time.perf_counter()
    pool = multiprocessing.Pool(workers)
    try:
        next(pool.imap(fn, items, chunksize=1))
        return time.perf_counter() - started
    finally:
        pool.terminate()
        pool.join()


def _pool_map(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        return pool.map(fn, items)


def _executor(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as executor:
        return list(executor.map(fn, items))


def _executor_first(fn: Fn, items: list[Any], workers: int) -> float:
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as executor:
        next(iter(executor.map(fn, items)))
        elapsed = time.perf_counter() - started
        executor.shutdown(wait=True, cancel_futures=True)
    return elapsed


def _joblib(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from joblib import Parallel, delayed  # type: ignore[import-untyped,unused-ignore]

    results: list[Any] = Parallel(n_jobs=workers)(delayed(fn)(item) for item in items)
    return results


def _joblib_first(fn: Fn, items: list[Any], workers: int) -> float:
    from joblib import Parallel, delayed  # type: ignore[import-untyped,unused-ignore]

    started = time.perf_counter()
    results = Parallel(n_jobs=workers, return_as="generator")(delayed(fn)(x) for x in items)
    next(results)
    elapsed = time.perf_counter() - started
    _close(results)
    return elapsed


def _mpire(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from mpire import WorkerPool  # type: ignore[attr-defined,unused-ignore]

    with WorkerPool(n_jobs=workers) as pool:
        results: list[Any] = pool.map(fn, items, progress_bar=True, concatenate_numpy_output=False)
    return results


def _mpire_first(fn: Fn, items: list[Any], workers: int) -> float:
    from mpire import WorkerPool  # type: ignore[attr-defined,unused-ignore]

    started = time.perf_counter()
    with WorkerPool(n_jobs=workers) as pool:
        results = pool.imap(fn, items, progress_bar=True)
        next(results)
        elapsed = time.perf_counter() - started
        list(results)  # mpire's imap must be drained before the pool can stop cleanly
    return elapsed


def process_map_chunksize(count: int, workers: int) -> int:
    """What we pass to ``process_map`` for more than 1000 items, where tqdm warns that the
    default of 1 is slow: ``Pool.map``'s own rule, ``ceil(count / (4 * workers))``."""
    return max(1, math.ceil(count / (4 * workers)))


def _process_map(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from tqdm.contrib.concurrent import process_map

    if len(items) > 1000:
        chunksize = process_map_chunksize(len(items), workers)
        return list(process_map(fn, items, max_workers=workers, chunksize=chunksize))
    return list(process_map(fn, items, max_workers=workers))


def _pebble(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from pebble import ProcessPool

    with ProcessPool(max_workers=workers) as pool:
        return list(pool.map(fn, items).result())


def _mmengine(fn: Fn, items: list[Any], workers: int) -> list[Any]:
    from mmengine.utils import track_parallel_progress  # type: ignore[import-untyped,unused-ignore]

    return list(track_parallel_progress(fn, items, workers))


def _close(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


# -- the registry -------------------------------------------------------------------------------

_ALL = (
    Contender(
        "loop",
        "for x in items: results.append(fn(x))",
        "",
        (),
        _loop,
        peer=False,
        serial=True,
        notes=("in the measuring process itself: one core, no pool",),
    ),
    Contender(
        "multitrack",
        "mt.map(fn, items, workers=N)",
        "tqdm on stderr (terminal); status lines otherwise",
        _MULTITRACK_MODULES,
        _multitrack,
        _multitrack_first,
        peer=False,
        notes=(
            "workers are forks of a zygote (a clean interpreter started once per caller, "
            "that imported the function's modules once); chunksize adapts to task time",
        ),
    ),
    Contender(
        "multitrack-fork",
        'mt.map(fn, items, workers=N, start_method="fork")',
        "as multitrack",
        _MULTITRACK_MODULES,
        _multitrack_fork,
        peer=False,
        notes=("workers are forks of the caller, not of the zygote: the other start semantics",),
    ),
    Contender(
        "multitrack-pool",
        "with mt.Pool(workers=N) as p: p.map(fn, items)  # pool started before the timer",
        "as multitrack",
        _MULTITRACK_MODULES,
        _multitrack,
        peer=False,
        warm=True,
        notes=("reused pool: start-up excluded, so not comparable with the other rows",),
    ),
    Contender(
        "multitrack-checkpoint",
        'mt.map(fn, items, workers=N, checkpoint="run.sqlite")  # a fresh journal each run',
        "as multitrack",
        (*_MULTITRACK_MODULES, "multitrack._checkpoint", "multitrack._keys", "sqlite3"),
        _multitrack_checkpoint,
        peer=False,
        notes=("every result stored in a new SQLite journal: the cost of checkpoint=",),
    ),
    Contender(
        "mt-track",
        "mt.track_parallel_progress(fn, items, N)  # the mmengine drop-in",
        "mmengine-style bar on stdout (terminal); whole lines otherwise",
        (*_MULTITRACK_MODULES, "multitrack._mmengine"),
        _mt_track,
        peer=False,
    ),
    Contender(
        "pool-imap",
        "with Pool(N) as p: list(p.imap(fn, items, chunksize=1))",
        "",
        ("multiprocessing.pool",),
        _pool_imap,
        _pool_imap_first,
        notes=("fork (the default start method on Linux before Python 3.14)",),
    ),
    Contender(
        "pool-map",
        "with Pool(N) as p: p.map(fn, items)  # chunksize = ceil(n / 4N)",
        "",
        ("multiprocessing.pool",),
        _pool_map,
        notes=("fork",),
    ),
    Contender(
        "executor",
        "with ProcessPoolExecutor(N) as ex: list(ex.map(fn, items))  # chunksize 1",
        "",
        ("concurrent.futures.process",),
        _executor,
        _executor_first,
        notes=("fork; map() submits every item before the first result",),
    ),
    Contender(
        "joblib",
        "Parallel(n_jobs=N)(delayed(fn)(x) for x in items)  # batch_size='auto'",
        "",
        ("joblib",),
        _joblib,
        _joblib_first,
        notes=(
            "loky workers (fresh interpreters), kept alive after the call for reuse, so their "
            "shutdown is not in the time; arrays over 1 MB are passed as memory maps",
        ),
    ),
    Contender(
        "mpire",
        "with WorkerPool(n_jobs=N) as p: p.map(fn, items, progress_bar=True)",
        "tqdm on stderr",
        ("mpire",),
        _mpire,
        _mpire_first,
        notes=(
            "fork; chunks of n / (64 N); concatenate_numpy_output=False so (f) returns a list "
            "like everyone else",
        ),
    ),
    Contender(
        "process-map",
        "process_map(fn, items, max_workers=N)  # chunksize: see notes",
        "tqdm on stderr",
        ("tqdm.contrib.concurrent", "concurrent.futures.process"),
        _process_map,
        notes=(
            "ProcessPoolExecutor + tqdm, fork; chunksize 1, or ceil(n / 4N) above 1000 items "
            "(tqdm warns there); with chunks its bar undercounts (tqdm#1791)",
        ),
    ),
    Contender(
        "pebble",
        "with ProcessPool(max_workers=N) as p: list(p.map(fn, items).result())",
        "",
        ("pebble",),
        _pebble,
        notes=("fork; chunksize 1",),
    ),
    Contender(
        "mmengine",
        "track_parallel_progress(fn, items, N)",
        "own bar on stdout, a redraw per task",
        ("mmengine.utils",),
        _mmengine,
        notes=("multiprocessing.Pool.imap, chunksize 1, fork",),
    ),
    Contender(
        "multitrack-ray",
        'mt.map(fn, items, workers=N, backend="ray")',
        "as multitrack",
        ("multitrack", "multitrack._api", "multitrack.backends._ray"),
        _multitrack_ray,
        _multitrack_ray_first,
        peer=False,
        cluster=True,
        workloads=CLUSTER_WORKLOADS,
        max_runs=CLUSTER_MAX_RUNS,
        own_cpu_seen=False,  # the raylet ignores SIGCHLD: its workers' CPU time is dropped
        notes=(
            "a local Ray instance of N CPUs, started (ray.init) and shut down inside the timed "
            "call, as a one-shot script pays it; chunks of about 50 ms of work as Ray tasks",
        ),
    ),
    Contender(
        "multitrack-dask",
        'mt.map(fn, items, workers=N, backend="dask")',
        "as multitrack",
        ("multitrack", "multitrack._api", "multitrack.backends._dask"),
        _multitrack_dask,
        _multitrack_dask_first,
        peer=False,
        cluster=True,
        workloads=CLUSTER_WORKLOADS,
        max_runs=CLUSTER_MAX_RUNS,
        notes=(
            "a dask LocalCluster of N single-threaded worker processes (spawned), started and "
            "closed inside the timed call, as a one-shot script pays it; chunks of about 50 ms "
            "of work as dask tasks",
        ),
    ),
)

CONTENDERS: dict[str, Contender] = {c.name: c for c in _ALL}
#: run unless ``--contenders`` says otherwise (mt-track, multitrack-checkpoint and multitrack-fork
#: are on request: they are multitrack's engine, measured for what they add or change)
ON_REQUEST = ("mt-track", "multitrack-checkpoint", "multitrack-fork")
DEFAULT = tuple(name for name in CONTENDERS if name not in ON_REQUEST)
