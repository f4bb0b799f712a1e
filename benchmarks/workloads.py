"""The workloads: the six of issue #4 and (g) of issue 13; what each one measures, its sizes,
its inputs and its check.

Two halves, split by process:

* the **runner** (``plan``) fixes a workload's parameters once per benchmark run: sizes (full or
  ``--quick``), loop lengths calibrated to this machine's speed, and, for (a), the synthetic
  PNGs on disk. The parameters are plain JSON, the same for every contender and every repeat.
* the **child** (``build_inputs``, ``check``) rebuilds the inputs from those parameters before
  its timer starts, and checks the results after it stops: a contender that returns the wrong
  results, in the wrong order, or too few, is reported as such instead of being timed.

Sizes are chosen so that the default run (5 repeats, all contenders) takes about 15 minutes
on a 2-core machine, while every parallel run still lasts about a second or more, so pool
start-up is visible but does not dominate (it is counted: see ``benchmarks.one``).

Workload (g) is a real script's path (issue 13): the child imports numpy and OpenCV and the
task's module (``benchmarks.real_task``, which imports both at import time) before its timer,
as a script's top would, then times ``calls`` consecutive calls (``Workload.calls``), each
starting and stopping its own pool, as a script that calls ``mt.map`` five times does. Without
OpenCV it cannot run: each of its runs is then an error that says so (``MissingOpenCV``).

The skewed workload (d) has a known optimum. For tasks of durations t_i on c cores no schedule
can beat ``max(sum(t_i) / c, max(t_i))``; the report turns that into seconds with the loop's
measured time (``ideal_fraction``), a lower bound that even ignores pool start-up.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import tasks

__all__ = [
    "COLD_START",
    "REPLACEMENT",
    "WORKLOADS",
    "MissingOpenCV",
    "Workload",
    "build_inputs",
    "calibrate_spin",
    "calls",
    "check",
    "ideal_fraction",
    "plan",
    "task_function",
]

Params = dict[str, Any]
SPIN_TARGET_S = 0.020  # (c): one task
SLOW_TASK_S = 0.300  # (d): each of the slow tasks at both ends


@dataclass(frozen=True)
class Workload:
    """One row group of the report."""

    key: str  # "a".."g", or "cold"
    name: str  # "images", "trivial", ...
    title: str
    function: str  # name in ``module``
    measures_memory: bool = False
    # Each task also reports its CPU time (``tasks.CpuTimed``), so the report can tell the
    # work from what the library adds. Not for (b): two clock reads would double a trivial
    # task; nor for (e), (f), where moving the data is the point.
    times_work: bool = False
    module: str = "tasks"  # of benchmarks: where ``function`` lives


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            "a",
            "images",
            "seed example: read PNG, resize to 200x200, write JPEG",
            "resize_image",
            times_work=True,
        ),
        Workload("b", "trivial", "trivial calls (per-task overhead)", "identity"),
        Workload(
            "c", "cpu", "CPU-bound pure Python, about 20 ms per task", "spin", times_work=True
        ),
        Workload(
            "d", "skewed", "skewed durations, slow tasks first and last", "spin", times_work=True
        ),
        Workload("e", "big-in", "large inputs: an 8 MB array in, a scalar out", "array_sum", True),
        Workload("f", "big-out", "large outputs: an int in, an 8 MB array out", "make_array", True),
        Workload(
            "g",
            "real-script",
            "a script importing numpy and cv2, then several calls of ~5 ms cv2 tasks from a "
            "module that imports cv2 and numpy",
            "blur",
            module="real_task",
        ),
    )
}
#: Not a map: seconds from ``imap(...)`` to its first result, trivial function, fresh process.
COLD_START = Workload("cold", "cold-start", "cold start: imap() to first result", "identity")
#: Not a map: a worker's death to its replacement's first task (``benchmarks.replace``).
REPLACEMENT = Workload(
    "replace", "worker-replacement", "a worker's death to its replacement's first task", "probe"
)

# Sizes: (full, quick).
_IMAGES = ({"count": 160, "width": 1024, "height": 768}, {"count": 12, "width": 320, "height": 240})
_TRIVIAL = ({"count": 200_000}, {"count": 2_000})
_CPU = ({"count": 150}, {"count": 12})
_SKEWED = ({"fast": 120, "slow": 4}, {"fast": 16, "slow": 4})
_ARRAYS = ({"count": 64}, {"count": 6})
_COLD = ({"count": 100}, {"count": 100})
_SCRIPT = ({"calls": 5, "per_call": 40}, {"calls": 2, "per_call": 6})


class MissingOpenCV(RuntimeError):
    """Workload (g) cannot run here: OpenCV or numpy is not installed."""


def calibrate_spin() -> float:
    """Seconds per ``tasks.spin`` iteration on this machine (best of 5, so noise cannot inflate
    it); done once in the runner, so every contender gets the same loop lengths."""
    iterations = 100_000
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        tasks.spin(iterations)
        best = min(best, time.perf_counter() - started)
    return best / iterations


def plan(key: str, *, quick: bool, workdir: Path, spin_s: float) -> Params:
    """The parameters of workload ``key`` for this benchmark run (JSON-able)."""
    pick = 1 if quick else 0
    if key == "a":
        params: Params = dict(_IMAGES[pick])
        params["src_dir"] = str(_make_images(workdir / "png", params))
        return params
    if key == "b":
        return dict(_TRIVIAL[pick])
    if key == "c":
        return {"iterations": [round(SPIN_TARGET_S / spin_s)] * _CPU[pick]["count"]}
    if key == "d":
        return {"iterations": [round(s / spin_s) for s in _skewed_durations(**_SKEWED[pick])]}
    if key in ("e", "f"):
        return dict(_ARRAYS[pick])
    if key == "cold":
        return dict(_COLD[pick])
    if key == "g":
        return _plan_script(dict(_SCRIPT[pick]))
    raise KeyError(key)


def _plan_script(params: Params) -> Params:
    """(g): the blur rounds of a ~5 ms task on this machine, or why (g) cannot run here."""
    try:
        params["rounds"] = _real_task().calibrate_rounds()
    except MissingOpenCV as missing:
        params["rounds"], params["missing"] = 1, str(missing)
    return params


def _real_task() -> Any:
    """``benchmarks.real_task``, imported (with OpenCV and numpy), or ``MissingOpenCV``."""
    try:
        import cv2  # noqa: F401
        import numpy  # noqa: F401

        from benchmarks import real_task
    except ImportError as error:
        raise MissingOpenCV(
            f"workload (g) needs OpenCV and numpy, from the bench extra "
            f'(pip install -e ".[bench]"): {error}'
        ) from error
    return real_task


def calls(key: str, params: Params) -> int:
    """How many consecutive calls the timed part makes: (g)'s ``calls``, else 1."""
    return int(params.get("calls", 1)) if key == "g" else 1


