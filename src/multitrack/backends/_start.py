"""How a worker process of the process backend comes to life, and what it sees of the caller.

Two semantics, chosen by ``start_method`` (the option, else ``MULTITRACK_START_METHOD``)::

    start_worker ──"spawn" (default)──┬─ fork of the zygote (Linux)        ~1 ms, _zygote
                  │                   └─ exec of a fresh Python (elsewhere) ~80 ms + imports
                  └──"fork"───────────── fork of the caller                ~1 ms

**"spawn": a worker is what a fresh interpreter started at the call would be**, on every path:
the caller's ``sys.path`` in its order, its interpreter's options (``-O``, ``-W``, ``-X``, as
multiprocessing's spawn passes them), its working directory and environment, its modules
imported anew (their state as import leaves it), the function pickled (a script's function by
value, with the values of the globals it names). Whether numpy, OpenCV, torch or anything else
started a thread in the caller changes nothing, and neither does the platform. On Linux the
workers are forks of the zygote (a clean process that imported the call's modules once, see
``_zygote``); where fork is unsafe (macOS) or the zygote cannot be used, they are fresh
interpreters. This is the default because it is the only semantics every path can keep: the
caller can be forked safely only while it has no other thread, and which case a user got
depended on what their imports did (a module global set at run time was seen, or not).

**"fork": a worker is a fork of the caller at the moment it starts**: it sees the caller's
module state as it is then (globals set at run time, as mmengine's workers on Linux do) and
shares its memory copy-on-write (a 2 GB lookup table in a global costs no copy). It is refused
while the caller runs another Python thread (a lock that thread holds would stay held in every
worker, forever), while GNU OpenMP's pool has threads that it cannot make let go (a fork
hangs at its first parallel region: ``_native``), and where fork is unsafe (macOS). Other
native threads (OpenBLAS's pool) are allowed: OpenBLAS shuts its pool down around a fork.

**The same worker either way.** A forked child (of the caller or of the zygote) starts where a
fresh interpreter would: its own session (a terminal's Ctrl-C reaches only the caller), signal
handlers reset, stdin on ``/dev/null``, stdout and stderr on the pipes the parent relays, the
parent-side ends of other workers' pipes closed (a sibling holding them would never see EOF
when the caller dies), numpy's global generator reseeded (``random`` reseeds itself). The
child never returns into the code it was forked from: it leaves with ``os._exit``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import IO, NamedTuple, Protocol

from multitrack.backends._platform import CAN_FORK, usable_cpus

# The default of the ``start_method`` option, for a whole script without editing it.
START_METHOD_ENV = "MULTITRACK_START_METHOD"
START_METHODS = ("spawn", "fork")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A fresh interpreter's first line: the caller's sys.path, in the caller's order (marshal: a
# builtin module, nothing to import; the last argument), then the folder multitrack was
# imported from, *last*: where that folder is site-packages, putting it first would let a
# package there shadow the standard library (PyPI's ``typing`` backport kills every worker).
_BOOT = (
    "import sys, marshal; sys.path[:] = marshal.loads(bytes.fromhex(sys.argv[-1])); "
    f"sys.path.append({_PACKAGE_PARENT!r}); "
    "from {module} import main; main()"
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


def start_method(given: str | None = None) -> str:
    """``"spawn"`` or ``"fork"``: ``given`` (the option), else ``MULTITRACK_START_METHOD``,
    else ``"spawn"`` (see the module docstring). Raises ``ValueError`` for anything else."""
    if given is not None:
        if given not in START_METHODS:
            raise ValueError(
                f"start_method={given!r} is not a start method: use one of {START_METHODS}"
            )
        return given
    wanted = os.environ.get(START_METHOD_ENV, "").strip().lower() or "spawn"
    if wanted not in START_METHODS:
        raise ValueError(
            f"{START_METHOD_ENV}={wanted!r} is not a start method: use one of {START_METHODS}"
        )
    return wanted


def refuse_fork() -> str | None:
    """Why the caller cannot be forked now (``start_method="fork"``), or ``None``."""
    if not CAN_FORK:
        return (
            "start_method='fork' is not available here: fork is unsafe on this platform "
            "(or switched off by MULTITRACK_WITHOUT); use start_method='spawn'"
        )
    others = other_python_threads()
    if others:
        return (
            "start_method='fork' cannot fork this process while other Python threads run "
            f"({', '.join(others)}): a lock one of them holds would stay locked in every "
            "worker. Stop them before the call, or use start_method='spawn'"
        )
    return refuse_native_fork()


def refuse_native_fork() -> str | None:
    """Why native threads of the caller make a fork of it hang, or ``None``. GNU OpenMP's
    pool is asked to let its threads go first (``_native.release_openmp``): the caller's next
    parallel region starts a new one."""
    from multitrack.backends._native import openmp_threads, release_openmp

    if openmp_threads() and release_openmp():
        return (
            "start_method='fork' cannot fork this process: it ran a GNU OpenMP parallel "
            "region (PyTorch, scikit-learn) whose threads would not let go, and a fork of it "
            "would wait forever for them, as a fork does not copy them. Use "
            "start_method='spawn', or set OMP_NUM_THREADS=1 before the first parallel region"
        )
    return None


def other_python_threads() -> list[str]:
    """The names of the Python threads running beside this one (``"unnamed"`` for one
    started with ``_thread``, which ``threading`` does not list)."""
    import threading

    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if len(sys._current_frames()) > len(others) + 1:
        others.append("unnamed")
    return others


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
    ends: ChildEnds, parent_ends: Sequence[int], limits: dict[str, str], method: str = "spawn"
) -> WorkerProcess:
    """Start a worker on the child ``ends`` by ``method``. ``parent_ends`` are the parent's
    descriptors a fork of the caller must close; ``limits`` its native thread caps. Raises
    ``OSError`` when no process can be started, ``WorkerStartError`` when ``method`` is
    ``"fork"`` and the caller cannot be forked now, or ``"spawn"`` and no fresh interpreter
    can start here (``refuse_spawn``)."""
    if method == "fork":
        _refuse_if(refuse_fork())
        # A fork of the caller runs the worker's code: imported here, before the fork, it is
        # imported once, not in every child (1-2 ms of each worker's start). A zygote
        # imports it when it boots; the caller of the default start never needs it.
        from multitrack.backends import _worker  # noqa: F401

        return _fork(ends, parent_ends, limits)
    _refuse_if(refuse_spawn())
    env = {**os.environ, **limits}
    if CAN_FORK:
        forked = _fork_zygote(ends, env)
        if forked is not None:
            return forked
    import subprocess  # only here: 3-4 ms of a first call's imports, for a path forks skip

    return subprocess.Popen(
        boot_command("multitrack.backends._worker", *ends),
        pass_fds=ends,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )


def prestart() -> None:
    """Start the zygote that a call with the default ``workers`` and start method will fork
    its workers from, so that it boots (a fresh interpreter: tens of milliseconds) while the
    caller imports the rest of multitrack and prepares the call. Called on a program's first
    use of a call (``multitrack.map``, ``imap``, ``starmap``, ``Pool``), not on import: a
    program that imports multitrack and never maps starts no process. Does nothing where
    workers are not forked from a zygote, or when the environment asks for another start.
    A call whose workers need another environment (another ``workers``: other thread caps)
    starts its own zygote, as it would have anyway.

    Example:
        >>> prestart()  # on Linux: a zygote boots in the background; elsewhere nothing
    """
    if not CAN_FORK or refuse_spawn() is not None:
        return
    try:
        if start_method() != "spawn":
            return
    except ValueError:  # a bad MULTITRACK_START_METHOD: the call says so, before any worker
        return
    from multitrack.backends import _zygote

    _zygote.prestart({**os.environ, **thread_limits(usable_cpus())})


def drop_prestarted() -> None:
    """Close a zygote that ``prestart`` started and no call has used yet: the call that was
    coming runs on another backend (threads, a cluster) or forks the caller, and no
    process of multitrack's should outlive it for nothing."""
    if "multitrack.backends._zygote" in sys.modules:
        from multitrack.backends import _zygote

        _zygote.drop_prestarted()


