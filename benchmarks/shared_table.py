"""A large read-only table in the caller, read by every task: what each start method costs.

``python -m benchmarks.shared_table [--mb 400] [--workers 2]``

The script's function names a module global of its own script (``TABLE``, a numpy array).
With the default start (``start_method="spawn"``) a worker sees what a fresh interpreter
would, so the function travels by value with the globals it names: one copy of the table per
worker, pickled and sent. With ``start_method="fork"`` the workers are forks of the caller:
the function travels by name and the table is shared copy-on-write, one copy in all. Each
variant runs in a fresh interpreter; the figures are the time of a ``Pool`` of 8 tasks and,
while the workers hold the table, their unique set size (memory no other process shares: the
copies) and proportional set size (a page shared by three processes counts a third in each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, psutil
    import multitrack as mt
    from multitrack.backends import _zygote

    TABLE = np.random.default_rng(0).random({count})

    def lookup(i):
        time.sleep(0.2)  # so that both workers are up when they are measured
        return float(TABLE[i * 1000])

    def workers_memory():
        zygotes = {{z.process.pid for z in _zygote._zygotes.values()}}
        pss = uss = 0
        for child in psutil.Process().children(recursive=True):
            if child.pid not in zygotes:
                try:
                    info = child.memory_full_info()
                except psutil.Error:
                    continue
                pss, uss = pss + info.pss, uss + info.uss
        return pss, uss

    started = time.perf_counter()
    with mt.Pool(workers={workers}, start_method={method!r}, progress=False) as pool:
        results = pool.imap(lookup, range(8))
        first = next(results)
        pss, uss = workers_memory()
        rest = list(results)
    seconds = time.perf_counter() - started
    assert [first, *rest] == [float(TABLE[i * 1000]) for i in range(8)]
    print(json.dumps({{"seconds": seconds, "pss": pss, "uss": uss}}))
    """
)


def measure(method: str, megabytes: int, workers: int) -> dict[str, float]:
    """One fresh interpreter: seconds, and the workers' USS and PSS in bytes."""
    source = CHILD.format(count=megabytes * 1_000_000 // 8, workers=workers, method=method)
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=300, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="size of the table, in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"| start_method | time, s (median of {args.rounds}) | workers' USS, MB | PSS, MB |")
    print("|---|---|---|---|")
    for method in ("spawn", "fork"):
        runs = sorted(
            (measure(method, args.mb, args.workers) for _ in range(args.rounds)),
            key=lambda run: run["seconds"],
        )
        middle = runs[len(runs) // 2]
        uss, pss = middle["uss"] / 1e6, middle["pss"] / 1e6
        print(f"| {method} | {middle['seconds']:.2f} | {uss:.0f} | {pss:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
