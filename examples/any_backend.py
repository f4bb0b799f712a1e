"""One script, any backend: only ``backend=`` changes between a laptop and a cluster.

Runs the same calls on a ``mt.Pool`` (ordered results, unordered results, a failing task kept
in its slot, a failing task raised) and prints a digest of everything the caller saw, so the
outputs of two backends can be compared line for line.

Run (the ray and dask extras start a local cluster of 2 workers and stop it at the end):

    python examples/any_backend.py process
    python examples/any_backend.py ray
    python examples/any_backend.py dask
"""

from __future__ import annotations

import hashlib
import sys
import time

import multitrack as mt


def score(a: int, b: int) -> int:
    """A deterministic bit of work on a pair; one pair is bad on purpose."""
    if a == 7:
        raise ValueError(f"bad pair {a}, {b}")
    return (a * 31 + b) % 97


def main(backend: str) -> None:
    started = time.monotonic()
    with mt.Pool(workers=2, backend=backend, progress=False) as pool:
        ordered = pool.map(score, range(2000), range(5000, 7000), errors="return")
        unordered = sorted(pool.imap(score, range(8, 308), range(300), ordered=False), key=repr)
        try:
            pool.starmap(score, [(1, 1), (7, 7)])
            raised = None
        except mt.TaskError as error:
            raised = (type(error).__name__, error.index, error.task, type(error.__cause__).__name__)
    seen = repr((ordered, unordered, raised)).encode()
    print(
        f"{backend:8s} {time.monotonic() - started:4.1f}s first={ordered[:5]} [7]={ordered[7]!r} "
        f"sum={sum(v for v in ordered if isinstance(v, int))} raised={raised} "
        f"digest={hashlib.sha256(seen).hexdigest()[:16]}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "process")
