"""How workers start (``backends/_start.py``): forked when the caller has a single thread,
fresh interpreters otherwise; the same worker, the same behaviour, either way."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import faults
import multitrack as mt
from multitrack.backends import _platform, _start
from scripts import run_script

needs_fork = pytest.mark.skipif(
    not _platform.CAN_FORK, reason="fork is not used here (MULTITRACK_WITHOUT or not Linux)"
)

# A module no worker imports on its own: a worker has it only when it inherited the caller's.
MARKER = "colorsys"


@needs_fork
def test_workers_fork_when_the_caller_has_a_single_thread() -> None:
    __import__(MARKER)
    assert _start.start_method() == "fork"
    assert mt.map(faults.imported, [MARKER] * 4, workers=2) == [True] * 4


def test_workers_are_fresh_interpreters_while_another_thread_runs() -> None:
    __import__(MARKER)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert _start.start_method() == "spawn"
        assert mt.map(faults.imported, [MARKER] * 4, workers=2) == [False] * 4
    finally:
        stop.set()
        other.join()


def test_the_environment_variable_forces_fresh_interpreters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    __import__(MARKER)
    monkeypatch.setenv(_start.START_METHOD_ENV, "spawn")
    assert mt.map(faults.imported, [MARKER] * 4, workers=2) == [False] * 4


def test_an_unknown_start_method_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_start.START_METHOD_ENV, "forkserver")
    with pytest.raises(ValueError, match="MULTITRACK_START_METHOD='forkserver'"):
        mt.map(abs, [1, 2], workers=2)


def test_the_os_thread_count_sees_native_threads() -> None:
    before = _start.os_threads()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert _start.os_threads() == before + 1
    finally:
        stop.set()
        other.join()


@pytest.mark.usefixtures("each_start_method")
def test_native_thread_caps_reach_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own setting wins
    per_worker = str(max(1, (os.cpu_count() or 1) // 2))
    got = mt.map(faults.environment, ["OMP_NUM_THREADS", "MKL_NUM_THREADS"], workers=2)
    assert got == [per_worker, "3"]


@needs_fork
def test_forked_workers_do_not_share_numpy_random_state() -> None:
    np = pytest.importorskip("numpy")
    np.random.random()  # the caller's global generator exists before the workers start
    draws = mt.map(faults.pid_and_draw, range(40), workers=2, chunksize=1)
    by_pid: dict[int, set[float]] = {}
    for pid, value in draws:
        by_pid.setdefault(pid, set()).add(value)
    assert len(by_pid) == 2, "both workers should have run tasks"
    first, second = by_pid.values()
    assert not first & second, "two workers drew the same numbers"
    assert float(np.random.random()) not in first | second  # nor the caller's next ones


@needs_fork
def test_the_callers_signal_handlers_stay_in_the_caller() -> None:
    # A forked worker starts with the caller's Python handlers; a SIGTERM must kill it as it
    # kills a fresh interpreter, not run the caller's handler there.
    import signal

    ran: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: ran.append(1))
    try:
        [outcome] = mt.map(faults.sigterm_self, [0], workers=1, errors="return")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(outcome, mt.WorkerCrashed)
    assert outcome.signal == "SIGTERM"
    assert not ran


@needs_fork
def test_output_buffered_before_the_fork_is_printed_once(tmp_path: Path) -> None:
    # Without a flush before fork(), a worker's first print would carry the caller's
    # unflushed text along, and it would appear twice.
    stdout = run_script(
        tmp_path,
        """
        import sys, multitrack as mt

        def shout(x):
            print("worker", x)
            return x

        sys.stdout.write("caller-before ")
        print(mt.map(shout, [1, 2], workers=2, chunksize=1))
        """,
        without_env=["PYTHONUNBUFFERED"],
    )
    assert stdout.count("caller-before") == 1, stdout
    assert stdout.count("worker 1") == stdout.count("worker 2") == 1, stdout


@needs_fork
def test_a_forked_worker_never_finalizes_the_callers_garbage(tmp_path: Path) -> None:
    # Garbage the caller had not collected yet is copied into a forked worker; collecting it
    # there would run its finalizer a second time, in the wrong process.
    marker = tmp_path / "finalized-by"

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            marker.write_text(str(os.getpid()))

    assert _start.start_method() == "fork"
    gc.disable()
    try:
        Cycle()
        mt.map(faults.collect_garbage, range(4), workers=2, chunksize=1)
        assert not marker.exists(), f"finalized in pid {marker.read_text()}"
    finally:
        gc.enable()
        gc.collect()
    assert marker.read_text() == str(os.getpid())


@pytest.mark.parametrize("kind", ["forked", "popen"])
def test_waiting_for_an_exit_is_bounded_either_way(kind: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    with open(os.devnull, "rb") as sink:
        if kind == "forked":
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                time.sleep(30)
                os._exit(0)
            process: _start.WorkerProcess = _start.ForkedProcess(pid, sink, sink)
        else:
            process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not _start.exited_within(process, 0.05)
        finally:
            os.kill(process.pid, signal.SIGKILL)
        assert _start.exited_within(process, 10.0)
        assert process.returncode == -signal.SIGKILL


def test_a_fresh_workers_sys_path_is_the_callers_in_the_callers_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_start.START_METHOD_ENV, "spawn")
    [seen] = mt.map(faults.sys_path, [0], workers=1)
    assert seen[: len(sys.path)] == sys.path


SHADOWED = """
import shutil, sys
from pathlib import Path
import multitrack
# A normal install: multitrack in a folder after the standard library, beside a package
# that shadows standard modules (PyPI's `typing` backport does, and kills every worker whose
# sys.path puts that folder first).
site = Path({site!r})
shutil.copytree(Path(multitrack.__file__).parent, site / "multitrack")
for name in ("typing", "queue"):
    (site / f"{{name}}.py").write_text("raise ImportError('the standard library was shadowed')")
for name in [m for m in sys.modules if m == "multitrack" or m.startswith("multitrack.")]:
    del sys.modules[name]
first_site = next(i for i, p in enumerate(sys.path) if "-packages" in p or p.endswith("src"))
sys.path.insert(first_site, str(site))
import multitrack as mt
assert mt.__file__.startswith(str(site)), mt.__file__
print(mt.map(abs, [-1, -2], workers=2))
"""


@pytest.mark.timeout(60)
def test_a_package_that_shadows_the_standard_library_does_not_kill_fresh_workers(
    tmp_path: Path,
) -> None:
    source = SHADOWED.format(site=str(tmp_path / "site"))
    out = run_script(
        tmp_path, f"import os\nos.environ['{_start.START_METHOD_ENV}'] = 'spawn'\n" + source
    )
    assert out.strip() == "[1, 2]"


def test_an_unsupported_platform_is_refused_with_the_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_platform.os, "name", "nt")
    with pytest.raises(RuntimeError, match=r"POSIX.*backend='thread'.*WSL"):
        mt.map(abs, [-1])
    assert mt.map(abs, [-1], backend="thread") == [1]


def test_features_switched_off_by_name_and_unknown_ones_refused(tmp_path: Path) -> None:
    probe = (
        "from multitrack.backends import _platform as p; "
        "print(p.HAS_PIDFD, p.HAS_MEMFD, p.CAN_FORK)"
    )
    env = {**os.environ, _platform.WITHOUT_ENV: "pidfd, fork"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.split()[0::2] == ["False", "False"]
    env[_platform.WITHOUT_ENV] = "pidfd,epoll"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "unknown feature(s) epoll" in done.stderr
