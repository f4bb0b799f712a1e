"""The child side of the process backend: one worker process.

A worker is a fork of the caller or a fresh interpreter (``_start`` says which and why). It owns
the child ends of two things the parent created for it:

* a duplex socket (``conn``): chunks and control messages come in, results go out; a reader
  thread drains it into a local queue, so the parent's sends never block on a busy worker and
  the parent's death (EOF) is noticed even in the middle of a long task;
* a 32-byte shared memory "slot" (an mmap of an unlinked file) where it records which item it
  is running and since when. The parent reads it to blame a crash on exactly one item and to
  enforce per-task deadlines, without a message per item.

The messages both ways and the slot's layout are defined in ``_protocol``, which the parent
imports too.

The worker runs in its own session (process group), so a terminal's Ctrl-C reaches only the
parent, which then kills whole worker groups; it ignores SIGINT for the same reason.

A script's globals. A function of the caller's ``__main__`` travels by value, and cloudpickle
rebuilds one globals dict per pickle (holding the globals its functions name, with the
caller's values). The "init" pickle carries the initializer and the first function together,
so they share one dict and the function sees what the initializer set. A later "fn" message
(the next call of a ``Pool``) brings a dict of its own, where the initializer never ran. So
when the initializer is a ``__main__`` function, the worker keeps its globals dict and the
names the initializer added, reassigned (compared by identity) or deleted; a ``__main__``
function loaded later is rebound to that dict, after merging its own dict into it by this
rule:

* a name the initializer set keeps the initializer's value (its model, its connection; a
  name it deleted stays deleted);
* every other name takes the value shipped with the new function: the caller's value of
  the moment (a constant the caller changed between two calls is seen changed), even over
  a value an earlier call's function assigned here.

``__main__`` functions that came in the same pickle and are globals of the dict (helpers the
function calls by name) are rebound too. Those reachable only otherwise (a closure cell, a
default, a class's methods) keep the dict they came with, which then gets the initializer's
values for its names as well: they read the same values. A ``functools.partial`` of such a
function is rebuilt around the rebound function.
"""

from __future__ import annotations

import _thread
import faulthandler
import functools
import itertools
import os
import queue
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeGuard

from multitrack.backends import _protocol as P
from multitrack.backends import _script_names, _wire
from multitrack.backends._channel import Channel
from multitrack.backends._protocol import BLOCK, IDLE, MS_SHIFT, POSITION_BITS, Slot

# Send partial results of a long chunk at least this often, so the bar moves and a crash
# late in a chunk loses little finished work.
FLUSH_EVERY = 0.25
# A worker's /proc/self/oom_score_adj: the most expendable process there is (see ``run``).
OOM_SCORE_ADJ = 1000


def _read(worker: Worker) -> None:
    """Reader thread: move messages to the inbox, answer "give back" requests at once (even
    while a long task runs); when the parent is gone, take this whole process group down (the
    task may have started processes of its own)."""
    conn, inbox = worker.conn, worker.inbox
    try:
        while True:
            data, buffers = conn.recv_bytes()
            message = _wire.loads(data)
            if message[0] == P.GIVE_BACK:
                worker.give_back(message[1])
                continue
            if message[0] == P.CHUNK:
                with worker.claim:
                    worker.queued.add(message[1])
            inbox.put((message, buffers))
    except (EOFError, OSError):
        pass
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


