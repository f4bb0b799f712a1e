"""The process backend, parent side: the pool of worker processes we start, watch and replace.

Not ``multiprocessing.Pool`` nor ``ProcessPoolExecutor``: those share one result queue (a dead
worker can hold its lock), cannot tell which task a dead worker held, and hang or break the
whole pool. Here every worker is owned individually::

                      parent (the caller's thread; no helper threads)
      ┌──────────────────────────────────────────────────────────────────────┐
      │ Run ─submit─▶ ProcessBackend ── Watch.wait(sockets, pidfds, pipes,   │
      │                  │     ▲           timeout = next deadline) ──┐      │
      │            WorkerHandle (one per worker: _proc)                │      │
      └──────────────────┼─────┼───────────────────────────────────────┼──────┘
             socketpair  │     │ results        slot (shared mmap):    │ pidfd: fires
             (one per    ▼     │                chunk, position, t0    │ when it dies
             worker)   worker process (own session)  ◀── read on crash / deadline

This module keeps the pool's *policy*: how many workers, when one is started, which one takes
the next chunk, when a worker is retired, and who gives work back at the tail. Everything about
one worker (its descriptors, state, the chunks it holds, their accounting, reaping, output) is
its ``WorkerHandle`` (``_proc``); the protocol both sides speak is ``_protocol``; the wait over
all descriptors is ``_watch``; how a process comes to life is ``_start``.

* A **socketpair per worker**: nothing is shared between workers, so no lock can be left
  dirty by a dying one. The child drains its end with a reader thread, and our sends never
  wait (``Channel.queue``): a worker stuck in C code cannot stop this loop.
* **Death is seen at once**: we wait on every worker's pidfd (Linux) together with the
  sockets and output pipes, with a timeout equal to the next deadline. Where pidfds do not
  exist, socket EOF plus a poll every half second stands in.
* **Blame is exact**: each worker writes "chunk c, position p, since t0" into its slot before
  running a task, so a death or a deadline is charged to that one task, and the unfinished
  rest of its chunks is given back to the scheduler to run elsewhere.
* **Kill, never repair**: a worker that crashed, timed out or broke the protocol is killed
  with its whole process group (``start_new_session``) and replaced.
* **Each worker holds two chunks** (one running, one waiting), so it never idles on a round
  trip.
* **The tail is shared**: when a worker is idle and nothing is left to hand out, the worker
  with the most tasks waiting behind the one it runs is asked to give them back
  (``give_back``); its reader thread answers at once, even in the middle of a long task, and
  the scheduler spreads them out. A worker that runs nothing yet is not asked: it starts at
  once, and moving what it holds would send its arguments again.
* **Large buffers bypass the socket**: numpy arrays and the like travel in memfd shared
  memory beside the message (``_channel``): one copy, and nothing in ``/dev/shm`` to leak.

Start method (``_start``): by default a worker sees what a fresh interpreter would, whatever
threads the caller runs; on Linux it is a fork of the zygote (``_zygote``), a clean process
that imported the call's modules once. ``start_method="fork"`` forks the caller instead.
Either way the function travels pickled (cloudpickle for what plain pickle cannot carry), so
no ``if __name__ == "__main__"`` guard is needed.

Output: each worker's stdout/stderr is a pipe read here and relayed line by line through the
progress bar, so prints neither garble the bar nor vanish in a notebook.

Why the loop is shaped as it is, with the measurements: docs/performance.md.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any

from multitrack._errors import WorkerStartError
from multitrack._memory import OomWitness
from multitrack.backends import _protocol as P
from multitrack.backends import _wire
from multitrack.backends._base import (
    Chunk,
    Completed,
    Event,
    Lost,
    MemoryUse,
    Output,
    Running,
    print_through,
)
from multitrack.backends._channel import Channel
from multitrack.backends._memwatch import KILL, MemoryWatch
from multitrack.backends._platform import HAS_MEMFD, HAS_PIDFD, require_posix
from multitrack.backends._pooled import PooledBackend
from multitrack.backends._proc import Message, State, WorkerHandle
from multitrack.backends._start import (
    ChildEnds,
    exited_within,
    is_fork,
    preload,
    refuse_fork,
    start_worker,
    thread_limits,
)
from multitrack.backends._start import (
    start_method as resolve_start_method,
)
from multitrack.backends._watch import Watch, wait_readable

# A worker must say "booted" within this many seconds of being started (interpreter start-up
# and imports; generous for loaded CI machines). The initializer itself is not bounded here.
BOOT_TIMEOUT = 60.0
# After "stop", how long a worker may take to exit before it is killed.
EXIT_GRACE = 2.0
# Each worker's socket asks for this send buffer (the kernel caps it at net.core.wmem_max,
# 208 KiB by default): a chunk that fits goes out in one call, with no wake-up to finish it.
SEND_BUFFER = 1 << 20

# Every backend with workers, for a forked child to close their parent-side ends.
_live_backends: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


class ProcessBackend(PooledBackend):
    """Worker processes that survive crashes of the tasks they run."""

    can_kill = True

    def __init__(
        self,
        workers: int,
        *,
        start_method: str | None = None,
        memory_limit: int | str | None = None,
        **options: Any,
    ) -> None:
        require_posix()
        super().__init__(workers, **options)  # initializer, initargs, max_tasks_per_worker
        # memory_limit: bytes per worker, or "auto" (the scheduler keeps the run's budget:
        # workers are only measured here)
        self._memory = None if memory_limit is None else _memory_watch(memory_limit)
        self._oom: OomWitness | None = None  # tells an OOM kill from another SIGKILL
        self._procs: dict[int, WorkerHandle] = {}
        self._watch: Watch[WorkerHandle] = Watch()
        self._next_key = 0
        self._events: list[Event] = []
        self._fn_payload = self._init_payload = b""
        self._fn_version = 0
        self._timed = False
        self._output: Output = print_through
        self._active = False
        self._closed = False
        self.startup_seconds = 0.0  # workers' time from their start to READY, in all
        self._thread_limits = thread_limits(workers)
        # A bad MULTITRACK_START_METHOD fails here, before any worker starts.
        self._start_method = resolve_start_method(start_method)
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
        # A fork of the caller starts with its __main__ as it is now: there a script's
        # function goes by name, and the globals it names (a 2 GB table) stay shared instead
        # of being pickled into each worker. (A worker that started earlier may not have the
        # function: it gets it by value, in _fn_payload.)
        self._init_payload = _dump_function(
            (self.initializer, self.initargs, fn), "fn", main=self._start_method == "fork"
        )
        self._fn_version += 1
        if self._start_method == "fork":
            reason = refuse_fork()
            if reason is not None:
                raise WorkerStartError(reason)
        else:  # for this call's workers, and any that replace one of them
            preload([self._init_payload], self._thread_limits)
        self._timed = timed
        self._args_seen = self._start_method == "fork"  # a fork of the caller has them all
        self._oom = OomWitness()
        if self._memory is not None:
            self._memory.begin()
        self._output = output
        self._active = True
        for proc in self._procs.values():
            self._send_function(proc)
        while len(self._procs) < self.slots:
            self._spawn()

    def end(self, *, abort: bool) -> None:
        self._active = False
        self._events.clear()
        for proc in list(self._procs.values()):
            if proc.chunks and abort:
                proc.kill()
                self._collect(proc, report=False)
            proc.forget_call()

    def close(self, *, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        _live_backends.discard(self)
        self._active = False
        procs = list(self._procs.values())
        if not kill:
            for proc in procs:
                proc.send((P.STOP,))
            _wait_for_exits(procs, time.monotonic() + EXIT_GRACE)
        for proc in procs:
            proc.kill()
            self._collect(proc, report=False)

    # -- scheduling -----------------------------------------------------------------------

    def _ready_workers(self) -> list[WorkerHandle]:
        return [p for p in self._procs.values() if p.state is State.READY or self._early(p)]

    def _early(self, proc: WorkerHandle) -> bool:
        """A forked worker still starting takes chunks: they queue behind its "init" message,
        which carries this call's function, and it is up within a few milliseconds. Saves a
        round trip per worker at the start of every call (a fresh interpreter takes tens of
        milliseconds: its chunks would wait there while other workers idle)."""
        return (
            proc.state in (State.BOOTING, State.INITIALIZING)
            and proc.forked
            and proc.fn_version == self._fn_version
        )

    def submit(self, chunk: Chunk) -> int | None:
        messages, unpicklable = _chunk_messages(chunk, self._timed)
        self._events.extend(unpicklable)
        if not messages:
            return None
        if not self._args_seen:
            self._args_seen = True
            self._preload_for_arguments(messages[0][0][4])
        target: WorkerHandle = self._pick(len(chunk.indices))
        size = sum(len(message[4]) for message, _ in messages)  # shared memory aside
        shared = sum(buffer.raw().nbytes for _, buffers in messages for buffer in buffers)
        target.hold(chunk, messages, len(unpicklable), timed=self._timed)
        return size + shared

    def _preload_for_arguments(self, payload: bytes) -> None:
        """The modules that the call's first arguments need (a torch tensor given to a
        function that never names torch): the zygote imports them before the next call's
        workers start (``Zygote.preload``), which otherwise each imported them again when
        they unpickled their first task (torch: 1.7 s a worker, every call)."""
        try:
            preload([payload], self._thread_limits, later=True)
        except WorkerStartError:
            pass  # no zygote here: nothing to warm

    def running(self) -> list[Running]:
        now_running = []
        for proc in self._procs.values():
            current = proc.running()
            if current is not None:
                now_running.append(
                    Running(proc.key, current.chunk_id, current.position, current.started_at)
                )
        return now_running

    def stack(self, worker: int) -> str | None:
        proc = self._procs.get(worker)
        return None if proc is None else proc.stack()

    def kill(self, worker: int) -> None:
        proc = self._procs.get(worker)
        if proc is None:
            return
        stack = proc.stack()  # where its task is stuck, for the TaskTimeout
        proc.kill()
        self._collect(proc, report=True, killed=True, stack=stack)

    def give_back(self) -> None:
        # Only for an idle worker; then the worker with the most tasks queued behind its
        # running one hands them back: the tail of its running chunk and its waiting chunk.
        ready = self._ready_workers()
        if not any(proc.chunks_held() == 0 for proc in ready):
            return
        best: tuple[int, WorkerHandle] | None = None
        for proc in ready:
            queued = _queued_behind(proc)
            if queued > 0 and (best is None or queued > best[0]):
                best = (queued, proc)
        if best is None:
            return
        proc = best[1]
        for chunk_id, held in list(proc.chunks.items()):
            if not held.split:
                proc.give_back(chunk_id)

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        timeout = self._bound_by_boot_deadlines(timeout)
        if self._memory is not None:
            timeout = self._memory.bound(timeout)
        if not HAS_PIDFD:
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        ready = self._watch.wait(timeout) if self._procs else _sleep(timeout)
        for proc, what, readable in ready:
            if not proc.alive:
                continue
            if what == "conn":
                self._on_socket(proc, readable)
            elif what == "pidfd":
                self._collect(proc, report=True)
            else:
                proc.relay(what, self._output)
        if self._memory is not None:
            self._watch_memory(self._memory)
        self._check_health()
        events, self._events = self._events, []
        return events

    def memory(self) -> MemoryUse | None:
        return None if self._memory is None else self._memory.latest

    @property
    def memory_actions(self) -> tuple[int, int]:
        """Workers retired past ``memory_limit`` and stopped past 1.5 times it, so far."""
        watch = self._memory
        return (0, 0) if watch is None else (watch.retired, watch.killed)

    def _watch_memory(self, watch: MemoryWatch) -> None:
        """Act on a memory sample: a worker past 1.5 times its limit is stopped now
        (its task fails with MemoryLimitExceeded), one past its limit finishes its task, gives
        back the rest and is replaced."""
        for proc, action, size in watch.step(self._procs.values()):
            if action == KILL:
                proc.kill()
                self._collect(proc, report=True, killed=True)
                self._annotate_lost(proc.key, memory=(watch.limit or 0, size))
                continue
            for chunk_id, held in list(proc.chunks.items()):
                if not held.split:
                    proc.give_back(chunk_id)
            proc.retire()

    def _annotate_lost(self, worker: int, **facts: Any) -> None:
        """Add ``facts`` (``memory``, ``oom``) to the ``Lost`` just reported for ``worker``."""
        for event in reversed(self._events):
            if isinstance(event, Lost) and event.worker == worker:
                for name, value in facts.items():
                    setattr(event, name, value)
                return

    def _on_socket(self, proc: WorkerHandle, readable: bool) -> None:
        proc.flush()
        if not readable:
            return
        starting = proc.ready_after is None
        if not proc.receive(self._events):
            self._collect(proc, report=True)
            return
        if starting and proc.ready_after is not None:
            self.startup_seconds += proc.ready_after
        self._send_function(proc)  # it may have become ready with an earlier call's function
        if proc.state is State.READY and not proc.chunks and self._quota_left(proc) <= 0:
            proc.retire()

    def _bound_by_boot_deadlines(self, timeout: float | None) -> float | None:
        booting = [p.boot_deadline for p in self._procs.values() if p.state is State.BOOTING]
        if not booting:
            return timeout
        left = max(0.0, min(booting) - time.monotonic())
        return left if timeout is None else min(timeout, left)

    def _check_health(self) -> None:
        now = time.monotonic()
        for proc in list(self._procs.values()):
            if proc.state is State.BOOTING and now > proc.boot_deadline:
                proc.kill()
                self._collect(proc, report=False)
                raise WorkerStartError(
                    f"a worker process did not start within {BOOT_TIMEOUT:.0f} s "
                    f"(pid {proc.pid}){proc.stderr_tail()}"
                )
            if not HAS_PIDFD and proc.alive and proc.popen.poll() is not None:
                self._collect(proc, report=True)
        if self._active:
            while len(self._procs) < self.slots:
                self._spawn()

    def _collect(
        self, proc: WorkerHandle, *, report: bool, killed: bool = False, stack: str | None = None
    ) -> None:
        """A worker is gone (or must go): its handle reports what it held; the pool forgets
        it (and replaces it at the next health check, while a call runs)."""
        try:
            proc.collect(
                self._events,
                self._output,
                report=report,
                killed=killed,
                stack=stack,
                starting_matters=self._active,
            )
        finally:
            self._procs.pop(proc.key, None)
        if report and not killed and proc.popen.returncode == -signal.SIGKILL and self._oom:
            # Whether the kernel's OOM killer sent it: from evidence, for WorkerCrashed.
            self._annotate_lost(proc.key, oom=self._oom.explain(proc.pid))

    # -- worker processes -----------------------------------------------------------------

    def _spawn(self) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair()
        stacks_read, stacks_write = os.pipe()
        try:
            with child_sock, _slot_file() as slot_file:
                os.ftruncate(slot_file.fileno(), P.SLOT_SIZE)
                ends = ChildEnds(child_sock.fileno(), slot_file.fileno(), stacks_write)
                # A forked child must not keep the parent's end of its own socket, nor of any
                # other worker's: the worker would then never see EOF when the caller dies.
                parent_ends = [parent_sock.fileno(), stacks_read, *_parent_ends()]
                popen = start_worker(ends, parent_ends, self._thread_limits, self._start_method)
                slot = mmap.mmap(slot_file.fileno(), P.SLOT_SIZE)
        except BaseException as exc:
            parent_sock.close()
            os.close(stacks_read)
            if isinstance(exc, OSError):
                raise WorkerStartError(f"could not start a worker process: {exc}") from exc
            raise
        finally:
            os.close(stacks_write)
        _enlarge_send_buffer(parent_sock)
        proc = WorkerHandle(
            self._next_key,
            popen,
            Channel(parent_sock),
            slot,
            _pidfd(popen.pid),
            self._watch,
            stacks=stacks_read,
            boot_deadline=time.monotonic() + BOOT_TIMEOUT,
            # A fork of the caller is known to be one without asking ``is_fork``, which
            # imports ``_zygote`` (and pickletools): 2-3 ms between the first worker's fork
            # and the second's, measured on a 2-task call with start_method="fork".
            forked=self._start_method == "fork" or is_fork(popen),
        )
        self._next_key += 1
        self._procs[proc.key] = proc
        proc.send((P.INIT, list(sys.path), list(sys.argv), self._init_payload))
        proc.fn_version = self._fn_version
        return proc

    def _send_function(self, proc: WorkerHandle) -> None:
        if proc.state is State.READY and proc.fn_version != self._fn_version and self._active:
            proc.send((P.FN, self._fn_payload))
            proc.fn_version = self._fn_version


def _memory_watch(memory_limit: int | str) -> MemoryWatch:
    if isinstance(memory_limit, int):
        return MemoryWatch(memory_limit)
    from multitrack._memory import auto_budget

    return MemoryWatch(None, budget=auto_budget().size)  # "auto": the run's, not per worker


def _queued_behind(proc: WorkerHandle) -> int:
    """Tasks ``proc`` holds that wait behind the one it runs (and were not asked back).

    None while a started worker runs nothing: it starts its next task at once, and what it
    holds may still be on its way to it (megabytes of arguments through its socket). Asked
    back then, a chunk went back whole, the least loaded worker was this one again, and an
    idle second worker asked for it again: 16 tasks of 4 MB bytes were sent 72 times
    (livelock until the first chunk, 32 MB, had arrived). A worker still starting (its
    initializer may load a model for minutes) keeps only the task it will run first."""
    current = P.read_slot(proc.slot)
    if current is None and proc.state is State.READY:
        return 0
    count = 0 if current is not None else -1
    for chunk_id, held in proc.chunks.items():
        if held.split or chunk_id in proc.asked_to_give_back:
            continue
        started = current[1] + 1 if current is not None and current[0] == chunk_id else 0
        count += len(held.chunk.indices) - started
    return count


def _wait_for_exits(procs: list[WorkerHandle], deadline: float) -> None:
    """Wait until every one of ``procs`` has exited, or ``deadline``. On their pidfds, so each
    exit is seen at once (``Popen.wait`` polls with growing sleeps: up to twice the time a
    worker takes to exit, which is most of what closing a one-shot call costs)."""
    exiting: dict[Any, Any] = {proc.pidfd: proc for proc in procs if proc.pidfd is not None}
    while exiting and (left := deadline - time.monotonic()) > 0:
        for fd in wait_readable(exiting, left):
            del exiting[fd]
    for proc in procs:
        if proc.pidfd is None:
            exited_within(proc.popen, max(0.0, deadline - time.monotonic()))


def _parent_ends() -> list[int]:
    """The open parent-side descriptors of every live worker of every backend."""
    ends = []
    for backend in list(_live_backends):
        for proc in backend._procs.values():
            ends.extend(proc.descriptors())
    return ends


def _dump_function(fn: Any, argument: str, *, main: bool = False) -> bytes:
    """Pickle what workers need to call. Plain pickle when it can (an importable function
    travels by name, and the worker need not import cloudpickle: ~30 ms of its start-up)."""
    try:
        data = _wire.dumps(fn, main=main)
        # A fork of the caller has every module the caller has; a fresh worker imports by name.
        return data if main else _wire.foreign_by_value(fn, data)
    except Exception as exc:
        raise TypeError(
            f"{argument}={fn!r:.200} cannot be sent to worker processes: "
            f"{_wire.describe(exc)}. "
            "Move what it captures into its arguments, or use backend='thread'."
        ) from exc


def _chunk_messages(chunk: Chunk, timed: bool) -> tuple[list[Message], list[Completed]]:
    """The messages that carry a chunk's arguments, and the tasks whose arguments cannot be
    pickled (as failures). When the whole chunk pickles, one message; otherwise one message
    per task, so only the tasks that really cannot be sent fail."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = _wire.dumps(chunk.args, buffers)
        return [((P.CHUNK, chunk.id, 0, timed, payload), buffers)], []
    except Exception:
        pass
    messages: list[Message] = []
    failures: list[Completed] = []
    for position, args in enumerate(chunk.args):
        buffers = []
        try:
            payload = _wire.dumps([args], buffers)
        except Exception as exc:
            error = _wire.pickling_failure("an argument", args, exc)
            failures.append(Completed.failure(chunk.id, position, error))
        else:
            messages.append(((P.CHUNK, chunk.id, position, timed, payload), buffers))
    return messages, failures


def _enlarge_send_buffer(sock: socket.socket) -> None:
    """Ask for a ``SEND_BUFFER`` send buffer on ``sock`` (the kernel may give less)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def _pidfd(pid: int) -> int | None:
    if not HAS_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # old kernel
        return None


def _slot_file() -> IO[bytes]:
    """An anonymous file for a worker's slot: nothing to clean up in ``/dev/shm``, ever."""
    if HAS_MEMFD:
        return open(os.memfd_create("multitrack-slot", os.MFD_CLOEXEC), "w+b", buffering=0)
    import tempfile  # 10 ms of imports where memfd exists (Linux) is spared

    return tempfile.TemporaryFile()


def _sleep(timeout: float | None) -> list[Any]:
    time.sleep(0.05 if timeout is None else min(timeout, 0.05))
    return []
