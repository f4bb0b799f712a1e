"""The process backend's contract between the parent and a worker: message tags and the slot.

Both sides import this module and nothing else defines the protocol: the parent's decoder
(``_proc.WorkerHandle.receive``) and the worker's (``_worker.Worker.serve``) dispatch on these
tags, and the slot's layout is written by one side and read by the other. Messages are plain
tuples on the wire (pickled: cheap, and readable when debugging), tag first.

Parent to worker::

    (INIT, sys_path, argv, payload)    the caller's sys.path and sys.argv (a worker sees them
                                       as a fresh interpreter started by the caller would);
                                       payload: pickle of (initializer, initargs, fn);
                                       one pickle, so that a function defined in the caller's
                                       script sees the globals its initializer set
    (FN, payload)                      the call's function, once per worker per call
    (CHUNK, chunk_id, first, timed, payload)   payload: pickle of the list of the tasks'
                                       arguments, for positions first, first + 1, ... of the
                                       chunk; timed: the tasks have deadlines, so each one
                                       records its own start time in the slot
    (GIVE_BACK, chunk_id)              give back the tasks of that chunk not started yet
    (STOP,)

Worker to parent::

    (BOOTED, pid)                      the interpreter is up (bounds the start-up time)
    (READY,) | (START_ERROR, packed)   the initializer ran, or raised
    (FN_ERROR, packed)                 the function could not be rebuilt in the worker
    (DONE, chunk_id, first, pickled, errors, busy_seconds)   results of positions first...:
                                       pickled is the pickle of their list (its large buffers
                                       travel beside the message), kept by the parent for a
                                       journal; errors maps an offset in it to a packed exception
    (CHUNK_ERROR, chunk_id, first, packed)   the arguments could not be unpickled
    (GIVEN_BACK, chunk_id, position)    the tasks from position on were given back, not run

The slot is 32 bytes of shared memory (an mmap of an anonymous file) in which the worker
records what it runs, so that the parent can charge a death or a deadline to one task
without a message per task. Layout (8-byte words): a sequence number (odd while the chunk
fields are being written), the chunk id (``IDLE``: none), the chunk's start time (float
seconds, ``time.monotonic``), and what runs now packed into one word: (milliseconds since the
chunk started << 32) | (span - 1) << 24 | position. One aligned 8-byte store is atomic, so the
parent never sees a position paired with another task's start time or span, and a task costs
the worker one clock read and one store.

``span``: tasks with deadlines mark each task (span 1, with its own start time). Tasks without
deadlines run in blocks of up to ``BLOCK`` and mark only the block ("one of positions
p ... p + span - 1 is running"): the Python loop around a trivial call costs as much as the call
(docs/performance.md). A crash inside a block is charged to nobody yet: the block's unfinished
tasks run again one by one, and a second crash is exact.
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

# parent -> worker
INIT = "init"
FN = "fn"
CHUNK = "chunk"
GIVE_BACK = "give_back"
STOP = "stop"
# worker -> parent
BOOTED = "booted"
READY = "ready"
START_ERROR = "start_error"
FN_ERROR = "fn_error"
DONE = "done"
CHUNK_ERROR = "chunk_error"
GIVEN_BACK = "given_back"

SLOT_FORMAT = "qqdq"
SLOT_SIZE = struct.calcsize(SLOT_FORMAT)
IDLE = -1
POSITION_BITS = 24  # chunks are far smaller than 16 million tasks
POSITION_MASK = (1 << POSITION_BITS) - 1
SPAN_MASK = 0xFF
MS_SHIFT = 32
BLOCK = 64  # at most SPAN_MASK + 1


class SlotReading(NamedTuple):
    """What a worker's slot says it runs: one of positions ``position``, ...,
    ``position + span - 1`` of chunk ``chunk_id`` (exactly ``position`` when ``span`` is 1),
    since ``started_at`` (``time.monotonic``; meaningful for timed tasks)."""

    chunk_id: int
    position: int
    started_at: float
    span: int


class Slot:
    """Worker side: what this worker is running now, in memory the parent can read."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SLOT_SIZE)
        self.ints = memoryview(self._map).cast("q")  # item assignment: cheap, one store
        self._floats = memoryview(self._map).cast("d")
        self._seq = 0

    def start_chunk(self, chunk_id: int, first: int, started_at: float) -> None:
        """A new chunk (or ``IDLE``): written under a sequence lock."""
        ints, seq = self.ints, self._seq + 1
        ints[0] = seq  # odd: being written
        ints[1] = chunk_id
        self._floats[2] = started_at
        ints[3] = first
        ints[0] = self._seq = seq + 1


def read_slot(view: mmap.mmap) -> SlotReading | None:
    """Parent side: what the worker runs now, or ``None`` when it is idle (or has not written
    yet: a fresh slot is all zeros)."""
    for _ in range(100):
        seq, chunk_id, chunk_start, packed = struct.unpack_from(SLOT_FORMAT, view, 0)
        if seq % 2 == 0 and struct.unpack_from("q", view, 0)[0] == seq:
            if chunk_id == IDLE or seq == 0:
                return None
            started = chunk_start + (packed >> MS_SHIFT) / 1000.0
            span = ((packed >> POSITION_BITS) & SPAN_MASK) + 1
            return SlotReading(chunk_id, packed & POSITION_MASK, started, span)
    return None  # pragma: no cover - a writer that never finishes is a dead writer