def _skewed_durations(fast: int, slow: int) -> list[float]:
    """Seconds per task: ``slow`` long tasks, half first and half last, around ``fast`` short
    ones whose lengths spread over 2-40 ms (log-uniform, fixed seed)."""
    rng = random.Random(4)
    middle = [math.exp(rng.uniform(math.log(0.002), math.log(0.040))) for _ in range(fast)]
    head = [SLOW_TASK_S] * (slow // 2)
    tail = [SLOW_TASK_S] * (slow - slow // 2)
    return [*head, *middle, *tail]


def ideal_fraction(params: Params, cores: int) -> float | None:
    """For (c) and (d): the best possible parallel time as a fraction of the serial time,
    ``max(total / cores, longest) / total``; ``None`` for the others."""
    iterations: list[int] | None = params.get("iterations")
    if not iterations:
        return None
    total = sum(iterations)
    return max(total / cores, max(iterations)) / total


def describe(key: str, params: Params) -> str:
    """The size of a workload, in words, for the report."""
    if key == "a":
        return f"{params['count']} PNGs of {params['width']}x{params['height']}"
    if key in ("b", "cold"):
        return f"{params['count']:,} calls"
    if key in ("c", "d"):
        its = params["iterations"]
        return f"{len(its)} tasks, {sum(its):,} loop steps in all, longest {max(its):,}"
    if key == "g":
        return (
            f"{params['calls']} calls of {params['per_call']} tasks, each "
            f"{params['rounds']} 7x7 Gaussian blurs of a 256x256 image (about 5 ms)"
        )
    return f"{params['count']} arrays of 8 MB"


def _make_images(folder: Path, params: Params) -> Path:
    """Synthetic PNGs (the demo's generator), made once per benchmark run, untimed."""
    from multitrack._demo import make_images

    make_images(folder, params["count"], (params["width"], params["height"]))
    return folder


# -- child side -------------------------------------------------------------------------------


def task_function(key: str) -> Callable[[Any], Any]:
    """The function of workload ``key``, from ``benchmarks.tasks``."""
    workload = COLD_START if key == "cold" else WORKLOADS[key]
    module = _real_task() if workload.module == "real_task" else tasks
    function: Callable[[Any], Any] = getattr(module, workload.function)
    return function


def build_inputs(key: str, params: Params, out_dir: Path) -> list[Any]:
    """The list of task arguments (built before the timer starts; a list because mmengine,
    process_map, pebble and ProcessPoolExecutor take the whole input up front anyway)."""
    if key == "a":
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = sorted(Path(params["src_dir"]).glob("*.png"))
        return [tasks.ResizeJob(str(src), str(out_dir / f"{src.stem}.jpg")) for src in sources]
    if key in ("b", "cold", "f"):
        return list(range(params["count"]))
    if key in ("c", "d"):
        return list(params["iterations"])
    if key == "e":
        import numpy as np

        return [np.full(tasks.ARRAY_ITEMS, float(i)) for i in range(params["count"])]
    if key == "g":
        if "missing" in params:
            raise MissingOpenCV(params["missing"])
        blur = _real_task().Blur
        count = params["calls"] * params["per_call"]
        return [blur(seed, params["rounds"]) for seed in range(count)]
    raise KeyError(key)


def check(key: str, inputs: Sequence[Any], results: Any) -> str | None:
    """``None`` when ``results`` are right for ``inputs`` (in order), else what is wrong."""
    results = list(results)
    if len(results) != len(inputs):
        return f"{len(results)} results for {len(inputs)} tasks"
    if key == "a":
        expected: list[Any] = [Path(job.dst).name for job in inputs]
        if results == expected and all(Path(job.dst).is_file() for job in inputs):
            return None
        return "wrong file names, or JPEGs missing"
    if key == "g":
        return _check_blurs(inputs, results)
    if key in ("b", "cold"):
        expected = list(inputs)
    elif key in ("c", "d"):
        expected = _spin_results(inputs)
    elif key == "e":
        expected = [float(i) * tasks.ARRAY_ITEMS for i in range(len(inputs))]
    else:
        return _check_arrays(results)
    return None if results == expected else "results differ from the for-loop's"


def _spin_results(inputs: Sequence[int]) -> list[int]:
    """``tasks.spin`` in closed form: the sum over one 7-cycle of step*step % 7 is 14."""
    squares = [step * step % 7 for step in range(7)]
    return [n // 7 * 14 + sum(squares[: n % 7]) for n in inputs]


def _check_arrays(results: Sequence[Any]) -> str | None:
    for index, array in enumerate(results):
        ok = getattr(array, "shape", None) == (tasks.ARRAY_ITEMS,)
        if not ok or array[0] != index or array[-1] != index:
            return f"result {index} is not the expected 8 MB array"
    return None


def _check_blurs(inputs: Sequence[Any], results: Sequence[Any]) -> str | None:
    """(g): each result is its task's seed and the checksum of its image (computed here, once
    per distinct image, after the timer)."""
    real_task = _real_task()
    rounds = inputs[0].rounds if inputs else 1
    reference = [real_task.blur(real_task.Blur(v, rounds))[1] for v in range(real_task.VARIANTS)]
    expected = [(job.seed, reference[job.seed % real_task.VARIANTS]) for job in inputs]
    got = [tuple(result) for result in results]
    return None if got == expected else "results differ from the for-loop's"