class Worker:
    def __init__(self, conn: Channel, slot: Slot) -> None:
        self.conn = conn
        self.slot = slot
        self.fn: Callable[..., Any] | None = None
        # The initializer's globals dict, when it is a function of the caller's script, and
        # the names it set there (see "A script's globals" above).
        self.script_globals: dict[str, Any] | None = None
        self.set_by_initializer: frozenset[str] = frozenset()
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sending = threading.Lock()  # the reader thread answers give_back requests too
        # Which chunk runs, and the iterator its tasks are taken from. The main thread takes
        # each task with next() on that iterator and the reader thread takes the rest with
        # list() when asked to give them back: each is one C call under the GIL, so a task
        # is either run here or given back, never both, never neither, with no lock per task
        # (a lock per task cost more than a trivial task). A free-threaded build would need
        # one. ``claim`` guards the switch from one chunk to the next.
        self.claim = threading.Lock()
        self.running = IDLE
        self.tasks: Iterator[Any] = iter(())
        self.chunk_end = 0  # position after the running chunk's last task
        self.queued: set[int] = set()  # chunks waiting in the inbox
        self.skipped: set[int] = set()  # waiting chunks given back whole
        # The running chunk's results: the main thread appends one per task, with no lock
        # (list.append is one C call under the GIL); a ticker thread reports what is done
        # every FLUSH_EVERY seconds, even while a long task runs, so the bar moves and a
        # crash loses little. ``reporting`` orders the reports (the ticker's and the last).
        self.reporting = threading.Lock()
        self.report: _Report | None = None
        # The ticker starts with the first chunk of more than one task: a chunk of one task
        # has nothing to report early, and a call of a few such chunks (a short call, the
        # first chunks of every call) then pays for no second thread at start-up.
        self.ticking = False

    def send(self, message: tuple[Any, ...], buffers: list[Any] | None = None) -> None:
        data = _wire.dumps(message)
        with self.sending:
            self.conn.send_bytes(data, buffers or ())

    def give_back(self, chunk_id: int) -> None:
        """Reader thread: take the tasks of the chunk that have not started, and tell the
        parent from which position on it will not run them."""
        with self.claim:
            if self.running == chunk_id:
                rest = list(self.tasks)  # atomic against the main thread's next()
                if not rest:
                    return  # its last task is running: nothing to give back
                first_unstarted = self.chunk_end - len(rest)
            elif chunk_id in self.queued:  # not started: all of it
                self.queued.discard(chunk_id)
                self.skipped.add(chunk_id)
                first_unstarted = 0
            else:
                return  # it ended already: nothing to give back
        self.send((P.GIVEN_BACK, chunk_id, first_unstarted))

    def tick(self) -> None:
        """Ticker thread: report the running chunk's finished tasks now and then."""
        while True:
            time.sleep(FLUSH_EVERY)
            with self.reporting:
                if self.report is not None:
                    self.send_report(self.report)

    def send_report(self, report: _Report, *, last: bool = False) -> None:
        """Send the results ``report`` holds that were not sent yet (caller holds
        ``reporting``). ``last``: the chunk is over and nothing appends to it any more."""
        values, errors = report.values, report.errors
        end = len(values)  # read first: errors[k] is always set before values[k] exists
        start = report.sent
        if end == start:
            return
        failed = {k - start: e for k, e in list(errors.items()) if start <= k < end}
        now = time.monotonic()
        if last and start == 0:
            span = values  # the whole chunk in one report: no copy (py-spy: 15% of a worker)
        else:
            span = values[start:end]
            values[start:end] = [None] * (end - start)  # sent: free the memory
        report.sent, busy, report.since = end, now - report.since, now
        self.send_done(report.chunk_id, report.first + start, span, failed, busy)

    def serve(self) -> None:
        # Bare threads: ``threading.Thread.start`` waits until the new thread has run, and
        # just after a fork, with the caller forking the next worker on the other core, that
        # wait took 1-4 ms of every worker's start-up (these threads are never joined; the
        # process ends with ``os._exit`` or at interpreter exit, which stops them).
        _thread.start_new_thread(_read, (self,))
        self.send((P.BOOTED, os.getpid()))
        while True:
            message, buffers = self.inbox.get()
            kind = message[0]
            if kind == P.CHUNK:
                self.run_chunk(message[1], message[2], message[3], message[4], buffers)
            elif kind == P.FN:
                self.load_function(message[1])
            elif kind == P.INIT:
                if not self.initialize(message[1], message[2], message[3]):
                    return
            elif kind == P.STOP:
                return

    def initialize(self, sys_path: list[str], argv: list[str], payload: bytes) -> bool:
        sys.path[:] = sys_path
        sys.argv[:] = argv
        try:
            initializer, initargs, self.fn = _wire.loads(payload)
        except BaseException as exc:  # the function (or initializer) cannot be loaded here
            self.send((P.FN_ERROR, _wire.pack_error(exc)))
            return False
        try:
            if initializer is not None:
                self.run_initializer(initializer, initargs)
        except BaseException as exc:
            self.send((P.START_ERROR, _wire.pack_error(exc)))
            return False
        self.send((P.READY,))
        return True

    def run_initializer(self, initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
        if not _is_script_function(initializer):
            initializer(*initargs)
            return
        namespace = initializer.__globals__
        before = dict(namespace)
        initializer(*initargs)
        missing = object()
        self.set_by_initializer = frozenset(
            name
            for name in namespace.keys() | before.keys()
            if namespace.get(name, missing) is not before.get(name, missing)
        )
        self.script_globals = namespace

    def load_function(self, payload: bytes) -> None:
        try:
            fn = _wire.loads(payload)
            if self.script_globals is not None:
                fn = self.share_script_globals(fn)
            self.fn = fn
        except BaseException as exc:
            self.fn = None
            self.send((P.FN_ERROR, _wire.pack_error(exc)))

    def share_script_globals(self, fn: Any) -> Any:
        """``fn``, rebound to the initializer's globals when it is a function of the caller's
        script that came with a globals dict of its own (once per function load)."""
        if isinstance(fn, _wire.Spread):
            fn.fn = self.share_script_globals(fn.fn)
            return fn
        if type(fn) is functools.partial:
            func = self.share_script_globals(fn.func)
            if func is fn.func:
                return fn
            bound = functools.partial(func, *fn.args, **fn.keywords)
            bound.__dict__.update(fn.__dict__)
            return bound
        shared = self.script_globals
        if shared is None or not _is_script_function(fn) or fn.__globals__ is shared:
            return fn
        own, kept = fn.__globals__, self.set_by_initializer
        rebound: dict[types.FunctionType, types.FunctionType] = {}
        for name, value in own.items():
            if name in kept:
                continue  # the initializer's value wins
            if _is_script_function(value) and value.__globals__ is own:
                value = rebound.setdefault(value, _rebind(value, shared))
            shared[name] = value  # the caller's value of the moment wins
        for name in kept:  # for what stays bound to ``own`` (closures, class methods...)
            if name in shared:
                own[name] = shared[name]
            else:
                own.pop(name, None)
        return rebound.get(fn) or _rebind(fn, shared)

    def run_chunk(
        self, chunk_id: int, first: int, timed: bool, payload: bytes, buffers: list[Any]
    ) -> None:
        try:
            calls = _wire.loads(payload, buffers=buffers)
        except BaseException as exc:
            with self.claim:
                ours = self._dequeue(chunk_id)
            if ours:  # not given back meanwhile
                self.send((P.CHUNK_ERROR, chunk_id, first, _wire.pack_error(exc)))
            return
        tasks = iter(calls)
        if not self._claim(chunk_id, tasks, first + len(calls)):
            return
        if len(calls) > 1 and not self.ticking:
            self.ticking = True
            _thread.start_new_thread(self.tick, ())
        fn = self.fn
        assert fn is not None, "a chunk arrived before its function"
        clock, ints = time.monotonic, self.slot.ints
        begun = clock()
        report = _Report(chunk_id, first, since=begun)
        values, errors = report.values, report.errors
        with self.reporting:
            self.report = report
        self.slot.start_chunk(chunk_id, first, begun)
        # The hot loops. Timed tasks: per task, one C-level next(), a clock read, one 8-byte
        # store and the call; ``append`` bound once (an attribute lookup per task costs as
        # much as a trivial call). Untimed ones: in blocks, see ``_protocol``.
        if timed:
            append = values.append
            for position, arg in enumerate(tasks, first):
                ints[3] = (int((clock() - begun) * 1000.0) << MS_SHIFT) | position
                try:
                    append(fn(arg))
                except BaseException as exc:  # SystemExit, KeyboardInterrupt too: it failed
                    errors[len(values)] = _wire.pack_error(exc)
                    append(None)
        else:
            _run_in_blocks(fn, tasks, first, self.chunk_end, values, errors, ints)
        with self.claim:
            self.running = IDLE
        with self.reporting:
            self.report = None
            self.send_report(report, last=True)
        self.slot.start_chunk(IDLE, 0, 0.0)

    def _claim(self, chunk_id: int, tasks: Iterator[Any], end: int) -> bool:
        """Make ``chunk_id`` the running chunk, unless it was given back while it waited."""
        with self.claim:
            if not self._dequeue(chunk_id):
                return False
            self.running, self.tasks, self.chunk_end = chunk_id, tasks, end
            return True

    def _dequeue(self, chunk_id: int) -> bool:
        """Take ``chunk_id`` off the waiting chunks; ``False`` when it was given back whole
        while it waited (caller holds ``claim``)."""
        self.queued.discard(chunk_id)
        if chunk_id in self.skipped:
            self.skipped.discard(chunk_id)
            return False
        return True

    def send_done(
        self, chunk_id: int, first: int, values: list[Any], errors: dict[int, Any], busy: float
    ) -> None:
        buffers: list[Any] = []  # large arrays among the results travel in shared memory
        # The values are pickled on their own, so that the parent can journal these very
        # bytes (``checkpoint=``) instead of pickling the results a second time.
        try:
            pickled = _wire.dumps(values, buffers)
        except BaseException:
            _wire.make_picklable(values, errors)
            pickled = _wire.dumps(values, buffers)
        data = _wire.dumps((P.DONE, chunk_id, first, pickled, errors, busy))
        with self.sending:
            self.conn.send_bytes(data, buffers)


def _run_in_blocks(
    fn: Callable[[Any], Any],
    tasks: Iterator[Any],
    first: int,
    end: int,
    values: list[Any],
    errors: dict[int, Any],
    ints: memoryview,
) -> None:
    """Run ``tasks`` (positions ``first``... up to ``end``) into ``values``, ``BLOCK`` at a
    time through ``map``, marking each block in the slot. ``list.extend`` keeps what a block
    produced before a task raised; the task that raised is the next position, and a new
    block starts after it. ``tasks`` may be emptied meanwhile by ``give_back``: a short block."""
    extend, islice = values.extend, itertools.islice
    while True:
        position = first + len(values)
        span = min(BLOCK, end - position)
        if span <= 0:
            return
        ints[3] = ((span - 1) << POSITION_BITS) | position
        try:
            extend(map(fn, islice(tasks, span)))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: it failed
            errors[len(values)] = _wire.pack_error(exc)
            values.append(None)
            continue
        if first + len(values) < position + span:
            return  # given back


class _Report:
    """The results of one running chunk, from position ``first`` on; ``sent`` of them were
    reported already."""

    __slots__ = ("chunk_id", "errors", "first", "sent", "since", "values")

    def __init__(self, chunk_id: int, first: int, *, since: float) -> None:
        self.chunk_id, self.first, self.since = chunk_id, first, since
        self.values: list[Any] = []  # one per task; None where it failed
        self.errors: dict[int, Any] = {}  # offset in values -> packed exception
        self.sent = 0


def _is_script_function(obj: object) -> TypeGuard[types.FunctionType]:
    """A plain function of the caller's ``__main__``: in a worker, only one that came by value
    (the worker's own ``__main__`` defines none)."""
    return type(obj) is types.FunctionType and obj.__module__ == "__main__"


def _rebind(fn: types.FunctionType, namespace: dict[str, Any]) -> types.FunctionType:
    """A copy of ``fn`` whose globals are ``namespace``."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__dict__.update(fn.__dict__)
    # Python 3.14 evaluates annotations lazily (reading them may raise): copy the function
    # that computes them when there is one. __type_params__: Python 3.12.
    lazy = getattr(fn, "__annotate__", None) is not None
    for name in ("__annotate__" if lazy else "__annotations__", "__type_params__"):
        if hasattr(fn, name):
            setattr(new, name, getattr(fn, name))
    return new


def _first_to_go_when_memory_runs_out() -> None:
    """Ask the kernel's out-of-memory killer to pick this worker before anything else: a
    worker is replaced and its task retried or reported, but the caller holds every result.
    (Any process may raise its own ``oom_score_adj``; 1000 is what Ray gives its workers.)"""
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass  # not Linux, or a read-only /proc: nothing to steer


def main() -> None:
    """Entry point of a fresh interpreter: ``python -c BOOT CONN SLOT STACKS SYS_PATH`` (see
    ``_start._BOOT``)."""
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def run(conn_fd: int, slot_fd: int, stacks_fd: int) -> None:
    """Serve the parent on ``conn_fd`` until told to stop (a fresh interpreter's ``main`` and
    a forked child both end up here; see ``_start``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _first_to_go_when_memory_runs_out()
    faulthandler.enable()
    # On SIGUSR1 (sent just before a timed-out task's worker is killed) every thread's stack
    # goes to the parent: written from a C signal handler, so even a task stuck in C code
    # with the GIL held says where it is.
    faulthandler.register(signal.SIGUSR1, file=stacks_fd, all_threads=True, chain=False)
    # Worker output is relayed line by line above the caller's progress bar: each line must
    # reach the pipe when it is written, or a worker killed (a crash, a timeout) loses it.
    # stdout is line-buffered, stderr unbuffered, as on a terminal; whatever started them.
    for stream, settings in (
        (sys.stdout, {"line_buffering": True}),
        (sys.stderr, {"write_through": True, "line_buffering": True}),
    ):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(**settings)
    worker = Worker(Channel(socket.socket(fileno=conn_fd)), Slot(slot_fd))
    os.close(slot_fd)
    _script_names.expose(lambda: (worker.fn,))
    try:
        worker.serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
