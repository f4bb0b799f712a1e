"""``python -m benchmarks.spy``: py-spy on one ``mt.map`` of a benchmark workload, summed up.

Records the caller and every worker (``py-spy record --subprocesses --threads``, active
samples only: a thread blocked in a system call without the GIL is idle and not sampled),
then counts samples by process (the caller, the workers), by thread within a worker (the one
that ran tasks, the others) and by the innermost multitrack or standard-library function, so
that what multitrack spends beside the tasks is listed by where it is spent::

    python -m benchmarks.spy c              # (c): 150 tasks of 20 ms, 2 workers
    python -m benchmarks.spy two --calls 200  # 200 calls of 2 no-op tasks in a row

Needs ``py-spy`` on PATH (``pip install py-spy``) and the right to trace children (root, or
``ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks import workloads
from benchmarks.runner import ROOT

__all__ = ["main", "summarize"]

_SCRIPT = """
import sys, time
sys.path[:0] = {paths!r}
import multitrack as mt, multitrack._api, multitrack.backends._process
from benchmarks import tasks, workloads
key, params, calls = {key!r}, {params!r}, {calls!r}
fn = workloads.task_function(key)
items = workloads.build_inputs(key, params, __import__("pathlib").Path({out!r}))
time.sleep(0.2)
for _ in range(calls):
    mt.map(fn, items, workers=2, progress=False)
"""
_PROCESS = re.compile(r"^process (\d+):")
_THREAD = re.compile(r"^thread \((\w+)\)")


def summarize(raw: str, task_function: str) -> str:
    """Samples by process, thread and innermost function (see the module docstring)."""
    stacks: list[tuple[str, str, list[str], int]] = []
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or not number.isdigit():
            continue
        process, thread = _PROCESS.match(frames[0]), _THREAD.match(frames[1])
        pid = process.group(1) if process else "?"
        tid = thread.group(1) if thread else "?"
        stacks.append((pid, tid, frames[2:], int(number)))
    if not stacks:
        return "no samples"
    # py-spy may file a forked worker's stacks under the caller's pid: threads tell them apart
    root = {tid for _, tid, f, _ in stacks if not any("_worker.py" in x for x in f)}
    task_threads = {(p, t) for p, t, f, _ in stacks if any(task_function in x for x in f)}
    places: Counter[str] = Counter()
    for pid, tid, frames, count in stacks:
        if any(task_function in frame for frame in frames):
            where = "worker, in the task"
        elif any("Worker.tick" in frame or "_read (" in frame for frame in frames):
            where = "worker, helper thread (py-spy counts its waits)"
        elif tid in root:
            where = "caller"
        elif (pid, tid) in task_threads:
            where = "worker, task thread, outside the task"
        else:
            where = "worker, other threads"
        places[f"{where}: {_innermost(frames)}"] += count
    total = sum(places.values())
    lines = [f"{total} samples"]
    lines += [f"{n:6d} {n / total:6.1%}  {place}" for place, n in places.most_common(40)]
    return "\n".join(lines)


def _innermost(frames: list[str]) -> str:
    """The innermost frame of multitrack or the standard library, with the one above it."""
    keep = [f for f in frames if "multitrack" in f or "/lib/python" in f or "(<" in f]
    chosen = keep[-2:] if keep else frames[-1:]
    return " < ".join(reversed([re.sub(r" \(.*?([^/]+\.py):\d+\)", r" (\1)", f) for f in chosen]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spy", description=__doc__)
    parser.add_argument("workload", choices=("a", "c", "d", "two"))
    parser.add_argument("--calls", type=int, default=1, help="calls in a row (default 1)")
    parser.add_argument("--rate", type=int, default=250, help="samples a second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="bench-spy-") as tmp:
        key = "b" if args.workload == "two" else args.workload
        if key == "b":
            params: dict[str, object] = {"count": 2}
        else:
            spin_s = workloads.calibrate_spin()
            params = workloads.plan(key, quick=False, workdir=Path(tmp), spin_s=spin_s)
        paths = [str(ROOT / "src"), str(ROOT)]
        script = _SCRIPT.format(paths=paths, key=key, params=params, calls=args.calls, out=tmp)
        (Path(tmp) / "probe.py").write_text(script)
        raw = args.raw or Path(tmp) / "raw.txt"
        command = [spy, "record", "--subprocesses", "--threads", "-r", str(args.rate)]
        command += ["--format", "raw", "-o", str(raw), "--", sys.executable, f"{tmp}/probe.py"]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        function = workloads.task_function(key).__name__
        print(summarize(raw.read_text(), f"{function} ("))
    return 0


if __name__ == "__main__":
    sys.exit(main())