def refuse_spawn() -> str | None:
    """Why workers cannot start as fresh interpreters here, or ``None``: a frozen program
    (PyInstaller, cx_Freeze) or an embedding one (uWSGI) has no ``python`` to start, and
    running ``sys.executable -c`` would start the program itself again."""
    if getattr(sys, "frozen", False) or not sys.executable:
        what = "a frozen program" if getattr(sys, "frozen", False) else "an embedded Python"
        return (
            f"workers cannot start as fresh interpreters in {what} (sys.executable="
            f"{sys.executable!r} is not a Python to run): use start_method='fork' (Linux), "
            "or backend='thread'"
        )
    return None


def _refuse_if(reason: str | None) -> None:
    if reason is not None:
        from multitrack._errors import WorkerStartError

        raise WorkerStartError(reason)


def preload(payloads: Sequence[bytes], limits: dict[str, str], *, later: bool = False) -> None:
    """Before a call's workers start: the zygote they will be forked from (started now, if
    needed, so that it boots while the caller goes on) imports what ``payloads`` need.
    ``later``: what a call's arguments need, imported before the next call's workers start
    (see ``Zygote.preload``). Raises ``WorkerStartError`` where no fresh interpreter can
    start (``refuse_spawn``)."""
    _refuse_if(refuse_spawn())
    if not CAN_FORK:
        return
    from multitrack.backends import _zygote
    from multitrack.backends._importable import modules_needed

    zygote = _zygote.for_env({**os.environ, **limits})
    if zygote is not None:
        names = [name for payload in payloads for name in modules_needed(payload)]
        zygote.preload(names, later=later)


