"""How a worker process of the process backend comes to life: forked, or a fresh interpreter.

Two ways, one worker (``_worker.run``) and one protocol after that::

    ProcessBackend._spawn ── start_worker(conn, slot) ──┬─ fork()   when it is safe  (~1 ms)
                                                        └─ exec of a fresh Python    (~80 ms)

**Fork when it is safe.** ``fork()`` copies the calling process as it is: its imported
modules (nothing to import again in the worker) and its memory, copy-on-write. What makes it
dangerous is threads: a lock another thread held at the fork (logging, malloc, OpenMP, a CUDA
driver) stays held forever in the child, and macOS frameworks refuse to run after a fork at
all. Python 3.12 warns on a fork with threads, and 3.14 moved multiprocessing off fork for
that reason. So we fork only on Linux, and only when the process has exactly one OS thread
(counted by the kernel, so native threads of OpenBLAS, torch or a CUDA driver count too): with
no other thread, no lock can be held by one. Anything else gets a fresh interpreter, and so
does every worker when ``MULTITRACK_START_METHOD=spawn`` is set.

A fork costs about a millisecond; a fresh interpreter tens of milliseconds plus the
function's imports, once per worker (docs/performance.md).

**The same worker either way.** A forked child starts where a fresh interpreter would: its own
session (a terminal's Ctrl-C reaches only the caller), the caller's signal handlers reset,
stdin on ``/dev/null``, stdout and stderr on the pipes the parent relays, and the parent-side
ends of every other worker's pipes closed (a sibling holding them would never see EOF when the
caller dies). The function still arrives pickled, as it does in a fresh interpreter, so a
function of the caller's script behaves the same in both. What differs is module state: a
forked worker sees the caller's modules as they are at the fork (a fresh one imports them
anew), and it never re-imports anything. ``random`` reseeds itself in a forked child; numpy's
global generator is reseeded here, as a fresh interpreter would seed it. The child never
returns into the caller's code: it leaves with ``os._exit``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import IO, NamedTuple, Protocol

from multitrack.backends._platform import CAN_FORK

if CAN_FORK:
    # A forked worker runs this module's code; imported here, with the backend, it is
    # imported once, not in every child after its fork nor on a first call's timed path
    # (1-2 ms of each worker's start, measured on a one-shot imap's first result).
    from multitrack.backends import _worker  # noqa: F401

# Set to "spawn" to always start workers as fresh interpreters; "auto" (the default) forks
# when the process has a single thread.
START_METHOD_ENV = "MULTITRACK_START_METHOD"
_START_METHODS = ("auto", "spawn")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A fresh interpreter's first line: the caller's sys.path, in the caller's order (marshal: a
# builtin module, nothing to import), then the folder multitrack was imported from, *last*:
# where that folder is site-packages, putting it first would let a package there shadow the
# standard library (PyPI's ``typing`` backport kills every worker that way).
_BOOT = (
    "import sys, marshal; sys.path[:] = marshal.loads(bytes.fromhex(sys.argv[4])); "
    f"sys.path.append({_PACKAGE_PARENT!r}); "
    "from multitrack.backends._worker import main; main()"
)
# Native thread pools: without a cap every worker starts one thread per core and N workers
# fight over N cores. A user's own setting wins.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class WorkerProcess(Protocol):
    """What the backend needs of a worker process: ``subprocess.Popen``'s shape."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    @property
    def stdout(self) -> IO[bytes] | None: ...
    @property
    def stderr(self) -> IO[bytes] | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


def start_method() -> str:
    """``"fork"`` or ``"spawn"``: how the next worker starts (see the module docstring)."""
    wanted = os.environ.get(START_METHOD_ENV, "auto").strip().lower() or "auto"
    if wanted not in _START_METHODS:
        raise ValueError(
            f"{START_METHOD_ENV}={wanted!r} is not a start method: use one of {_START_METHODS}"
        )
    if wanted == "auto" and CAN_FORK and os_threads() == 1:
        return "fork"
    return "spawn"


def os_threads() -> int:
    """Threads of this process as the kernel counts them (native ones included); a large
    number when it cannot tell, so that the answer errs on the safe side."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
        return int(fields[17])  # field 20 of proc(5), counted after the command name
    except (OSError, ValueError, IndexError):
        return 1 << 30


def thread_limits(workers: int) -> dict[str, str]:
    """The native thread-pool caps for a worker, each a user's setting wins over."""
    per_worker = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return {name: os.environ.get(name, per_worker) for name in _THREAD_ENV}


class ChildEnds(NamedTuple):
    """The descriptors a worker keeps: its socket, its slot, and the pipe its stacks are
    dumped into (``faulthandler``, on SIGUSR1: what a task was doing when it timed out)."""

    conn: int
    slot: int
    stacks: int


