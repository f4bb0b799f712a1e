"""The zygote's own side: the process workers are forked from (``_zygote`` is the caller's side,
and says why there is one).

Its loop waits on two things at once: the control socket (requests from the caller, one at a
time) and a pipe the SIGCHLD handler writes into (a worker exited)::

    control socket ── "environ" env ─────────────▶ take it as its own (before any preload)
                  ├── "preload" path argv names ──▶ import them (errors ignored: the worker
                  │                                  imports again and says what went wrong)
                  ├── "fork" token state + 6 fds ▶ fork() a worker, in the caller's working
                  │                                  directory (the 6th fd, when the caller
                  │                                  could open it), with its umask, CPUs and
                  │                                  limits (state); reply "forked" token pid
                  │                                  (or "unsafe": a thread, CUDA, OpenMP;
                  │                                  "failed")
                  └── "release" pid ─────────────▶ reap it once it has exited
    SIGCHLD ──▶ waitid(WNOWAIT) for each child ──▶ reply "exit" pid code (not reaped yet)

EOF on the control socket (the caller exited, died or closed it) ends it; its workers see EOF
on their own sockets and exit too. It imports what a worker needs and no more (the caller's
side, the scheduler, tqdm: none of it), since its start is on the path of a process's first
call.
"""

from __future__ import annotations

import os
import pickle
import resource  # every worker takes the caller's limits (``_take``): imported once, here
import signal
import socket
import sys
from typing import Any

MAX_MESSAGE = 1 << 16  # control messages are small: a path list, names, a pid


def main() -> None:  # pragma: no cover - runs in the zygote process
    """The zygote's entry point (``python -c BOOT CONTROL_FD SYS_PATH``): serve until EOF."""
    try:
        server = _Server(int(sys.argv[1]))
        # What every worker runs, imported while the caller still prepares its call (the
        # zygote is started before the caller's own first-call imports), not after its
        # first fork request.
        from multitrack.backends import _start, _worker  # noqa: F401

        server.serve()
    finally:
        os._exit(0)


class _Server:  # pragma: no cover - runs in the zygote process
    """The zygote's loop: preload, fork, report exits, reap what is released."""

    def __init__(self, control_fd: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.control = socket.socket(fileno=control_fd)
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler: the wake-up fd is written
        self.children: dict[int, bool] = {}  # pid -> released by the caller
        self.exited: set[int] = set()  # reported to the caller, not released yet

    def serve(self) -> None:
        import select

        control = self.control.fileno()
        while True:
            readable, _, _ = select.select([control, self.wake_read], [], [])
            if self.wake_read in readable:
                while _drained(self.wake_read):
                    pass
            self._report_exits()
            if control in readable:
                data, fds, _, _ = socket.recv_fds(self.control, MAX_MESSAGE, 8)
                if not data:
                    return  # the caller is gone
                self._handle(pickle.loads(data), fds)

    def _handle(self, message: tuple[Any, ...], fds: list[int]) -> None:
        if message[0] == "environ":  # before anything of the user's is imported (_zygote)
            os.environ.clear()
            os.environ.update(message[1])
        elif message[0] == "preload":
            _preload(message[1], message[2], message[3])
        elif message[0] == "fork":
            self._fork(message[1], message[2], fds)
        elif message[0] == "release":
            self.children[message[1]] = True
            self._report_exits()

    def _fork(self, token: int, state: dict[str, Any], fds: list[int]) -> None:
        import threading

        from multitrack.backends._native import openmp_threads, release_openmp

        if len(fds) not in (5, 6) or threading.active_count() > 1 or len(sys._current_frames()) > 1:
            self._reply(("unsafe", token, None))  # a preloaded module started a thread
        elif _cuda_in_use():
            self._reply(("unsafe", token, None))  # a fork could not use CUDA again
        elif openmp_threads() and release_openmp():  # a pool that would not let go:
            self._reply(("unsafe", token, None))  # a fork would hang in its first region
        else:
            pid = _fork_worker(fds, state, closing=(self.control.fileno(), *self._wake_fds()))
            if pid is None:
                self._reply(("failed", token, None))
            else:
                self.children[pid] = False
                self._reply(("forked", token, pid))
        for fd in fds:
            os.close(fd)

    def _wake_fds(self) -> tuple[int, int]:
        return self.wake_read, self.wake_write

    def _report_exits(self) -> None:
        for pid, released in list(self.children.items()):
            if pid not in self.exited:
                try:
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = None
                    released = True
                if info is None:
                    continue
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                self.exited.add(pid)
                self._reply(("exit", pid, code))
            if released:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                del self.children[pid]
                self.exited.discard(pid)

    def _reply(self, message: tuple[Any, ...]) -> None:
        try:
            self.control.send(pickle.dumps(message))
        except OSError:
            pass  # the caller is gone: the loop sees EOF next


def _cuda_in_use() -> bool:  # pragma: no cover - the zygote
    """Whether a preloaded module initialised CUDA (a model moved to the GPU at import):
    CUDA cannot be used again in a fork, and fresh interpreters each initialise their own."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def _preload(
    path: list[str], argv: list[str], names: list[str]
) -> None:  # pragma: no cover - the zygote
    """Import ``names`` as a fresh worker would: with the caller's ``sys.path`` and
    ``sys.argv`` (a module may read flags at import)."""
    import importlib

    sys.path[:] = path
    sys.argv[:] = argv
    for name in names:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except BaseException:  # the worker imports it again, and says what went wrong
                pass


def _fork_worker(
    fds: list[int], state: dict[str, Any], *, closing: tuple[int, ...]
) -> int | None:  # pragma: no cover - the zygote
    import warnings

    from multitrack.backends._start import ChildEnds, become_worker

    with warnings.catch_warnings():
        # Native threads (OpenBLAS's pool, after numpy's import) make 3.12+ warn; OpenBLAS
        # stops its pool around a fork, and no Python thread runs here (checked above).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pid = os.fork()
        except OSError:
            return None
    if pid == 0:
        conn, slot, stacks, out, err, *cwd = fds
        for fd in cwd:  # none: the caller could not open its own, this one's it is
            try:
                os.fchdir(fd)
            except OSError:
                pass
            os.close(fd)
        _take(state)
        become_worker(ChildEnds(conn, slot, stacks), (out, err), closing=closing, mask=set())
    return pid


def _take(state: dict[str, Any]) -> None:  # pragma: no cover - a worker, just forked
    """Take the caller's umask, CPUs, niceness and resource limits (``_zygote.process_state``),
    as a process it started now would have them; what this process may not take (a limit
    above its hard limit, a lower niceness) stays as it is."""
    if "umask" in state:
        os.umask(state["umask"])
    for number, limits in state["limits"].items():
        try:
            if resource.getrlimit(number) != limits:
                resource.setrlimit(number, limits)
        except (OSError, ValueError):
            pass
    try:
        if os.sched_getaffinity(0) != state["affinity"]:
            os.sched_setaffinity(0, state["affinity"])
    except OSError:  # CPUs outside this process's cpuset: it keeps its own
        pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != state["nice"]:
            os.setpriority(os.PRIO_PROCESS, 0, state["nice"])
    except OSError:  # a lower niceness than its own needs a privilege
        pass


def _drained(fd: int) -> bool:  # pragma: no cover - the zygote
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False
