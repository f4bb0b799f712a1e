"""Other processes and a varying CPU speed: noticing them, waiting them out, measuring again.

This harness runs on shared machines (CI runners, cloud VMs, a colleague's test suite on the
same box), where two things make a run slow that have nothing to do with the library measured:

* **other processes** taking CPU. Before each run, ``wait_quiet`` measures the machine's CPU
  use over a quarter of a second (nothing of ours runs then) and waits, up to ``--settle``
  seconds, until it is under ``QUIET_PERCENT`` of all CPUs. During the run, ``ForeignLoad``
  takes the machine's busy CPU time (``/proc/stat``) minus the CPU time of the run itself (the
  child and every descendant reaped, from ``getrusage``; orphans are reaped too, see
  ``proctree``) and of the runner: the cores other processes took while we measured.
* **a CPU whose speed changes**. A virtual machine's cores can run at half speed for minutes
  (the host is busy, or throttles), with no process of the guest to blame. ``SpeedProbe``
  times a short pure-Python loop (best of 3, about 10 ms) before and after each run. A slow
  period that lasts is no harm (it hits every contender alike, thanks to the round robin) and
  is only reported, as the speed relative to the fastest probe of the benchmark run; what
  skews a comparison is a *change*, so a run is judged against the median of the last
  ``RECENT`` probes.

A run is *disturbed* when others took more than ``NOISY_CORES`` during it, or when the CPU ran
under ``SLOW_SPEED`` of its recent speed before or after it. The runner measures a disturbed
run again (``--noisy-retries``) and keeps the last attempt either way; the report says how
many runs were repeated, and how many disturbed ones were kept.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import deque

import psutil

from benchmarks.tasks import spin

__all__ = [
    "NOISY_CORES",
    "QUIET_PERCENT",
    "QUIET_WINDOW_S",
    "SLOW_SPEED",
    "ForeignLoad",
    "SpeedProbe",
    "wait_quiet",
]

QUIET_PERCENT = 20.0  # the machine is quiet below this CPU use (% of all CPUs)
QUIET_WINDOW_S = 0.25  # seconds over which CPU use is measured before a run
NOISY_CORES = 0.25  # a run during which other processes took more CPU than this is disturbed
SLOW_SPEED = 0.85  # a CPU slower than this fraction of its recent speed is disturbed
RECENT = 15  # probes that make the "recent speed"
_PROBE_STEPS = 50_000  # one probe: about 3-4 ms of tasks.spin


def wait_quiet(max_wait: float) -> tuple[float, bool]:
    """Wait up to ``max_wait`` seconds for CPU use under ``QUIET_PERCENT``.

    Returns (the last CPU use seen in %, whether it was under the threshold)."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = float(psutil.cpu_percent(interval=QUIET_WINDOW_S))
        if busy <= QUIET_PERCENT:
            return busy, True
        if time.monotonic() >= deadline:
            return busy, False


class ForeignLoad:
    """Cores that other processes used between construction and ``stop``."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._busy = _machine_busy_seconds()
        self._ours = _our_cpu_seconds()

    def stop(self) -> float:
        """The average number of cores taken by others (0 when it cannot be told)."""
        wall = time.monotonic() - self._started
        busy = _machine_busy_seconds() - self._busy
        ours = _our_cpu_seconds() - self._ours
        return max(0.0, busy - ours) / wall if wall > 0 else 0.0


class SpeedProbe:
    """How fast one core runs now: against its recent speed, and against its best."""

    def __init__(self) -> None:
        self._best = float("inf")
        self._recent: deque[float] = deque(maxlen=RECENT)

    def measure(self) -> tuple[float, float]:
        """Time the probe loop (best of 3); (speed vs the recent median, speed vs the best),
        1.0 meaning as fast."""
        seconds = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            spin(_PROBE_STEPS)
            seconds = min(seconds, time.perf_counter() - started)
        self._recent.append(seconds)
        self._best = min(self._best, seconds)
        return statistics.median(self._recent) / seconds, self._best / seconds


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(sum(times) - idle)


def _our_cpu_seconds() -> float:
    seconds = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        seconds += usage.ru_utime + usage.ru_stime
    return seconds
