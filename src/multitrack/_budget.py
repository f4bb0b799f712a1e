"""The run's memory, scheduler side: what the bar and the report show, and, with
``memory_limit="auto"``, the policy that keeps the whole run inside its budget.

The process backend samples its workers (``backends._memwatch``); after each wait the
scheduler (``_run.Run``) hands the latest sample here and asks what to do. ``Budget`` decides;
``Run`` acts (it alone submits, kills and requeues)::

    backend.memory() ──▶ observe(sample) ──▶ peaks (bar, report)
                                         └─▶ decide(running) ──▶ worker to stop (the newest task)
    Run._fill ──▶ may_start(chunks in flight)        paused near the budget; fewer in parallel
    Run: Lost of a stopped worker ──▶ stopped(index) ──▶ requeue, run alone, or fail

The policy, against ``size`` (``_memory.auto_budget``: the smallest of the machine's memory,
the cgroup's limit and ``RLIMIT_RSS``, all of it) and the run's use (the caller's PSS plus every
worker's, or what its cgroup holds that the kernel cannot reclaim, when that is more). The marks
are lower than the 85 % and 95 % first proposed: at 95 % a task growing 250 MB a second in a
400 MB cgroup was killed by the kernel between two samples (measured); past 70 % of the budget
the backend also samples 20 times a second instead of 4:

* a worker holds one chunk, not one running and one waiting as usual, so that a pause stops
  every new task, not only those not sent yet (with chunks sized to the task time, about a
  tenth of a second at least, the round trip this costs is negligible);
* at ``PAUSE_AT`` (80 %) no new chunk is sent (unless nothing runs: something must, or memory
  would never be freed);
* at ``SHED_AT`` (90 %) the most recently started task is stopped (it has done the least
  work) and requeued without using an attempt, and the chunks allowed in flight drop to one
  fewer than were running; one more is allowed after each ``QUIET`` seconds with neither;
* a task stopped ``ALONE_AFTER`` (2) times runs alone (nothing else in flight) and, stopped
  once more, fails with ``MemoryLimitExceeded``.

After a stop, nothing is decided until a sample taken after it comes (the stopped worker's
memory is still in the old one). Peers: dask pauses a worker at 80 % and terminates at 95 %
of its limit; Ray kills the newest retriable task when the node passes 95 %.

Time comes from the scheduler's clock, so the policy is tested without processes
(``tests/test_memory.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from multitrack._memory import Budget as Size
from multitrack._memory import format_size
from multitrack.backends._base import MemoryUse, Running

PAUSE_AT = 0.80
SHED_AT = 0.90
QUIET = 10.0  # seconds with no pause and no stop before one more chunk may be in flight
ALONE_AFTER = 2  # stops for memory after which a task runs alone; one more and it fails


class Budget:
    """The memory of one run: peaks for the bar and the report and, given ``size``, the
    ``"auto"`` policy (see the module docstring).

    Example:
        >>> from multitrack.backends._base import MemoryUse
        >>> budget = Budget(None, slots=2, clock=lambda: 0.0)
        >>> budget.observe(MemoryUse(1.0, 50_000_000, {0: 300_000_000, 1: 200_000_000}))
        True
        >>> budget.bar_text()
        'mem 300 MB/worker, 550 MB in all'
    """

    def __init__(self, size: Size | None, *, slots: int, clock: Callable[[], float]) -> None:
        self.size = size
        self.slots = slots
        self.clock = clock
        self.latest: MemoryUse | None = None
        self.peak_worker = 0
        self.peak_total = 0
        self.paused = False
        self.allowed = slots  # chunks in flight (under a budget: one per worker at most)
        self.stops = 0  # tasks stopped to stay inside the budget
        self._stopped_workers: set[int] = set()
        self._stopped_tasks: dict[int, int] = {}  # index -> times stopped
        self.alone: set[int] = set()
        self._stopped_after = -1.0  # the sample time a decision must be newer than
        self._trouble_at = clock()  # last pause or stop

    # -- samples -------------------------------------------------------------------------

    def observe(self, sample: MemoryUse | None) -> bool:
        """Take ``sample`` in; ``False`` when it is not a new one."""
        if sample is None or (self.latest is not None and sample.taken_at <= self.latest.taken_at):
            return False
        self.latest = sample
        self.peak_worker = max(self.peak_worker, sample.largest)
        self.peak_total = max(self.peak_total, sample.total)
        return True

    def bar_text(self) -> str:
        sample = self.latest
        if sample is None:
            return ""
        return f"mem {format_size(sample.largest)}/worker, {format_size(sample.total)} in all"

    # -- the "auto" policy ---------------------------------------------------------------

    def decide(self, running: Sequence[Running]) -> int | None:
        """After a new sample: pause or go on, allow one more chunk after a quiet while; the
        worker whose task is to be stopped, if one is."""
        size, sample, now = self.size, self.latest, self.clock()
        if size is None or sample is None or sample.taken_at <= self._stopped_after:
            return None
        used = sample.used
        self.paused = used >= PAUSE_AT * size.size
        if used >= SHED_AT * size.size and running:
            newest = max(running, key=lambda item: item.started_at)
            self._stopped_workers.add(newest.worker)
            self.allowed = max(1, min(self.allowed, len(running)) - 1)
            self._stopped_after = sample.taken_at
            self._trouble_at = now
            self.stops += 1
            return newest.worker
        if self.paused:
            self._trouble_at = now
        elif self.allowed < self.slots and now - self._trouble_at >= QUIET:
            self.allowed += 1
            self._trouble_at = now
        return None

    def may_start(self, in_flight: int) -> bool:
        """Whether one more chunk may be sent, with ``in_flight`` chunks out."""
        if in_flight == 0 or self.size is None:
            return True  # something must run, or nothing is ever freed
        if self.paused or self.alone:
            return False
        return in_flight < self.allowed

    def was_stopped(self, worker: int) -> bool:
        """Whether ``worker`` was stopped by ``decide`` (asked once, when its loss arrives)."""
        if worker in self._stopped_workers:
            self._stopped_workers.discard(worker)
            return True
        return False

    def stopped(self, index: int) -> bool:
        """Task ``index`` was stopped for memory: ``True`` to run it again (alone after
        ``ALONE_AFTER`` stops), ``False``: it has had its chances and fails."""
        times = self._stopped_tasks[index] = self._stopped_tasks.get(index, 0) + 1
        if times > ALONE_AFTER:
            self.alone.discard(index)
            return False
        if times == ALONE_AFTER:
            self.alone.add(index)
        return True

    def stopped_times(self, index: int) -> int:
        return self._stopped_tasks.get(index, 0)

    def settled(self, indices: Iterable[int]) -> None:
        """These tasks are done: none of them waits to run alone any more."""
        self.alone.difference_update(indices)

    def exceeded(self) -> tuple[int, int]:
        """(the budget, what the run used) for ``MemoryLimitExceeded``."""
        used = self.latest.used if self.latest is not None else 0
        return (self.size.size if self.size is not None else 0), used
