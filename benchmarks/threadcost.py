"""Does a second Python thread that wakes now and then slow a task that holds the GIL?

``python -m benchmarks.threadcost [--iterations N] [--tasks N] [--rounds N]``

A multitrack worker runs its tasks in its main thread beside a reader thread (it answers the
parent between messages) and, for chunks of several tasks, a ticker (it reports partial
results). ``docs/cpu.md`` weighed removing both ("no second Python thread while a task
runs") to win back a slowdown of the tasks themselves. This measures what such a thread can
cost: the same pure-Python task (``tasks.spin``), timed in its own thread's CPU, alone and
with a helper thread that wakes 20, 60 or 200 times a second (a worker's threads woke 56-73
times a second on (c)); the figure is the median task's CPU over the median without a
helper, per round.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from benchmarks.tasks import spin

RATES = (20, 60, 200)  # helper wake-ups per second


def median_task_cpu(iterations: int, tasks: int, wakeups: int = 0) -> float:
    """The median thread-CPU seconds of ``tasks`` spins, beside a helper thread that wakes
    ``wakeups`` times a second (none when 0)."""
    stop = threading.Event()
    helper = None
    if wakeups:
        helper = threading.Thread(target=_wake, args=(stop, wakeups))
        helper.start()
    cpu = []
    try:
        for _ in range(tasks):
            started = time.thread_time()
            spin(iterations)
            cpu.append(time.thread_time() - started)
    finally:
        stop.set()
        if helper is not None:
            helper.join()
    return statistics.median(cpu)


def _wake(stop: threading.Event, wakeups: int) -> None:
    """Wake ``wakeups`` times a second (each wake-up takes the GIL) until ``stop`` is set."""
    while not stop.wait(1 / wakeups):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threadcost")
    parser.add_argument("--iterations", type=int, default=400_000, help="per task (~20 ms)")
    parser.add_argument("--tasks", type=int, default=10, help="per batch")
    parser.add_argument("--rounds", type=int, default=30, help="a batch of each, shuffled")
    args = parser.parse_args(argv)
    # The machine's speed drifts by tens of percent within a minute: each round runs a short
    # batch of every variant, in a new order, and compares them within the round.
    ratios: dict[int, list[float]] = {rate: [] for rate in RATES}
    alone: list[float] = []
    for _ in range(args.rounds):
        variants = [0, *RATES]
        random.shuffle(variants)
        cpu = {rate: median_task_cpu(args.iterations, args.tasks, rate) for rate in variants}
        alone.append(cpu[0])
        for rate in RATES:
            ratios[rate].append(cpu[rate] / cpu[0])
    print(
        f"{args.rounds} rounds of {args.tasks} tasks each; alone a task took "
        f"{statistics.median(alone) * 1e3:.2f} ms of CPU ({min(alone) * 1e3:.2f}-"
        f"{max(alone) * 1e3:.2f} over the rounds). With a helper thread waking, paired "
        "median (range):"
    )
    for rate, values in ratios.items():
        print(f"  {rate}/s: {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
