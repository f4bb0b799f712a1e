"""What the caller sees when a worker process is killed with SIGKILL in the middle of a run.

Task 5 writes the pid of the process running it to a file and sleeps; this script kills that
process from outside each time, as the out-of-memory killer would for a task that needs too
much memory. Every other task still returns its result; task 5 gets ``WorkerCrashed``.

On the process backend the worker says which task it runs, so the first death is blamed. On
Ray and dask a chunk is one remote task and the engine cannot say which item was running: the
items of the lost chunk are run again one by one, and the second death is blamed (the script
prints how many times it killed).

Run:

    python examples/kill_a_worker.py process
    python examples/kill_a_worker.py ray
    python examples/kill_a_worker.py dask
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time

import multitrack as mt


def job(index: int, pid_file: str) -> int:
    """Task 5 records its process and waits to be killed; the others return at once."""
    if index == 5:
        with open(pid_file + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        time.sleep(60)
    return index


def kill_whenever_written(pid_file: str) -> None:
    """Kill the process named in ``pid_file`` each time it appears (at most 5 times)."""
    for _ in range(5):
        while not os.path.exists(pid_file):
            time.sleep(0.02)
        with open(pid_file) as source:
            pid = int(source.read())
        os.remove(pid_file)
        print(f"kill -9 {pid}", flush=True)
        os.kill(pid, signal.SIGKILL)


def main(backend: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        pid_file = os.path.join(scratch, "pid")
        threading.Thread(target=kill_whenever_written, args=(pid_file,), daemon=True).start()
        started = time.monotonic()
        results = mt.map(
            job, range(20), [pid_file] * 20, workers=2, backend=backend, errors="return"
        )
    crashed = results[5]
    print(f"{backend}: returned after {time.monotonic() - started:.1f} s")
    print(f"  results[5] = {crashed!r}")
    intact = results[:5] + results[6:] == [*range(5), *range(6, 20)]
    print(f"  attempts = {crashed.attempts}; the other 19 results intact: {intact}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "process")
