"""The zygote: one clean process per caller, that workers are forked from (the default start).

**What a worker sees of the caller** is what a fresh interpreter started at the call would
see: the caller's ``sys.path`` (in its order), working directory and environment (its umask,
CPUs, niceness and resource limits too: ``process_state``), and its
modules imported anew, in the state their import leaves them (a module global the caller
changed at run time is not seen changed; a function of the caller's script travels by value,
with the values of the globals it names). This is the same whether or not numpy, OpenCV,
torch or tqdm started a thread in the caller, on Linux and macOS alike, and it is the
semantics of ``multiprocessing``'s forkserver (the default from Python 3.14). Forking the
caller itself gave its module state of the moment instead, but only while the caller had no
other thread: which of the two a user got depended on what their imports did (issue 13's
``helper.SCALE``). ``start_method="fork"`` asks for that deliberately (``_start``).

**As fast as a fork.** A fresh interpreter per worker costs tens of milliseconds, plus the
function's imports (OpenCV, torch: seconds) in every worker of every call. The zygote is a
fresh interpreter started once per caller process; before a call's workers start, it imports
the modules the call's function needs ("preload", once), then forks each worker (~1 ms). The
workers of later calls, replacements after a crash and ``max_tasks_per_worker`` restarts are
all forks of it::

    caller ──control socket (SOCK_SEQPACKET; descriptors by SCM_RIGHTS)──▶ zygote (own session)
      │  "preload" sys.path, module names  ─▶  imported once, errors ignored (the worker
      │                                         imports again and reports them)
      │  "fork" token + 5 child ends, cwd  ─▶  fork() ─▶ worker (child of the zygote)
      │                       ◀─ "forked" token pid
      │                       ◀─ "exit" pid code     (learned with waitid(WNOWAIT): not reaped)
      │  "release" pid        ─▶ reaped now
      └── the worker's socket, slot and pipes are created by the caller, as for any worker

**Supervising a worker that is not our child.** Its death wakes the caller's wait on a pidfd
(any process of ours can have one) or its socket's EOF, as for any worker. Its exit status
comes from the zygote, which reaps a worker only when the caller releases it: a pid the caller
may still signal (a kill, a stack dump) is never reused meanwhile.

**One zygote per environment.** Libraries read the environment when they are imported
(``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``): a zygote is started with the caller's
environment plus the workers' thread caps (which depend on the pool's size), and a caller whose
environment changed gets a new one. Two are kept (a program may alternate between two pool
sizes); an older one exits once its last worker is released. The exception is the zygote
started ahead of a program's first call (``prestart``, with the default pool size's caps):
until it has imported anything of the user's it takes the environment of the call that uses
it ("environ"), so a first call with another ``workers`` does not boot a second one, unless
a variable an interpreter reads as it starts differs (``STARTUP_ENV``).

**Lifetime.** A process's first use of a call (``multitrack.map`` and its siblings) starts the
zygote for the default pool size (``_start.prestart``): it boots while the caller imports the
scheduler and prepares the call, which hides about half of its start; a call that turns out
to need none (threads, a cluster, forks of the caller) kills it. ``import multitrack`` alone
starts nothing. The zygote exits when its control socket reaches EOF: when the caller exits
or dies (even by SIGKILL) or closes it. It runs no task and holds no result.

The zygote's own loop is ``_zygote_server`` (it imports only what a worker needs).

**When it cannot be used** (it failed to start or died; a preloaded module started a Python
thread in it, so that forking it could copy a held lock; initialised CUDA, which a fork
cannot use again; or ran a GNU OpenMP parallel region whose pool would not let go of its
threads, which a fork would wait for forever: ``_native``), workers are fresh interpreters,
as where ``fork`` is unsafe (macOS); the semantics are the same.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from multitrack.backends._watch import wait_readable
from multitrack.backends._zygote_server import MAX_MESSAGE

REPLY_POLL = 1.0  # seconds between checks that a zygote still importing is alive
CLOSE_WAIT = 0.1  # seconds a closed zygote gets to exit before it is left to exit on its own
# A zygote that is gone cannot tell its workers' exit statuses: this stands in (not negative:
# that would name a signal).
_DROPPED = 255
# Zygotes kept at once, one per environment (pools of different sizes differ in their thread
# caps, and a program may alternate between two): each holds what it preloaded.
MAX_ZYGOTES = 2
# Variables an interpreter (or the dynamic loader, or libc) reads as it starts, or that the
# zygote's own imports read: a zygote started with other values cannot take them later.
STARTUP_ENV = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_", "LANG", "TZ", "MULTITRACK_")
# The caller's working directory, sent to a worker as a descriptor (``Zygote.fork``).
_CWD_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


# -- the caller's side ------------------------------------------------------------------------


class Zygote:
    """The caller's handle on one zygote process (see the module docstring)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import subprocess

        from multitrack.backends._start import boot_command

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                boot_command("multitrack.backends._zygote_server", theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # what an import prints there is no task's output
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(env),
            )
        self.env = dict(env)  # what its workers get (``adopt`` may change it once)
        ours.setblocking(False)
        self._control = ours
        self._preloaded: set[str] = set()
        self._later: set[str] = set()  # imported before the next fork after the next preload
        self._exits: dict[int, int] = {}
        self._children: set[int] = set()  # forked and not released
        self.unsafe = False  # a preloaded module started a thread: never used again
        self._tokens = itertools.count()
        # One request and its reply at a time: calls in several threads share the zygote.
        self._lock = threading.RLock()
        self._awaited = -1  # the fork request whose reply is awaited
        self.retiring = False  # replaced: exits once its last worker is released

    @property
    def usable(self) -> bool:
        """Whether workers may be forked from it: ``close`` (it is gone, unsafe or failed)
        closes its socket, which is the one record of that."""
        return self._control.fileno() >= 0

    @property
    def blank(self) -> bool:
        """Nothing of the user's imported, no worker forked: its environment can change."""
        return self.usable and not self._preloaded and self._awaited == -1

    def adopt(self, env: Mapping[str, str]) -> bool:
        """Take ``env`` as the environment of everything it imports and forks from now on,
        when it is blank and no variable read at start-up differs (``STARTUP_ENV``)."""
        changed = {
            name for name in self.env.keys() | env.keys() if self.env.get(name) != env.get(name)
        }
        with self._lock:
            if not self.blank or any(name.startswith(STARTUP_ENV) for name in changed):
                return False
            if not self._send(("environ", dict(env))):
                return False
            self.env = dict(env)
            return True

    def preload(self, names: Iterable[str], *, later: bool = False) -> None:
        """Have the zygote import ``names`` (once each) before its next fork; ``later``: with
        the next ones asked for without it. A call's arguments may need modules its function
        does not name (a torch tensor for a function that never names torch): every worker
        imported them again, every call. Imported at once they would compete with that
        call's workers for the cores (a one-call script's 64 arrays: 1.11x the time, for
        numpy's import that no later worker used); before the next call's forks, they cost
        what one worker's import did, once."""
        with self._lock:
            if later:
                self._later.update(name for name in names if name not in self._preloaded)
                return
            fresh = [name for name in [*names, *self._later] if name not in self._preloaded]
            fresh = list(dict.fromkeys(fresh))
            self._later.clear()
            path = [entry for entry in sys.path if isinstance(entry, str)]
            if fresh and self._send(("preload", path, list(sys.argv), fresh)):
                self._preloaded.update(fresh)

    def fork(self, fds: tuple[int, ...]) -> int | None:
        """A worker forked on the child ends ``fds`` (socket, slot, stacks, stdout, stderr);
        its pid, or ``None`` when the zygote cannot (then it is not used again)."""
        with self._lock:
            self._awaited = token = next(self._tokens)
            # The working directory goes as a descriptor, not a path: the worker then starts
            # in it even when it was deleted or renamed meanwhile, as a fresh interpreter
            # would (O_PATH: no read permission needed, as for a path).
            try:
                cwd: tuple[int, ...] = (os.open(".", _CWD_FLAGS),)
            except OSError:  # gone from under us (a stale NFS mount): the zygote's, then
                cwd = ()
            try:
                if not self._send(("fork", token, process_state()), (*fds, *cwd)):
                    return None
            finally:
                for fd in cwd:
                    os.close(fd)
            # The reply comes once the zygote has imported what the call needs: a model
            # loaded at import can take minutes, and a fresh worker's import is waited for
            # as long as it takes, so the zygote's is too (giving up would make every worker
            # of every call import it again). The bound is the zygote's life: its death is
            # EOF on the socket (or, checked each REPLY_POLL, its exit); Ctrl-C interrupts.
            try:
                while self.usable:
                    for kind, _, pid in self._receive(REPLY_POLL):
                        if kind == "forked":
                            self._children.add(pid)
                            return int(pid)
                        self.unsafe = kind == "unsafe"  # else "failed": fork() itself failed
                        self.close()
                        return None
                    if self.process.poll() is not None:
                        break
            finally:  # a reply that comes later (after Ctrl-C, say) is for nobody
                self._awaited = -1
            self._abandon()
            return None

    def _abandon(self) -> None:
        """A fork request went unanswered (the zygote died): the caller now starts that
        worker otherwise, on the same descriptors, so the zygote must never act on the
        request later (two processes on one socket corrupt its stream): it is killed, if it
        still lives. Its workers live on. (A zygote that dies between its fork and its reply
        leaves a worker on those descriptors: a window of microseconds, not closed here.)"""
        if self.process.poll() is None:
            self.process.kill()  # first: close() then waits for an exit, not for an import
        self.close()

    def exit_code(self, pid: int) -> int | None:
        """``pid``'s exit status once known (``Popen.returncode``'s convention), or ``None``."""
        with self._lock:
            for _ in self._receive(0.0):
                pass
            if pid in self._exits:
                return self._exits[pid]
            if not self.usable and not _exists(pid):
                return _DROPPED  # the zygote is gone, and its worker too: no status to be had
            return None

    def wait(self, timeout: float) -> None:
        """Until a message arrives or ``timeout`` seconds pass."""
        with self._lock:
            if self.usable:
                for _ in self._receive(timeout):
                    pass
            else:
                time.sleep(min(timeout, 0.01))

    def release(self, pid: int) -> None:
        """The caller is done with ``pid``: the zygote may reap it."""
        with self._lock:
            self._children.discard(pid)
            self._exits.pop(pid, None)
            self._send(("release", pid))
            if self.retiring and not self._children:
                self.close()

    def close(self) -> None:
        """Let it exit (EOF on its socket: at once, unless it is busy importing); its workers
        are told nothing, and live on."""
        self._control.close()
        # Polled, not ``Popen.wait``: this may run while the interpreter shuts down (an
        # ``imap`` left open is closed then), when an import (its TimeoutExpired) fails.
        deadline = time.monotonic() + CLOSE_WAIT
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.process.poll() is None:
            _reap_later(self.process)

    def _send(self, message: tuple[Any, ...], fds: tuple[int, ...] = ()) -> bool:
        if not self.usable:
            return False
        try:
            socket.send_fds(self._control, [pickle.dumps(message)], list(fds))
            return True
        except OSError:  # gone (EPIPE), or its queue full: not to be trusted any more
            self.close()
            return False

    def _receive(self, timeout: float) -> Iterator[tuple[Any, ...]]:
        """The replies waiting (after up to ``timeout`` seconds for the first); exit statuses
        are kept, everything else is yielded."""
        if not self.usable or not wait_readable({self._control: None}, timeout):
            return
        while True:
            try:
                data = self._control.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # EOF: it died
                self.close()
                return
            reply = pickle.loads(data)
            if reply[0] == "exit":
                self._exits[reply[1]] = reply[2]
            elif reply[1] == self._awaited:
                yield reply
            elif reply[0] == "forked":  # for a request given up: its worker sees EOF and exits
                self._send(("release", reply[2]))


