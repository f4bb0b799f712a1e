"""The worker-replacement row: from a worker's death to its replacement's first task.

``python -m benchmarks --only replace`` (it is part of the default run too). Each measurement is
a fresh ``python -m benchmarks.one`` child (mode ``"replace"``), as for the workloads::

    child: contender's one-shot call, 1 worker, tasks 0, 1, 2 (``Probe``)
      task 0   writes (time.monotonic(), pid) to <dir>/death, then os._exit(1)
      task k   writes (time.monotonic(), pid) to <dir>/start-k, returns k
    after the call (or PATIENCE_S, whichever comes first):
      seconds = first start after the death, in another process, - the death

``time.monotonic`` is one clock for every process of the machine, so the two ends can be
subtracted. The figure is what a user waits for because a worker died: noticing the death,
starting a new worker (a fork of the zygote, of the caller, a fresh interpreter) and giving it
the next task. With one worker nothing else can run meanwhile.

The call is each contender's own one-shot call (``contenders``), except multitrack's: its
default (``errors="raise"``) stops the call at the first failure, so its rows run with
``errors="return"``, which goes on and puts a ``TaskError`` in task 0's slot. What the call
did is part of the row (``fate``): it returned, raised (pebble's ``ProcessExpired`` for task 0,
the results of the others still there), or hung: ``multiprocessing.Pool`` (and so mmengine)
replaces the worker but loses the task it ran, so a map waits for that result forever; after
``PATIENCE_S`` the child gives up, records the replacement if one ran, and exits. A library
whose pool breaks instead (``ProcessPoolExecutor``: ``BrokenProcessPool``) runs no replacement:
its run is an error that says what the call raised.

joblib's ``Parallel(n_jobs=1)`` runs the tasks in the caller, so its row maps on what
``Parallel`` uses for more workers, loky's reusable executor, with one worker. The loop (it
would die itself), the reused pool (the same workers as multitrack's) and the cluster backends
do not take part (``Contender.runs_in``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["PATIENCE_S", "TASKS", "Probe", "child", "probe", "replacement_delay"]

TASKS = 3  # task 0 kills its worker; 1 and 2 show who runs next
PATIENCE_S = 4.0  # after this the call counts as hung (every task is instantaneous)


@dataclass(frozen=True)
class Probe:
    """One task: its index, and the folder the tasks write to (a dataclass: mpire would unpack
    a tuple)."""

    index: int
    folder: str


def probe(task: Probe) -> int:
    """Task 0 records its death and kills its worker; any other records its start."""
    name = "death" if task.index == 0 else f"start-{task.index}"
    Path(task.folder, name).write_text(f"{time.monotonic()!r} {os.getpid()}")
    if task.index == 0:
        os._exit(1)
    return task.index


def replacement_delay(folder: Path) -> tuple[float, int, int] | None:
    """(seconds from the death to the first later start in another process, dead pid, new
    pid), or ``None`` when no task started after the death."""
    death = _record(folder / "death")
    if death is None:
        return None
    starts = [_record(path) for path in folder.glob("start-*")]
    later = [s for s in starts if s is not None and s[1] != death[1] and s[0] >= death[0]]
    if not later:
        return None
    first = min(later)
    return first[0] - death[0], death[1], first[1]


def _record(path: Path) -> tuple[float, int] | None:
    try:
        moment, pid = path.read_text().split()
    except (OSError, ValueError):
        return None
    return float(moment), int(pid)


# -- the child (mode "replace" of benchmarks.one) ----------------------------------------------


class _Hung(Exception):
    """The call outlived ``PATIENCE_S``."""


def _own_call(name: str) -> Callable[[Any, list[Any], int], Any] | None:
    """multitrack's calls with ``errors="return"``, joblib's on its loky executor (see the
    module docstring); ``None``: the contender's own call."""
    if name == "joblib":
        return _loky
    start = {"multitrack": None, "multitrack-fork": "fork"}
    if name not in start:
        return None
    method = start[name]

    def call(fn: Any, items: list[Any], workers: int) -> Any:
        import multitrack as mt

        options: dict[str, Any] = {"start_method": method} if method else {}
        return mt.map(fn, items, workers=workers, errors="return", **options)

    return call


def _loky(fn: Any, items: list[Any], workers: int) -> Any:
    """What ``Parallel(n_jobs=N)`` runs on for N > 1 (with ``n_jobs=1`` it runs the tasks in
    the caller, which task 0 would kill): loky's reusable executor."""
    from joblib.externals.loky import get_reusable_executor  # type: ignore[import-untyped]

    return list(get_reusable_executor(max_workers=workers).map(fn, items))


def _fate(call: Callable[[Any, list[Any], int], Any], items: list[Any]) -> str:
    """What the call did: ``returned``, ``raised <type>: <message>`` or ``hung``."""

    def give_up(signum: int, frame: object) -> None:
        raise _Hung

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, PATIENCE_S)
    try:
        call(probe, items, 1)
        return "returned"
    except _Hung:
        return f"hung (no result after {PATIENCE_S:g} s: the crashed task's result never came)"
    except BaseException as error:
        return f"raised {type(error).__name__}: {str(error)[:160]}".rstrip(": ")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def child(spec: dict[str, Any], result_path: Path) -> NoReturn:
    """Measure once, write the outcome (JSON) and leave at once: a hung pool's threads and
    workers must not hold the child's exit (the runner kills what is left)."""
    import json

    from benchmarks.contenders import CONTENDERS

    contender = CONTENDERS[spec["contender"]]
    contender.load()
    folder = Path(spec["out_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    items = [Probe(index, str(folder)) for index in range(TASKS)]
    fate = _fate(_own_call(contender.name) or contender.call, items)
    found = replacement_delay(folder)
    if found is None:
        outcome: dict[str, Any] = {"ok": False, "error": f"no replacement ran: {fate}"}
    else:
        seconds, dead, new = found
        detail = {"fate": fate, "dead_pid": dead, "new_pid": new}
        outcome = {"ok": True, "seconds": seconds, "detail": detail}
    result_path.write_text(json.dumps(outcome))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
