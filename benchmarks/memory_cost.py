"""``python -m benchmarks.memory_cost``: what sampling the workers' memory costs a run.

Workloads (b) (200,000 trivial tasks) and (c) (150 tasks of 20 ms) of ``benchmarks.workloads``,
without ``memory_limit``, with a per-worker limit no task reaches (``"4GB"``: the sampling
alone, 4 times a second) and with ``"auto"`` (the cgroup read too). Each round runs every
variant once, in a random order, each in a fresh process; the figure to read is the median
over rounds of "variant / without" (1.00: no cost). The machine is shared: only paired,
same-round ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import workloads

VARIANTS = ("none", "4GB", "auto")


def child(key: str, variant: str, params: str) -> None:
    import multitrack as mt

    inputs = workloads.build_inputs(key, json.loads(params), Path(tempfile.gettempdir()))
    fn = workloads.task_function(key)
    limit = None if variant == "none" else variant
    started = time.perf_counter()
    results = mt.map(fn, inputs, workers=2, progress=False, memory_limit=limit)
    seconds = time.perf_counter() - started
    problem = workloads.check(key, inputs, results)
    print(json.dumps({"seconds": seconds, "problem": problem}))


def measure(key: str, variant: str, params: str) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_cost", "--child", key, variant, params],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["problem"]:
        raise SystemExit(f"{key} {variant}: {result['problem']}")
    return float(result["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    spin_s = workloads.calibrate_spin()
    for key in ("b", "c"):
        params = json.dumps(workloads.plan(key, quick=False, workdir=Path("."), spin_s=spin_s))
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in random.sample(VARIANTS, len(VARIANTS)):
                seconds[variant].append(measure(key, variant, params))
        base = seconds["none"]
        line = [f"({key}) without: median {statistics.median(base):.3f} s"]
        for variant in VARIANTS[1:]:
            ratios = [v / b for v, b in zip(seconds[variant], base, strict=True)]
            line.append(
                f"memory_limit={variant!r}: x{statistics.median(ratios):.3f} "
                f"(ratios {min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(" · ".join(line), flush=True)


if __name__ == "__main__":
    main()