def process_state() -> dict[str, Any]:
    """What a process started now inherits from the caller besides its working directory and
    environment: its umask, the CPUs it may run on, its niceness, its resource limits. The
    caller may have changed them since its zygote started; the worker takes these
    (``_zygote_server``)."""
    import resource

    state: dict[str, Any] = {
        "affinity": os.sched_getaffinity(0),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "limits": {
            number: resource.getrlimit(number)
            for name, number in vars(resource).items()
            if name.startswith("RLIMIT_")
        },
    }
    try:
        with open("/proc/self/status", "rb") as status:  # Linux 4.7+: read without changing
            for line in status:
                if line.startswith(b"Umask:"):
                    state["umask"] = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return state


_zygotes: dict[tuple[tuple[str, str], ...], Zygote] = {}


def for_env(env: Mapping[str, str]) -> Zygote | None:
    """The zygote for workers with environment ``env``, started if needed; ``None`` when one
    for ``env`` failed (workers then start as fresh interpreters)."""
    with _registry_lock:
        found = _adopted(env) or _for_env(env)
        if found is not None:
            _prestarted.discard(found)  # used now
        return found


def _adopted(env: Mapping[str, str]) -> Zygote | None:
    """A zygote started ahead that takes ``env`` as its own (``Zygote.adopt``), kept under
    it; ``None`` when one for ``env`` exists already, or none can."""
    key = tuple(sorted(env.items()))
    if key in _zygotes:
        return None
    for ahead in _prestarted:
        if ahead.adopt(env):
            for old, each in list(_zygotes.items()):
                if each is ahead:
                    del _zygotes[old]
            _zygotes[key] = ahead
            return ahead
    return None


