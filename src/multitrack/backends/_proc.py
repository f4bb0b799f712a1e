"""One worker process, parent side: everything the parent holds of one worker, in one object.

``WorkerHandle`` owns the worker's descriptors (socket, pidfd, output pipes, slot), its
state, the chunks it holds, and the accounting of each chunk to its end. The pool
(``_process.ProcessBackend``) decides *which* worker gets a chunk, when one is started,
retired or asked to give work back; the handle does what concerns that one worker::

    ProcessBackend ──hold(chunk)──▶ WorkerHandle ──queue──▶ Channel (never blocks) ──▶ worker
                  ◀──events────────  receive(): DONE, UNSTARTED, CHUNK_ERROR, ... decoded here
                  ◀──Lost──────────  collect(): the worker is gone; what it held comes back

**One path ends a chunk.** Whatever accounts for a chunk's tasks (results, an error while
unpickling its arguments, tasks given back), it goes through ``_account``; what a dead worker
held is reported whole by ``collect``. (When "a chunk is done" was written in two places, one
of them forgot to release the messages held back behind it, and a call hung.)

**Sends never wait** (``Channel.queue``): what the kernel does not take now waits in the
channel and goes out when the socket is writable (``flush``), so a worker stuck in C code
with the GIL held cannot stop the scheduler, its deadlines or the other workers.

States::

    BOOTING ──BOOTED──▶ INITIALIZING ──READY──▶ READY ──(quota used)──▶ STOPPING
       │                     │                    │                        │
       └─────────────────────┴──── death, kill ───┴────────────────────────┴──▶ DEAD
"""

from __future__ import annotations

import enum
import mmap
import os
import pickle
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _protocol as P
from multitrack.backends import _wire
from multitrack.backends._base import Chunk, Completed, Event, GivenBack, Lost, Output
from multitrack.backends._channel import Channel
from multitrack.backends._start import WorkerProcess, exited_within, release
from multitrack.backends._watch import Watch, wait_readable

# A message to a worker and the large buffers that travel beside it in shared memory.
Message = tuple[tuple[Any, ...], list[pickle.PickleBuffer]]

STDERR_KEPT = 2000  # bytes of a worker's last stderr kept, to explain a failed start
STACK_WAIT = 0.3  # seconds a timed-out worker gets to dump its stacks before it is killed


class State(enum.Enum):
    BOOTING = "booting"  # started, not yet BOOTED: the start-up bound applies
    INITIALIZING = "initializing"  # interpreter up, initializer running
    READY = "ready"  # takes chunks
    STOPPING = "stopping"  # told to stop (its quota of tasks is used): takes no more
    DEAD = "dead"  # collected; its descriptors are closed


@dataclass(eq=False)
class _Held:
    """A chunk a worker holds, and how many of its tasks are not accounted for yet."""

    chunk: Chunk
    remaining: int
    timed: bool
    split: bool = False  # sent one task per message (after a pickling problem)