def _fork_zygote(ends: ChildEnds, env: dict[str, str]) -> WorkerProcess | None:
    from multitrack.backends import _zygote

    zygote = _zygote.for_env(env)
    if zygote is None:
        return None
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        pid = zygote.fork((*ends, out_write, err_write))
    finally:
        os.close(out_write)
        os.close(err_write)
    if pid is None:
        os.close(out_read)
        os.close(err_read)
        return None
    stdout, stderr = (os.fdopen(fd, "rb", buffering=0) for fd in (out_read, err_read))
    return _zygote.ZygoteProcess(zygote, pid, stdout, stderr)


def boot_command(module: str, *fds: int) -> list[str]:
    """The command of a fresh interpreter that runs ``module.main()`` on ``fds``, with the
    caller's interpreter options and ``sys.path`` (entries that are not strings are dropped,
    as imports ignore them)."""
    import marshal
    import subprocess

    path = marshal.dumps([entry for entry in sys.path if isinstance(entry, str)]).hex()
    # -O, -B, -W, -X ... as the caller got them (what multiprocessing's spawn passes too)
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-c", _BOOT.format(module=module), *map(str, fds), path]


def is_fork(process: WorkerProcess) -> bool:
    """Whether ``process`` was forked (up within milliseconds), not a fresh interpreter."""
    from multitrack.backends._zygote import ZygoteProcess

    return isinstance(process, ForkedProcess | ZygoteProcess)


def release(process: WorkerProcess) -> None:
    """The backend is done with ``process``: a zygote may reap it."""
    done = getattr(process, "release", None)
    if done is not None:
        done()


def _fork(ends: ChildEnds, parent_ends: Sequence[int], limits: dict[str, str]) -> WorkerProcess:
    from multitrack.backends._wire import track_script_classes

    track_script_classes()
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
        with warnings.catch_warnings():
            # Python 3.12+ warns of native threads too (OpenBLAS's pool); refuse_fork has
            # ruled out Python threads, and the user chose this start method.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child; covered by every test that forks a worker
        _remember_command_line()
        become_worker(
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


def _remember_command_line() -> None:  # pragma: no cover - a fork of the caller
    """A ``python -c`` program's functions come by name to a fork of it: their source lines
    for its tracebacks (``_source``)."""
    try:
        from multitrack.backends._source import remember_command_line

        remember_command_line()
    except Exception:
        pass


def become_worker(
    ends: ChildEnds,
    output: tuple[int, int],
    *,
    closing: tuple[int, ...],
    mask: set[int | signal.Signals],
    limits: dict[str, str] | None = None,
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
        for name, value in (limits or {}).items():
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