def prestart(env: Mapping[str, str]) -> None:
    """Start the zygote for ``env`` ahead of a call, if there is none (``_start.prestart``)."""
    with _registry_lock:
        if _prestart_wanted and tuple(sorted(env.items())) not in _zygotes:
            started = _for_env(env)
            if started is not None:
                _prestarted.add(started)


def drop_prestarted() -> None:
    """Kill the zygotes started ahead that no call has used (still booting, most likely: a
    close would wait for their imports), and start none ahead again: this program's calls
    do not use one."""
    global _prestart_wanted
    with _registry_lock:
        _prestart_wanted = False
        for unused in _prestarted:
            for key, each in list(_zygotes.items()):
                if each is unused:
                    del _zygotes[key]
            unused._abandon()
        _prestarted.clear()


_registry_lock = threading.Lock()
_prestarted: set[Zygote] = set()  # started ahead of a call, not used by one yet
_prestart_wanted = True  # False once a call had no use for the zygote started ahead of it


def _for_env(env: Mapping[str, str]) -> Zygote | None:
    key = tuple(sorted(env.items()))
    found = _zygotes.pop(key, None)
    if found is not None and (found.usable or found.unsafe or found.process.poll() is None):
        _zygotes[key] = found  # the most recently used last
        return found if found.usable else None
    # none yet, or it died: start one
    while len(_zygotes) >= MAX_ZYGOTES:  # the least recently used goes
        oldest = _zygotes.pop(next(iter(_zygotes)))
        oldest.retiring = True
        # Not while a call in another thread awaits a fork from it (that may take as long as
        # an import): it closes itself once the worker it forks is released (``retiring``).
        if oldest._lock.acquire(blocking=False):
            try:
                if not oldest._children:
                    oldest.close()
            finally:
                oldest._lock.release()
    try:
        _zygotes[key] = fresh = Zygote(env)
    except OSError:
        return None
    return fresh


