"""How many tasks to send to a worker at once.

Every chunk costs a fixed overhead (pickling, a socket round trip, waking the scheduler: some
tens of microseconds). For 20 ms tasks that is noise; for 2 µs tasks it is everything, which is
why ``imap(chunksize=1)`` is 10x slower than ``Pool.map`` on tiny tasks.

``chunksize=None`` ("auto") sizes chunks from the *measured* time per task, not from the input
length (which may be unknown) or a constant:

* start with chunks of 1, so the first measurements arrive fast and slow tasks never wait in a
  batch behind each other;
* then aim for ``TARGET_SECONDS`` of work per chunk: the fixed cost stays well under 1 %,
  results (and so the bar) still move several times a second, and a crash re-runs at most
  that much finished work;
* estimate the time per task as decayed total busy time over decayed total tasks: a chunk
  of 1,000 tasks weighs 1,000 times a chunk of one, so one slow first call cannot keep chunks
  small for a whole run;
* near the end of a known-length input, shrink chunks so every worker gets a share of what is
  left, but not below ``MIN_TAIL_SECONDS`` of work (an idle worker can ask to share a tail
  anyway: ``give_back``);
* keep a chunk's arguments under ``MAX_CHUNK_BYTES``, measured as they are sent: each worker
  holds two chunks, so large inputs (8 MB arrays) would otherwise have dozens of arrays in
  flight, each a copy in shared memory.

The measurements behind each constant: docs/performance.md.
"""

from __future__ import annotations

import math

TARGET_SECONDS = 0.1
MIN_TAIL_SECONDS = 0.005
MAX_CHUNK = 20_000
MAX_CHUNK_BYTES = 32 * 1024 * 1024
# Weight of the newest measurement in the running estimates (the older ones decay by
# 1 - SMOOTHING at each new one, so the estimates follow tasks that change).
SMOOTHING = 0.3


class ChunkSizer:
    """Chooses chunk sizes; ``fixed`` (the user's ``chunksize``) overrides the estimate."""

    def __init__(self, *, fixed: int | None, slots: int, cap: int | None = None) -> None:
        self.fixed = fixed
        self.slots = max(1, slots)
        self.cap = cap
        self._busy = self._tasks = 0.0  # decayed sums behind per_task
        self.bytes_per_task: float | None = None  # of arguments sent, estimated

    def observe(self, tasks: int, busy_seconds: float) -> None:
        """A worker spent ``busy_seconds`` running ``tasks`` tasks."""
        if tasks > 0 and busy_seconds >= 0:
            self._busy = self._busy * (1 - SMOOTHING) + busy_seconds
            self._tasks = self._tasks * (1 - SMOOTHING) + tasks

    @property
    def per_task(self) -> float | None:
        """Seconds a task takes, estimated; ``None`` before the first measurement."""
        return self._busy / self._tasks if self._tasks else None

    def observe_sent(self, tasks: int, nbytes: int) -> None:
        """``tasks`` tasks' arguments took ``nbytes`` to send (shared memory included)."""
        if tasks > 0:
            self.bytes_per_task = _smoothed(self.bytes_per_task, nbytes / tasks)

    def next_size(self, remaining: int | None) -> int:
        """Size of the next chunk; ``remaining`` is how many tasks are left, when known."""
        if self.fixed is not None:
            size = self.fixed
        elif self.per_task is None:
            size = 1
        else:
            per_task = max(self.per_task, 1e-9)
            size = int(TARGET_SECONDS / per_task)
            if remaining is not None:
                # Leave work for every worker's running and waiting chunk.
                share = math.ceil(remaining / (self.slots * 2))
                size = min(size, max(share, int(MIN_TAIL_SECONDS / per_task)), remaining)
            size = min(size, MAX_CHUNK)
            if self.bytes_per_task:
                size = min(size, int(MAX_CHUNK_BYTES / self.bytes_per_task))
        if self.cap is not None:
            size = min(size, self.cap)
        return max(1, size)


def _smoothed(estimate: float | None, sample: float) -> float:
    """The running estimate moved ``SMOOTHING`` of the way towards the newest sample."""
    return sample if estimate is None else estimate + SMOOTHING * (sample - estimate)
