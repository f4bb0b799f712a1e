"""``python -m benchmarks.paired --rev REV``: this working tree's multitrack against another
revision's, paired, on the two figures a refactor most easily makes worse: a one-shot call's
first result (start-up), 200,000 trivial tasks (the parent's cost per chunk) and 48 results of
8 MB (shared memory on the way back).

Each round runs every probe once per revision, alternating, each in a fresh process, so drift in
the machine's speed hits both sides alike; the figure to read is the median over rounds of
"this tree / REV" (below 1: this tree is faster). The full comparison with the peers is
``python -m benchmarks``; this is the quick check before and after a change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBES = {
    "first result": """
import time, multitrack as mt, multitrack._api, multitrack.backends._process
started = time.perf_counter()
results = mt.imap(abs, range(100), workers=2, progress=False)
next(results)
print(time.perf_counter() - started)
results.close() if hasattr(results, "close") else None
""",
    "200,000 trivial": """
import time, multitrack as mt, multitrack._api, multitrack.backends._process
items = list(range(200_000))
started = time.perf_counter()
assert len(mt.map(abs, items, workers=2, progress=False)) == 200_000
print(time.perf_counter() - started)
""",
    "8 MB results": """
import time, numpy as np, multitrack as mt, multitrack._api, multitrack.backends._process
def make(i):
    return np.full(1 << 20, float(i))
started = time.perf_counter()
assert len(mt.map(make, range(48), workers=2, progress=False)) == 48
print(time.perf_counter() - started)
""",
}


def _checkout(rev: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def _time(probe: str, src: Path) -> float:
    env = {"PYTHONPATH": str(src), "PATH": os.environ.get("PATH", ""), "MULTITRACK_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__)
    parser.add_argument("--rev", required=True, help="the revision to compare with (git)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds (default 30)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mt-paired-") as tmp:
        sides = {"this tree": ROOT / "src", args.rev: _checkout(args.rev, Path(tmp))}
        for name, probe in PROBES.items():
            times: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, src in sides.items():
                    times[side].append(_time(probe, src))
            ratios = [a / b for a, b in zip(*times.values(), strict=True)]
            medians = ", ".join(
                f"{s} {statistics.median(t) * 1000:.1f} ms" for s, t in times.items()
            )
            print(
                f"{name}: {medians}; this tree / {args.rev}, paired median "
                f"{statistics.median(ratios):.3f} over {args.rounds} rounds"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
