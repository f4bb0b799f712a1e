"""``python -m benchmarks.phases``: where one short call's time goes, multitrack against
``Pool.imap`` and ``ProcessPoolExecutor.map``: a call of 2 no-op tasks, start to return.

Each probe runs in a fresh process (forked workers, as the benchmark's), alternating between
the libraries round by round. In the probe, multitrack's phases are timed by wrapping, from
outside, the methods that bound them (nothing in ``src/`` changes)::

    call ─ begin (fork the workers, send the function) ─ first result ─ last result
         ─ end (the call's bookkeeping) ─ close: STOP to each worker, wait for their exits
           (``_wait_for_exits``, on pidfds), reap ─ the report ─ return

and the peers' phases by where their API splits: creating the pool, the results, and leaving
the ``with`` block (``Pool.__exit__`` is ``terminate()``; the executor's is
``shutdown(wait=True)``).

    python -m benchmarks.phases --rounds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.runner import ROOT

__all__ = ["main", "probe"]

Marks = list[tuple[str, float]]


def _wrap(owner: Any, name: str, marks: Marks, label: str) -> None:
    """Record ``label`` when ``owner.name`` is entered and ``label`` + " done" when it returns."""
    original = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        marks.append((label, time.monotonic()))
        try:
            return original(*args, **kwargs)
        finally:
            marks.append((label + " done", time.monotonic()))

    setattr(owner, name, wrapped)


def _multitrack(marks: Marks) -> None:
    import multitrack as mt
    from multitrack import _run
    from multitrack.backends import _process

    _wrap(_process.ProcessBackend, "begin", marks, "begin")
    _wrap(_process.ProcessBackend, "end", marks, "end")
    _wrap(_process.ProcessBackend, "close", marks, "close")
    _wrap(_process, "_wait_for_exits", marks, "wait for exits")
    _wrap(_run, "deliver", marks, "report")
    results = mt.imap(abs, [0, 1], workers=2, progress=False)
    marks.append(("call", time.monotonic()))
    for _ in results:
        marks.append(("result", time.monotonic()))


def _pool_imap(marks: Marks) -> None:
    import multiprocessing

    marks.append(("call", time.monotonic()))
    with multiprocessing.Pool(2) as pool:
        marks.append(("pool made", time.monotonic()))
        for _ in pool.imap(abs, [0, 1], chunksize=1):
            marks.append(("result", time.monotonic()))
        marks.append(("exit", time.monotonic()))


def _executor(marks: Marks) -> None:
    from concurrent.futures import ProcessPoolExecutor

    marks.append(("call", time.monotonic()))
    with ProcessPoolExecutor(max_workers=2) as executor:
        marks.append(("pool made", time.monotonic()))
        for _ in executor.map(abs, [0, 1]):
            marks.append(("result", time.monotonic()))
        marks.append(("exit", time.monotonic()))


PROBES: dict[str, Callable[[Marks], None]] = {
    "multitrack": _multitrack,
    "pool-imap": _pool_imap,
    "executor": _executor,
}
_IMPORTS = {
    "multitrack": ("multitrack", "multitrack._api", "multitrack.backends._process"),
    "pool-imap": ("multiprocessing.pool",),
    "executor": ("concurrent.futures.process",),
}


def probe(name: str) -> dict[str, float]:
    """Milliseconds from the call's start to each mark, and to the return (``return``)."""
    import importlib

    for module in _IMPORTS[name]:
        importlib.import_module(module)
    marks: Marks = []
    started = time.monotonic()
    PROBES[name](marks)
    returned = time.monotonic()
    call = next(t for label, t in marks if label == "call")
    if name == "multitrack":  # mt.imap does nothing until the first next(): the call is there
        call = started
    points: dict[str, float] = {}
    for label, when in marks:
        points.setdefault(label, (when - call) * 1000)  # the first of each, and below, the last
    points["last result"] = max(t for label, t in marks if label == "result") * 1000 - call * 1000
    points["return"] = (returned - call) * 1000
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(probe(args.child)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in PROBES}
    for round_ in range(args.rounds):
        names = list(PROBES)
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.phases", "--child", name],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            runs[name].append(json.loads(done.stdout))
    for name, points in runs.items():
        labels = sorted(points[0], key=lambda label: statistics.median(p[label] for p in points))
        cells = ", ".join(
            f"{label} {statistics.median(p[label] for p in points):.2f}" for label in labels
        )
        print(f"{name} (ms from the call, median of {len(points)}): {cells}")
    totals = {name: [p["return"] for p in points] for name, points in runs.items()}
    for peer in ("pool-imap", "executor"):
        ratios = [a / b for a, b in zip(totals["multitrack"], totals[peer], strict=True)]
        print(
            f"multitrack / {peer}, paired: {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