def start_worker(
    ends: ChildEnds, parent_ends: Sequence[int], limits: dict[str, str]
) -> WorkerProcess:
    """Start a worker on the child ``ends``. ``parent_ends`` are the parent's descriptors a
    forked child must close; ``limits`` its native thread caps. Raises ``OSError`` when no
    process can be started."""
    if start_method() == "fork":
        return _fork(ends, parent_ends, limits)
    import subprocess  # only here: 3-4 ms of a first call's imports, for a path forks skip

    return subprocess.Popen(
        [sys.executable, "-c", _BOOT, *map(str, ends), _marshalled(sys.path)],
        pass_fds=ends,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, **limits},
    )


def _marshalled(path: list[str]) -> str:
    """``sys.path`` for the boot line (entries that are not strings are dropped, as the
    import system ignores them)."""
    import marshal

    return marshal.dumps([entry for entry in path if isinstance(entry, str)]).hex()


def _fork(ends: ChildEnds, parent_ends: Sequence[int], limits: dict[str, str]) -> WorkerProcess:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # or the child would print what is buffered twice
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    # A Ctrl-C between fork() and the child's own handlers would run the caller's handler in
    # the child: hold SIGINT until both sides are set (the parent gets it right after).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child; covered by every test that forks a worker
        _become_worker(
            ends,
            (out_write, err_write),
            closing=(out_read, err_read, *parent_ends),
            mask=mask,
            limits=limits,
        )
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(out_write)
    os.close(err_write)
    stdout, stderr = (os.fdopen(fd, "rb", buffering=0) for fd in (out_read, err_read))
    return ForkedProcess(pid, stdout, stderr)


def _become_worker(
    ends: ChildEnds,
    output: tuple[int, int],
    *,
    closing: tuple[int, ...],
    mask: set[int | signal.Signals],
    limits: dict[str, str],
) -> None:  # pragma: no cover - runs in the forked child only
    """The forked child: set it up as a fresh worker would be, serve, and leave with
    ``os._exit``, whatever happens (returning would run the caller's code a second time)."""
    code = 1
    try:
        # The caller's objects are the caller's: the collector never visits them here, so it
        # neither runs finalizers of the caller's garbage (a temporary file's, say) nor
        # touches, and so copies, their pages.
        gc.freeze()
        os.setsid()
        _reset_signals(mask)
        for fd in closing:
            try:
                os.close(fd)
            except OSError:
                pass
        _redirect_std_streams(*output)
        for name, value in limits.items():
            os.environ.setdefault(name, value)
        _reseed_numpy()
        from multitrack.backends._worker import run

        run(*ends)
        code = 0
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _reset_signals(mask: set[int | signal.Signals]) -> None:  # pragma: no cover - forked child
    """The caller's Python signal handlers are the caller's: back to the defaults, SIGINT
    ignored as in every worker, then the signal mask from before the fork."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for number in signal.valid_signals():
        try:
            if callable(signal.getsignal(number)):
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _redirect_std_streams(out_fd: int, err_fd: int) -> None:  # pragma: no cover - forked child
    """stdin from ``/dev/null``; stdout and stderr into the pipes the parent relays, as fresh
    text streams (the caller's may be a capture object or a notebook's)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in {devnull, out_fd, err_fd} - {0, 1, 2}:
        os.close(fd)
    streams = {
        "stdin": open(0, closefd=False),  # noqa: SIM115 - they live as long as the process
        "stdout": open(1, "w", encoding="utf-8", closefd=False),  # noqa: SIM115
        "stderr": open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False),  # noqa: SIM115
    }
    for name, stream in streams.items():
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)  # what a fresh interpreter's would be


def _reseed_numpy() -> None:  # pragma: no cover - forked child
    """Workers of a fresh interpreter each seed numpy's global generator from the OS; forked
    ones would share the caller's state and draw the same numbers."""
    random = sys.modules.get("numpy.random")
    seed = getattr(random, "seed", None)
    if callable(seed):
        try:
            seed()
        except Exception:
            pass


class ForkedProcess:
    """A forked worker, with the part of ``subprocess.Popen``'s interface the backend uses."""

    def __init__(self, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                self._reap(0)
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:  # Popen.wait's way: no blocking wait can take a timeout
            left = deadline - time.monotonic()
            if left <= 0:
                import subprocess

                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # somebody else reaped it (a SIGCHLD handler, say)
            self.returncode = 0
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def exited_within(process: WorkerProcess, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``process`` to exit; whether it did. (Both kinds
    raise ``subprocess.TimeoutExpired``, which is imported only where a process raised it.)"""
    try:
        process.wait(timeout)
    except Exception as exc:
        subprocess = sys.modules.get("subprocess")
        if subprocess is not None and isinstance(exc, subprocess.TimeoutExpired):
            return False
        raise
    return True