def _forget_after_fork() -> None:  # pragma: no cover - runs in forked children
    """A forked child (a worker of ``start_method="fork"``) starts its own zygote if it needs
    one: the caller's is the caller's."""
    for each in _zygotes.values():
        try:
            each._control.close()
        except OSError:
            pass
    _zygotes.clear()
    _prestarted.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_at_exit() -> None:
    """At interpreter exit: zygotes with no worker left exit now; the others once the pools
    that still hold their workers close (their exit handler runs after this one)."""
    for each in list(_zygotes.values()):
        each.retiring = True
        if not each._children:
            each.close()
    _zygotes.clear()
    _prestarted.clear()
    for process in _closed:
        if process.poll() is None:
            process.kill()
            process.wait()


class ZygoteProcess:
    """A worker forked by a zygote, with the part of ``subprocess.Popen``'s interface the
    backend uses."""

    def __init__(self, zygote: Zygote, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None
        self._zygote = zygote

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                import subprocess

                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            self._zygote.wait(min(left, 1.0))
        assert self.returncode is not None
        return self.returncode

    def release(self) -> None:
        self._zygote.release(self.pid)


def _exists(pid: int) -> bool:
    """Whether ``pid`` still runs. A worker whose zygote died is reparented to init, or to
    whatever runs as PID 1 in a container, which may never reap it: a zombie has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _reap_later(process: Any) -> None:
    """A closed zygote exits at once; reap it when we next look (no zombie is left for long,
    and none outlives the caller)."""
    _closed.append(process)
    _closed[:] = [each for each in _closed if each.poll() is None]


_closed: list[Any] = []