class WorkerHandle:
    """The parent's side of one worker process (see the module docstring)."""

    def __init__(
        self,
        key: int,
        popen: WorkerProcess,
        conn: Channel,
        slot: mmap.mmap,
        pidfd: int | None,
        watch: Watch[WorkerHandle],
        *,
        stacks: int,
        boot_deadline: float,
        forked: bool,
    ) -> None:
        self.key = key
        self.popen = popen
        self.conn = conn
        self.slot = slot
        self.pidfd = pidfd
        self.stacks = stacks  # read end of the pipe its faulthandler writes stacks into
        os.set_blocking(stacks, False)
        self.boot_deadline = boot_deadline
        self.forked = forked
        self.spawned_at = time.monotonic()
        self.ready_after: float | None = None  # seconds from its start to READY
        self.state = State.BOOTING
        self.chunks: dict[int, _Held] = {}
        self.asked_to_give_back: set[int] = set()  # chunks asked back and not yet accounted for
        self.fn_version = 0  # of the function it has (the pool bumps its own per call)
        self.tasks_done = 0
        self.last_stderr = b""
        self._partial_line: dict[str, bytes] = {}
        self._watch = watch
        watch.add(conn.fileno(), self, "conn")
        if pidfd is not None:
            watch.add(pidfd, self, "pidfd")
        for name, stream in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
                watch.add(stream.fileno(), self, name)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    def chunks_held(self) -> int:
        return len(self.chunks)

    def tasks_held(self) -> int:
        return sum(len(held.chunk.indices) for held in self.chunks.values())

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: tuple[Any, ...], buffers: Sequence[pickle.PickleBuffer] = ()) -> None:
        """Queue ``message``; whatever the kernel does not take now goes out when the socket
        is writable. A worker that is gone is reported by its pidfd or EOF, not here."""
        if self.state is State.DEAD:
            return
        try:
            done = self.conn.queue(_wire.dumps(message), buffers)
        except OSError:
            return
        if not done:
            self._watch.want_write(self.conn.fileno(), True)

    def flush(self) -> None:
        """The socket is writable: send more of what waits."""
        try:
            done = self.conn.flush()
        except OSError:
            return  # it is gone: its pidfd or EOF says so
        if done:
            self._watch.want_write(self.conn.fileno(), False)

    def hold(self, chunk: Chunk, messages: list[Message], failed: int, *, timed: bool) -> None:
        """Send a chunk's ``messages`` (``failed`` of its tasks could not be pickled: they
        are reported already, and the rest travels one task per message)."""
        held = _Held(chunk, len(chunk.indices) - failed, timed, split=failed > 0)
        self.chunks[chunk.id] = held
        for message, buffers in messages:
            self.send(message, buffers)

    def give_back(self, chunk_id: int) -> None:
        """Ask for the tasks of ``chunk_id`` not started yet (once per chunk)."""
        if chunk_id not in self.asked_to_give_back:
            self.asked_to_give_back.add(chunk_id)
            self.send((P.GIVE_BACK, chunk_id))

    def retire(self) -> None:
        self.state = State.STOPPING
        self.send((P.STOP,))

    def stack(self, bound: float = STACK_WAIT) -> str | None:
        """What its threads are doing, as ``faulthandler`` dumps it on SIGUSR1 (the task's
        thread first, multitrack's own threads left out); ``None`` when nothing came within
        ``bound`` seconds (a worker dead already, or one that never answers)."""
        if self.state is State.DEAD or self.popen.returncode is not None:
            return None
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            return None
        text, deadline = b"", time.monotonic() + bound
        while (left := deadline - time.monotonic()) > 0:
            if not wait_readable({self.stacks: None}, min(left, 0.05 if text else left)):
                if text:
                    break  # a pause after some text: the dump is complete
                continue
            fresh, eof = _read_available(self.stacks)
            text += fresh
            if eof:
                break
        return task_stack(text.decode("utf-8", "replace")) if text else None

    def kill(self) -> None:
        """SIGKILL its whole process group (a task may have started processes of its own)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                # A fork that has not made its own session yet (just started) has no group
                # of its own; the pid is still ours (not reaped), so it names that process.
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    # -- receiving --------------------------------------------------------------------------

    def receive(self, events: list[Event]) -> bool:
        """Decode every message waiting; append what they mean to ``events``. ``False`` when
        the socket reached EOF (the worker is dying: ``collect`` it)."""
        try:
            while self.conn.poll(0):
                data, buffers = self.conn.recv_bytes()
                self._handle(_wire.loads(data), events, buffers)
        except (EOFError, OSError):
            return False
        return True

    def _handle(self, message: tuple[Any, ...], events: list[Event], buffers: Any = ()) -> None:
        tag = message[0]
        if tag == P.DONE:
            self._on_done(events, *message[1:], buffers=buffers)
        elif tag == P.GIVEN_BACK:
            self._on_given_back(events, message[1], message[2])
        elif tag == P.CHUNK_ERROR:
            self._on_chunk_error(events, message[1], message[2], message[3])
        elif tag == P.BOOTED:
            self.state = State.INITIALIZING
        elif tag == P.READY:
            self.state = State.READY
            self.ready_after = time.monotonic() - self.spawned_at
        elif tag == P.START_ERROR:
            cause = _wire.unpack_error(message[1])
            raise WorkerStartError(
                f"the initializer failed in worker pid {self.pid}: {_wire.describe(cause)}"
            ) from cause
        elif tag == P.FN_ERROR:
            cause = _wire.unpack_error(message[1])
            raise WorkerStartError(
                f"the function could not be loaded in a worker process: {_wire.describe(cause)}"
                " (is its module importable from the worker's sys.path?)"
            ) from cause

    def _on_done(
        self,
        events: list[Event],
        chunk_id: int,
        first: int,
        pickled: bytes,
        errors: dict[int, Any],
        busy: float,
        *,
        buffers: Any,
    ) -> None:
        if chunk_id not in self.chunks:  # a chunk of an aborted call finishing late
            return
        values = _wire.loads(pickled, buffers=buffers)
        raised = {offset: _wire.unpack_error(packed) for offset, packed in errors.items()}
        self.tasks_done += len(values)
        # The worker's bytes are kept for a journal when they stand alone (no buffer of
        # theirs travelled in shared memory).
        kept = None if buffers else pickled
        events.append(Completed(chunk_id, first, values, raised, busy, self.key, kept))
        self._account(chunk_id, len(values))

    def _on_given_back(self, events: list[Event], chunk_id: int, position: int) -> None:
        held = self.chunks.get(chunk_id)
        if held is None or position >= len(held.chunk.indices):
            return
        events.append(GivenBack(chunk_id, position))
        self._account(chunk_id, len(held.chunk.indices) - position)

    def _on_chunk_error(self, events: list[Event], chunk_id: int, first: int, packed: Any) -> None:
        """The worker could not unpickle a chunk's arguments. Send its tasks again one by one,
        so that only the task that really cannot be rebuilt there fails."""
        held = self.chunks.get(chunk_id)
        if held is None:
            return
        chunk = held.chunk
        if held.split or len(chunk.indices) == 1:
            events.append(Completed.failure(chunk_id, first, _wire.unpack_error(packed)))
            self._account(chunk_id, 1)
            return
        held.split = True
        self.asked_to_give_back.add(chunk_id)  # one message per task now: never asked back whole
        for position, args in enumerate(chunk.args):
            buffers: list[pickle.PickleBuffer] = []
            payload = _wire.dumps([args], buffers)
            self.send((P.CHUNK, chunk_id, position, held.timed, payload), buffers)

    def _account(self, chunk_id: int, count: int) -> None:
        """``count`` more tasks of a chunk are accounted for: the one place a chunk ends."""
        held = self.chunks[chunk_id]
        held.remaining -= count
        if held.remaining <= 0:
            del self.chunks[chunk_id]
            # Chunk ids start again at 0 in each call of a reused pool: a stale entry would
            # stop a later chunk with this id from ever being asked back.
            self.asked_to_give_back.discard(chunk_id)

    def running(self) -> P.SlotReading | None:
        """What it runs now, if that is one of the chunks it holds for this call."""
        if not self.chunks:
            return None
        current = P.read_slot(self.slot)
        return current if current is not None and current.chunk_id in self.chunks else None

    # -- output -----------------------------------------------------------------------------

    def relay(self, name: str, output: Output, *, final: bool = False) -> None:
        """Pass what the worker wrote to ``name`` ("stdout"/"stderr") on, whole lines only
        (``final``: the rest too, as a line)."""
        stream: IO[bytes] | None = getattr(self.popen, name)
        if stream is None or stream.closed:
            return
        fresh, eof = _read_available(stream.fileno())
        if eof:
            self._watch.discard(stream.fileno())
            stream.close()
            final = True
        if name == "stderr":
            self.last_stderr = (self.last_stderr + fresh)[-STDERR_KEPT:]
        data = self._partial_line.get(name, b"") + fresh
        complete, _, rest = data.rpartition(b"\n")
        if final and rest:
            complete, rest = data + b"\n", b""
        elif complete:
            complete += b"\n"
        self._partial_line[name] = rest
        if complete:
            output(complete.decode("utf-8", "replace"), name)

    def stderr_tail(self) -> str:
        """Its last lines on stderr, to explain a failed start (``""`` when none)."""
        tail = self.last_stderr.decode("utf-8", "replace").strip()
        if not tail:
            return ""
        return "; its last output was:\n" + "\n".join(tail.splitlines()[-15:])

    # -- the end ----------------------------------------------------------------------------

    def collect(
        self,
        events: list[Event],
        output: Output,
        *,
        report: bool,
        killed: bool = False,
        stack: str | None = None,
        starting_matters: bool = True,
    ) -> None:
        """The worker is gone, or must go: take what it sent, reap it, relay its last output,
        close its descriptors and (``report``) append a ``Lost`` for the chunks it held.
        Raises ``WorkerStartError`` when it died before it was ready (``starting_matters``:
        a call is running)."""
        if self.state is State.DEAD:
            return
        start_error: WorkerStartError | None = None
        if report:
            try:
                self.receive(events)
            except WorkerStartError as exc:  # raised once it is cleaned up
                start_error = exc
        was_starting = self.state in (State.BOOTING, State.INITIALIZING)
        current, held = self._reap(output)
        code = self.popen.returncode
        if start_error is not None:
            raise start_error
        if report and was_starting and code != 0 and starting_matters:
            raise WorkerStartError(
                f"a worker process exited with code {code} before it was ready "
                f"(pid {self.pid}){self.stderr_tail()}"
            )
        if report and held:
            events.append(self._lost(held, current, killed=killed, stack=stack))

    def _reap(self, output: Output) -> tuple[P.SlotReading | None, list[int]]:
        """Wait for its exit (kill it if it lingers), relay its last output, close its
        descriptors. What its slot said it ran, and the chunks it held."""
        if not exited_within(self.popen, 1.0):
            self.kill()  # it closed its socket but lives on: not ours to trust
            self.popen.wait()
        for name in ("stdout", "stderr"):
            self.relay(name, output, final=True)
        current = P.read_slot(self.slot)
        self._close()
        held = list(self.chunks)
        self.forget_call()
        return current, held

    def _lost(
        self, held: list[int], current: P.SlotReading | None, *, killed: bool, stack: str | None
    ) -> Lost:
        if current is not None and current.chunk_id not in held:
            current = None  # a chunk of an earlier call
        return Lost(
            worker=self.key,
            chunk_ids=held,
            running=(current.chunk_id, current.position) if current else None,
            returncode=self.popen.returncode,
            pid=self.pid,
            killed=killed,
            span=current.span if current else 1,
            stack=stack,
        )

    def forget_call(self) -> None:
        """The call is over: what it holds of that call is not wanted any more."""
        self.chunks.clear()
        self.asked_to_give_back.clear()

    def _close(self) -> None:
        """Close every descriptor, each dropped from the watch first."""
        self.state = State.DEAD
        self._watch.discard(self.conn.fileno())
        self.conn.close()
        self.slot.close()
        os.close(self.stacks)
        if self.pidfd is not None:
            self._watch.discard(self.pidfd)
            os.close(self.pidfd)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None and not stream.closed:
                self._watch.discard(stream.fileno())
                stream.close()
        release(self.popen)

    def descriptors(self) -> list[int]:
        """Its open parent-side descriptors (a forked sibling must close them)."""
        if self.state is State.DEAD:
            return []
        fds = [self.conn.fileno(), self.stacks]
        if self.pidfd is not None:
            fds.append(self.pidfd)
        streams = (self.popen.stdout, self.popen.stderr)
        fds.extend(s.fileno() for s in streams if s is not None and not s.closed)
        return fds


def task_stack(dump: str) -> str:
    r"""A ``faulthandler`` dump of a worker, cut to what concerns its task: the threads that
    are not multitrack's own (the reader and the ticker), without multitrack's frames.

    Example:
        >>> dump = (
        ...     'Thread 0x1 (most recent call first):\n'
        ...     '  File "/x/multitrack/backends/_worker.py", line 9 in _read\n\n'
        ...     'Current thread 0x2 (most recent call first):\n'
        ...     '  File "/home/me/job.py", line 3 in resize\n'
        ...     '  File "/x/multitrack/backends/_worker.py", line 99 in run_chunk\n'
        ... )
        >>> print(task_stack(dump))
        Current thread 0x2 (most recent call first):
          File "/home/me/job.py", line 3 in resize
    """
    kept = []
    for block in dump.strip().split("\n\n"):
        lines = block.splitlines()
        frames = []
        for line in lines[1:]:  # most recent first: the task's frames, down to its runner
            if _WORKER_FRAME in line.replace("\\", "/"):
                break  # below: the worker's loop (and, when forked, the caller's old stack)
            frames.append(line)
        if any(_OWN_FRAMES not in frame.replace("\\", "/") for frame in frames):
            kept.append("\n".join([lines[0], *frames]))  # not one of multitrack's threads
    return "\n\n".join(kept) if kept else dump.strip()


_WORKER_FRAME = "multitrack/backends/_worker.py"
_OWN_FRAMES = "multitrack/backends/"


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What a non-blocking pipe holds now, and whether it reached EOF."""
    fresh = b""
    while True:
        try:
            block = os.read(fd, 65536)
        except BlockingIOError:
            return fresh, False
        except OSError:
            return fresh, True
        if not block:
            return fresh, True
        fresh += block
