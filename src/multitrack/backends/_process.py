"""The process backend, parent side: worker processes we start, watch, kill and replace.

Not ``multiprocessing.Pool`` nor ``ProcessPoolExecutor``: those share one result queue (a dead
worker can hold its lock), cannot tell which task a dead worker held, and hang or break the
whole pool. Here every worker is owned individually::

                      parent (the caller's thread; no helper threads)
      ┌──────────────────────────────────────────────────────────────────────┐
      │ Run ─submit─▶ ProcessBackend ── wait(conns, pidfds, stdout/err pipes,│
      │                  │     ▲           timeout = next deadline) ──┐      │
      └──────────────────┼─────┼─────────────────────────────────────-┼──────┘
             socketpair  │     │ results        slot (shared mmap):    │ pidfd: fires
             (one per    ▼     │                chunk, position, t0    │ when it dies
             worker)   worker process (own session)  ◀── read on crash / deadline

* A **socketpair per worker**: nothing is shared between workers, so no lock can be left
  dirty by a dying one. The child drains its end with a reader thread, so a send from here
  never waits on a busy task, and the child notices our death (EOF) even mid-task.
* **Death is seen at once**: we wait on every worker's pidfd (Linux) together with the
  sockets and output pipes, with a timeout equal to the next deadline. Where pidfds do not
  exist, socket EOF plus a poll every half second stands in.
* **Blame is exact**: each worker writes "chunk c, position p, since t0" into its slot before
  running an item, so a death or a deadline is charged to that one item, and the unfinished
  rest of its chunks is handed back to the scheduler to run elsewhere.
* **Kill, never repair**: a worker that crashed, timed out or broke the protocol is killed
  with its whole process group (``start_new_session``) and replaced.
* **Each worker holds two chunks** (one running, one waiting), so it never idles on a round
  trip. A waiting chunk larger than half its socket's send buffer (which we ask to be 1 MiB)
  is held back here until the worker is free: a task stuck in C code holding the GIL starves
  the worker's reader thread, and a send that does not fit would then block this loop and
  every deadline with it.
* **The tail is shared**: when a worker is idle and nothing is left to hand out, the worker
  with the most unstarted tasks is asked to give them back (``give_back``); its reader thread
  answers at once, even in the middle of a long task, and the scheduler spreads them out.
* **Large buffers bypass the socket**: numpy arrays and the like travel in memfd shared
  memory beside the message (``_channel``): one copy, and nothing in ``/dev/shm`` to leak.

What profiling taught (cProfile in the parent, timeit on the worker's loop, 200,000 trivial
tasks on 2 workers; a reused pool went from 0.45 s to 0.11 s, ``Pool.map`` takes 0.09 s):

* the parent spent 1.5 µs a task on bookkeeping (a dict entry, a set, an outcome tuple per
  task): results now move as spans of a chunk, stored and released as slices (``_run``);
* a worker spent 1.4 µs a task around a 0.1 µs call: a lock per task against ``give_back``
  (0.2-0.4 µs), reading the clock (0.1 µs) and packing a start time (0.3 µs). A task is now
  claimed with ``next()`` on an iterator the reader thread can drain (both one C call under
  the GIL), the clock is read only when tasks have deadlines, and a ticker thread sends
  partial results instead of a time check per task;
* a single-argument task travelled as a 1-tuple: building, pickling and unpickling it cost
  0.4 µs; it now travels bare (``_wire.Spread`` unpacks several arguments);
* importing ``multiprocessing.connection`` cost each worker 17 ms of start-up, so the framing
  is our own 100 lines (``_channel``);
* later (py-spy on parent and workers, ``--subprocesses``): the Python loop around each task
  cost as much as the trivial call itself, so tasks without deadlines run in blocks through
  ``map`` (``_worker``); every 100 KB chunk waited for its worker to be idle before it was
  sent (``SEND_BUFFER``); half the parent's samples went to requeuing, one task at a time,
  the tail a busy worker handed back (now whole slices, ``_run``); and a chunk's results
  were copied twice on the way out of the worker and once more on the way to the caller.
  A reused pool went from 0.11 s to 0.035-0.045 s on 200,000 trivial tasks; ``Pool.map``
  takes 0.05-0.06 s with its start-up.
* on CPU-bound work (benchmark (c), 20 ms tasks) each worker lost 0.6-0.8 ms at every chunk
  boundary: the worker's "done" wakes this loop on the worker's own core, and the loop ran
  there, with caches the tasks had trashed (perf: 79% of its time in the interpreter, at
  about three times the cost per chunk of the same loop run warm). So the loop now does less
  per chunk: it registers the descriptors it waits on once per worker (``_Watch``), not
  every time; each socket keeps its poll object; a message body is read in one call; the
  free-worker checks skip the ``max_tasks_per_worker`` quota when there is none. Parent CPU
  per chunk (0.5 ms sleeping tasks, one per chunk): 145 -> 108 µs; per (c) run on a reused
  pool: 20 -> 12-15 ms.

Start method (``_start``): a worker is a ``fork()`` of the caller when the caller has a single
OS thread (no lock can then be held by another thread), else a fresh interpreter. Either way
the function travels pickled (cloudpickle for what plain pickle cannot carry), so no
``if __name__ == "__main__"`` guard is needed and a script's functions behave the same in both.
A fork starts in about a millisecond; a fresh interpreter costs tens of ms and the function's
imports, once per worker (``mt.Pool`` pays it once).

Output: each worker's stdout/stderr is a pipe read here and relayed line by line through the
progress bar, so prints neither garble the bar nor vanish in a notebook.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _wire
from multitrack.backends._base import (
    Chunk,
    Completed,
    Event,
    Lost,
    Output,
    Returned,
    Running,
)
from multitrack.backends._channel import Channel
from multitrack.backends._pooled import PooledBackend
from multitrack.backends._start import (
    ForkedProcess,
    WorkerProcess,
    exited_within,
    start_method,
    start_worker,
    thread_limits,
)
from multitrack.backends._worker import SLOT_SIZE, read_slot

# A worker must say "booted" within this many seconds of being started (interpreter start-up
# and imports; generous for loaded CI machines). The initializer itself is not bounded here.
BOOT_TIMEOUT = 60.0
# After "stop", how long a worker may take to exit before it is killed.
EXIT_GRACE = 2.0
# A waiting chunk is sent at once when it fits in its socket's kernel buffer: that costs the
# sender nothing. A larger one is held back here until its worker is idle, because the send
# would wait for the worker's reader thread, which cannot run while a task holds the GIL in C
# code: the send (and with it every deadline) would wait for that task. The buffer is asked
# to be SEND_BUFFER (the kernel caps it at net.core.wmem_max, 208 KiB by default); half of
# what we get is the limit, the rest is room for control messages. Measured: 200,000 trivial
# tasks travel in chunks of 100 KB (20,000 ints), so a 64 KiB limit held back every chunk and
# each worker idled while its next one was pickled and sent (the parent is the busier side).
SEND_BUFFER = 1 << 20
PREFETCH_MIN_BYTES = 64 * 1024

HAS_PIDFD = hasattr(os, "pidfd_open")
# Every backend with workers, for a forked child to close their parent-side ends.
_live_backends: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


# A message to a worker and the large buffers that travel beside it in shared memory.
_Message = tuple[tuple[Any, ...], list[pickle.PickleBuffer]]


@dataclass(eq=False)
class _Sent:
    chunk: Chunk
    remaining: int  # items not reported yet
    split: bool = False  # sent one item per message (after a pickling problem)


@dataclass(eq=False)
class _Proc:
    """One worker process as seen from the parent."""

    key: int
    popen: WorkerProcess  # a subprocess.Popen, or a _start.ForkedProcess
    conn: Channel
    slot: mmap.mmap
    pidfd: int | None
    boot_deadline: float
    state: str = "booting"  # booting -> ready -> (stopping) -> dead
    sent: dict[int, _Sent] = field(default_factory=dict)
    fn_version: int = 0
    tasks_done: int = 0
    pending_out: dict[str, bytes] = field(default_factory=dict)
    last_stderr: bytes = b""
    held_back: list[_Message] = field(default_factory=list)  # sent once it is idle
    asked_back: set[int] = field(default_factory=set)  # chunks we asked it to give back
    prefetch_max: int = PREFETCH_MIN_BYTES  # largest chunk sent while it is busy

    @property
    def pid(self) -> int:
        return self.popen.pid

    def chunks_held(self) -> int:
        return len(self.sent)

    def tasks_held(self) -> int:
        return sum(len(s.chunk.indices) for s in self.sent.values())


class ProcessBackend(PooledBackend):
    """Worker processes that survive crashes of the tasks they run."""

    can_kill = True

    def __init__(self, workers: int, **options: Any) -> None:
        super().__init__(workers, **options)  # initializer, initargs, max_tasks_per_worker
        self._procs: dict[int, _Proc] = {}
        self._watch = _Watch()
        self._next_key = 0
        self._events: list[Event] = []
        self._fn: Callable[..., Any] | None = None
        self._fn_payload = self._init_payload = b""
        self._fn_version = 0
        self._timed = False
        self._output: Output = _print_through
        self._active = False
        self._closed = False
        self._thread_limits = thread_limits(workers)
        start_method()  # a bad MULTITRACK_START_METHOD fails here, before any worker starts
        _live_backends.add(self)

    # -- call lifecycle -------------------------------------------------------------------

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this pool is closed")
        self._fn_payload = _dump_function(fn, "fn")
        # The initializer travels with the function in one pickle: a function defined in the
        # caller's script then sees the globals its initializer sets (cloudpickle rebuilds one
        # globals dict per pickle).
        if self.initializer is not None:
            _dump_function(self.initializer, "initializer")  # to name the culprit
            _dump_function(self.initargs, "initargs")
        self._init_payload = _dump_function((self.initializer, self.initargs, fn), "fn")
        self._fn, self._fn_version = fn, self._fn_version + 1
        self._timed = timed
        self._output = output
        self._active = True
        for proc in self._procs.values():
            if proc.state == "ready":
                self._send_function(proc)
        while len(self._procs) < self.slots:
            self._spawn()

    def end(self, *, abort: bool) -> None:
        self._active = False
        self._events.clear()
        for proc in list(self._procs.values()):
            if proc.sent and abort:
                self._kill(proc)
                self._reap(proc, report=False)
            proc.sent.clear()
            proc.held_back.clear()
            proc.asked_back.clear()
        self._fn = None

    def close(self, *, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        _live_backends.discard(self)
        self._active = False
        procs = list(self._procs.values())
        if not kill:
            for proc in procs:
                self._try_send(proc, ("stop",))
            _wait_for_exits(procs, time.monotonic() + EXIT_GRACE)
        for proc in procs:
            self._kill(proc)
            self._reap(proc, report=False)

    # -- scheduling -----------------------------------------------------------------------

    def _ready_workers(self) -> list[_Proc]:
        return [p for p in self._procs.values() if p.state == "ready" or self._early(p)]

    def _early(self, proc: _Proc) -> bool:
        """A forked worker still starting takes chunks: they queue behind its "init" message,
        which carries this call's function, and it is up within a few milliseconds. Saves a
        round trip per worker at the start of every call (a fresh interpreter takes tens of
        milliseconds: its chunks would wait there while other workers idle)."""
        return (
            proc.state in ("booting", "initializing")
            and isinstance(proc.popen, ForkedProcess)
            and proc.fn_version == self._fn_version
        )

    def submit(self, chunk: Chunk) -> int | None:
        messages, unpicklable = _chunk_messages(chunk, self._timed)
        self._events.extend(unpicklable)
        if not messages:
            return None
        target: _Proc = self._pick(len(chunk.indices))
        sent = _Sent(chunk, len(chunk.indices) - len(unpicklable), split=bool(unpicklable))
        size = sum(len(message[4]) for message, _ in messages)  # shared memory aside
        shared = sum(buffer.raw().nbytes for _, buffers in messages for buffer in buffers)
        busy = bool(target.sent)
        target.sent[chunk.id] = sent
        if busy and size > target.prefetch_max:
            target.held_back.extend(messages)
        else:
            for message, buffers in messages:
                self._try_send(target, message, buffers)
        return size + shared

    def running(self) -> list[Running]:
        now_running = []
        for proc in self._procs.values():
            if not proc.sent:
                continue
            current = read_slot(proc.slot)
            if current is not None and current[0] in proc.sent:
                now_running.append(Running(proc.key, current[0], current[1], current[2]))
        return now_running

    def kill(self, worker: int) -> None:
        proc = self._procs.get(worker)
        if proc is None:
            return
        self._kill(proc)
        self._reap(proc, report=True, killed=True)

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        timeout = self._bound_by_boot_deadlines(timeout)
        if not HAS_PIDFD:
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        ready = self._watch.wait(timeout) if self._procs else _sleep(timeout)
        for proc, what in ready:
            if proc.state == "dead":
                continue
            if what == "conn":
                self._receive(proc)
            elif what == "pidfd":
                self._reap(proc, report=True)
            else:
                self._relay(proc, what)
        self._check_health()
        events, self._events = self._events, []
        return events

    def _bound_by_boot_deadlines(self, timeout: float | None) -> float | None:
        booting = [p.boot_deadline for p in self._procs.values() if p.state == "booting"]
        if not booting:
            return timeout
        left = max(0.0, min(booting) - time.monotonic())
        return left if timeout is None else min(timeout, left)

    def _check_health(self) -> None:
        now = time.monotonic()
        for proc in list(self._procs.values()):
            if proc.state == "booting" and now > proc.boot_deadline:
                self._kill(proc)
                self._reap(proc, report=False)
                raise WorkerStartError(
                    f"a worker process did not start within {BOOT_TIMEOUT:.0f} s "
                    f"(pid {proc.pid}){_stderr_tail(proc)}"
                )
            if not HAS_PIDFD and proc.state != "dead" and proc.popen.poll() is not None:
                self._reap(proc, report=True)
        if self._active:
            while len(self._procs) < self.slots:
                self._spawn()

    def _receive(self, proc: _Proc) -> None:
        try:
            while proc.conn.poll(0):
                data, buffers = proc.conn.recv_bytes()
                self._handle(proc, _wire.loads(data, buffers=buffers))
        except (EOFError, OSError):
            self._reap(proc, report=True)

    def _handle(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            self._on_done(proc, *message[1:])
        elif kind == "booted":
            proc.state = "initializing"
        elif kind == "ready":
            proc.state = "ready"
            if self._fn is not None:  # it may have booted with an earlier call's function
                self._send_function(proc)
        elif kind == "unstarted":
            self._on_unstarted(proc, message[1], message[2])
        elif kind == "chunk_error":
            self._on_chunk_error(proc, message[1], message[2], message[3])
        elif kind == "start_error":
            raise WorkerStartError(
                f"the initializer failed in worker pid {proc.pid}: "
                f"{_wire.describe(_wire.unpack_error(message[1]))}"
            ) from _wire.unpack_error(message[1])
        elif kind == "fn_error":
            cause = _wire.unpack_error(message[1])
            raise WorkerStartError(
                f"the function could not be loaded in a worker process: {_wire.describe(cause)}"
                " (is its module importable from the worker's sys.path?)"
            ) from cause

    def _on_done(
        self,
        proc: _Proc,
        chunk_id: int,
        first: int,
        values: list[Any],
        errors: dict[int, Any],
        busy: float,
    ) -> None:
        sent = proc.sent.get(chunk_id)
        if sent is None:  # a chunk of an aborted call finishing late: not ours any more
            return
        raised = {offset: _wire.unpack_error(packed) for offset, packed in errors.items()}
        proc.tasks_done += len(values)
        self._events.append(Completed(chunk_id, first, values, raised, busy))
        self._chunk_reported(proc, chunk_id, sent, len(values))
        if not proc.sent and self._quota_left(proc) <= 0:
            self._retire(proc)

    def _chunk_reported(self, proc: _Proc, chunk_id: int, sent: _Sent, count: int) -> None:
        """``count`` more tasks of a chunk are accounted for (done, or handed back)."""
        sent.remaining -= count
        if sent.remaining <= 0:
            del proc.sent[chunk_id]
            # Chunk ids start again at 0 in each call of a reused pool: a stale entry would
            # stop a later chunk with this id from ever being asked back.
            proc.asked_back.discard(chunk_id)
            for message, buffers in proc.held_back:  # the worker is idle: send what waited
                self._try_send(proc, message, buffers)
            proc.held_back.clear()

    def give_back(self) -> None:
        # Only for an idle worker; then the worker with the most tasks queued behind its
        # running one hands them back: the tail of its running chunk and its waiting chunk.
        ready = self._ready_workers()
        if not any(proc.chunks_held() == 0 for proc in ready):
            return
        best: tuple[int, _Proc] | None = None
        for proc in ready:
            queued = self._queued_behind(proc)
            if queued > 0 and (best is None or queued > best[0]):
                best = (queued, proc)
        if best is None:
            return
        proc = best[1]
        for chunk_id, sent in proc.sent.items():
            if not sent.split and chunk_id not in proc.asked_back:
                proc.asked_back.add(chunk_id)
                self._try_send(proc, ("give_back", chunk_id))

    def _queued_behind(self, proc: _Proc) -> int:
        """Tasks ``proc`` holds that wait behind the one it runs (and were not asked back).
        A worker between tasks starts its next one at once: that one does not count."""
        current = read_slot(proc.slot)
        count = 0 if current is not None else -1
        for chunk_id, sent in proc.sent.items():
            if sent.split or chunk_id in proc.asked_back:
                continue
            started = current[1] + 1 if current is not None and current[0] == chunk_id else 0
            count += len(sent.chunk.indices) - started
        return count

    def _on_unstarted(self, proc: _Proc, chunk_id: int, position: int) -> None:
        sent = proc.sent.get(chunk_id)
        if sent is None or position >= len(sent.chunk.indices):
            return
        self._events.append(Returned(chunk_id, position))
        self._chunk_reported(proc, chunk_id, sent, len(sent.chunk.indices) - position)

    def _on_chunk_error(self, proc: _Proc, chunk_id: int, first: int, packed: Any) -> None:
        """The worker could not unpickle a chunk's arguments. Resend its items one by one, so
        that only the item that really cannot be rebuilt there fails."""
        sent = proc.sent.get(chunk_id)
        if sent is None:
            return
        chunk = sent.chunk
        if sent.split or len(chunk.indices) == 1:
            sent.remaining -= 1
            if sent.remaining <= 0:
                del proc.sent[chunk_id]
            self._events.append(Completed.failure(chunk_id, first, _wire.unpack_error(packed)))
            return
        sent.split = True
        for position, args in enumerate(chunk.args):
            buffers: list[pickle.PickleBuffer] = []
            payload = _wire.dumps([args], buffers)
            self._try_send(proc, ("chunk", chunk_id, position, self._timed, payload), buffers)

    # -- worker processes -----------------------------------------------------------------

    def _spawn(self) -> _Proc:
        parent_sock, child_sock = socket.socketpair()
        try:
            with child_sock, _slot_file() as slot_file:
                os.ftruncate(slot_file.fileno(), SLOT_SIZE)
                fds = (child_sock.fileno(), slot_file.fileno())
                # A forked child must not keep the parent's end of its own socket, nor of any
                # other worker's: the worker would then never see EOF when the caller dies.
                parent_ends = [parent_sock.fileno(), *_parent_ends()]
                popen = start_worker(*fds, parent_ends, self._thread_limits)
                slot = mmap.mmap(slot_file.fileno(), SLOT_SIZE)
        except BaseException as exc:
            parent_sock.close()
            if isinstance(exc, OSError):
                raise WorkerStartError(f"could not start a worker process: {exc}") from exc
            raise
        for stream in (popen.stdout, popen.stderr):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
        proc = _Proc(
            key=self._next_key,
            popen=popen,
            conn=Channel(parent_sock),
            slot=slot,
            pidfd=_pidfd(popen.pid),
            boot_deadline=time.monotonic() + BOOT_TIMEOUT,
            prefetch_max=_enlarge_send_buffer(parent_sock),
        )
        self._next_key += 1
        self._procs[proc.key] = proc
        self._watch.add(proc.conn.fileno(), proc, "conn")
        if proc.pidfd is not None:
            self._watch.add(proc.pidfd, proc, "pidfd")
        for name, stream in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            if stream is not None:
                self._watch.add(stream.fileno(), proc, name)
        self._try_send(proc, ("init", list(sys.path), self._init_payload))
        proc.fn_version = self._fn_version
        return proc

    def _send_function(self, proc: _Proc) -> None:
        if proc.fn_version != self._fn_version:
            self._try_send(proc, ("fn", self._fn_payload))
            proc.fn_version = self._fn_version

    def _retire(self, proc: _Proc) -> None:
        proc.state = "stopping"
        self._try_send(proc, ("stop",))

    def _try_send(
        self,
        proc: _Proc,
        message: tuple[Any, ...],
        buffers: list[pickle.PickleBuffer] | None = None,
    ) -> None:
        try:
            proc.conn.send_bytes(_wire.dumps(message), buffers or ())
        except OSError:
            # It is dying; its pidfd or EOF reports the death with everything it held.
            pass

    def _kill(self, proc: _Proc) -> None:
        if proc.popen.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap(self, proc: _Proc, *, report: bool, killed: bool = False) -> None:
        """Collect a dead (or dying) worker: drain what it sent, reap it, release its
        resources, and report the chunks it still held."""
        if proc.state == "dead":
            return
        if report:
            try:
                while proc.conn.poll(0):
                    data, buffers = proc.conn.recv_bytes()
                    self._handle(proc, _wire.loads(data, buffers=buffers))
            except (EOFError, OSError):
                pass
        was_booting = proc.state in ("booting", "initializing")
        proc.state = "dead"
        if not exited_within(proc.popen, 1.0):
            self._kill(proc)  # it closed its socket but lives on: not ours to trust
            proc.popen.wait()
        for name in ("stdout", "stderr"):
            self._relay(proc, name, final=True)
        current = read_slot(proc.slot)
        self._release(proc)
        del self._procs[proc.key]
        if report and was_booting and proc.popen.returncode != 0 and self._active:
            raise WorkerStartError(
                f"a worker process exited with code {proc.popen.returncode} before it was "
                f"ready (pid {proc.pid}){_stderr_tail(proc)}"
            )
        if report and proc.sent:
            if current is not None and current.chunk_id not in proc.sent:
                current = None  # a chunk of an earlier call
            self._events.append(
                Lost(
                    worker=proc.key,
                    chunk_ids=list(proc.sent),
                    running=(current.chunk_id, current.position) if current else None,
                    returncode=proc.popen.returncode,
                    pid=proc.pid,
                    killed=killed,
                    span=current.span if current else 1,
                )
            )
        proc.sent.clear()
        proc.held_back.clear()

    def _release(self, proc: _Proc) -> None:
        self._watch.discard(proc.conn.fileno())
        proc.conn.close()
        proc.slot.close()
        if proc.pidfd is not None:
            self._watch.discard(proc.pidfd)
            os.close(proc.pidfd)
        for stream in (proc.popen.stdout, proc.popen.stderr):
            if stream is not None and not stream.closed:
                self._watch.discard(stream.fileno())
                stream.close()

    def _relay(self, proc: _Proc, name: str, *, final: bool = False) -> None:
        stream: IO[bytes] | None = getattr(proc.popen, name)
        if stream is None or stream.closed:
            return
        fresh = b""
        while True:
            try:
                block = os.read(stream.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                block = b""
            if not block:
                self._watch.discard(stream.fileno())
                stream.close()
                final = True
                break
            fresh += block
        if name == "stderr":
            proc.last_stderr = (proc.last_stderr + fresh)[-2000:]
        data = proc.pending_out.get(name, b"") + fresh
        complete, _, rest = data.rpartition(b"\n")
        if final and rest:
            complete, rest = data + b"\n", b""
        elif complete:
            complete += b"\n"
        proc.pending_out[name] = rest
        if complete:
            self._output(complete.decode("utf-8", "replace"), name)


def _wait_for_exits(procs: list[_Proc], deadline: float) -> None:
    """Wait until every one of ``procs`` has exited, or ``deadline``. On their pidfds, so each
    exit is seen at once (``Popen.wait`` polls with growing sleeps: up to twice the time a
    worker takes to exit, which is most of what closing a one-shot call costs)."""
    exiting = {proc.pidfd: proc for proc in procs if proc.pidfd is not None}
    while exiting and (left := deadline - time.monotonic()) > 0:
        for fd in _wait(exiting, left):
            del exiting[fd]
    for proc in procs:
        if proc.pidfd is None:
            exited_within(proc.popen, max(0.0, deadline - time.monotonic()))


def _parent_ends() -> list[int]:
    """The open parent-side descriptors of every live worker of every backend."""
    ends = []
    for backend in list(_live_backends):
        for proc in backend._procs.values():
            ends.append(proc.conn.fileno())
            if proc.pidfd is not None:
                ends.append(proc.pidfd)
            streams = (proc.popen.stdout, proc.popen.stderr)
            ends.extend(s.fileno() for s in streams if s is not None and not s.closed)
    return ends


def _dump_function(fn: Any, argument: str) -> bytes:
    """Pickle what workers need to call. Plain pickle when it can (an importable function
    travels by name, and the worker need not import cloudpickle: ~30 ms of its start-up)."""
    try:
        return _wire.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"{argument}={fn!r:.200} cannot be sent to worker processes: "
            f"{_wire.describe(exc)}. "
            "Move what it captures into its arguments, or use backend='thread'."
        ) from exc


def _chunk_messages(chunk: Chunk, timed: bool) -> tuple[list[_Message], list[Completed]]:
    """The messages that carry a chunk's arguments, and the tasks whose arguments cannot be
    pickled (as failures). When the whole chunk pickles, one message; otherwise one message
    per task, so only the tasks that really cannot be sent fail."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = _wire.dumps(chunk.args, buffers)
        return [(("chunk", chunk.id, 0, timed, payload), buffers)], []
    except Exception:
        pass
    messages: list[_Message] = []
    failures: list[Completed] = []
    for position, args in enumerate(chunk.args):
        buffers = []
        try:
            payload = _wire.dumps([args], buffers)
        except Exception as exc:
            error = _wire.pickling_failure("an argument", args, exc)
            failures.append(Completed.failure(chunk.id, position, error))
        else:
            messages.append((("chunk", chunk.id, position, timed, payload), buffers))
    return messages, failures


