"""From outcomes to the numbers the report shows.

* A row is one (workload, contender): the **median** of its successful runs (robust to one
  unlucky run on a shared machine), their min and max, and its failures counted by kind.
* **speedup** = loop median / row median; **efficiency** = speedup / workers (1.0 is perfect
  use of every core; the loop runs on one core, so it is the right yardstick).
* **best peer** = the fastest row among the libraries users would pick instead of multitrack
  (not the loop, not multitrack's own rows); a peer counts if at least one of its runs worked,
  its failures are shown next to it.
* **multitrack / best peer**: below 1, multitrack wins.
* **overhead** ((a), (c), (d)): the median over runs of the time beyond the *loop's* work
  floor (``loop_floor``): the loop's tasks' CPU time spread on the workers. A library that
  slows the tasks themselves down (helper threads, wake-ups on the workers' cores) is charged
  for it. **own overhead** is the older figure, the time beyond the run's own tasks' floor
  (``benchmarks.one``), which counts such a slowdown as work; the loop's row (one core) shows
  that one, what it adds to its own work. Paired figures: ``benchmarks.pairing``.
* **cores busy** and **/ floor** (same workloads), per run and then the median: the tasks' CPU
  time over the run's time (how many cores ran tasks, on average; over the workers, the
  efficiency), and the run's time over its floor (over the best possible schedule). Both
  compare a run with the work *it* did, not with a loop run minutes earlier at another speed.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.contenders import CONTENDERS
from benchmarks.runner import Outcome

__all__ = ["Row", "best_peer", "find", "loop_floor", "make_rows", "typical_floor"]


@dataclass(frozen=True)
class Row:
    """The aggregated runs of one contender on one workload."""

    contender: str
    runs: int
    ok: int
    median_s: float | None
    min_s: float | None
    max_s: float | None
    overhead_s: float | None  # median of (seconds - the loop's floor on the workers)
    own_overhead_s: float | None  # median of (seconds - floor_s): beyond its own tasks' CPU
    cores_busy: float | None  # median of task_cpu_s / seconds
    over_floor: float | None  # median of seconds / floor_s
    peak_mb: float | None  # median over successful runs of the peak RSS sum of the process tree
    output_bytes: int  # median bytes written to stdout + stderr (the bars)
    leaked: int  # processes left behind, summed over runs
    failures: str  # "timeout x2, crash x1", or ""
    message: str  # the first failure's message
    busy_before: float  # median CPU use (%) of the machine just before the runs
    unsettled: int  # runs that started on a busy machine
    disturbed: int  # kept runs during which other processes took CPU

    @property
    def timed(self) -> bool:
        """Whether at least one run gave a time."""
        return self.median_s is not None

    def speedup(self, loop: Row | None) -> float | None:
        """How many times faster than the loop."""
        if loop is None or loop.median_s is None or self.median_s is None:
            return None
        return loop.median_s / self.median_s

    def ratio_to(self, other: Row | None) -> float | None:
        """This row's median over ``other``'s."""
        if other is None or other.median_s is None or self.median_s is None:
            return None
        return self.median_s / other.median_s


def make_rows(outcomes: Iterable[Outcome], order: Sequence[str]) -> list[Row]:
    """One row per contender of ``order`` that has outcomes, in that order."""
    by_name: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_name.setdefault(outcome.contender, []).append(outcome)
    floor = loop_floor(o for runs in by_name.values() for o in runs)
    return [_row(name, by_name[name], floor) for name in order if name in by_name]


def loop_floor(outcomes: Iterable[Outcome]) -> float | None:
    """The loop's tasks spread evenly on the workers, ``max(CPU / workers, longest)``: the
    median over the loop's runs of their ``workers_floor_s``."""
    floors = [
        o.workers_floor_s
        for o in outcomes
        if o.contender == "loop" and o.status == "ok" and o.workers_floor_s is not None
    ]
    return statistics.median(floors) if floors else None


def _row(name: str, outcomes: list[Outcome], floor: float | None) -> Row:
    times = [o.seconds for o in outcomes if o.status == "ok" and o.seconds is not None]
    peaks = [o.peak_mb for o in outcomes if o.peak_mb is not None and o.status == "ok"]
    measured = [
        (o.seconds, o.floor_s, o.task_cpu_s)
        for o in outcomes
        if o.status == "ok" and o.seconds and o.floor_s
    ]
    own = [seconds - own_floor for seconds, own_floor, _ in measured]
    if CONTENDERS[name].serial or floor is None:
        overheads = own if CONTENDERS[name].serial else []
    else:
        overheads = [seconds - floor for seconds, _, _ in measured]
    over_floor = [seconds / own_floor for seconds, own_floor, _ in measured]
    busy = [cpu / seconds for seconds, _, cpu in measured if cpu is not None]
    failed = [o for o in outcomes if o.status != "ok"]
    kinds = Counter(o.status for o in failed)
    return Row(
        contender=name,
        runs=len(outcomes),
        ok=len(times),
        median_s=statistics.median(times) if times else None,
        min_s=min(times) if times else None,
        max_s=max(times) if times else None,
        overhead_s=statistics.median(overheads) if overheads else None,
        own_overhead_s=statistics.median(own) if own else None,
        cores_busy=statistics.median(busy) if busy else None,
        over_floor=statistics.median(over_floor) if over_floor else None,
        peak_mb=statistics.median(peaks) if peaks else None,
        output_bytes=round(statistics.median(o.output_bytes for o in outcomes)),
        leaked=sum(o.leaked for o in outcomes),
        failures=", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items())),
        message=failed[0].message if failed else "",
        busy_before=statistics.median(o.busy_before for o in outcomes),
        unsettled=sum(not o.settled for o in outcomes),
        disturbed=sum(o.disturbed for o in outcomes),
    )


def find(rows: Sequence[Row], name: str) -> Row | None:
    """The row of contender ``name``, if it ran."""
    return next((row for row in rows if row.contender == name), None)


def best_peer(rows: Sequence[Row]) -> Row | None:
    """The fastest peer with a time (see the module docstring)."""
    peers = [row for row in rows if CONTENDERS[row.contender].peer and row.median_s is not None]
    return min(peers, key=lambda row: row.median_s or 0.0, default=None)


def typical_floor(outcomes: Iterable[Outcome]) -> float | None:
    """The median work floor over every run on the workers (not the loop's, on one core, nor
    the cluster backends'): the tasks' time at the machine's typical speed."""
    floors = [
        o.floor_s
        for o in outcomes
        if o.status == "ok"
        and o.floor_s is not None
        and not CONTENDERS[o.contender].serial
        and not CONTENDERS[o.contender].cluster
    ]
    return statistics.median(floors) if floors else None
