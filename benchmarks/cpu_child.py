"""The child's half of ``python -m benchmarks.cpu``: one call, with where its CPU went.

``benchmarks.one`` hands a spec of mode ``"cpu"`` here. The call is bracketed, as close to it
as the process allows, by the kernel's own accounting of this process::

    snapshot()   getrusage(SELF)       all threads of the caller, dead ones included
                 getrusage(THREAD)     the caller's main thread alone
                 getrusage(CHILDREN)   every child reaped so far, with all its threads
    ┌ call: contender.call(Traced(fn), items, workers) ┐
    snapshot()

The differences are the **parent's CPU** (and how much of it its helper threads took: SELF
minus THREAD), its **wake-ups** (voluntary context switches: it blocked and was woken) and
preemptions (involuntary ones), and the **workers' CPU** of every worker reaped by the end of
the call (all of a fork-based pool's; joblib keeps its workers alive, so none of its). Each
task, wrapped in ``tasks.Traced``, says its CPU time, when it started and ended and which
process and thread ran it, so the workers' CPU *beyond the tasks* is known, and so is the
**tail**: from the last task's end to the call's return (result transfer, teardown).

Per-thread figures of the workers (their helper threads) are sampled from outside, by the
runner (``benchmarks.threads``).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.contenders import Contender
from benchmarks.tasks import Traced
from benchmarks.workloads import build_inputs, check, task_function

__all__ = ["measure_cpu", "snapshot"]

_FIELDS = ("cpu_s", "vcs", "nvcs")


def snapshot() -> dict[str, dict[str, float]]:
    """CPU seconds and context switches of this process, its main thread and its children."""
    return {
        "self": _usage(resource.RUSAGE_SELF),
        "main": _usage(resource.RUSAGE_THREAD),
        "children": _usage(resource.RUSAGE_CHILDREN),
    }


def _usage(who: int) -> dict[str, float]:
    usage = resource.getrusage(who)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "vcs": usage.ru_nvcsw,
        "nvcs": usage.ru_nivcsw,
    }


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> Any:
    return {
        who: {field: after[who][field] - before[who][field] for field in _FIELDS} for who in after
    }


def measure_cpu(
    contender: Contender, key: str, params: dict[str, Any], workers: int, out_dir: Path
) -> dict[str, Any]:
    """One call of ``contender`` on workload ``key``, bracketed (see the module docstring)."""
    items = build_inputs(key, params, out_dir)
    traced = Traced(task_function(key))
    before = snapshot()
    started = time.monotonic()
    results = list(contender.call(traced, items, workers))
    ended = time.monotonic()
    after = snapshot()
    if not all(type(r) is tuple and len(r) == 6 for r in results):
        return {"ok": False, "error": "results are not the traced tasks' tuples"}
    values, cpu, starts, ends, pids, tids = (list(column) for column in zip(*results, strict=True))
    wrong = check(key, items, values)
    if wrong is not None:
        return {"ok": False, "error": f"wrong results: {wrong}"}
    return {
        "ok": True,
        "pid": os.getpid(),
        "seconds": ended - started,
        "task_cpu_s": sum(cpu),
        "task_cpu_max_s": max(cpu),
        "tasks": len(values),
        "first_start_s": min(starts) - started,
        "tail_s": ended - max(ends),
        "usage": _delta(before, after),
        "task_threads": sorted({(pid, tid) for pid, tid in zip(pids, tids, strict=True)}),
    }