def _enlarge_send_buffer(sock: socket.socket) -> int:
    """Ask for a ``SEND_BUFFER`` send buffer on ``sock``; the largest message that then fits
    beside what else may be queued (see ``SEND_BUFFER``)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return PREFETCH_MIN_BYTES
    return max(PREFETCH_MIN_BYTES, size // 2)


def _pidfd(pid: int) -> int | None:
    if not HAS_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # old kernel
        return None


def _stderr_tail(proc: _Proc) -> str:
    tail = proc.last_stderr.decode("utf-8", "replace").strip()
    if not tail:
        return ""
    return "; its last output was:\n" + "\n".join(tail.splitlines()[-15:])


class _Watch:
    """What ``poll`` waits on: every worker's socket, pidfd and output pipes, registered once
    each, when the worker starts, and dropped before the descriptor is closed (a number the
    kernel hands out again must not stay registered as the old one). Registering all of them
    anew for each wait cost a dozen calls per scheduler step, in a loop that runs once per
    chunk, on the same cores as the workers."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._by_fd: dict[int, tuple[_Proc, str]] = {}

    def add(self, fd: int, proc: _Proc, what: str) -> None:
        self._poller.register(fd, select.POLLIN)  # hang-ups and errors are always reported
        self._by_fd[fd] = (proc, what)

    def discard(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def wait(self, timeout: float | None) -> list[tuple[_Proc, str]]:
        """(worker, what) of the descriptors ready to read, or closed, within ``timeout``."""
        milliseconds = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
        ready = []
        for fd, flags in self._poller.poll(milliseconds):
            entry = self._by_fd.get(fd)
            if flags & select.POLLNVAL:  # closed without discard (a bug): never spin on it
                self.discard(fd)
            if entry is not None:
                ready.append(entry)
        return ready


def _wait(waitables: dict[Any, Any], timeout: float | None) -> list[Any]:
    """The objects (file descriptors, or objects with ``fileno()``) ready to read, or closed,
    within ``timeout`` seconds. ``multiprocessing.connection.wait`` does the same but costs
    the first call 5 ms of imports; ``select.select`` fails on descriptors over 1023."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for obj in waitables:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN)  # hang-ups and errors are always reported
    milliseconds = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
    return [by_fd[fd] for fd, _ in poller.poll(milliseconds)]


def _slot_file() -> IO[bytes]:
    """An anonymous file for a worker's slot: nothing to clean up in ``/dev/shm``, ever."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("multitrack-slot", os.MFD_CLOEXEC), "w+b", buffering=0)
    import tempfile  # 10 ms of imports where memfd exists (Linux) is spared

    return tempfile.TemporaryFile()


def _sleep(timeout: float | None) -> list[Any]:
    time.sleep(0.05 if timeout is None else min(timeout, 0.05))
    return []


def _print_through(text: str, stream: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()
