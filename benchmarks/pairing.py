"""Paired figures: comparisons a shared machine's drift cannot fake.

On a machine whose speed drifts by tens of percent over minutes (a shared 2-core VM), a ratio
of two medians taken over different moments mixes the libraries' difference with the
machine's. The runner runs every contender once per *round*, interleaved, so two runs of one
round saw nearly the same machine. Hence:

* **paired ratio** (``paired``): in each round, A's time over B's; the median over the rounds
  and the range. The strongest peer of a workload (``strongest_peer``) is the one multitrack
  is furthest behind (or least ahead of) by this figure, not the one with the lowest median.
* **the loop's work as the yardstick** (``stats.loop_floor``): the tasks' CPU time as the plain
  loop measured it, spread on the workers (``max(sum / workers, longest)``, each loop run's
  ``workers_floor_s``, the median over the loop's runs). A library's **overhead** is its time
  beyond that floor. Measured against the library's *own* tasks' CPU time instead (the old
  figure), a task slowed down by the library (its helper threads taking the GIL, its parent
  waking on the workers' cores and evicting their caches) counted as work, not overhead.
* **task CPU over the loop's** (``task_cpu_ratio``): in each round, the CPU time the tasks
  took under a library over what they took in the loop: above 1, the library slows the tasks
  themselves down.

Runs carry their round (``Outcome.round``); results saved before rounds were recorded pair the
k-th run of each contender, which is the same thing for the runner's round robin.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from benchmarks.contenders import CONTENDERS
from benchmarks.runner import Outcome
from benchmarks.stats import Row

__all__ = [
    "Paired",
    "by_round",
    "paired",
    "strongest_peer",
    "task_cpu_ratio",
]


@dataclass(frozen=True)
class Paired:
    """A ratio per round, summed up: median, lowest, highest, over ``rounds`` rounds."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Paired | None:
        if not ratios:
            return None
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def by_round(
    outcomes: Iterable[Outcome], name: str, value: Callable[[Outcome], float | None]
) -> dict[int, float]:
    """``value`` of each successful run of ``name``, by round (its position among the runs of
    ``name`` when the round was not recorded)."""
    found: dict[int, float] = {}
    position = 0
    for outcome in outcomes:
        if outcome.contender != name:
            continue
        key = outcome.round if outcome.round is not None else position
        position += 1
        got = value(outcome) if outcome.status == "ok" else None
        if got is not None:
            found[key] = got
    return found


def _seconds(outcome: Outcome) -> float | None:
    return outcome.seconds


def _task_cpu(outcome: Outcome) -> float | None:
    return outcome.task_cpu_s


def paired(outcomes: Sequence[Outcome], a: str, b: str) -> Paired | None:
    """``a``'s time over ``b``'s, round by round (rounds where both have a time)."""
    first, second = by_round(outcomes, a, _seconds), by_round(outcomes, b, _seconds)
    return Paired.of([first[r] / second[r] for r in sorted(first.keys() & second.keys())])


def task_cpu_ratio(outcomes: Sequence[Outcome], name: str) -> Paired | None:
    """The tasks' CPU time under ``name`` over the loop's, round by round."""
    mine, loop = by_round(outcomes, name, _task_cpu), by_round(outcomes, "loop", _task_cpu)
    return Paired.of([mine[r] / loop[r] for r in sorted(mine.keys() & loop.keys()) if loop[r]])


def strongest_peer(
    outcomes: Sequence[Outcome], rows: Sequence[Row]
) -> tuple[Row, Paired | None] | None:
    """The peer multitrack does worst against, by the paired median; the lowest median among
    the peers when no round has both (multitrack failed, say)."""
    peers = [row for row in rows if CONTENDERS[row.contender].peer and row.median_s is not None]
    scored = [(paired(outcomes, "multitrack", row.contender), row) for row in peers]
    with_pairs = [(p, row) for p, row in scored if p is not None]
    if with_pairs:
        best, row = max(with_pairs, key=lambda pair: pair[0].median)
        return row, best
    fastest = min(peers, key=lambda row: row.median_s or 0.0, default=None)
    return None if fastest is None else (fastest, None)
