"""Picklable task functions for the tests, good and bad. Workers import this module by name
(the tests directory is on the caller's sys.path, which workers inherit)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def pid_of(_: Any) -> int:
    return os.getpid()


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


def sigkill_on(x: int, bad: int = 3) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault_on(x: int, bad: int = 3) -> int:
    if x == bad:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x


def exit_on(x: int, bad: int = 3) -> int:
    if x == bad:
        os._exit(7)
    return x


def sys_exit_on(x: int, bad: int = 3) -> int:
    if x == bad:
        sys.exit(5)
    return x


def interrupt_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise KeyboardInterrupt
    return x


def sleep_on(x: int, bad: int = 3, seconds: float = 60.0) -> int:
    if x == bad:
        time.sleep(seconds)
    return x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def spawn_grandchild_and_hang(_: Any) -> None:
    """Starts a process of its own, then hangs: a timeout must kill both."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"grandchild {child.pid}", flush=True)
    time.sleep(120)


def return_lock(_: Any) -> Any:
    return threading.Lock()


def lock_on(x: int, bad: int = 3) -> Any:
    return threading.Lock() if x == bad else x


class BadInit(Exception):
    """Cannot be unpickled: its __init__ needs two arguments, pickle gives it one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


def raise_bad_init(x: int) -> int:
    if x == 1:
        raise BadInit("unrebuildable", "second")
    return x


def _refuse_to_load() -> None:
    raise RuntimeError("this argument refuses to be unpickled")


class FailsToUnpickle:
    """Pickles fine in the caller, raises when a worker unpickles it."""

    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


class FailsToPickle:
    def __reduce__(self) -> Any:
        raise TypeError("FailsToPickle refuses to be pickled")


def identity(x: Any) -> Any:
    return x


def type_name(x: Any) -> str:
    return type(x).__name__


_STATE: dict[str, Any] = {}


def set_state(value: Any) -> None:
    _STATE["value"] = value


def read_state(x: Any) -> Any:
    return (_STATE.get("value"), x)


def failing_initializer() -> None:
    raise RuntimeError("initializer exploded")


def noisy(x: int) -> int:
    print(f"worker says {x}")
    print(f"worker warns {x}", file=sys.stderr)
    return x


def flaky(x: int, counter_dir: str, fail_times: int = 2) -> int:
    """Fails (raises) the first ``fail_times`` times it runs for ``x``; counts in files, so
    attempts in different worker processes see each other."""
    path = os.path.join(counter_dir, f"attempts-{x}")
    with open(path, "a") as handle:
        handle.write(".")
    with open(path) as handle:
        runs = len(handle.read())
    if runs <= fail_times:
        raise ConnectionError(f"flaky attempt {runs}")
    return x


def record_pid_and_sleep(seconds: float, pid_dir: str) -> float:
    with open(os.path.join(pid_dir, str(os.getpid())), "w"):
        pass
    time.sleep(seconds)
    return seconds


def hold_the_gil_on(x: Any, bad: int = 0) -> Any:
    """Catastrophic regex backtracking: minutes inside C code that never releases the GIL."""
    import re

    if x == bad:
        re.match(r"(a+)+$", "a" * 40 + "!")
    return x


def array_sum(array: Any) -> float:
    return float(array.sum())


def make_array(i: int) -> Any:
    import numpy as np

    return np.full(1_000_000, float(i))


def nbytes(value: Any) -> int:
    return len(value) if isinstance(value, bytes | bytearray) else int(value.nbytes)


def sigkill_on_array(array: Any) -> float:
    if float(array[0]) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(array.sum())


def logged_runs(log_dir: Any) -> list[tuple[int, int]]:
    """(task index, worker pid) of every run ``sleep_and_log`` recorded in ``log_dir``,
    sorted."""
    runs = (name.split("-") for name in os.listdir(log_dir))
    return sorted((int(index), int(pid)) for index, pid, _ in runs)


def sleep_and_log(task: tuple[int, float], log_dir: str) -> int:
    """Sleeps, and leaves one file per run: a test counts how often each task ran."""
    index, seconds = task
    time.sleep(seconds)
    with open(os.path.join(log_dir, f"{index}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    return index


def fail_on_multiples(x: int, of: int = 7) -> int:
    if x % of == 0:
        raise ValueError(f"{x} is a multiple of {of}")
    return x


def wait_for_file(x: int, path: str, seconds: float = 10.0) -> int:
    """Task 1 waits until ``path`` exists (the test creates it once it saw task 0's
    result), and returns -1 if it never came; any other task returns at once."""
    deadline = time.monotonic() + seconds
    while x == 1 and not os.path.exists(path):
        if time.monotonic() > deadline:
            return -1
        time.sleep(0.01)
    return x


def imported(name: str) -> bool:
    """Whether module ``name`` is loaded in the process running this task."""
    return name in sys.modules


SCALE = 1  # set at run time by a test: seen by forks of the caller only


def scaled(x: int) -> int:
    return x * SCALE


def environment(name: str) -> str | None:
    return os.environ.get(name)


def pid_and_draw(_: Any) -> tuple[int, float]:
    """This worker's pid and a draw from numpy's global generator."""
    import numpy as np

    time.sleep(0.01)  # so that both workers get some of the tasks
    return os.getpid(), float(np.random.random())


def sigterm_self(_: Any) -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    return 0


def collect_garbage(_: Any) -> int:
    import gc

    return gc.collect()


def sys_path(_: Any) -> list[str]:
    return list(sys.path)


def sys_argv(_: Any) -> list[str]:
    return list(sys.argv)


def pid_unless_hang_on(x: int, bad: int = 3, seconds: float = 60.0) -> tuple[int, int]:
    """``(x, pid of the worker that ran it)``; task ``bad`` hangs for ``seconds``."""
    if x == bad:
        time.sleep(seconds)
    return x, os.getpid()


def pid_after_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _log_run(x: Any, log_dir: str) -> None:
    with open(os.path.join(log_dir, f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass


def logged_square(x: int, log_dir: str, bad: int | None = None) -> int:
    """``x * x``, leaving one file per run in ``log_dir``; raises for ``bad``."""
    _log_run(x, log_dir)
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x * x


def logged_square_fixed(x: int, log_dir: str, bad: int | None = None) -> int:
    """``logged_square`` with its bug fixed: a changed function for a checkpoint."""
    _log_run(x, log_dir)
    return x * x


def logged_sleep(x: int, log_dir: str, seconds: float) -> int:
    time.sleep(seconds)
    _log_run(x, log_dir)
    return x * x


def three_kinds_of_failure(x: int) -> int:
    """Fails three ways: ValueError on multiples of 97, KeyError at 500, a crash at 700."""
    if x == 700:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 500:
        raise KeyError(x)
    if x and x % 97 == 0:
        raise ValueError(f"{x} is a multiple of 97")
    return x


def working_directory(_: Any) -> str:
    """The working directory of the process running this task, as the kernel names it (a
    deleted one ends in " (deleted)")."""
    return os.readlink("/proc/self/cwd")


def process_state(_: Any) -> tuple[int, list[int], tuple[int, int]]:
    """The umask, CPUs and open-files limit of the process running this task."""
    import resource

    mask = os.umask(0)
    os.umask(mask)
    return mask, sorted(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_NOFILE)
