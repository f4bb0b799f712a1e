"""Calls of a script, one after another: what the first call costs and what later ones do.

``python -m benchmarks.calls [--runs 3] [--calls 3]``

Each run is a fresh interpreter that makes ``--calls`` calls of ``mt.map(abs, [1, 2],
workers=2)``, with and without numpy imported first (OpenBLAS starts its threads at import,
which decided how workers started before the zygote). The first call pays for the workers'
start (the zygote's, on Linux); later ones fork their workers from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
if {numpy}:
    import numpy
import multitrack as mt
times = []
for _ in range({calls}):
    started = time.perf_counter()
    mt.map(abs, [1, 2], workers=2, progress=False)
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def run(numpy: bool, calls: int) -> list[float]:
    """Seconds of each call, in one fresh interpreter."""
    source = CHILD.format(numpy=numpy, calls=calls)
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, check=True
    )
    times: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    print("| caller | first call, ms | later calls, ms |")
    print("|---|---|---|")
    for numpy in (False, True):
        runs = [run(numpy, args.calls) for _ in range(args.runs)]
        first = sorted(times[0] * 1000 for times in runs)
        later = sorted(t * 1000 for times in runs for t in times[1:])
        label = "numpy imported" if numpy else "no numpy"
        print(f"| {label} | {first[0]:.0f}-{first[-1]:.0f} | {later[0]:.0f}-{later[-1]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
