"""Native threads that a fork would break: GNU OpenMP's pool (``libgomp``).

A fork copies only the thread that calls it. Most native pools cope: OpenBLAS (numpy's) stops
its threads around a fork and starts new ones in the child. GNU OpenMP does not: a child
forked after its parent ran a parallel region believes the pool's threads still exist and
waits for them at its own first parallel region, forever. PyTorch's and scikit-learn's Linux
wheels bundle libgomp, and a module that runs a parallel operation at import (a model built
at module level) leaves the pool behind in whoever imported it: the zygote, when it preloads
the call's modules, or the caller. So before either is forked, ``openmp_threads`` counts the
threads of the process that sit inside libgomp::

    /proc/self/task            one entry per thread: only this one? nothing to look for
    /proc/self/maps            where libgomp's code is mapped (no libgomp: nothing to look for)
    /proc/self/task/T/syscall  where thread T is blocked: its program counter in libgomp's code
                               (the pool sleeps on a futex it calls inline), or "running"

A thread that runs at that moment cannot be placed: it is looked at again every 0.5 ms for
up to 0.1 s (a spinning OpenBLAS thread is soon caught inside sched_yield, outside libgomp),
and counted if it never stops running (libgomp's pool spins for a while after a region, with
no system call, before it sleeps): a false alarm costs a slower start (the zygote's
workers start as fresh interpreters) or a clear refusal (``start_method="fork"``), a miss
costs a hang. Nothing is read in a process with one thread.

**Letting the pool go.** OpenMP 5.0 has a call for exactly this: ``omp_pause_resource_all``
(libgomp of GCC 9 and later: torch's bundled copy, Debian 12's) tears down the calling
thread's pool, whose threads exit, and the next parallel region starts a new one. So where
threads are found, ``release_openmp`` asks every libgomp of the process to pause, and counts
again: a fork is safe when none is left (the zygote's workers are then forks after all, and a
fork of the caller is not refused). A pool it cannot release (an older libgomp, a pool of
another thread) still counts.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def openmp_threads() -> int:
    """How many threads of this process belong (or may belong) to GNU OpenMP's pool.

    Example:
        >>> openmp_threads()  # this process ran no OpenMP parallel region
        0
    """
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # no /proc (macOS): fork is not used there by default
        return 0
    if len(tasks) <= 1:
        return 0
    code = _libgomp_code()
    if not code:
        return 0
    me = threading.get_native_id()
    verdicts = {tid: _inside(tid, code) for tid in map(int, tasks) if tid != me}
    for _ in range(RUNNING_CHECKS):  # a thread that runs now may block in a moment
        running = [tid for tid, inside in verdicts.items() if inside is None]
        if not running:
            break
        time.sleep(RUNNING_PAUSE)
        verdicts.update((tid, _inside(tid, code)) for tid in running)
    return sum(1 for inside in verdicts.values() if inside is not False)


def release_openmp() -> int:
    """Ask each GNU OpenMP of this process to let its pool's threads go (see the module's
    docstring), then how many OpenMP threads are left: 0 when a fork is safe again.

    Example:
        >>> release_openmp()  # no pool here: nothing to release
        0
    """
    if not _libgomp_code():
        return 0  # no libgomp: no pool
    import ctypes

    for path in _libgomp_paths():
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:  # not loaded after all
            continue
        pause = getattr(library, "omp_pause_resource_all", None)
        if pause is not None:  # absent before GCC 9: its pool stays, and counts
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            pause(OMP_PAUSE_SOFT)
    return openmp_threads()


OMP_PAUSE_SOFT = 1  # omp.h's omp_pause_soft: release the threads, keep the data


# A running thread is looked at again every 0.5 ms for up to 100 ms: caught once in a system
# call, it is placed. OpenBLAS's idle threads spin on sched_yield for about 0.1 s after any
# work; an idle libgomp thread spins without a system call, then sleeps in libgomp.
RUNNING_PAUSE = 0.0005
RUNNING_CHECKS = 200


_code: tuple[int, list[tuple[int, int]]] = (-1, [])  # (len(sys.modules), libgomp's code)


def _libgomp_code() -> list[tuple[int, int]]:
    """The address ranges of libgomp's executable mappings in this process. Reading the maps
    takes about 1 ms in a process that imported numpy and OpenCV, and a fork of the caller
    asks before every worker: the answer is kept until a module is imported (libgomp comes
    with one, torch's or scikit-learn's extension), and once found (it never moves)."""
    global _code
    if _code[1] or _code[0] == len(sys.modules):
        return _code[1]
    _code = (len(sys.modules), _read_libgomp_code())
    return _code[1]


def _read_libgomp_code() -> list[tuple[int, int]]:
    return [(low, high) for low, high, _ in _libgomp_mappings()]


def _libgomp_paths() -> list[str]:
    """The files of the libgomp copies mapped in this process (torch bundles its own)."""
    return sorted({path for _, _, path in _libgomp_mappings()})


def _libgomp_mappings() -> list[tuple[int, int, str]]:
    """(low, high, path) of each executable mapping of a libgomp in this process."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libgomp" not in line:
                    continue
                span, perms, *rest = line.split()
                if "x" in perms and rest and os.path.basename(rest[-1]).startswith("libgomp"):
                    low, high = span.split("-")
                    found.append((int(low, 16), int(high, 16), rest[-1]))
    except OSError:
        return []
    return found


def _inside(tid: int, code: list[tuple[int, int]]) -> bool | None:
    """Whether thread ``tid`` waits in ``code``; ``None`` while it runs (it cannot be told)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as file:
            fields = file.read().split()
    except OSError:  # it has exited, or this kernel does not say: it cannot be told
        return os.path.isdir(f"/proc/self/task/{tid}")
    if not fields or fields[0] == "running":
        return None
    try:
        pc = int(fields[-1], 16)
    except ValueError:
        return True
    return any(low <= pc < high for low, high in code)
