"""One measurement in a fresh interpreter: ``python -m benchmarks.one SPEC RESULT``.

The runner starts this module once per (contender, workload, repeat), so no library's imported
modules, worker pools, threads, caches or leaked processes can reach the next measurement.

What happens here, in order::

    read SPEC (JSON: contender, workload key, its parameters, workers, mode, out dir)
    contender.load()                 import the library                      untimed
    build_inputs()                   the task list (8 MB arrays for (e))     untimed
                                     (g): numpy, cv2 and the task's module imported, as a
                                     script's top does (benchmarks.workloads)
    gc.collect()
    ┌ timer ───────────────────────────────────────────────────────────────┐
    │ mode "map":   start pool, map every task, stop pool  (contender.call) │
    │               (g): that, once per call of the script (5 calls)       │
    │ mode "first": start pool, imap, first result          (contender.first)│
    │ mode "cpu":   the call, with where its CPU went      (benchmarks.cpu_child)│
    │ mode "replace": a worker's death to its replacement  (benchmarks.replace)│
    └──────────────────────────────────────────────────────────────────────┘
    check(results)                   right results, right order              untimed
    write RESULT (JSON: ok, seconds, task_cpu_s, floor_s, workers_floor_s | error)

On (a), (c) and (d) every task also reports the CPU time it took in its thread
(``tasks.CpuTimed``). From those, ``floor_s`` is the shortest time the run could have taken on
its cores, ``max(sum / cores, longest)``, at the speed the machine ran *that* run at. The
time above it is what the library added (start-up and shutdown, idle cores, CPU its own
threads and processes took from the tasks), and it is far steadier from run to run than the
time itself on a machine whose speed drifts. ``workers_floor_s`` is the same bound on all the
workers, also for the loop: the loop's is the floor every library is measured against, so a
library whose tasks run slower than the loop's (helper threads, wake-ups, cache misses) is
charged for it (``benchmarks.pairing``). Six runs of (c) on the 2-core VM: ``Pool.map``
took 1.21-1.73 s, of which 26-143 ms beyond the floor; multitrack 1.26-1.67 s, of which 32-65.

stdout and stderr belong to the bars (the runner points them at a log file or a pty), so the
outcome travels through the RESULT file. Any exception becomes ``{"ok": false, "error": ...}``;
a crash or a hang leaves no RESULT and the runner reports it as such.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from benchmarks import replace, workloads
from benchmarks.contenders import CONTENDERS
from benchmarks.cpu_child import measure_cpu
from benchmarks.tasks import CpuTimed
from benchmarks.workloads import WORKLOADS, build_inputs, check, task_function

__all__ = ["main", "measure", "work_floor"]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement ``spec`` describes; the outcome as a JSON-able dict."""
    contender = CONTENDERS[spec["contender"]]
    key: str = spec["workload"]
    workers: int = spec["workers"]
    contender.load()
    if spec["mode"] == "cpu":  # python -m benchmarks.cpu
        return _cpu(measure_cpu(contender, key, spec["params"], workers, Path(spec["out_dir"])))
    fn = task_function(key)
    items = build_inputs(key, spec["params"], Path(spec["out_dir"]))
    gc.collect()
    if spec["mode"] == "first":
        if contender.first is None:
            return {"ok": False, "error": f"{contender.name} has no lazy map"}
        return {"ok": True, "seconds": contender.first(fn, items, workers)}
    times_work = key in WORKLOADS and WORKLOADS[key].times_work
    calls = workloads.calls(key, spec["params"])
    seconds, results = contender.timed(
        CpuTimed(fn) if times_work else fn, items, workers, calls=calls
    )
    outcome: dict[str, Any] = {"ok": True, "seconds": seconds}
    if times_work:
        results, task_cpu = _split(results)
        if task_cpu is not None:
            cores = 1 if contender.serial else workers
            outcome["task_cpu_s"] = sum(task_cpu)
            outcome["floor_s"] = work_floor(task_cpu, cores)
            # the same tasks on every worker: the loop's is the yardstick of everyone's
            outcome["workers_floor_s"] = work_floor(task_cpu, workers)
    wrong = check(key, items, results)
    if wrong is not None:
        return {"ok": False, "error": f"wrong results: {wrong}", "seconds": seconds}
    return outcome


def _cpu(measured: dict[str, Any]) -> dict[str, Any]:
    if not measured.pop("ok"):
        return {"ok": False, "error": measured["error"]}
    seconds, task_cpu = measured.pop("seconds"), measured.pop("task_cpu_s")
    return {"ok": True, "seconds": seconds, "task_cpu_s": task_cpu, "detail": measured}


def work_floor(task_cpu: list[float], cores: int) -> float:
    """The shortest time tasks that took these CPU times can take on ``cores`` cores, whoever
    runs them: all the work spread evenly, or the longest task, whichever is more."""
    return max(sum(task_cpu) / cores, max(task_cpu, default=0.0))


def _split(results: Any) -> tuple[list[Any], list[float] | None]:
    """``CpuTimed`` results into (results, CPU seconds per task); results as they came when
    they are not all such pairs (``check`` then says what is wrong)."""
    results = list(results)
    if not all(type(r) is tuple and len(r) == 2 for r in results):
        return results, None
    return [r[0] for r in results], [float(r[1]) for r in results]


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``SPEC`` and ``RESULT`` are paths of JSON files."""
    spec_path, result_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    if spec["mode"] == "replace":  # benchmarks.replace: writes RESULT and exits itself
        replace.child(spec, Path(result_path))
    try:
        outcome = measure(spec)
    except BaseException as error:  # a library's KeyboardInterrupt or SystemExit is news too
        lines = traceback.format_exception_only(type(error), error)
        outcome = {"ok": False, "error": "".join(lines).strip()}
        traceback.print_exc()
    Path(result_path).write_text(json.dumps(outcome))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
